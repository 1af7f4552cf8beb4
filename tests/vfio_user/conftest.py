"""A small device and fixtures for the vfio-user conformance suite.

:class:`VfuTestDevice` implements :class:`vfio_user.device.VfioUserDevice` directly (not
through the PCI framework) so the transport is tested on its own:

- region 7: 4 KiB PCIe config space with PCIe, MSI-X capabilities and extended ATS,
  PASID, PRI capabilities (for ``devmodel inspect``);
- BAR0: 8 KiB; page 0 trapped registers, page 1 a sparse-mmap memfd area;
- IRQs: INTx 1, MSI 0 (to test "zero vectors"), MSI-X 4, ERR 1, REQ 1;
- a tiny DMA engine: writing DMA_CMD schedules work with ``ctx.call_soon`` that copies
  DMA_LEN bytes from DMA_SRC to DMA_DST and raises MSI-X vector 0.

The ``vfu`` fixture is parametrized by server backend (``python``, ``libvfio-user``; see
vfio_user/backend.py): every conformance case runs against both. The libvfio-user
variants skip with the reason when the library is absent (point ``LIBVFIO_USER`` at a
build). Cases where the reference library deliberately or knowingly behaves differently
are listed in :data:`LIBVFIO_USER_DIFFERENCES` and marked strict-xfail for that backend
only, so our server's expectation stays as strict as before and a change in the library
shows up as an XPASS failure; each entry is explained in docs/backends.md.
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
from vfio_user.backend import BACKENDS, LIBVFIO_USER, create_server, unavailable_reason
from vfio_user.libvfio_user import LIB_ENV

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

    def __init__(self, path: str, server, device: VfuTestDevice, backend: str) -> None:
        self.path = path
        self.server = server
        self.device = device
        self.backend = backend

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


def backend_skip_reason(backend: str) -> str | None:
    """One-line skip reason when ``backend`` cannot run here, else None."""
    reason = unavailable_reason(backend)
    if reason is None:
        return None
    tried = [line.strip() for line in reason.splitlines() if line.startswith("  ")]
    return (f"{backend} backend unavailable: library not loadable (tried {'; '.join(tried)}); "
            f"set {LIB_ENV}=/path/to/libvfio-user.so.0 to run these cases")


@pytest.fixture(params=BACKENDS)
def vfu_backend(request) -> str:
    """The server backend under test; skips the case when its library is missing."""
    reason = backend_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture
def vfu(sockdir: str, vfu_backend: str) -> Iterator[VfuEnv]:
    device = VfuTestDevice()
    server = create_server(vfu_backend, dma_timeout=5.0)
    path = os.path.join(sockdir, "ep0.sock")
    server.add_device(path, device)
    server.start_in_thread()
    yield VfuEnv(path, server, device, vfu_backend)
    server.stop()
    device.close()


#: Conformance cases (test function name, optionally with its own parameter id) where
#: libvfio-user differs from our server; value: the short reason (docs/backends.md has
#: the details). Marked strict xfail for the libvfio-user variant only.
LIBVFIO_USER_DIFFERENCES: dict[str, str] = {
    # VERSION and connection handling
    "test_negotiation_reply_is_version_0_0_with_nul_terminated_json":
        "replies min(client minor, 2), not 0.0; no write_multiple capability",
    "test_request_before_version_is_einval": "closes the connection after a failed negotiation",
    "test_bad_versions_are_einval_and_connection_survives":
        "closes the connection after a failed negotiation",
    "test_fds_on_rejected_version_are_closed": "closes the connection after a failed negotiation",
    "test_fuzz_burst_then_well_formed_request":
        "a rejected oversized header leaves its body on the stream (desynchronised)",
    "test_write_multi": "REGION_WRITE_MULTI not implemented (EINVAL)",
    "test_device_feature_not_supported": "DEVICE_FEATURE without migration is EINVAL, not ENOTSUP",
    # DMA_MAP validation
    "test_overlap_is_einval_identical_remap_accepted":
        "a re-map of the same range without the fd is EINVAL",
    "test_zero_size_is_einval": "accepts a zero-sized DMA_MAP",
    "test_fd_smaller_than_map_is_einval": "maps past the end of the fd (SIGBUS risk on access)",
    "test_two_fds_einval_and_both_closed": "uses the first fd (mmap of a pipe: EACCES)",
    # Server-to-client DMA messages
    "test_fd_less_copy_served_by_messages":
        "expects addr/count echoed in the DMA_WRITE reply; a bare-header reply fails",
    "test_late_dma_answer_while_requests_continue":
        "one socket, synchronous DMA: a request arriving before the DMA reply breaks it",
    "test_chunked_by_client_max_data_xfer_size":
        "sends one DMA chunk at a time and waits for its reply",
    # IRQs
    "test_irq_info": "never reports VFIO_IRQ_INFO_MASKABLE",
    "test_msix_eventfds_in_chunks_and_trigger":
        "no callback for eventfd assignment, so irqs_changed() is not called",
    "test_eventfd_without_fds_deassigns":
        "DATA_EVENTFD without fds closes vectors [start, count), not [start, start+count)",
    "test_unmask_eventfd_unmasks_when_written": "ACTION_UNMASK with an eventfd is not supported",
    "test_invalid_set_irqs_einval[2-97-0-1]": "unknown SET_IRQS flag bits are ignored",
    "test_argsz_must_match_payload": "SET_IRQS argsz larger than the payload is accepted",
    "test_intx_msix_mutually_exclusive": "INTx/MSI/MSI-X exclusivity is not enforced",
    "test_err_and_req_eventfds": "the library API cannot trigger the ERR/REQ eventfds",
}


def pytest_collection_modifyitems(config, items) -> None:
    """Mark the known libvfio-user differences on that backend's variants only."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or callspec.params.get("vfu_backend") != LIBVFIO_USER:
            continue
        own = item.name.split("[", 1)[0]
        rest = callspec.id.replace(LIBVFIO_USER, "").replace("--", "-").strip("-")
        for key in ([f"{own}[{rest}]"] if rest else []) + [own]:
            reason = LIBVFIO_USER_DIFFERENCES.get(key)
            if reason:
                item.add_marker(pytest.mark.xfail(reason=f"libvfio-user: {reason}", strict=True))
                break


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
