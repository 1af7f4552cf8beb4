"""The ``testdev`` endpoint: register behaviour, DMA, interrupts, mmappable BAR, reset.

Register semantics are the ones documented in :mod:`devmodel.devices.testdev`. Bus
Master gating follows PCI 3.0 §6.2.2; the MSI-X/INTx choice follows reference
smmuv3-pcie.md §8.2; "reply first, DMA after" is vfio-user-qemu.md's server-to-client
DMA rule. The last tests run the device behind the real vfio-user server and client.
"""

from __future__ import annotations

import mmap
import os
import select
import tempfile
import zlib

import pytest

from devmodel.devices import testdev as td
from devmodel.pci import regs
from vfio_user.device import PciIrq, PciRegion

CFG = PciRegion.CONFIG
BAR0 = PciRegion.BAR0
BAR2 = PciRegion.BAR2
BUF = 0x4000_1000  # inside the conftest guest RAM window


def rd(dev, offset: int, size: int) -> int:
    return int.from_bytes(dev.region_read(CFG, offset, size), "little")


def wr(dev, offset: int, size: int, value: int) -> None:
    dev.region_write(CFG, offset, value.to_bytes(size, "little"))


def reg(dev, r: int) -> int:
    return int.from_bytes(dev.region_read(BAR0, r, 4), "little")


def setreg(dev, r: int, value: int) -> None:
    dev.region_write(BAR0, r, value.to_bytes(4, "little"))


@pytest.fixture
def dev(ctx):
    d = td.TestDevice()
    d.attach(ctx)
    wr(d, regs.PCI_COMMAND, 2, regs.Command.MEMORY | regs.Command.MASTER)
    yield d
    d.close()


def program_dma(dev, addr: int, length: int, pattern: int) -> None:
    setreg(dev, td.Reg.DMA_ADDR_LO, addr & 0xFFFFFFFF)
    setreg(dev, td.Reg.DMA_ADDR_HI, addr >> 32)
    setreg(dev, td.Reg.DMA_LEN, length)
    setreg(dev, td.Reg.DMA_PATTERN, pattern)


def test_identity_and_capabilities(dev):
    assert rd(dev, regs.PCI_VENDOR_ID, 2) == td.TESTDEV_VENDOR_ID
    assert rd(dev, regs.PCI_DEVICE_ID, 2) == td.TESTDEV_DEVICE_ID
    assert rd(dev, regs.PCI_CLASS_DEVICE, 2) == 0xFF00
    assert dev.find_capability(regs.CapId.EXP) and dev.find_capability(regs.CapId.MSIX)
    for cap_id in (regs.ExtCapId.ATS, regs.ExtCapId.PASID, regs.ExtCapId.PRI):
        assert dev.find_ext_capability(cap_id) is not None
    assert dev.region_info(PciRegion.BAR0).size == td.REGS_SIZE
    info = dev.region_info(PciRegion.BAR2)
    assert info.size == td.RAM_BAR_SIZE and info.sparse == [(0, td.RAM_SIZE)]
    assert rd(dev, regs.bar_offset(2), 4) & 0xF == regs.BarFlag.MEM_TYPE_64 | regs.BarFlag.PREFETCH
    assert dev.irq_info(PciIrq.MSIX).count == td.MSIX_VECTORS


def test_id_version_scratch(dev):
    assert reg(dev, td.Reg.ID) == td.TESTDEV_MAGIC
    assert dev.region_read(BAR0, td.Reg.ID, 4) == b"TDEV"
    assert reg(dev, td.Reg.VERSION) == td.TESTDEV_VERSION
    setreg(dev, td.Reg.SCRATCH, 0xCAFEF00D)
    assert reg(dev, td.Reg.SCRATCH) == 0xCAFEF00D
    setreg(dev, td.Reg.ID, 0)  # read-only
    assert reg(dev, td.Reg.ID) == td.TESTDEV_MAGIC
    assert reg(dev, td.Reg.DOORBELL) == 0


def test_dma_write_and_readback_with_msix(dev, ctx, guest_ram):
    """Doorbell: DMA is scheduled (not done in the handler), then MSI-X IRQ_VECTOR fires."""
    ctx.install_eventfd(PciIrq.MSIX, 2)
    wr(dev, dev.msix.offset + regs.PCI_MSIX_FLAGS, 2, regs.PCI_MSIX_FLAGS_ENABLE)
    program_dma(dev, BUF, 10, 0x44332211)
    setreg(dev, td.Reg.IRQ_VECTOR, 2)
    setreg(dev, td.Reg.DOORBELL, td.Cmd.WRITE | td.Cmd.READBACK)
    assert reg(dev, td.Reg.STATUS) == td.StatusBit.BUSY
    assert guest_ram.read(BUF, 10) == bytes(10)  # nothing before the reply went out
    assert ctx.run_pending() == 1
    expected = bytes.fromhex("11223344112233441122")
    assert guest_ram.read(BUF, 10) == expected
    assert reg(dev, td.Reg.STATUS) == td.StatusBit.DONE
    assert reg(dev, td.Reg.CHECKSUM) == zlib.crc32(expected)
    assert reg(dev, td.Reg.DMA_COUNT) == 1
    assert reg(dev, td.Reg.ERROR_CODE) == td.ErrorCode.NONE
    assert ctx.fired(PciIrq.MSIX, 2) == 1
    setreg(dev, td.Reg.STATUS, td.StatusBit.DONE)
    assert reg(dev, td.Reg.STATUS) == 0


def test_readback_only_checksums_guest_memory(dev, ctx, guest_ram):
    guest_ram.write(BUF, b"hello world")
    program_dma(dev, BUF, 11, 0)
    setreg(dev, td.Reg.DOORBELL, td.Cmd.READBACK)
    ctx.run_pending()
    assert reg(dev, td.Reg.CHECKSUM) == zlib.crc32(b"hello world")
    assert guest_ram.read(BUF, 11) == b"hello world"


def test_dma_completion_uses_intx_when_msix_off(dev, ctx):
    """Completion asserts INTx; clearing STATUS.DONE (W1C) deasserts it."""
    ctx.install_eventfd(PciIrq.INTX)
    program_dma(dev, BUF, 4, 1)
    setreg(dev, td.Reg.DOORBELL, td.Cmd.WRITE)
    ctx.run_pending()
    assert ctx.fired(PciIrq.INTX) == 1
    assert dev.intx_level and rd(dev, regs.PCI_STATUS, 2) & regs.Status.INTERRUPT
    setreg(dev, td.Reg.STATUS, td.StatusBit.DONE)
    assert not dev.intx_level and not rd(dev, regs.PCI_STATUS, 2) & regs.Status.INTERRUPT


def test_dma_blocked_without_bus_master(dev, ctx, guest_ram):
    """PCI 3.0 §6.2.2: no DMA with BME clear: error 1, memory untouched."""
    wr(dev, regs.PCI_COMMAND, 2, regs.Command.MEMORY)
    program_dma(dev, BUF, 4, 0xFFFFFFFF)
    setreg(dev, td.Reg.DOORBELL, td.Cmd.WRITE)
    ctx.run_pending()
    assert guest_ram.read(BUF, 4) == bytes(4)
    assert reg(dev, td.Reg.STATUS) == td.StatusBit.ERROR
    assert reg(dev, td.Reg.ERROR_CODE) == td.ErrorCode.BUS_MASTER_DISABLED


def test_dma_to_unbacked_address_is_a_target_abort(dev, ctx):
    program_dma(dev, 0x1000, 4, 1)
    setreg(dev, td.Reg.DOORBELL, td.Cmd.WRITE)
    ctx.run_pending()
    assert reg(dev, td.Reg.ERROR_CODE) == td.ErrorCode.TARGET_ABORT
    assert rd(dev, regs.PCI_STATUS, 2) & regs.Status.REC_MASTER_ABORT


def test_bad_length_and_busy(dev, ctx):
    program_dma(dev, BUF, 0, 1)
    setreg(dev, td.Reg.DOORBELL, td.Cmd.WRITE)
    assert reg(dev, td.Reg.ERROR_CODE) == td.ErrorCode.BAD_LENGTH
    setreg(dev, td.Reg.DMA_LEN, td.MAX_DMA_LEN + 1)
    setreg(dev, td.Reg.DOORBELL, td.Cmd.WRITE)
    assert reg(dev, td.Reg.ERROR_CODE) == td.ErrorCode.BAD_LENGTH
    setreg(dev, td.Reg.DMA_LEN, 4)
    setreg(dev, td.Reg.DOORBELL, td.Cmd.WRITE)
    setreg(dev, td.Reg.DOORBELL, td.Cmd.WRITE)
    assert reg(dev, td.Reg.ERROR_CODE) == td.ErrorCode.BUSY
    ctx.run_pending()
    assert reg(dev, td.Reg.DMA_COUNT) == 1


def test_reset_drops_inflight_dma_and_clears_registers(dev, ctx, guest_ram):
    setreg(dev, td.Reg.SCRATCH, 5)
    program_dma(dev, BUF, 4, 0x01010101)
    setreg(dev, td.Reg.DOORBELL, td.Cmd.WRITE)
    dev.reset()
    ctx.run_pending()
    assert guest_ram.read(BUF, 4) == bytes(4)
    assert not dev.bus_master
    wr(dev, regs.PCI_COMMAND, 2, regs.Command.MEMORY)
    assert reg(dev, td.Reg.SCRATCH) == 0 and reg(dev, td.Reg.STATUS) == 0


def test_bar2_ram_and_trapped_page(dev):
    """BAR2 page 0 is shared memfd RAM; page 1 traps: RAM_CRC, TRAP_COUNT, RAM_FILL."""
    info = dev.region_info(PciRegion.BAR2)
    mm = mmap.mmap(info.mmap_fd, td.RAM_SIZE, mmap.MAP_SHARED, offset=info.mmap_offset)
    try:
        mm[0:5] = b"bytes"
        crc = int.from_bytes(dev.region_read(BAR2, td.TrapReg.RAM_CRC, 4), "little")
        assert crc == zlib.crc32(bytes(mm))
        dev.region_write(BAR2, td.TrapReg.RAM_FILL, b"\x5a\x00\x00\x00")
        assert mm[:4] == b"ZZZZ" and mm[td.RAM_SIZE - 1] == 0x5A
        count = int.from_bytes(dev.region_read(BAR2, td.TrapReg.TRAP_COUNT, 4), "little")
        assert count == 2
    finally:
        mm.close()


# --- behind the real vfio-user server ---------------------------------------------------------
@pytest.fixture
def served():
    from vfio_user.client import Client
    from vfio_user.server import Server

    tmp = tempfile.mkdtemp(prefix="pci-testdev-")
    path = os.path.join(tmp, "testdev.sock")
    server = Server()
    device = td.TestDevice()
    server.add_device(path, device)
    server.start_in_thread()
    client = Client(path, timeout=5.0)
    try:
        client.negotiate()
        yield client, device, path
    finally:
        client.close()
        server.stop()
        device.close()
        os.rmdir(tmp)


def _wait_readable(fd: int, timeout: float = 5.0) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r)


def test_served_socket_mode_and_config_space(served):
    """Server sockets are private (0600); QEMU's first read is 256 bytes at 0; extended
    config at 0x100 is served (vfio-user-qemu.md items 6)."""
    client, device, path = served
    assert os.stat(path).st_mode & 0o777 == 0o600
    header = client.region_read(CFG, 0, 256)
    assert int.from_bytes(header[0:2], "little") == td.TESTDEV_VENDOR_ID
    ext = int.from_bytes(client.region_read(CFG, 0x100, 4), "little")
    assert regs.ext_cap_fields(ext)[0] == regs.ExtCapId.ATS
    info = client.region_info(PciRegion.BAR2)
    assert info.sparse == [(0, td.RAM_SIZE)] and len(info.fds) == 1
    for fd in info.fds:
        os.close(fd)


def test_served_dma_and_msix(served):
    """End to end: BME + MSI-X via SET_IRQS eventfd, doorbell, DMA into client memfd RAM."""
    from vfio_user.protocol import IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD

    client, device, _ = served
    ram = client.map_memory(0x8000_0000, 0x10000)
    cmd = (regs.Command.MEMORY | regs.Command.MASTER).to_bytes(2, "little")
    client.region_write(CFG, regs.PCI_COMMAND, cmd)
    msix_ctrl = device.msix.offset + regs.PCI_MSIX_FLAGS
    client.region_write(CFG, msix_ctrl, regs.PCI_MSIX_FLAGS_ENABLE.to_bytes(2, "little"))
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        client.set_irqs(PciIrq.MSIX, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 1, [efd])
        for r, v in ((td.Reg.DMA_ADDR_LO, 0x8000_0100), (td.Reg.DMA_ADDR_HI, 0), (td.Reg.DMA_LEN, 64),
                     (td.Reg.DMA_PATTERN, 0xA5A5A5A5)):
            client.region_write(BAR0, r, v.to_bytes(4, "little"))
        client.region_write(BAR0, td.Reg.DOORBELL, int(td.Cmd.WRITE | td.Cmd.READBACK).to_bytes(4, "little"))
        assert _wait_readable(efd), "no MSI-X after the DMA"
        assert os.eventfd_read(efd) == 1
        assert bytes(ram[0x100:0x140]) == b"\xa5" * 64
        status = int.from_bytes(client.region_read(BAR0, td.Reg.STATUS, 4), "little")
        assert status == td.StatusBit.DONE
        crc = int.from_bytes(client.region_read(BAR0, td.Reg.CHECKSUM, 4), "little")
        assert crc == zlib.crc32(b"\xa5" * 64)
    finally:
        os.close(efd)
