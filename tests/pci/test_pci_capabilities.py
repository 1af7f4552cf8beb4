"""Capability lists, the PCI Express capability, MSI-X and MSI.

Rules cited: reference smmuv3-pcie.md §8.1 (Status.CAP_LIST, pointer at 0x34, v2 PCIe
cap of 0x3C bytes, extended header ID/Version/Next, header at 0x100, DevCap2 bit 21),
§8.2 (MSI-X registers, table entries, PBA, sending rule); PCIe Base Spec §6.6.2 (FLR),
§7.5.3.4 (Initiate FLR reads 0); PCI 3.0 §6.8.1 (MSI); vfio-user-qemu.md item 7 (QEMU
emulates the MSI-X table and sends SET_IRQS per unmasked vector).
"""

from __future__ import annotations

import pytest

from devmodel.pci import (
    AtsCapability,
    Bar,
    MsiCapability,
    MsixCapability,
    PasidCapability,
    PciExpressCapability,
    PciFunction,
    PriCapability,
    regs,
)
from vfio_user.device import PciIrq, PciRegion

CFG = PciRegion.CONFIG
TABLE = 0x000
PBA = 0x800
VECTORS = 4


def rd(dev, offset: int, size: int) -> int:
    return int.from_bytes(dev.region_read(CFG, offset, size), "little")


def wr(dev, offset: int, size: int, value: int) -> None:
    dev.region_write(CFG, offset, value.to_bytes(size, "little"))


class CapDevice(PciFunction):
    vendor_id = 0x1AF4
    device_id = 0x10F2

    def realize(self) -> None:
        self.add_bar(0, Bar.mem32(0x1000))
        self.express = self.add_capability(PciExpressCapability(flr=True))
        self.msi_cap = self.add_capability(MsiCapability(vectors=4))
        self.add_capability(MsixCapability(VECTORS, 0, TABLE, 0, PBA))
        self.ats = self.add_ext_capability(AtsCapability())
        self.pasid = self.add_ext_capability(PasidCapability())
        self.pri = self.add_ext_capability(PriCapability())
        self.device_resets = 0

    def device_reset(self) -> None:
        self.device_resets += 1


@pytest.fixture
def dev(ctx):
    d = CapDevice()
    d.attach(ctx)
    return d


def walk_standard(dev) -> list[tuple[int, int]]:
    """Walk the list like Linux's pci_find_capability does (pointer at 0x34)."""
    assert rd(dev, regs.PCI_STATUS, 2) & regs.Status.CAP_LIST
    found, pos, seen = [], rd(dev, regs.PCI_CAPABILITY_LIST, 1) & regs.CAP_PTR_MASK, set()
    while pos and pos not in seen:
        seen.add(pos)
        found.append((rd(dev, pos, 1), pos))
        pos = rd(dev, pos + 1, 1) & regs.CAP_PTR_MASK
    return found


def walk_extended(dev) -> list[tuple[int, int, int]]:
    found, pos = [], regs.PCI_EXT_CAP_START
    while pos:
        header = rd(dev, pos, 4)
        if header in (0, 0xFFFFFFFF):
            break
        cap_id, version, nxt = regs.ext_cap_fields(header)
        found.append((cap_id, version, pos))
        pos = nxt
    return found


def test_standard_capability_list(dev):
    """§8.1: Status bit 4 set, 0x34 points at a chain of ID/Next headers."""
    caps = walk_standard(dev)
    assert [cid for cid, _ in caps] == [regs.CapId.EXP, regs.CapId.MSI, regs.CapId.MSIX]
    assert all(pos >= 0x40 and pos % 4 == 0 for _, pos in caps)
    assert caps[0][1] + regs.PCI_CAP_EXP_SIZEOF_V2 <= caps[1][1]


def test_extended_capability_list(dev):
    """§8.1: valid header at 0x100; ID[15:0] Version[19:16] Next[31:20]."""
    caps = walk_extended(dev)
    assert [(c, v) for c, v, _ in caps] == [(regs.ExtCapId.ATS, 1), (regs.ExtCapId.PASID, 1),
                                            (regs.ExtCapId.PRI, 1)]
    assert caps[0][2] == 0x100


def test_capability_headers_are_read_only(dev):
    first = rd(dev, regs.PCI_CAPABILITY_LIST, 1)
    wr(dev, first, 2, 0)
    wr(dev, 0x100, 4, 0)
    assert walk_standard(dev)[0] == (regs.CapId.EXP, first)
    assert len(walk_extended(dev)) == 3


def test_no_capabilities_means_no_list_and_a_null_extended_header():
    class Bare(PciFunction):
        pass

    d = Bare()
    assert not rd(d, regs.PCI_STATUS, 2) & regs.Status.CAP_LIST
    assert rd(d, regs.PCI_CAPABILITY_LIST, 1) == 0
    # Linux sizes config space by reading 0x100: 0 (not all-ones) keeps 4 KiB.
    assert rd(d, 0x100, 4) == 0


def test_pcie_capability_fields(dev):
    """§8.1: version 2, Endpoint type, FLR in DevCap, EE TLP prefix in DevCap2, link regs."""
    p = dev.express.offset
    flags = rd(dev, p + regs.PCI_EXP_FLAGS, 2)
    assert flags & regs.PCI_EXP_FLAGS_VERS_MASK == 2
    assert (flags & regs.PCI_EXP_FLAGS_TYPE_MASK) >> regs.PCI_EXP_FLAGS_TYPE_SHIFT == regs.PcieType.ENDPOINT
    devcap = rd(dev, p + regs.PCI_EXP_DEVCAP, 4)
    assert devcap & regs.PCI_EXP_DEVCAP_FLR
    assert devcap & regs.PCI_EXP_DEVCAP_PAYLOAD_MASK == 1
    assert rd(dev, p + regs.PCI_EXP_DEVCAP2, 4) & regs.PCI_EXP_DEVCAP2_EE_PREFIX
    lnkcap = rd(dev, p + regs.PCI_EXP_LNKCAP, 4)
    assert lnkcap & regs.PCI_EXP_LNKCAP_SLS_MASK == 1
    assert (lnkcap & regs.PCI_EXP_LNKCAP_MLW_MASK) >> regs.PCI_EXP_LNKCAP_MLW_SHIFT == 1
    lnksta = rd(dev, p + regs.PCI_EXP_LNKSTA, 2)
    assert (lnksta & regs.PCI_EXP_LNKSTA_NLW_MASK) >> regs.PCI_EXP_LNKSTA_NLW_SHIFT == 1
    assert rd(dev, p + regs.PCI_EXP_LNKCAP2, 4) == 0b10  # 2.5 GT/s in the speeds vector


def test_rc_integrated_endpoint_has_no_link_registers():
    """§8.1: RCiEPs have no link."""
    class Rciep(PciFunction):
        def realize(self) -> None:
            self.express = self.add_capability(PciExpressCapability(port_type=regs.PcieType.RC_END))

    d = Rciep()
    p = d.express.offset
    assert rd(d, p + regs.PCI_EXP_LNKCAP, 4) == 0
    wr(d, p + regs.PCI_EXP_LNKCTL, 2, 0xFFFF)
    assert rd(d, p + regs.PCI_EXP_LNKCTL, 2) == 0


def test_pcie_devctl_mask_and_devsta_w1c(dev):
    p = dev.express.offset
    wr(dev, p + regs.PCI_EXP_DEVCTL, 2, 0x1 << 5)  # MPS 256
    assert dev.express.max_payload_size == 256
    assert dev.express.max_read_request_size == 128
    dev.express.report_error(regs.PCI_EXP_DEVSTA_URD | regs.PCI_EXP_DEVSTA_CED)
    wr(dev, p + regs.PCI_EXP_DEVSTA, 2, regs.PCI_EXP_DEVSTA_URD)
    assert rd(dev, p + regs.PCI_EXP_DEVSTA, 2) == regs.PCI_EXP_DEVSTA_CED


def test_flr_through_devctl(dev):
    """PCIe §6.6.2/§7.5.3.4: Initiate FLR resets the function and reads back 0; Link
    Control is preserved; the device-specific reset hook runs."""
    p = dev.express.offset
    wr(dev, regs.PCI_COMMAND, 2, regs.Command.MEMORY | regs.Command.MASTER)
    wr(dev, p + regs.PCI_EXP_LNKCTL, 2, regs.PCI_EXP_LNKCTL_CCC)
    wr(dev, dev.pasid.offset + regs.PCI_PASID_CTRL, 2, regs.PCI_PASID_CTRL_ENABLE)
    wr(dev, p + regs.PCI_EXP_DEVCTL, 2, regs.PCI_EXP_DEVCTL_BCR_FLR | (1 << 5))
    assert dev.device_resets == 1
    assert rd(dev, regs.PCI_COMMAND, 2) == 0
    assert not dev.pasid.enabled
    assert rd(dev, p + regs.PCI_EXP_DEVCTL, 2) & regs.PCI_EXP_DEVCTL_BCR_FLR == 0
    assert dev.express.max_payload_size == 128  # DevCtl back to its default
    assert rd(dev, p + regs.PCI_EXP_LNKCTL, 2) == regs.PCI_EXP_LNKCTL_CCC


def test_flr_bit_is_read_only_without_flr_capability():
    class NoFlr(PciFunction):
        def realize(self) -> None:
            self.express = self.add_capability(PciExpressCapability(flr=False))
            self.resets = 0

        def device_reset(self) -> None:
            self.resets += 1

    d = NoFlr()
    wr(d, d.express.offset + regs.PCI_EXP_DEVCTL, 2, regs.PCI_EXP_DEVCTL_BCR_FLR)
    assert d.resets == 0
    assert not rd(d, d.express.offset + regs.PCI_EXP_DEVCAP, 4) & regs.PCI_EXP_DEVCAP_FLR


# --- MSI-X ----------------------------------------------------------------------------------
def msix_ctrl(dev, value: int) -> None:
    wr(dev, dev.msix.offset + regs.PCI_MSIX_FLAGS, 2, value)


def table_write(dev, vector: int, field: int, value: int) -> None:
    dev.region_write(PciRegion.BAR0, TABLE + vector * 16 + field, value.to_bytes(4, "little"))


def pba(dev) -> int:
    return int.from_bytes(dev.region_read(PciRegion.BAR0, PBA, 8), "little")


@pytest.fixture
def msix_dev(dev, ctx):
    wr(dev, regs.PCI_COMMAND, 2, regs.Command.MEMORY | regs.Command.MASTER)
    for v in range(VECTORS):
        ctx.install_eventfd(PciIrq.MSIX, v)
    return dev


def test_msix_capability_registers(dev):
    """§8.2: Table Size = N-1, BIR/offset in Table and PBA registers; only Enable and
    Function Mask are writable."""
    o = dev.msix.offset
    assert rd(dev, o + regs.PCI_MSIX_FLAGS, 2) == VECTORS - 1
    assert rd(dev, o + regs.PCI_MSIX_TABLE, 4) == TABLE | 0
    assert rd(dev, o + regs.PCI_MSIX_PBA, 4) == PBA | 0
    msix_ctrl(dev, 0xFFFF)
    assert rd(dev, o + regs.PCI_MSIX_FLAGS, 2) == (regs.PCI_MSIX_FLAGS_ENABLE | regs.PCI_MSIX_FLAGS_MASKALL
                                                   | (VECTORS - 1))
    assert dev.irq_info(PciIrq.MSIX).count == VECTORS


def test_msix_table_resets_masked_and_holds_messages(msix_dev):
    dev = msix_dev
    for v in range(VECTORS):
        ctrl = dev.region_read(PciRegion.BAR0, TABLE + v * 16 + regs.PCI_MSIX_ENTRY_VECTOR_CTRL, 4)
        assert int.from_bytes(ctrl, "little") & regs.PCI_MSIX_ENTRY_CTRL_MASKBIT
    table_write(dev, 1, regs.PCI_MSIX_ENTRY_LOWER_ADDR, 0xFEE00000)
    table_write(dev, 1, regs.PCI_MSIX_ENTRY_UPPER_ADDR, 0x1)
    table_write(dev, 1, regs.PCI_MSIX_ENTRY_DATA, 0x4041)
    assert dev.msix.message(1) == (0x1_FEE00000, 0x4041)


def test_msix_sending_rule_with_table_owned_by_client(msix_dev, ctx):
    """§8.2: send only when Enable=1, Function Mask=0, vector unmasked; otherwise set the
    PBA bit and send once unmasked."""
    dev = msix_dev
    table_write(dev, 0, regs.PCI_MSIX_ENTRY_DATA, 0x30)  # client drives the table
    msix_ctrl(dev, regs.PCI_MSIX_FLAGS_ENABLE)
    assert dev.raise_irq(0) is False  # vector 0 still masked (reset value)
    assert ctx.fired(PciIrq.MSIX, 0) == 0
    assert pba(dev) == 0b1
    table_write(dev, 0, regs.PCI_MSIX_ENTRY_VECTOR_CTRL, 0)  # unmask -> pending delivered
    assert ctx.fired(PciIrq.MSIX, 0) == 1
    assert pba(dev) == 0
    assert dev.raise_irq(0) is True
    assert ctx.fired(PciIrq.MSIX, 0) == 1


def test_msix_function_mask(msix_dev, ctx):
    dev = msix_dev
    msix_ctrl(dev, regs.PCI_MSIX_FLAGS_ENABLE | regs.PCI_MSIX_FLAGS_MASKALL)
    dev.msix.notify(2)
    dev.msix.notify(3)
    assert pba(dev) == 0b1100
    assert ctx.fired(PciIrq.MSIX, 2) == 0
    msix_ctrl(dev, regs.PCI_MSIX_FLAGS_ENABLE)
    assert ctx.fired(PciIrq.MSIX, 2) == 1 and ctx.fired(PciIrq.MSIX, 3) == 1
    assert pba(dev) == 0


def test_msix_qemu_style_eventfd_decides(msix_dev, ctx):
    """vfio-user-qemu.md item 7: QEMU never writes the table; a vector without an eventfd
    (masked in QEMU) goes pending and is sent when SET_IRQS installs its eventfd."""
    dev = msix_dev
    msix_ctrl(dev, regs.PCI_MSIX_FLAGS_ENABLE)
    assert dev.msix.notify(1) is True  # eventfd present: delivered despite reset-masked table
    assert ctx.fired(PciIrq.MSIX, 1) == 1
    ctx.masked.add((PciIrq.MSIX, 2))
    assert dev.msix.notify(2) is False
    assert pba(dev) == 0b100  # only PBA reads reach the server
    ctx.masked.discard((PciIrq.MSIX, 2))
    dev.irqs_changed(PciIrq.MSIX)
    assert ctx.fired(PciIrq.MSIX, 2) == 1
    assert pba(dev) == 0


def test_msix_bus_master_gates_messages(dev, ctx):
    """An MSI-X message is a memory write: held pending while BME is clear."""
    wr(dev, regs.PCI_COMMAND, 2, regs.Command.MEMORY)
    ctx.install_eventfd(PciIrq.MSIX, 0)
    msix_ctrl(dev, regs.PCI_MSIX_FLAGS_ENABLE)
    assert dev.msix.notify(0) is False
    assert dev.msix.pending(0)
    wr(dev, regs.PCI_COMMAND, 2, regs.Command.MEMORY | regs.Command.MASTER)
    assert ctx.fired(PciIrq.MSIX, 0) == 1
    assert not dev.msix.pending(0)


def test_msix_disabled_uses_intx_and_enabled_suppresses_it(msix_dev, ctx):
    dev = msix_dev
    ctx.install_eventfd(PciIrq.INTX)
    assert dev.raise_irq(0) is True
    assert ctx.fired(PciIrq.INTX) == 1 and ctx.fired(PciIrq.MSIX, 0) == 0
    dev.set_intx(False)
    msix_ctrl(dev, regs.PCI_MSIX_FLAGS_ENABLE)
    dev.raise_irq(0)
    assert ctx.fired(PciIrq.INTX) == 0 and ctx.fired(PciIrq.MSIX, 0) == 1


def test_msix_pba_is_read_only_and_out_of_range_vector(msix_dev):
    dev = msix_dev
    msix_ctrl(dev, regs.PCI_MSIX_FLAGS_ENABLE | regs.PCI_MSIX_FLAGS_MASKALL)
    dev.msix.notify(1)
    dev.region_write(PciRegion.BAR0, PBA, b"\x00" * 8)
    assert pba(dev) == 0b10
    assert dev.msix.notify(VECTORS) is False


def test_msix_state_cleared_by_reset(msix_dev):
    dev = msix_dev
    msix_ctrl(dev, regs.PCI_MSIX_FLAGS_ENABLE | regs.PCI_MSIX_FLAGS_MASKALL)
    table_write(dev, 0, regs.PCI_MSIX_ENTRY_VECTOR_CTRL, 0)
    dev.msix.notify(0)
    dev.reset()
    assert not dev.msix.enabled and not dev.msix.pending(0)
    assert dev.msix.vector_masked(0) and not dev.msix.table_written


# --- MSI --------------------------------------------------------------------------------------
def test_msi_mask_and_pending(dev, ctx):
    """PCI 3.0 §6.8.1: masked vector sets its Pending bit; unmask sends it."""
    o = dev.msi_cap.offset
    wr(dev, regs.PCI_COMMAND, 2, regs.Command.MASTER)
    ctx.install_eventfd(PciIrq.MSI, 0)
    ctx.install_eventfd(PciIrq.MSI, 1)
    flags = rd(dev, o + regs.PCI_MSI_FLAGS, 2)
    assert flags & regs.PCI_MSI_FLAGS_64BIT and flags & regs.PCI_MSI_FLAGS_MASKBIT
    assert (flags & regs.PCI_MSI_FLAGS_QMASK) >> 1 == 2  # 4 vectors capable
    wr(dev, o + regs.PCI_MSI_FLAGS, 2, regs.PCI_MSI_FLAGS_ENABLE | (1 << regs.PCI_MSI_FLAGS_QSIZE_SHIFT))
    assert dev.msi_cap.enabled_vectors == 2
    wr(dev, o + regs.PCI_MSI_MASK_64, 4, 0b10)
    assert dev.raise_irq(1) is False
    assert rd(dev, o + regs.PCI_MSI_PENDING_64, 4) == 0b10
    assert dev.raise_irq(0) is True
    wr(dev, o + regs.PCI_MSI_MASK_64, 4, 0)
    assert ctx.fired(PciIrq.MSI, 1) == 1 and ctx.fired(PciIrq.MSI, 0) == 1
    assert rd(dev, o + regs.PCI_MSI_PENDING_64, 4) == 0
    assert dev.irq_info(PciIrq.MSI).count == 4


def test_msi_vectors_beyond_the_enabled_count_fold_onto_enabled_ones(dev, ctx):
    """PCI 3.0 §6.8.1.3: with Multiple Message Enable below Capable the function may only
    use the enabled data values; a cause on a higher vector folds (vector mod enabled)
    instead of being lost. A vector the function does not have is refused."""
    o = dev.msi_cap.offset
    wr(dev, regs.PCI_COMMAND, 2, regs.Command.MASTER)
    ctx.install_eventfd(PciIrq.MSI, 0)
    wr(dev, o + regs.PCI_MSI_FLAGS, 2, regs.PCI_MSI_FLAGS_ENABLE)  # one vector enabled of 4
    assert dev.msi_cap.enabled_vectors == 1
    assert dev.raise_irq(3) is True and dev.raise_irq(1) is True
    assert ctx.fired(PciIrq.MSI, 0) == 2
    assert dev.msi_cap.notify(4) is False  # capable of 4: vector 4 does not exist
    assert dev.msi_cap.message(0)[1] == rd(dev, o + regs.PCI_MSI_DATA_64, 2)


def test_capability_placement_errors():
    class Overlap(PciFunction):
        def realize(self) -> None:
            self.add_capability(PciExpressCapability(), offset=0x40)
            self.add_capability(MsiCapability(), offset=0x48)

    with pytest.raises(ValueError):
        Overlap()

    class MsixWithoutBar(PciFunction):
        def realize(self) -> None:
            self.add_capability(MsixCapability(2, 0, 0, 0, 0x800))

    with pytest.raises(ValueError):
        MsixWithoutBar()
