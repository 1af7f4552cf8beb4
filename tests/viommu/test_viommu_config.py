"""Bring-up, STE handling and the command queue of the vIOMMU, through BAR0 only.

References: the machine interface (README, devmodel/machine.py) (vIOMMU PCI function: ID registers, vectors), smmuv3-pcie.md
section 1.5 (CR0/CR0ACK), 1.9 (CMDQ_CONS.ERR, CERROR_ILL), 1.6 (GERROR toggles), 5.3
(CMD_SYNC CS=SIG_IRQ), 5.4 (error handling and restart), 6.3 (ILLEGAL STE -> C_BAD_STE);
iommufd.md section 1.5.5 (nested attach needs a vDEVICE), 4.1/4.3 (entry_num, EIO).
"""

from __future__ import annotations

import pytest

from devmodel.iommu import registers as R
from devmodel.iommu import records as rec
from devmodel.iommu.records import EventId, Opcode
from devmodel.iommufd.objects import ObjType
from devmodel.viommu import MsixVector, VIOMMU_PROFILE

from .conftest import CMDQ, VSID, build


def test_id_registers_and_cr0_ack():
    """the machine interface (README, devmodel/machine.py): S1P=1, S2P=0, ATS, PRI, SIDSIZE=16, SSIDSIZE=20, queue maxima 8;
    CR0ACK mirrors CR0 (section 1.5)."""
    host, fn, ctx, g, _ = build(bring_up=False)
    idr0, idr1 = g.rd(R.IDR0), g.rd(R.IDR1)
    assert idr0 & R.IDR0_S1P and not idr0 & R.IDR0_S2P
    assert idr0 & R.IDR0_ATS and idr0 & R.IDR0_PRI
    assert idr1 & R.IDR1_SIDSIZE_MASK == 16 and (idr1 >> R.IDR1_SSIDSIZE_SHIFT) & 0x1F == 20
    assert (idr1 >> R.IDR1_CMDQS_SHIFT) & 0x1F == 8 and (idr1 >> R.IDR1_EVENTQS_SHIFT) & 0x1F == 8
    assert g.rd(R.IDR5) == VIOMMU_PROFILE.idr5()
    g.bring_up()
    assert g.rd(R.CR0ACK) & R.Cr0.SMMUEN
    # 64-bit register as two halves (the machine interface (README, devmodel/machine.py))
    g.wr(R.CR0, 0)
    g.wr(R.CMDQ_BASE, 0x1234_5000, 4)
    g.wr(R.CMDQ_BASE + 4, 0x1, 4)
    assert g.rd(R.CMDQ_BASE, 8) == 0x1_1234_5000
    host.close()


def test_cfgi_ste_attaches_nested_hwpt(world):
    """A guest S1 STE + CFGI_STE -> a nested HWPT on the vIOMMU (with the FAULT) replaces
    the endpoint's attachment; the host's physical STE becomes Config=nested."""
    host, fn, ctx, g = world
    g.events()  # C_BAD_STE of the V=0 STE at SMMUEN=1
    g.s1_stream()
    ep = fn.endpoints[VSID]
    hwpt = host.ctx.table.lookup(ep.hwpt_id, ObjType.HWPT_NESTED)
    assert hwpt.viommu.id == fn.viommu_id and hwpt.fault.id == fn.fault_id
    ste = rec.STE.decode(host.memory.read(host.hw.ste_addr(0x10), rec.STE_SIZE))
    assert ste.Config == rec.SteConfig.NESTED
    assert ctx.vectors()[-1] == MsixVector.CMD_SYNC  # CS=SIG_IRQ -> vector 3
    assert g.rd(R.CMDQ_CONS) & R.Q_IDX_MASK == g.cmd_prod


def test_bad_ste_gives_c_bad_ste_and_abort(world):
    """V=0, ILLEGAL (EATS=0b10, S1STALLD with STALL_MODEL=1) -> abort HWPT and C_BAD_STE
    with the guest's StreamID in the guest EVTQ (section 6.3)."""
    host, fn, ctx, g = world
    g.events()
    for ste in (rec.STE.encode(V=1, Config=rec.SteConfig.S1_TRANS, EATS=rec.EATS_SPLIT),
                rec.STE.encode(V=1, Config=rec.SteConfig.S1_TRANS, S1STALLD=1),
                rec.STE.encode(V=0)):
        g.write_ste(VSID, ste)
        g.cmd(Opcode.CMD_CFGI_STE, StreamID=VSID, Leaf=1)
        g.sync()
        evs = g.events()
        assert [(e.EventID, e.StreamID) for e in evs] == [(EventId.C_BAD_STE, VSID)]
        assert fn.endpoints[VSID].hwpt_id == fn.abort_hwpt
    assert ctx.vectors().count(MsixVector.EVENTQ) >= 3


def test_illegal_invalidation_stops_at_the_right_command_and_recovers(world):
    """Batch TLBI_NH_ALL, CFGI_CD(vSID), ATC_INV(unknown vSID), TLBI_NH_ASID: the host
    refuses entry 2 (EIO: no vDEVICE) -> CONS stops on it with CERROR_ILL, GERROR.CMDQ_ERR
    toggles, vector 2; the guest replaces it by a CMD_SYNC, acks GERRORN, and the queue
    resumes and finishes (sections 1.9, 5.4)."""
    host, fn, ctx, g = world
    g.s1_stream()
    start = g.cmd_prod
    g.cmd(Opcode.CMD_TLBI_NH_ALL, doorbell=False)
    g.cmd(Opcode.CMD_CFGI_CD, StreamID=VSID, doorbell=False)
    g.cmd(Opcode.CMD_ATC_INV, StreamID=0x77, Size=52, doorbell=False)
    g.cmd(Opcode.CMD_TLBI_NH_ASID, ASID=VSID, doorbell=False)
    before = host.counters.commands
    g.wr(R.CMDQ_PROD, g.cmd_prod)
    cons = g.rd(R.CMDQ_CONS)
    assert cons & R.Q_IDX_MASK == start + 2
    assert (cons & R.CMDQ_CONS_ERR_MASK) >> R.CMDQ_CONS_ERR_SHIFT == R.CmdqError.CERROR_ILL
    gerror = g.rd(R.GERROR)
    assert (gerror ^ g.rd(R.GERRORN)) & R.Gerror.CMDQ_ERR
    assert ctx.vectors()[-1] == MsixVector.GERROR
    assert host.counters.commands == before + 2  # the two good ones reached the host
    # A PROD write while the error is active does nothing.
    g.wr(R.CMDQ_PROD, g.cmd_prod)
    assert g.rd(R.CMDQ_CONS) & R.Q_IDX_MASK == start + 2
    g.mem.write(CMDQ + (start + 2) * rec.CMD_SIZE, rec.encode_command(Opcode.CMD_SYNC))
    g.wr(R.GERRORN, gerror)
    assert g.rd(R.CMDQ_CONS) & R.Q_IDX_MASK == g.cmd_prod
    assert host.counters.commands == before + 3
    assert fn.counters.cmdq_errors == {"CERROR_ILL": 1}


def test_reserved_opcode_and_sync_cs3_are_cerror_ill(world):
    """Unknown opcode and CMD_SYNC CS=0b11 are CERROR_ILL (pitfall 4)."""
    host, fn, ctx, g = world
    for raw in (bytes([0x7F]) + bytes(15), rec.encode_command(Opcode.CMD_SYNC, CS=0b11),
                rec.encode_command(Opcode.CMD_TLBI_S12_VMALL)):
        bad = g.cmd_prod
        g.raw_cmd(raw)
        cons = g.rd(R.CMDQ_CONS)
        assert cons & R.Q_IDX_MASK == bad
        assert (cons & R.CMDQ_CONS_ERR_MASK) >> R.CMDQ_CONS_ERR_SHIFT == R.CmdqError.CERROR_ILL
        g.mem.write(CMDQ + bad * rec.CMD_SIZE, rec.encode_command(Opcode.CMD_SYNC))
        g.wr(R.GERRORN, g.rd(R.GERROR))
        assert g.rd(R.CMDQ_CONS) & R.Q_IDX_MASK == g.cmd_prod


def test_unplug_detaches_and_plug_installs_the_current_ste_without_an_event(world):
    """Hot-plug on the VMM side. unplug: the nested HWPT is detached and destroyed and the
    vDEVICE goes (iommufd.md 1.6). plug: the endpoint gets what the guest's stream table
    says now; an invalid STE there means abort, but no C_BAD_STE is recorded, because no
    transaction or CFGI_STE looked it up (SMMUv3 records configuration errors on lookup);
    the guest's next CFGI_STE reports it as usual."""
    host, fn, ctx, g = world
    g.events()
    g.s1_stream()
    ep = fn.endpoints[VSID]
    dev, nested, vdev = ep.dev_id, ep.hwpt_id, fn.vdevice_ids[VSID]
    assert fn.unplug(VSID) == 0
    assert VSID not in fn.endpoints and VSID not in fn.vdevice_ids
    for obj in (nested, vdev):
        with pytest.raises(OSError):
            host.ctx.destroy(obj)  # already gone
    with pytest.raises(KeyError):
        fn.unplug(VSID)
    g.write_ste(VSID, rec.STE.encode(V=0))
    fn.plug(VSID, dev)
    assert fn.endpoints[VSID].hwpt_id == fn.abort_hwpt and VSID in fn.vdevice_ids
    assert g.events() == []
    with pytest.raises(ValueError):
        fn.plug(VSID, dev)
    g.cmd(Opcode.CMD_CFGI_STE, StreamID=VSID, Leaf=1)
    g.sync()
    assert [(e.EventID, e.StreamID) for e in g.events()] == [(EventId.C_BAD_STE, VSID)]
    assert (fn.counters.unplugs, fn.counters.plugs) == (1, 1)
