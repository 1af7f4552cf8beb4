"""Type-0 header, command/status semantics, BAR sizing and region plumbing.

Rules cited: PCI Local Bus Spec 3.0 §6.1 (header, RO IDs), §6.2.2 (Command), §6.2.3
(Status, RW1C), §6.2.4 (interrupt line/pin), §6.2.5.1 (BAR sizing); reference
vfio-user-qemu.md (what QEMU reads: 256 bytes at 0, ROM BAR at 0x30, extended space).
"""

from __future__ import annotations

import errno
import mmap

import pytest

from devmodel.memory import BusError
from devmodel.pci import Bar, PciFunction, regs
from vfio_user.device import (
    VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_MMAP,
    PciIrq,
    PciRegion,
)

CFG = PciRegion.CONFIG


def rd(dev, offset: int, size: int) -> int:
    return int.from_bytes(dev.region_read(CFG, offset, size), "little")


def wr(dev, offset: int, size: int, value: int) -> None:
    dev.region_write(CFG, offset, value.to_bytes(size, "little"))


class AllBars(PciFunction):
    """One BAR of each kind, a register window, and a RAM area."""

    vendor_id = 0x1AF4
    device_id = 0x10F1
    class_code = 0xFF0000
    revision = 7
    subsystem_vendor_id = 0x1AF4
    subsystem_id = 0x1234

    def realize(self) -> None:
        self.regs_seen: list[tuple[str, int, int, int]] = []
        bar0 = self.add_bar(0, Bar.mem32(0x1000))
        bar0.add_mmio(0, 0x10, self._read, self._write, min_access=4, max_access=4)
        self.add_bar(1, Bar.io(0x20))
        bar2 = self.add_bar(2, Bar.mem64(0x4000, prefetchable=True))
        self.ram = bar2.add_ram(0x2000, 0x1000)
        self.add_bar(4, Bar.mem32(0x100000, prefetchable=True))
        self.scratch = 0

    def _read(self, offset: int, size: int) -> int:
        self.regs_seen.append(("r", offset, size, 0))
        return 0x11223344 if offset == 0 else self.scratch

    def _write(self, offset: int, size: int, value: int) -> None:
        self.regs_seen.append(("w", offset, size, value))
        if offset == 4:
            self.scratch = value


@pytest.fixture
def dev(ctx):
    d = AllBars()
    d.attach(ctx)
    yield d
    d.close()


def test_identity_fields_read_back_and_are_read_only(dev):
    """PCI 3.0 §6.1: Vendor/Device/Revision/Class/Subsystem are read-only."""
    header = dev.region_read(CFG, 0, 256)  # QEMU's first access (reference §"What the client sends")
    assert len(header) == 256
    assert rd(dev, regs.PCI_VENDOR_ID, 2) == 0x1AF4
    assert rd(dev, regs.PCI_DEVICE_ID, 2) == 0x10F1
    assert rd(dev, regs.PCI_REVISION_ID, 1) == 7
    assert rd(dev, regs.PCI_CLASS_PROG, 1) == 0x00
    assert rd(dev, regs.PCI_CLASS_DEVICE, 2) == 0xFF00
    assert rd(dev, regs.PCI_SUBSYSTEM_ID, 2) == 0x1234
    wr(dev, regs.PCI_VENDOR_ID, 4, 0xDEADBEEF)
    wr(dev, regs.PCI_REVISION_ID, 4, 0xFFFFFFFF)
    wr(dev, regs.PCI_SUBSYSTEM_VENDOR_ID, 4, 0)
    assert rd(dev, regs.PCI_VENDOR_ID, 4) == 0x10F11AF4
    assert rd(dev, regs.PCI_REVISION_ID, 4) == 0xFF000007
    assert rd(dev, regs.PCI_SUBSYSTEM_ID, 2) == 0x1234


def test_header_type_and_interrupt_pin_line(dev):
    """§6.2.4: Interrupt Pin RO (INTA=1), Interrupt Line RW scratch; header type 0."""
    assert rd(dev, regs.PCI_HEADER_TYPE, 1) == regs.PCI_HEADER_TYPE_NORMAL
    assert rd(dev, regs.PCI_INTERRUPT_PIN, 1) == 1
    wr(dev, regs.PCI_INTERRUPT_LINE, 2, 0x050B)
    assert rd(dev, regs.PCI_INTERRUPT_LINE, 1) == 0x0B
    assert rd(dev, regs.PCI_INTERRUPT_PIN, 1) == 1


def test_command_write_mask(dev):
    """§6.2.2: only implemented Command bits stick (others hardwired 0 on PCIe)."""
    wr(dev, regs.PCI_COMMAND, 2, 0xFFFF)
    expected = (regs.Command.IO | regs.Command.MEMORY | regs.Command.MASTER | regs.Command.PARITY
                | regs.Command.SERR | regs.Command.INTX_DISABLE)
    assert rd(dev, regs.PCI_COMMAND, 2) == expected


def test_status_w1c_bits_and_read_only_bits(dev):
    """§6.2.3: error bits are RW1C; writing 0 keeps them; CAP_LIST/INTERRUPT are RO."""
    dev.signal_master_abort()
    dev.config.set_bits(regs.PCI_STATUS, 2, regs.Status.SIG_SYSTEM_ERROR)
    wr(dev, regs.PCI_STATUS, 2, 0)
    assert rd(dev, regs.PCI_STATUS, 2) & regs.Status.REC_MASTER_ABORT
    wr(dev, regs.PCI_STATUS, 2, regs.Status.REC_MASTER_ABORT)
    status = rd(dev, regs.PCI_STATUS, 2)
    assert not status & regs.Status.REC_MASTER_ABORT
    assert status & regs.Status.SIG_SYSTEM_ERROR
    wr(dev, regs.PCI_STATUS, 2, regs.Status.INTERRUPT | regs.Status.CAP_LIST)
    assert not rd(dev, regs.PCI_STATUS, 2) & (regs.Status.INTERRUPT | regs.Status.CAP_LIST)


def test_byte_write_into_a_word_register(dev):
    """Config writes are byte-granular: a 1-byte write to COMMAND+1 keeps the low byte."""
    wr(dev, regs.PCI_COMMAND, 2, regs.Command.MEMORY | regs.Command.MASTER)
    wr(dev, regs.PCI_COMMAND + 1, 1, regs.Command.INTX_DISABLE >> 8)
    assert rd(dev, regs.PCI_COMMAND, 2) == regs.Command.MEMORY | regs.Command.MASTER | regs.Command.INTX_DISABLE


def _size_bar(dev, index: int) -> int:
    off = regs.bar_offset(index)
    wr(dev, off, 4, 0xFFFFFFFF)
    return rd(dev, off, 4)


def test_bar_sizing_mem32(dev):
    """§6.2.5.1: writing all-ones returns ~(size-1) with the RO type bits."""
    assert _size_bar(dev, 0) == 0xFFFFF000
    wr(dev, regs.bar_offset(0), 4, 0xFEB01234)
    assert rd(dev, regs.bar_offset(0), 4) == 0xFEB01000
    assert dev.bar_address(0) == 0xFEB01000


def test_bar_sizing_io(dev):
    """§6.2.5.1: I/O BAR has bit 0 set, address from bit 2 up."""
    assert _size_bar(dev, 1) == 0xFFFFFFE1
    wr(dev, regs.bar_offset(1), 4, 0xC040)
    assert rd(dev, regs.bar_offset(1), 4) == 0xC041


def test_bar_sizing_mem64_prefetchable(dev):
    """§6.2.5.1: 64-bit BAR: type 10b + prefetch bit; upper dword all writable."""
    low = _size_bar(dev, 2)
    assert low == 0xFFFFC000 | regs.BarFlag.MEM_TYPE_64 | regs.BarFlag.PREFETCH
    assert _size_bar(dev, 3) == 0xFFFFFFFF
    wr(dev, regs.bar_offset(2), 4, 0x0)
    wr(dev, regs.bar_offset(3), 4, 0x80)
    assert dev.bar_address(2) == 0x80_0000_0000


def test_bar_sizing_large_mem32_prefetchable(dev):
    assert _size_bar(dev, 4) == 0xFFF00000 | regs.BarFlag.PREFETCH


def test_unused_bars_and_rom_read_zero(dev):
    """Unimplemented BARs and the ROM BAR are hardwired 0 (QEMU sizes the ROM at 0x30)."""
    assert _size_bar(dev, 5) == 0
    wr(dev, regs.PCI_ROM_ADDRESS, 4, 0xFFFFFFFF)
    assert rd(dev, regs.PCI_ROM_ADDRESS, 4) == 0
    assert dev.region_info(PciRegion.ROM).size == 0
    assert dev.region_info(PciRegion.BAR3).size == 0  # upper half of BAR2


def test_region_info_reports_sizes_and_sparse_mmap(dev):
    """RegionInfo: config 4 KiB; BAR sizes; memfd + sparse area for the RAM page."""
    assert dev.region_info(CFG).size == 0x1000
    assert dev.region_info(PciRegion.BAR0).size == 0x1000
    info = dev.region_info(PciRegion.BAR2)
    assert info.size == 0x4000
    assert info.flags & VFIO_REGION_INFO_FLAG_MMAP and info.flags & VFIO_REGION_INFO_FLAG_CAPS
    assert info.sparse == [(0x2000, 0x1000)]
    assert info.mmap_fd is not None
    with pytest.raises(OSError) as err:
        dev.region_info(9)
    assert err.value.errno == errno.EINVAL


def test_mmapped_ram_is_shared_with_the_model(dev):
    """A client mapping the sparse area at fd offset = BAR offset sees the model's bytes."""
    info = dev.region_info(PciRegion.BAR2)
    off, size = info.sparse[0]
    mm = mmap.mmap(info.mmap_fd, size, mmap.MAP_SHARED, offset=info.mmap_offset + off)
    try:
        mm[0:4] = b"abcd"
        assert bytes(dev.ram.buf[0:4]) == b"abcd"
        dev.ram.buf[8:12] = b"wxyz"
        assert mm[8:12] == b"wxyz"
        wr(dev, regs.PCI_COMMAND, 2, regs.Command.MEMORY)
        # A trapped access to the same area is served from the same pages.
        assert dev.region_read(PciRegion.BAR2, off, 4) == b"abcd"
    finally:
        mm.close()


def test_memory_decode_gates_bar_accesses(dev):
    """§6.2.2 Memory Space: with decode off the function does not respond (all-ones)."""
    assert dev.region_read(PciRegion.BAR0, 0, 4) == b"\xff" * 4
    dev.region_write(PciRegion.BAR0, 4, b"\x01\x00\x00\x00")
    assert dev.scratch == 0
    wr(dev, regs.PCI_COMMAND, 2, regs.Command.MEMORY)
    assert dev.region_read(PciRegion.BAR0, 0, 4) == (0x11223344).to_bytes(4, "little")
    dev.region_write(PciRegion.BAR0, 4, b"\x01\x00\x00\x00")
    assert dev.scratch == 1


def test_io_decode_is_separate_from_memory(dev):
    wr(dev, regs.PCI_COMMAND, 2, regs.Command.MEMORY)
    assert dev.region_read(PciRegion.BAR1, 0, 1) == b"\xff"
    wr(dev, regs.PCI_COMMAND, 2, regs.Command.IO)
    assert dev.region_read(PciRegion.BAR1, 0, 1) == b"\x00"  # no handler: reads zero


def test_mmio_access_splitting_and_widening(dev):
    """An 8-byte access is split into dwords; a byte write merges into its dword."""
    wr(dev, regs.PCI_COMMAND, 2, regs.Command.MEMORY)
    data = dev.region_read(PciRegion.BAR0, 0, 8)
    assert data[:4] == (0x11223344).to_bytes(4, "little")
    dev.region_write(PciRegion.BAR0, 4, (0xAABBCCDD).to_bytes(4, "little"))
    dev.region_write(PciRegion.BAR0, 5, b"\x11")
    assert dev.scratch == 0xAABB11DD
    assert dev.region_read(PciRegion.BAR0, 6, 1) == b"\xbb"
    writes = [e for e in dev.regs_seen if e[0] == "w"]
    assert all(size == 4 and off % 4 == 0 for _, off, size, _ in writes)


def test_bus_master_enable_gates_dma(dev, guest_ram):
    """§6.2.2 Bus Master: no memory requests while BME is clear."""
    addr = guest_ram.base + 0x100
    with pytest.raises(BusError) as err:
        dev.dma.write(addr, b"x")
    assert "bus master" in err.value.reason
    assert not dev.bus_master
    wr(dev, regs.PCI_COMMAND, 2, regs.Command.MASTER)
    assert dev.bus_master
    dev.dma.write(addr, b"xyz")
    assert guest_ram.read(addr, 3) == b"xyz"
    assert dev.require_bus_master() is guest_ram


def test_dma_without_client_is_a_bus_error(dev):
    wr(dev, regs.PCI_COMMAND, 2, regs.Command.MASTER)
    dev.detach()
    with pytest.raises(BusError):
        dev.dma.read(0, 4)


def test_intx_respects_interrupt_disable(dev, ctx):
    """§6.2.2 Interrupt Disable: no INTx while set; Status.Interrupt still reflects the line;
    clearing the bit with the line high delivers it."""
    ctx.install_eventfd(PciIrq.INTX)
    wr(dev, regs.PCI_COMMAND, 2, regs.Command.INTX_DISABLE)
    dev.set_intx(True)
    assert ctx.fired(PciIrq.INTX) == 0
    assert rd(dev, regs.PCI_STATUS, 2) & regs.Status.INTERRUPT
    wr(dev, regs.PCI_COMMAND, 2, 0)
    assert ctx.fired(PciIrq.INTX) == 1
    dev.set_intx(False)
    assert not rd(dev, regs.PCI_STATUS, 2) & regs.Status.INTERRUPT


def test_intx_level_resignalled_on_unmask(dev, ctx):
    """vfio INTx is level with auto-mask: an unmask while still asserted fires again."""
    ctx.install_eventfd(PciIrq.INTX)
    assert dev.raise_irq() is True
    assert ctx.fired(PciIrq.INTX) == 1
    dev.irqs_changed(PciIrq.INTX)
    assert ctx.fired(PciIrq.INTX) == 1
    dev.set_intx(False)
    dev.irqs_changed(PciIrq.INTX)
    assert ctx.fired(PciIrq.INTX) == 0


def test_irq_info(dev):
    assert dev.irq_info(PciIrq.INTX).count == 1
    assert dev.irq_info(PciIrq.MSIX).count == 0
    assert dev.irq_info(PciIrq.MSI).count == 0
    with pytest.raises(OSError):
        dev.irq_info(7)


def test_function_reset_restores_defaults(dev):
    """PCIe §6.6.2: a function reset returns config to its defaults (BARs, command, line)."""
    wr(dev, regs.PCI_COMMAND, 2, regs.Command.MEMORY | regs.Command.MASTER)
    wr(dev, regs.bar_offset(0), 4, 0xFEB00000)
    wr(dev, regs.PCI_INTERRUPT_LINE, 1, 11)
    dev.signal_master_abort()
    dev.reset()
    assert rd(dev, regs.PCI_COMMAND, 2) == 0
    assert rd(dev, regs.bar_offset(0), 4) == 0
    assert rd(dev, regs.PCI_INTERRUPT_LINE, 1) == 0
    assert rd(dev, regs.PCI_STATUS, 2) == 0
    assert rd(dev, regs.PCI_VENDOR_ID, 2) == 0x1AF4


def test_bar_declaration_errors():
    with pytest.raises(ValueError):
        Bar.mem32(0x1001)
    with pytest.raises(ValueError):
        Bar.io(0x200)

    class Bad(PciFunction):
        def realize(self) -> None:
            self.add_bar(5, Bar.mem64(0x1000))

    with pytest.raises(ValueError):
        Bad()
