"""A small device and fixtures for the vfio-user conformance suite.

:class:`VfuTestDevice` implements :class:`vfio_user.device.VfioUserDevice` directly (not
through the PCI framework) so the transport is tested on its own:

- region 7: 4 KiB PCIe config space with PCIe, MSI-X capabilities and extended ATS,
  PASID, PRI capabilities (for ``devmodel inspect``);
- BAR0: 8 KiB; page 0 trapped registers, page 1 a sparse-mmap memfd area;
- IRQs: INTx 1, MSI 0 (to test "zero vectors"), MSI-X 4, ERR 1, REQ 1;
- a tiny DMA engine: writing DMA_CMD schedules work with ``ctx.call_soon`` that copies
  DMA_LEN bytes from DMA_SRC to DMA_DST and raises MSI-X vector 0.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator

import pytest

from devmodel.memory import BusError
from vfio_user.client import Client
from vfio_user.device import (
    NUM_PCI_IRQS,
    VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_INFO_MASKABLE,
    VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
    DmaFromHandlerError,
    IrqInfo,
    PciIrq,
    PciRegion,
    RegionInfo,
    VfioUserDevice,
)
from vfio_user.server import Server

VENDOR_ID = 0x1DE5
DEVICE_ID = 0x7E57
CLASS_CODE = 0x088000  # system peripheral, other
BAR0_SIZE = 0x2000
BAR0_MMAP_OFFSET = 0x1000
BAR0_MMAP_SIZE = 0x1000
CONFIG_SIZE = 0x1000
MSIX_COUNT = 4

# BAR0 registers (little-endian u64 each).
REG_SCRATCH = 0x00
REG_DMA_SRC = 0x08
REG_DMA_DST = 0x10
REG_DMA_LEN = 0x18
REG_DMA_CMD = 0x20  # write 1: copy SRC->DST; 2: DMA from inside the handler (forbidden)
REG_DMA_STATUS = 0x28  # 0 idle, 1 done, 2 bus error, 3 DMA-from-handler refused
REG_RESETS = 0x30

DMA_CMD_COPY = 1
DMA_CMD_IN_HANDLER = 2
DMA_STATUS_DONE = 1
DMA_STATUS_BUS_ERROR = 2
DMA_STATUS_REFUSED = 3


def _build_config() -> bytearray:
    """Config space with a standard and an extended capability list."""
    c = bytearray(CONFIG_SIZE)
    c[0x00:0x02] = VENDOR_ID.to_bytes(2, "little")
    c[0x02:0x04] = DEVICE_ID.to_bytes(2, "little")
    c[0x06:0x08] = (0x0010).to_bytes(2, "little")  # status: capability list
    c[0x08] = 0x01  # revision
    c[0x09:0x0C] = CLASS_CODE.to_bytes(3, "little")
    c[0x10:0x14] = (0x0000_0000).to_bytes(4, "little")  # BAR0 32-bit memory
    c[0x34] = 0x40
    c[0x3D] = 0x01  # INTA
    # PCIe capability at 0x40 (endpoint), next 0x70
    c[0x40], c[0x41] = 0x10, 0x70
    c[0x42:0x44] = (0x0002).to_bytes(2, "little")
    # MSI-X at 0x70: table size 4 (N-1), table BAR0 0x800, PBA BAR0 0xC00
    c[0x70], c[0x71] = 0x11, 0x00
    c[0x72:0x74] = (MSIX_COUNT - 1).to_bytes(2, "little")
    c[0x74:0x78] = (0x800).to_bytes(4, "little")
    c[0x78:0x7C] = (0xC00).to_bytes(4, "little")
    # Extended: ATS at 0x100 -> PASID at 0x110 -> PRI at 0x120
    c[0x100:0x104] = (0x000F | (1 << 16) | (0x110 << 20)).to_bytes(4, "little")
    c[0x110:0x114] = (0x001B | (1 << 16) | (0x120 << 20)).to_bytes(4, "little")
    c[0x120:0x124] = (0x0013 | (1 << 16) | (0 << 20)).to_bytes(4, "little")
    return c


class VfuTestDevice(VfioUserDevice):
    """See the module docstring."""

    def __init__(self) -> None:
        self.config = _build_config()
        self.regs = bytearray(0x1000)
        self.mem_fd = os.memfd_create("vfu-test-bar0", os.MFD_CLOEXEC)
        os.ftruncate(self.mem_fd, BAR0_SIZE)
        self.mem = mmap.mmap(self.mem_fd, BAR0_SIZE, flags=mmap.MAP_SHARED)
        self.ctx = None
        self.events: list[str] = []
        self.irq_changes: list[int] = []
        self.dma_changes = 0
        self.resets = 0
        self.writes: list[tuple[int, int, bytes]] = []
        self.dma_done = threading.Event()
        self.dma_error: BaseException | None = None

    # -- VfioUserDevice -----------------------------------------------------------------

    def region_info(self, index: int) -> RegionInfo:
        rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
        if index == PciRegion.CONFIG:
            return RegionInfo(size=CONFIG_SIZE, flags=rw)
        if index == PciRegion.BAR0:
            return RegionInfo(size=BAR0_SIZE, flags=rw, mmap_fd=self.mem_fd,
                              sparse=[(BAR0_MMAP_OFFSET, BAR0_MMAP_SIZE)])
        return RegionInfo()

    def irq_info(self, index: int) -> IrqInfo:
        counts = {PciIrq.INTX: 1, PciIrq.MSI: 0, PciIrq.MSIX: MSIX_COUNT, PciIrq.ERR: 1, PciIrq.REQ: 1}
        flags = VFIO_IRQ_INFO_EVENTFD | (VFIO_IRQ_INFO_MASKABLE if index == PciIrq.INTX else 0)
        return IrqInfo(count=counts[PciIrq(index)], flags=flags)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == PciRegion.CONFIG:
            return bytes(self.config[offset:offset + count])
        if index == PciRegion.BAR0:
            if offset >= BAR0_MMAP_OFFSET:
                return self.mem[offset:offset + count]
            return bytes(self.regs[offset:offset + count])
        raise OSError(22, "no such region")

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self.writes.append((index, offset, bytes(data)))
        if index == PciRegion.CONFIG:
            return  # read-only config in this test device
        if offset >= BAR0_MMAP_OFFSET:
            self.mem[offset:offset + len(data)] = data
            return
        self.regs[offset:offset + len(data)] = data
        if offset == REG_DMA_CMD:
            self._doorbell(int.from_bytes(data, "little"))

    def reset(self) -> None:
        self.resets += 1
        self.regs[:] = bytes(len(self.regs))
        self.regs[REG_RESETS:REG_RESETS + 8] = self.resets.to_bytes(8, "little")

    def attach(self, ctx) -> None:
        self.ctx = ctx
        self.events.append("attach")

    def detach(self) -> None:
        self.ctx = None
        self.events.append("detach")

    def irqs_changed(self, index: int) -> None:
        self.irq_changes.append(index)

    def dma_changed(self) -> None:
        self.dma_changes += 1

    # -- the DMA engine -----------------------------------------------------------------

    def reg(self, off: int) -> int:
        return int.from_bytes(self.regs[off:off + 8], "little")

    def _set_status(self, value: int) -> None:
        self.regs[REG_DMA_STATUS:REG_DMA_STATUS + 8] = value.to_bytes(8, "little")

    def _doorbell(self, cmd: int) -> None:
        ctx = self.ctx
        if cmd == DMA_CMD_IN_HANDLER:
            try:
                ctx.dma.read(self.reg(REG_DMA_SRC), 8)
            except DmaFromHandlerError as exc:
                self.dma_error = exc
                self._set_status(DMA_STATUS_REFUSED)
            return
        if cmd != DMA_CMD_COPY:
            return
        src, dst, n = self.reg(REG_DMA_SRC), self.reg(REG_DMA_DST), self.reg(REG_DMA_LEN)
        self.dma_done.clear()

        def work() -> None:
            try:
                ctx.dma.write(dst, ctx.dma.read(src, n))
                self._set_status(DMA_STATUS_DONE)
                ctx.trigger_irq(PciIrq.MSIX, 0)
            except BusError as exc:
                self.dma_error = exc
                self._set_status(DMA_STATUS_BUS_ERROR)
            finally:
                self.dma_done.set()

        ctx.call_soon(work)

    def close(self) -> None:
        self.mem.close()
        os.close(self.mem_fd)


assert NUM_PCI_IRQS == 5


class VfuEnv:
    """A running server with one test device."""

    def __init__(self, path: str, server: Server, device: VfuTestDevice) -> None:
        self.path = path
        self.server = server
        self.device = device

    def client(self, negotiate: bool = True, **kw) -> Client:
        c = Client(self.path, **kw)
        if negotiate:
            c.negotiate()
        return c


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vfu")  # short: AF_UNIX paths are limited to 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def vfu(sockdir: str) -> Iterator[VfuEnv]:
    device = VfuTestDevice()
    server = Server(dma_timeout=5.0)
    path = os.path.join(sockdir, "ep0.sock")
    server.add_device(path, device)
    server.start_in_thread()
    yield VfuEnv(path, server, device)
    server.stop()
    device.close()


@pytest.fixture
def client(vfu: VfuEnv) -> Iterator[Client]:
    c = vfu.client()
    yield c
    c.close()


def fd_closed_by_peer(read_end: int, timeout: float = 2.0) -> bool:
    """True when every write end of the pipe is closed (EOF after draining)."""
    import select
    deadline = timeout
    while True:
        r, _, _ = select.select([read_end], [], [], deadline)
        if not r:
            return False
        if os.read(read_end, 4096) == b"":
            return True


@pytest.fixture
def tdev():
    """This module, so tests reach the test device's constants and helpers by name."""
    import sys
    return sys.modules[__name__]
