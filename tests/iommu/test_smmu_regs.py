"""Register interface: ID registers, CR0/ACK, GBPA, IRQ_CTRL, guards, Page 1, GERROR (reference §1)."""

from devmodel.iommu import registers as R
from devmodel.iommu.builder import make_world
from devmodel.iommu.irq import IrqSource
from devmodel.iommu.records import Opcode


def test_id_registers_advertise_profile():
    """§1.4: S1P, S2P, TTF=AArch64, ATS, MSI, PRI, CD2L, ST_LEVEL=1, TTENDIAN=LE; SSIDSIZE; OAS 48, GRAN4K."""
    _, _, smmu, _ = make_world()
    idr0 = smmu.read_reg(R.IDR0)
    assert idr0 & R.IDR0_S1P and idr0 & R.IDR0_S2P and (idr0 >> 2) & 3 == 2
    assert idr0 & R.IDR0_ATS and idr0 & R.IDR0_PRI and idr0 & R.IDR0_MSI and idr0 & R.IDR0_CD2L
    assert (idr0 >> 27) & 3 == 1 and (idr0 >> 21) & 3 == 2 and (idr0 >> 24) & 3 == 1
    idr1 = smmu.read_reg(R.IDR1)
    assert idr1 & 0x3F == 16 and (idr1 >> 6) & 0x1F == 20 and (idr1 >> 21) & 0x1F > 6
    assert (idr1 >> 28) & 0x7 == 0  # REL / QUEUES_PRESET / TABLES_PRESET all 0 (Linux rejects them)
    assert smmu.read_reg(R.IDR5) == 5 | 1 << 4
    smmu.write_reg(R.IDR0, 0)
    assert smmu.read_reg(R.IDR0) == idr0  # RO, constant


def test_cr0_ack_mirrors_without_reserved_bits():
    """§1.5: CR0ACK follows CR0 (reserved bits not mirrored)."""
    _, _, smmu, _ = make_world()
    smmu.write_reg(R.CR0, 0xFFFFFFFF)
    assert smmu.read_reg(R.CR0ACK) == R.CR0_MASK | R.CR0_VMW_MASK
    smmu.write_reg(R.CR0, R.Cr0.CMDQEN)
    assert smmu.read_reg(R.CR0ACK) == R.Cr0.CMDQEN


def test_gbpa_update_protocol_and_abort():
    """§1.5 GBPA: writes without Update=1 are ignored; with SMMUEN=0 traffic bypasses or aborts silently."""
    _, _, smmu, _ = make_world()
    assert smmu.read_reg(R.GBPA) == R.GBPA_RESET
    assert smmu.translate(1, None, 0x1234).pa == 0x1234
    smmu.write_reg(R.GBPA, R.GBPA_ABORT)
    assert smmu.read_reg(R.GBPA) == R.GBPA_RESET
    smmu.write_reg(R.GBPA, R.GBPA_ABORT | R.GBPA_UPDATE)
    assert smmu.read_reg(R.GBPA) == R.GBPA_ABORT  # Update reads back 0 at once
    r = smmu.translate(1, None, 0x1234)
    assert r.aborted and r.fault.event is None and not r.fault.recorded


def test_irq_ctrl_ack_and_cfg_guard():
    """§1.6: IRQ_CTRLACK mirrors; IRQ_CFGn are ignored while their enable is 1."""
    _, _, smmu, _ = make_world()
    smmu.write_reg(R.EVENTQ_IRQ_CFG0, 0x1000, 8)
    smmu.write_reg(R.IRQ_CTRL, R.IrqCtrl.EVENTQ_IRQEN)
    assert smmu.read_reg(R.IRQ_CTRLACK) == R.IrqCtrl.EVENTQ_IRQEN
    smmu.write_reg(R.EVENTQ_IRQ_CFG0, 0x2000, 8)
    smmu.write_reg(R.EVENTQ_IRQ_CFG1, 0x77)
    assert smmu.read_reg(R.EVENTQ_IRQ_CFG0, 8) == 0x1000 and smmu.read_reg(R.EVENTQ_IRQ_CFG1) == 0
    smmu.write_reg(R.GERROR_IRQ_CFG0 + 4, 0x1)  # upper half of a 64-bit register
    assert smmu.read_reg(R.GERROR_IRQ_CFG0, 8) == 1 << 32


def test_guarded_base_registers_ignore_writes_when_enabled():
    """§1.1 (v3.2): CMDQ_BASE guarded by CMDQEN, STRTAB_* by SMMUEN, EVENTQ_PROD by EVENTQEN; CMDQ_CONS RO when enabled."""
    _, _, smmu, sw = make_world()
    sw.enable()
    before = smmu.read_reg(R.CMDQ_BASE, 8)
    smmu.write_reg(R.CMDQ_BASE, 0x5000_0000, 8)
    smmu.write_reg(R.STRTAB_BASE, 0x5000_0000, 8)
    smmu.write_reg(R.STRTAB_BASE_CFG, 0)
    smmu.write_reg(R.EVENTQ_PROD, 3)
    smmu.write_reg(R.CMDQ_CONS, 5)
    assert smmu.read_reg(R.CMDQ_BASE, 8) == before
    assert smmu.read_reg(R.STRTAB_BASE, 8) & R.STRTAB_BASE_ADDR_MASK == sw.strtab
    assert smmu.read_reg(R.STRTAB_BASE_CFG) != 0
    assert smmu.read_reg(R.EVENTQ_PROD) == 0 and smmu.read_reg(R.CMDQ_CONS) == 0
    smmu.write_reg(R.EVENTQ_CONS, 1 << 31)  # CONS is always writable
    assert smmu.read_reg(R.EVENTQ_CONS) == 1 << 31


def test_queue_pointers_live_in_page1():
    """Pitfall 1: EVENTQ/PRIQ PROD/CONS are at 0x100A8..0x100CC; the Page 0 aliases read as zero here."""
    _, _, smmu, _ = make_world()
    smmu.write_reg(R.EVENTQ_CONS, 2)
    smmu.write_reg(R.PRIQ_CONS, 3)
    assert smmu.read_reg(R.EVENTQ_CONS) == 2 and smmu.read_reg(R.PRIQ_CONS) == 3
    assert smmu.read_reg(0xAC) == 0 and smmu.read_reg(0xCC) == 0


def test_bad_access_sizes_are_harmless():
    """§1.1: only aligned 4/8-byte accesses are defined; others are RAZ/WI here, never a crash."""
    _, _, smmu, _ = make_world()
    assert smmu.read_reg(R.IDR0, 2) == 0 and smmu.read_reg(R.IDR0 + 1, 4) == 0
    smmu.write_reg(R.CR0, 0xF, 1)
    smmu.write_reg(0x30000, 1, 4)
    assert smmu.read_reg(R.CR0) == 0


def test_gerror_toggle_semantics():
    """§1.6: an error is active while GERROR!=GERRORN; it toggles once, not again while active; ack by copying."""
    _, _, smmu, sw = make_world()
    pulses = []
    smmu.connect_irq(IrqSource.GERROR, lambda: pulses.append(1))
    sw.enable(irqs=R.IrqCtrl.GERROR_IRQEN)
    sw.raw_cmd(bytes([0x99]) + bytes(15))  # reserved opcode -> CMDQ_ERR
    g = smmu.read_reg(R.GERROR)
    assert g & R.Gerror.CMDQ_ERR and len(pulses) == 1
    sw.raw_cmd(bytes([0x99]) + bytes(15))  # still active: GERROR does not toggle back
    assert smmu.read_reg(R.GERROR) == g and len(pulses) == 1
    sw.mem.write(sw.cmdq, bytes(16))  # rewrite the failing slot (opcode 0 is reserved too)
    smmu.write_reg(R.GERRORN, g)
    assert smmu.read_reg(R.GERRORN) == g
    # acknowledged, re-fetched, failed again: toggles the other way
    assert smmu.read_reg(R.GERROR) == g ^ R.Gerror.CMDQ_ERR and len(pulses) == 2


def test_gerror_msi():
    """§1.7: with IRQ_CFG0.ADDR != 0 the interrupt is a 32-bit write of CFG1.DATA to ADDR."""
    mem, _, smmu, sw = make_world()
    pulses = []
    smmu.connect_irq(IrqSource.GERROR, lambda: pulses.append(1))
    smmu.write_reg(R.GERROR_IRQ_CFG0, 0x900000, 8)
    smmu.write_reg(R.GERROR_IRQ_CFG1, 0xCAFE)
    sw.enable(irqs=R.IrqCtrl.GERROR_IRQEN)
    sw.cmd(Opcode.CMD_RESUME, StreamID=1)  # no stall model -> ILL
    assert int.from_bytes(mem.read(0x900000, 4), "little") == 0xCAFE and not pulses


def test_msi_abort_raises_msi_gerror():
    """§1.6: an aborted GERROR MSI sets MSI_GERROR_ABT_ERR without another GERROR interrupt."""
    _, _, smmu, sw = make_world()
    smmu.write_reg(R.GERROR_IRQ_CFG0, 0x4000_0000, 8)  # no memory there
    sw.enable(irqs=R.IrqCtrl.GERROR_IRQEN)
    sw.raw_cmd(bytes([0x99]) + bytes(15))
    g = smmu.read_reg(R.GERROR)
    assert g & R.Gerror.CMDQ_ERR and g & R.Gerror.MSI_GERROR_ABT_ERR
