"""Stage-1 AArch64 4 KiB walk, permissions, A/R/S fault configuration, stage-2 hook (reference §6.5, §7)."""

import pytest

from devmodel.iommu import records as rec
from devmodel.iommu.builder import PageTable, cd_fields, make_s1_stream, make_world, s2_fields, ste_s1
from devmodel.iommu.faults import Access
from devmodel.iommu.records import EventClass, EventId, SteConfig
from devmodel.iommu.stage1 import TABLE_AP_NO_UNPRIV, TABLE_AP_RO, TABLE_UXN, start_level
from devmodel.iommu.translation import Stage2Fault

DATA = 0x800000


def world(**kw):
    mem, alloc, smmu, sw = make_world(**kw)
    sw.enable()
    return mem, alloc, smmu, sw


def stream(sw, sid=1, **kw):
    return make_s1_stream(sw, sid, **kw)


@pytest.mark.parametrize("ia,level", [(48, 0), (40, 0), (39, 1), (31, 1), (30, 2), (25, 2)])
def test_start_level(ia, level):
    """§7.2: start = 3 - floor((IA-13)/9)."""
    assert start_level(ia) == level


@pytest.mark.parametrize("t0sz", [16, 25, 32, 39])
def test_walk_page_for_each_t0sz(t0sz):
    """§7.2: 4-level (T0SZ=16) down to a 2-level walk (T0SZ=39) reach the L3 page."""
    mem, alloc, smmu, sw = world()
    s = stream(sw, cd_extra=dict(T0SZ=t0sz))
    pt = s.tables[0]
    pt.t0sz = t0sz
    va = (1 << (64 - t0sz)) - 0x1000
    pt.map(va, DATA)
    assert smmu.translate(1, None, va + 0x10).pa == DATA + 0x10


def test_blocks():
    """§7.3: 2 MiB (L2) and 1 GiB (L1) blocks; the output keeps the in-block offset."""
    _, _, smmu, sw = world()
    pt = stream(sw).tables[0]
    pt.map(0x4000_0000, 0x4000_0000, level=1)
    pt.map(0x20_0000, 0x60_0000, level=2)
    assert smmu.translate(1, None, 0x4012_3456).pa == 0x4012_3456
    r = smmu.translate(1, None, 0x21_2345, 0x100000)
    assert r.pa == 0x61_2345 and r.length == 0x100000


def test_range_check_and_epd():
    """§7.1: VA outside T0SZ range -> F_TRANSLATION (CLASS=IN); VA[55]=1 with EPD1=1 -> F_TRANSLATION."""
    _, _, smmu, sw = world()
    stream(sw)
    assert smmu.translate(1, None, 1 << 39).fault.event == EventId.F_TRANSLATION
    assert smmu.translate(1, None, 0xFFFF_FF80_0000_0000).fault.event == EventId.F_TRANSLATION
    evs = sw.events()
    assert [e.EventID for e in evs] == [EventId.F_TRANSLATION] * 2
    assert all(e.CLASS == EventClass.IN and e.S2 == 0 for e in evs)


def test_tbi_ignores_top_byte():
    """§7.1: with TBI0=1 the top byte is ignored for the range check and the walk; InputAddr keeps it."""
    _, _, smmu, sw = world()
    s = stream(sw, cd_extra=dict(TBI0=1))
    s.tables[0].map(0x3000, DATA)
    assert smmu.translate(1, None, 0x5A00_0000_0000_3000).pa == DATA


def test_invalid_and_reserved_descriptors():
    """§7.3: invalid (bit0=0), reserved L3 0b01, and L0 block descriptors -> F_TRANSLATION."""
    _, _, smmu, sw = world()
    pt = stream(sw, cd_extra=dict(T0SZ=16)).tables[0]
    pt.t0sz = 16
    pt.map(0x1000, 0, raw=DATA | 0b01)  # reserved at L3
    r = smmu.translate(1, None, 0x1000)
    assert r.fault.event == EventId.F_TRANSLATION and r.fault.level == 3
    r = smmu.translate(1, None, 0x2000)
    assert r.fault.event == EventId.F_TRANSLATION
    # an L0 block: write the L0 entry for VA 1<<39 directly
    sw.mem.write64(pt.root + 8, DATA | 0b01)
    r = smmu.translate(1, None, 1 << 39)
    assert r.fault.event == EventId.F_TRANSLATION and r.fault.level == 0


def test_address_size_faults():
    """§7.4: table address or output address beyond the CD's IPS -> F_ADDR_SIZE."""
    _, _, smmu, sw = world()
    pt = stream(sw, cd_extra=dict(IPS=0)).tables[0]  # 32-bit IPS
    pt.map(0x1000, 1 << 33)
    r = smmu.translate(1, None, 0x1000)
    assert r.fault.event == EventId.F_ADDR_SIZE and r.fault.level == 3
    sw.mem.write64(pt.root + 8, (1 << 34) | 0b11)  # L1 table pointer beyond 32 bits
    assert smmu.translate(1, None, 0x4000_0000).fault.event == EventId.F_ADDR_SIZE


def test_access_flag_fault_and_affd():
    """§7.4: AF=0 -> F_ACCESS unless CD.AFFD=1."""
    _, _, smmu, sw = world()
    stream(sw).tables[0].map(0x1000, DATA, af=False)
    assert smmu.translate(1, None, 0x1000).fault.event == EventId.F_ACCESS
    stream(sw, 2, cd_extra=dict(AFFD=1)).tables[0].map(0x1000, DATA, af=False)
    assert smmu.translate(2, None, 0x1000).ok


def test_walk_external_abort():
    """§7.4: an aborted descriptor read -> F_WALK_EABT, CLASS=TT, FetchAddr; recorded even with R=0."""
    mem, _, smmu, sw = world()
    pt = stream(sw, cd_extra=dict(R=0)).tables[0]
    mem.write64(pt.root, 0x40_0000_0000 | 0b11)
    r = smmu.translate(1, None, 0x1000)
    assert r.fault.event == EventId.F_WALK_EABT and r.aborted
    ev = sw.events()[0]
    assert ev.EventID == EventId.F_WALK_EABT and ev.CLASS == EventClass.TT
    assert ev.FetchAddr == 0x40_0000_0000 + 8 * 0  # L2 index 0 of the unbacked table


# ap = AP[2:1]: 00 RW priv only, 01 RW both, 10 RO priv only, 11 RO both (§7.5)
PERMS = [
    # (write_allowed_bit, unpriv_bit, access, privileged, ok)
    (True, True, Access.READ, False, True),
    (True, True, Access.WRITE, False, True),
    (True, False, Access.READ, False, False),   # AP[1]=0: PCIe DMA without PASID is unprivileged (pitfall 7)
    (True, False, Access.WRITE, False, False),
    (True, False, Access.READ, True, True),
    (True, False, Access.WRITE, True, True),
    (False, True, Access.READ, False, True),
    (False, True, Access.WRITE, False, False),
    (False, True, Access.WRITE, True, False),
    (False, False, Access.READ, True, True),
    (False, False, Access.WRITE, True, False),
]


@pytest.mark.parametrize("write,unpriv,access,priv,ok", PERMS)
def test_permission_table(write, unpriv, access, priv, ok):
    """§7.5 two-privilege Direct permissions for data accesses."""
    _, _, smmu, sw = world()
    stream(sw).tables[0].map(0x1000, DATA, write=write, unpriv=unpriv)
    r = smmu.translate(1, None, 0x1000, 4, access, priv)
    assert r.ok is ok
    if not ok:
        assert r.fault.event == EventId.F_PERMISSION
        ev = sw.events()[0]
        assert ev.RnW == (access is not Access.WRITE) and ev.PnU == int(priv)


def test_exec_permissions():
    """§7.5: unprivileged fetch needs UXN=0; privileged needs PXN=0 and not AP=01; WXN removes exec."""
    _, _, smmu, sw = world()
    pt = stream(sw).tables[0]
    pt.map(0x1000, DATA, uxn=True, unpriv=False)
    pt.map(0x2000, DATA, pxn=True, write=False)
    pt.map(0x3000, DATA)  # AP=01: unprivileged-writable
    assert smmu.translate(1, None, 0x1000, 4, Access.EXEC).fault.event == EventId.F_PERMISSION
    assert smmu.translate(1, None, 0x1000, 4, Access.EXEC, True).ok
    assert smmu.translate(1, None, 0x2000, 4, Access.EXEC).ok
    assert not smmu.translate(1, None, 0x2000, 4, Access.EXEC, True).ok
    assert not smmu.translate(1, None, 0x3000, 4, Access.EXEC, True).ok
    assert sw.events()[0].InD == 1
    stream(sw, 2, cd_extra=dict(WXN=1)).tables[0].map(0x3000, DATA)
    assert not smmu.translate(2, None, 0x3000, 4, Access.EXEC).ok


def test_pan_and_table_attributes():
    """§7.5: PAN faults privileged access to AP[1]=1 pages; APTable/UXNTable restrict; HAD0 ignores them."""
    _, _, smmu, sw = world()
    stream(sw, 1, cd_extra=dict(PAN=1)).tables[0].map(0x1000, DATA)
    assert not smmu.translate(1, None, 0x1000, 4, Access.READ, True).ok
    pt = stream(sw, 2).tables[0]
    pt.map(0x1000, DATA)
    pt.set_table_desc(0x1000, 2, TABLE_AP_RO | TABLE_UXN)
    assert not smmu.translate(2, None, 0x1000, 4, Access.WRITE).ok
    assert not smmu.translate(2, None, 0x1000, 4, Access.EXEC).ok
    assert smmu.translate(2, None, 0x1000, 4, Access.READ).ok
    pt3 = stream(sw, 3, cd_extra=dict(HAD0=1)).tables[0]
    pt3.map(0x1000, DATA)
    pt3.set_table_desc(0x1000, 1, TABLE_AP_NO_UNPRIV)
    assert smmu.translate(3, None, 0x1000, 4, Access.WRITE).ok


def test_privcfg_instcfg_overrides():
    """§6.2: STE.PRIVCFG=0b11 forces privileged, INSTCFG=0b11 turns reads into instruction fetches."""
    _, _, smmu, sw = world()
    stream(sw, 1, ste_extra=dict(PRIVCFG=rec.PRIVCFG_FORCE_PRIV)).tables[0].map(0x1000, DATA, unpriv=False)
    assert smmu.translate(1, None, 0x1000).ok
    stream(sw, 2, ste_extra=dict(INSTCFG=rec.INSTCFG_FORCE_INSTR)).tables[0].map(0x1000, DATA, uxn=True)
    assert not smmu.translate(2, None, 0x1000).ok
    assert sw.events()[0].InD == 1


@pytest.mark.parametrize("a,r,recorded,aborted", [(1, 1, True, True), (1, 0, False, True),
                                                  (0, 1, True, False), (0, 0, False, False)])
def test_cd_ars_fault_configuration(a, r, recorded, aborted):
    """§6.5 A/R/S table: R records, A=0 terminates as RAZ/WI; config errors ignore it."""
    _, _, smmu, sw = world()
    stream(sw, cd_extra=dict(A=a, R=r))
    res = smmu.translate(1, None, 0x1000)
    assert res.fault.event == EventId.F_TRANSLATION
    assert res.fault.recorded is recorded and res.aborted is aborted and res.raz_wi is (not aborted)
    assert len(sw.events()) == int(recorded)


# ---------------------------------------------------------------- stage 2 (hook = the host's IOAS)

class Ioas:
    """A dict-backed stage 2: ipa page -> (pa page, writable)."""

    def __init__(self):
        self.map = {}
        self.calls = 0

    def __call__(self, ipa, access):
        self.calls += 1
        e = self.map.get(ipa >> 12)
        if e is None:
            return Stage2Fault(EventId.F_TRANSLATION, "unmapped")
        if access is Access.WRITE and not e[1]:
            return Stage2Fault(EventId.F_PERMISSION, "read-only")
        return e[0] | (ipa & 0xFFF)


def test_stage2_only_stream():
    """§6.2 Config=0b110: IOVA is an IPA; stage-2 faults record S2=1, CLASS=IN, IPA (§3.1)."""
    _, _, smmu, sw = world()
    ioas = Ioas()
    ioas.map[0x10] = (DATA, False)
    smmu.set_stage2(3, ioas)
    sw.write_ste(5, dict(V=1, Config=SteConfig.S2_TRANS, **s2_fields(3)))
    assert smmu.translate(5, None, 0x10_010).pa == DATA + 0x10
    assert smmu.translate(5, None, 0x10_010, 4, Access.WRITE).fault.event == EventId.F_PERMISSION
    assert smmu.translate(5, None, 0x20_000).fault.event == EventId.F_TRANSLATION
    evs = sw.events()
    assert [(e.EventID, e.S2, e.CLASS, e.IPA) for e in evs] == [
        (EventId.F_PERMISSION, 1, EventClass.IN, 0x10_000), (EventId.F_TRANSLATION, 1, EventClass.IN, 0x20_000)]


def test_stage2_s2r_zero_is_silent():
    """§3.3: stage-2 Translation-related faults are recorded only when STE.S2R=1 (always abort)."""
    _, _, smmu, sw = world()
    smmu.set_stage2(3, Ioas())
    sw.write_ste(5, dict(V=1, Config=SteConfig.S2_TRANS, **s2_fields(3, s2r=0)))
    r = smmu.translate(5, None, 0x1000)
    assert r.aborted and not r.fault.recorded and sw.events() == []


def test_nested_cd_and_walk_through_stage2():
    """§6.2 Config=0b111: CD and table addresses are IPAs; S2 faults on them report CLASS=CD / TT (TTRnW=1)."""
    mem, alloc, smmu, sw = world()
    ioas = Ioas()
    smmu.set_stage2(4, ioas)
    pt = PageTable(mem, alloc)
    cd = alloc.alloc(4096)
    sw.write_cd(cd, cd_fields(pt.root))
    pt.map(0x5000, 0x9000)  # output IPA 0x9000
    ipa_base = 0x1_0000_0000
    for pa_page in range(0, mem.size >> 13):  # identity-map the low half at IPA + 4 GiB
        ioas.map[(ipa_base >> 12) + pa_page] = (pa_page << 12, True)
    ste = ste_s1(ipa_base + cd)
    ste.update(Config=SteConfig.NESTED, **s2_fields(4))
    sw.write_ste(6, ste)
    # CD at IPA ipa_base+cd works, but the page table root is a PA, i.e. IPA not mapped -> CLASS=TT
    r = smmu.translate(6, None, 0x5000)
    assert r.fault.event == EventId.F_TRANSLATION and r.fault.stage == 2
    ev = sw.events()[0]
    assert ev.S2 == 1 and ev.CLASS == EventClass.TT
    sw.write_ste(7, dict(V=1, Config=SteConfig.NESTED, S1ContextPtr=0x7_0000_0000, **s2_fields(4)))
    assert smmu.translate(7, None, 0x5000).fault.stage == 2
    assert sw.events()[0].CLASS == EventClass.CD
    # identity stage 2 for everything: the walk completes and the output IPA goes through stage 2
    smmu.set_stage2(4, lambda ipa, acc: ipa)
    sw.cmd(rec.Opcode.CMD_TLBI_S12_VMALL, VMID=4)
    assert smmu.translate(6, None, 0x5000).pa == 0x9000
