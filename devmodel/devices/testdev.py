"""``testdev``: a small PCIe test endpoint built on :mod:`devmodel.pci`.

It exercises every part of the framework end to end (trapped MMIO, an mmappable BAR,
DMA gated by Bus Master Enable, MSI-X/INTx, FLR, ATS/PASID/PRI capabilities) without any
IOMMU logic of its own: its DMA addresses go straight to the client's memory.

Identity
--------
Vendor 0x1af4, device 0x10f0 (subsystem the same): the start of the 0x10f0-0x10ff range
QEMU's PCI ID list sets aside for experimental use without registration. Class 0xff0000
("device does not fit any defined class"), revision 1. INTA.

Capabilities: PCI Express v2 Endpoint (FLR, End-End TLP prefix), MSI-X (4 vectors,
table and PBA in BAR4), ATS, PASID (20 bits, exec + privileged supported), PRI
(capacity 32, PRG Response PASID Required).

BAR0: 32-bit memory, 4 KiB, registers (32-bit; narrower accesses read/merge the dword)
---------------------------------------------------------------------------------------
====== ============= ====== =====================================================
Offset Name          Access Meaning
====== ============= ====== =====================================================
0x00   ID            RO     0x56454454 ("TDEV" in little-endian bytes)
0x04   VERSION       RO     0x00010000 (1.0)
0x08   SCRATCH       RW     free for software; reset 0
0x0C   STATUS        mixed  DONE[0] RW1C, ERROR[1] RW1C, BUSY[8] RO. INTx stays asserted
                            while DONE or ERROR is set (MSI-X is edge-triggered)
0x10   DMA_ADDR_LO   RW     guest physical address of the DMA buffer, low 32 bits
0x14   DMA_ADDR_HI   RW     high 32 bits
0x18   DMA_LEN       RW     bytes, 1..65536
0x1C   DMA_PATTERN   RW     32-bit pattern repeated (little-endian) over the buffer
0x20   DOORBELL      WO     CMD_WRITE[0]: write the pattern; CMD_READBACK[1]: read the
                            buffer back into CHECKSUM. Reads 0. The job's parameters
                            are latched at the doorbell; the DMA runs after the reply.
0x24   CHECKSUM      RO     CRC-32 (zlib) of the bytes last read back
0x28   DMA_COUNT     RO     number of jobs completed without error
0x2C   IRQ_VECTOR    RW     MSI-X vector raised on completion (0..3)
0x30   ERROR_CODE    RO     0 none, 1 bus master disabled, 2 DMA target abort (no memory
                            / client error), 3 bad length, 4 busy, 5 no client
====== ============= ====== =====================================================

Completion (success or error) sets DONE or ERROR, clears BUSY and raises the interrupt:
MSI-X vector IRQ_VECTOR when MSI-X is enabled, else INTx.

BAR2: 64-bit prefetchable memory, 8 KiB
---------------------------------------
* 0x0000-0x0FFF: RAM, memfd-backed and offered as a sparse mmap area (no traps when the
  client maps it).
* 0x1000-0x1FFF: trapped page. 0x1000 RAM_CRC (RO, CRC-32 of the RAM page),
  0x1004 TRAP_COUNT (RO, trapped accesses to this page before this one),
  0x1008 RAM_FILL (WO, fill the RAM page with the low byte).

BAR4: 32-bit memory, 4 KiB: MSI-X table at 0x000, PBA at 0x800.
"""

from __future__ import annotations

import enum
import logging
import zlib
from dataclasses import dataclass

from devmodel.memory import BusError
from devmodel.pci import (
    AtsCapability,
    Bar,
    MsixCapability,
    PasidCapability,
    PciExpressCapability,
    PciFunction,
    PriCapability,
)
from vfio_user.device import DmaError

log = logging.getLogger(__name__)

TESTDEV_VENDOR_ID = 0x1AF4
TESTDEV_DEVICE_ID = 0x10F0
TESTDEV_MAGIC = int.from_bytes(b"TDEV", "little")
TESTDEV_VERSION = 0x00010000
MSIX_VECTORS = 4
MAX_DMA_LEN = 0x10000

REGS_BAR = 0
REGS_SIZE = 0x1000
REGS_WINDOW = 0x100
RAM_BAR = 2
RAM_BAR_SIZE = 0x2000
RAM_SIZE = 0x1000
TRAP_PAGE = 0x1000
MSIX_BAR = 4
MSIX_BAR_SIZE = 0x1000
MSIX_TABLE_OFFSET = 0x000
MSIX_PBA_OFFSET = 0x800


class Reg(enum.IntEnum):
    """BAR0 register offsets."""

    ID = 0x00
    VERSION = 0x04
    SCRATCH = 0x08
    STATUS = 0x0C
    DMA_ADDR_LO = 0x10
    DMA_ADDR_HI = 0x14
    DMA_LEN = 0x18
    DMA_PATTERN = 0x1C
    DOORBELL = 0x20
    CHECKSUM = 0x24
    DMA_COUNT = 0x28
    IRQ_VECTOR = 0x2C
    ERROR_CODE = 0x30


class StatusBit(enum.IntFlag):
    DONE = 0x001
    ERROR = 0x002
    BUSY = 0x100


STATUS_W1C = StatusBit.DONE | StatusBit.ERROR


class Cmd(enum.IntFlag):
    """DOORBELL command bits."""

    WRITE = 0x1
    READBACK = 0x2


class ErrorCode(enum.IntEnum):
    NONE = 0
    BUS_MASTER_DISABLED = 1
    TARGET_ABORT = 2
    BAD_LENGTH = 3
    BUSY = 4
    NO_CLIENT = 5


class TrapReg(enum.IntEnum):
    """BAR2 trapped-page register offsets (from the BAR start)."""

    RAM_CRC = TRAP_PAGE + 0x0
    TRAP_COUNT = TRAP_PAGE + 0x4
    RAM_FILL = TRAP_PAGE + 0x8


@dataclass(frozen=True)
class DmaJob:
    """Parameters latched when the doorbell rang."""

    addr: int
    length: int
    pattern: int
    cmd: Cmd
    vector: int
    generation: int

    def pattern_bytes(self) -> bytes:
        unit = self.pattern.to_bytes(4, "little")
        return (unit * (self.length // 4 + 1))[:self.length]


class TestDevice(PciFunction):
    """The test endpoint; see the module docstring for its register map."""

    __test__ = False  # not a pytest class

    vendor_id = TESTDEV_VENDOR_ID
    device_id = TESTDEV_DEVICE_ID
    class_code = 0xFF0000
    revision = 1
    subsystem_vendor_id = TESTDEV_VENDOR_ID
    subsystem_id = TESTDEV_DEVICE_ID
    interrupt_pin = 1

    def realize(self) -> None:
        self._clear_registers()
        self._generation = 0
        regs_bar = self.add_bar(REGS_BAR, Bar.mem32(REGS_SIZE, name="testdev-regs"))
        regs_bar.add_mmio(0, REGS_WINDOW, self._reg_read, self._reg_write, name="regs",
                          min_access=4, max_access=4)
        ram_bar = self.add_bar(RAM_BAR, Bar.mem64(RAM_BAR_SIZE, prefetchable=True, name="testdev-ram"))
        self.ram = ram_bar.add_ram(0, RAM_SIZE, name="ram")
        ram_bar.add_mmio(TRAP_PAGE, RAM_BAR_SIZE - TRAP_PAGE, self._trap_read, self._trap_write,
                         name="trap", min_access=4, max_access=4)
        self.add_bar(MSIX_BAR, Bar.mem32(MSIX_BAR_SIZE, name="testdev-msix"))
        self.express = self.add_capability(PciExpressCapability(flr=True, ee_prefix=True))
        self.add_capability(MsixCapability(MSIX_VECTORS, MSIX_BAR, MSIX_TABLE_OFFSET, MSIX_BAR, MSIX_PBA_OFFSET))
        self.ats = self.add_ext_capability(AtsCapability())
        self.pasid = self.add_ext_capability(PasidCapability(exec_supported=True, priv_supported=True))
        self.pri = self.add_ext_capability(PriCapability(capacity=32, pasid_required=True))

    def _clear_registers(self) -> None:
        self.scratch = 0
        self.status_reg = 0
        self.dma_addr = 0
        self.dma_len = 0
        self.dma_pattern = 0
        self.checksum = 0
        self.dma_count = 0
        self.irq_vector = 0
        self.error_code = ErrorCode.NONE
        self.trap_count = 0

    def device_reset(self) -> None:
        """Registers back to reset values, RAM cleared, in-flight DMA abandoned."""
        self._clear_registers()
        self._generation += 1
        self.ram.buf[:] = bytes(RAM_SIZE)

    # --- BAR0 ----------------------------------------------------------------------------
    def _reg_read(self, offset: int, size: int) -> int:
        values = {
            Reg.ID: TESTDEV_MAGIC,
            Reg.VERSION: TESTDEV_VERSION,
            Reg.SCRATCH: self.scratch,
            Reg.STATUS: self.status_reg,
            Reg.DMA_ADDR_LO: self.dma_addr & 0xFFFFFFFF,
            Reg.DMA_ADDR_HI: self.dma_addr >> 32,
            Reg.DMA_LEN: self.dma_len,
            Reg.DMA_PATTERN: self.dma_pattern,
            Reg.CHECKSUM: self.checksum,
            Reg.DMA_COUNT: self.dma_count,
            Reg.IRQ_VECTOR: self.irq_vector,
            Reg.ERROR_CODE: self.error_code,
        }
        return values.get(offset, 0)

    def _reg_write(self, offset: int, size: int, value: int) -> None:
        if offset == Reg.SCRATCH:
            self.scratch = value
        elif offset == Reg.STATUS:
            self.status_reg &= ~(value & STATUS_W1C)
            if not self.status_reg & STATUS_W1C:
                self.set_intx(False)
        elif offset == Reg.DMA_ADDR_LO:
            self.dma_addr = (self.dma_addr & ~0xFFFFFFFF) | value
        elif offset == Reg.DMA_ADDR_HI:
            self.dma_addr = (self.dma_addr & 0xFFFFFFFF) | (value << 32)
        elif offset == Reg.DMA_LEN:
            self.dma_len = value
        elif offset == Reg.DMA_PATTERN:
            self.dma_pattern = value
        elif offset == Reg.IRQ_VECTOR:
            self.irq_vector = value % MSIX_VECTORS
        elif offset == Reg.DOORBELL:
            self._doorbell(Cmd(value & (Cmd.WRITE | Cmd.READBACK)))
        else:
            log.warning("guest error: testdev write %#x to read-only/unimplemented %#x", value, offset)

    def _doorbell(self, cmd: Cmd) -> None:
        """Latch a job and schedule it after the reply (DMA never runs in the handler)."""
        if not cmd:
            return
        if self.status_reg & StatusBit.BUSY:
            self._complete(ErrorCode.BUSY)
            return
        if not 1 <= self.dma_len <= MAX_DMA_LEN:
            self._complete(ErrorCode.BAD_LENGTH)
            return
        if self.ctx is None:
            self._complete(ErrorCode.NO_CLIENT)
            return
        job = DmaJob(self.dma_addr, self.dma_len, self.dma_pattern, cmd, self.irq_vector, self._generation)
        self.status_reg |= StatusBit.BUSY
        log.info("testdev: doorbell %s addr=%#x len=%d", cmd, job.addr, job.length)
        self.ctx.call_soon(lambda: self._run(job))

    def _run(self, job: DmaJob) -> None:
        """Worker: do the DMA, then report completion."""
        if job.generation != self._generation:
            log.info("testdev: DMA job dropped by a reset")
            return
        try:
            if job.cmd & Cmd.WRITE:
                self.dma.write(job.addr, job.pattern_bytes())
            if job.cmd & Cmd.READBACK:
                self.checksum = zlib.crc32(self.dma.read(job.addr, job.length))
        except BusError as exc:
            log.info("testdev: DMA failed: %s", exc)
            code = ErrorCode.BUS_MASTER_DISABLED if not self.bus_master else ErrorCode.TARGET_ABORT
            if code is ErrorCode.TARGET_ABORT:
                self.signal_master_abort()
            self._complete(code, job.vector)
            return
        except DmaError as exc:
            log.info("testdev: client refused DMA: %s", exc)
            self.signal_master_abort()
            self._complete(ErrorCode.TARGET_ABORT, job.vector)
            return
        if job.generation != self._generation:
            return
        self.dma_count += 1
        self._complete(ErrorCode.NONE, job.vector)

    def _complete(self, code: ErrorCode, vector: int | None = None) -> None:
        self.status_reg &= ~StatusBit.BUSY
        self.error_code = code
        self.status_reg |= StatusBit.DONE if code is ErrorCode.NONE else StatusBit.ERROR
        log.info("testdev: job complete, error=%s", code.name)
        self.raise_irq(self.irq_vector if vector is None else vector)

    # --- BAR2 trapped page ------------------------------------------------------------------
    def _trap_read(self, offset: int, size: int) -> int:
        absolute = offset + TRAP_PAGE
        value = 0
        if absolute == TrapReg.RAM_CRC:
            value = zlib.crc32(self.ram.buf)
        elif absolute == TrapReg.TRAP_COUNT:
            value = self.trap_count
        self.trap_count += 1
        return value

    def _trap_write(self, offset: int, size: int, value: int) -> None:
        self.trap_count += 1
        if offset + TRAP_PAGE == TrapReg.RAM_FILL:
            self.ram.buf[:] = bytes([value & 0xFF]) * RAM_SIZE


def create_device() -> TestDevice:
    """Factory used by ``devmodel serve --device testdev``."""
    return TestDevice()
