"""Bring-up, stream table and stage 2 through the register interface.

References: smmuv3-pcie.md section 1.10 (Linux bring-up order), 1.5/1.6 (CR0/IRQ_CTRL
with ACK), 1.7 (MSI configuration), 1.8/6.1 (2-level stream table), 6.2 (STE fields),
6.7 (CFGI after STE writes), 1.9/5.4 (CMDQ_ERR recovery); iommufd.md section 1.4 (paging
HWPT = stage 2 from the IOAS).
"""

from __future__ import annotations

import errno

import pytest

from devmodel.host import HostMachine, ProbeError
from devmodel.host.scenario import GPA_BASE, USER_BASE, user_memory
from devmodel.iommu import records as rec
from devmodel.iommu import registers as R
from devmodel.iommu.faults import Access
from devmodel.iommu.records import Opcode, SteConfig

from .conftest import SID, VSID


def test_bringup_register_state(world):
    """Section 1.10: CR0 ends with SMMUEN|CMDQEN|EVENTQEN|PRIQEN|ATSCHK, every ACK
    matches, queues and stream table live in host-private memory, MSIs point at the
    doorbell with one vector each (section 1.7), CR2 = PTM|RECINVSID."""
    host, _ = world
    s = host.smmu
    want = R.Cr0.SMMUEN | R.Cr0.CMDQEN | R.Cr0.EVENTQEN | R.Cr0.PRIQEN | R.Cr0.ATSCHK
    assert s.read_reg(R.CR0) == want and s.read_reg(R.CR0ACK) == want
    assert s.read_reg(R.IRQ_CTRLACK) == 0x7
    assert s.read_reg(R.CR2) == R.CR2_PTM | R.CR2_RECINVSID
    priv = host.memory.private
    for reg in (R.STRTAB_BASE, R.CMDQ_BASE, R.EVENTQ_BASE, R.PRIQ_BASE):
        base = s.read_reg(reg, 8) & R.Q_BASE_ADDR_MASK & ~0x3F
        assert priv.contains(base, 16), hex(reg)
    cfg = s.read_reg(R.STRTAB_BASE_CFG)
    assert (cfg >> R.STRTAB_CFG_FMT_SHIFT) & 3 == R.STRTAB_FMT_2LEVEL
    assert (cfg >> R.STRTAB_CFG_SPLIT_SHIFT) & 0x1F == 8
    vectors = {s.read_reg(off + 8) for off in (R.EVENTQ_IRQ_CFG0, R.PRIQ_IRQ_CFG0, R.GERROR_IRQ_CFG0)}
    assert vectors == {0, 1, 2}
    assert s.read_reg(R.EVENTQ_IRQ_CFG0, 8) == host.doorbell_base
    # Bring-up issued CFGI_ALL and TLBI_NSNH_ALL, each with a sync, and the CMDQ is idle.
    assert host.counters.commands >= 2 and host.counters.syncs >= 2
    assert s.read_reg(R.CMDQ_CONS) & R.Q_IDX_MASK == s.read_reg(R.CMDQ_PROD)


def test_probe_refuses_smmu_without_stage2():
    """Nesting needs IDR0.S2P (section 1.4); the driver refuses the SMMU like a failed probe."""
    with pytest.raises(ProbeError):
        HostMachine(user_memory(), profile=R.SmmuProfile(s2p=False))


def test_wired_interrupts_without_msi():
    """IDR0.MSI=0: IRQ_CFG registers are unused; the wired EVTQ output still delivers
    faults to the vEVENTQ (section 1.7)."""
    from devmodel.host.scenario import make_nested_master
    user = user_memory()
    host = HostMachine(user, profile=R.SmmuProfile(msi=False))
    try:
        assert not host.hw.msi
        m = make_nested_master(host, user, SID, VSID)
        host.smmu.translate(SID, None, 0x4000_0000, 4, Access.READ)
        assert host.counters.events_forwarded == 1
        assert len(host.ctx.read(m.veventq_fd, 4096)) == 8 + 32
    finally:
        host.close()


def _ste(host: HostMachine, sid: int):
    return rec.STE.decode(host.memory.read(host.hw.ste_addr(sid), rec.STE_SIZE))


def test_bound_master_starts_blocked_and_unbound_sid_is_bad_streamid(world):
    """A bound master's STE is V=1 Config=abort (blocked: silent abort, section 3.3);
    a SID with no L2 table is C_BAD_STREAMID (section 6.1), counted as unhandled."""
    host, _ = world
    host.bind(SID, "ep")
    ste = _ste(host, SID)
    assert ste.V == 1 and ste.Config == SteConfig.ABORT
    r = host.smmu.translate(SID, None, 0x1000, 4, Access.READ)
    assert r.aborted and r.fault.event is None
    r = host.smmu.translate(0x4000, None, 0x1000, 4, Access.READ)
    assert r.fault.event == rec.EventId.C_BAD_STREAMID
    assert host.counters.events["C_BAD_STREAMID"] == 1 and host.counters.events_unhandled == 1


def test_paging_hwpt_is_stage2_from_the_ioas(world):
    """Paging HWPT: Config=S2 translate with the HWPT's VMID; the SMMU's stage-2 hook
    resolves IPA -> user VA via the IOAS (ste.py docstring); write to a read-only IOAS
    mapping is a stage-2 F_PERMISSION, an unmapped IPA a stage-2 F_TRANSLATION (S2=1,
    counted, not forwarded: iommufd.md section 3.7)."""
    host, user = world
    ctx = host.ctx
    dev = host.bind(SID, "ep")
    ioas = ctx.ioas_alloc()
    ctx.ioas_map(ioas, USER_BASE, 0x10000, iova=0x100000)
    ctx.ioas_map(ioas, USER_BASE + 0x10000, 0x1000, iova=0x200000, prot=1)  # READABLE only
    hwpt = ctx.hwpt_alloc(dev, ioas)
    ctx.attach(dev, hwpt)
    ste = _ste(host, SID)
    assert ste.Config == SteConfig.S2_TRANS and ste.S2VMID == ctx.table.lookup(hwpt).priv["vmid"]
    assert ste.S2R == 1 and ste.S2AA64 == 1
    user.write(USER_BASE + 0x2345, b"\xab")
    r = host.smmu.translate(SID, None, 0x102345, 1, Access.READ)
    assert r.ok and r.pa == USER_BASE + 0x2345
    assert host.memory.read(r.pa, 1) == b"\xab"
    r = host.smmu.translate(SID, None, 0x200000, 4, Access.WRITE)
    assert r.fault.event == rec.EventId.F_PERMISSION and r.fault.stage == 2
    r = host.smmu.translate(SID, None, 0x900000, 4, Access.READ)
    assert r.fault.event == rec.EventId.F_TRANSLATION and r.fault.stage == 2
    c = host.counters
    assert c.events_stage2 == 2 and c.events_forwarded == 0
    # Detach: blocked again (silent abort).
    ctx.detach(dev)
    assert _ste(host, SID).Config == SteConfig.ABORT
    assert host.smmu.translate(SID, None, 0x102345, 1, Access.READ).fault.event is None


def test_nested_ste_fields_come_from_guest_ste(nested):
    """Nested HWPT: Config=nested, S1ContextPtr/S1CDMax/S1Fmt from the guest STE, stage 2
    = the vIOMMU's VMID (what converted guest TLBIs carry), MEV=1 (iommufd.md 3.7)."""
    host = nested.host
    ste = _ste(host, SID)
    assert ste.Config == SteConfig.NESTED
    assert ste.S1ContextPtr == nested.cd_addr and ste.S1CDMax == 0
    assert ste.S2VMID == host.ctx.table.lookup(nested.viommu_id).priv["vmid"]
    assert ste.MEV == 1 and ste.S2TTB == 0


def test_guest_mapping_translates_through_both_stages(nested):
    """Guest stage 1 VA -> GPA, host stage 2 GPA -> user VA (section 6.2 Config=0b111)."""
    nested.map_guest_page(0x4000_0000, GPA_BASE + 0x60_0000)
    r = nested.host.smmu.translate(SID, None, 0x4000_0123, 4, Access.WRITE)
    assert r.ok and r.pa == USER_BASE + 0x60_0123


def test_cmdq_illegal_command_is_skipped_and_counted(world):
    """CERROR_ILL: the host replaces the command with CMD_SYNC and acknowledges CMDQ_ERR
    (section 1.9, Linux recovery); later commands still run."""
    host, _ = world
    host.hw.cmdq.issue([bytes([0x7F]) + bytes(15)])  # reserved opcode
    assert host.counters.cmdq_errors["CERROR_ILL"] == 1
    s = host.smmu
    assert not (s.read_reg(R.GERROR) ^ s.read_reg(R.GERRORN)) & R.Gerror.CMDQ_ERR
    host.hw.cmdq.command(Opcode.CMD_TLBI_NSNH_ALL)
    assert s.read_reg(R.CMDQ_CONS) & R.Q_IDX_MASK == s.read_reg(R.CMDQ_PROD)


def test_pasid_attach_is_refused(world):
    """PASID tables of nested masters are the guest's (user_pasid_table); a host PASID
    attach is not modelled and is refused with EOPNOTSUPP, not a crash."""
    host, _ = world
    ctx = host.ctx
    dev = host.bind(SID, "ep")
    ioas = ctx.ioas_alloc()
    hwpt = ctx.hwpt_alloc(dev, ioas, 1 << 3)  # IOMMU_HWPT_ALLOC_PASID
    with pytest.raises(OSError) as e:
        ctx.attach(dev, hwpt, pasid=1)
    assert e.value.errno == errno.EOPNOTSUPP


def test_cmd_sync_uses_msipoll_word(world):
    """With IDR0.MSI the host's CMD_SYNC is CS=SIG_IRQ with MSIAddress = the sync slot and
    MSIData = 0 (Linux MSIPOLL, section 5.3): after completion the slot's first word is 0."""
    host, _ = world
    cmdq = host.hw.cmdq
    slot = cmdq.slot_addr(cmdq.prod + 1)  # the sync that follows the next command
    host.hw.cmdq.command(Opcode.CMD_TLBI_NSNH_ALL)
    assert host.memory.read(slot, 4) == bytes(4)
    assert host.memory.read(slot + 4, 4) == bytes(4)  # MSIData field was 0 as well
    assert host.memory.read(slot + 8, 8) != bytes(8)  # MSIAddress = the slot itself


def test_ats_master_gets_atc_invalidation_on_detach(world):
    """An ATS master (STE.EATS=0b01) gets CMD_ATC_INV (all) when it is blocked, so its ATC
    holds no stale translation (section 5.2 CMD_ATC_INV; detach path)."""
    from .conftest import Endpoint
    host, _ = world
    ctx = host.ctx
    ep = Endpoint(host, SID)
    dev = host.bind(SID, "ats-ep", ats=True)
    ioas = ctx.ioas_alloc()
    ctx.attach(dev, ioas)
    assert _ste(host, SID).EATS == rec.EATS_FULL
    ctx.detach(dev)
    assert ep.atc and ep.atc[-1][1:3] == (0, 1 << 64)


def test_unbind_blocks_and_forgets_the_master(nested):
    """VFIO unbind: iommufd detaches (blocked STE, section 6.2 Config=abort) and the host
    forgets the StreamID: its traffic aborts silently and nothing reaches a vEVENTQ."""
    host = nested.host
    host.unbind(nested.dev_id)
    assert _ste(host, SID).Config == SteConfig.ABORT and SID not in host.hw.masters
    r = host.smmu.translate(SID, 3, 0x1000, 4, Access.READ)
    assert r.aborted and r.fault.event is None
    assert host.counters.events_forwarded == 0 and not host.counters.events
