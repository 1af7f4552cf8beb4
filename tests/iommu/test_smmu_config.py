"""Stream table, STE and CD decode: every configuration error and its priority (reference §3.3, §6)."""

import pytest

from devmodel.iommu import records as rec
from devmodel.iommu import registers as R
from devmodel.iommu.builder import cd_fields, make_s1_stream, make_world, s2_fields, ste_s1
from devmodel.iommu.faults import Access
from devmodel.iommu.records import EventId, SteConfig

DATA = 0x800000


def world(**kw):
    mem, alloc, smmu, sw = make_world(**kw)
    sw.enable()
    return mem, alloc, smmu, sw


def only_event(sw):
    evs = sw.events()
    assert len(evs) == 1, evs
    return evs[0]


def test_linear_table_translation_ok():
    """§6.1 linear: STE = base + SID*64; §6.4 single CD."""
    mem, _, smmu, sw = world()
    s = make_s1_stream(sw, 5)
    s.tables[0].map(0x1000, DATA)
    r = smmu.translate(5, None, 0x1008, 8, Access.READ)
    assert r.ok and r.pa == DATA + 8 and r.length == 8


def test_bad_streamid_out_of_range():
    """§1.8: SID >= 2^LOG2SIZE aborts with C_BAD_STREAMID when CR2.RECINVSID=1."""
    _, _, smmu, sw = world()
    r = smmu.translate(1 << 8, None, 0)
    assert r.fault.event == EventId.C_BAD_STREAMID
    assert only_event(sw).StreamID == 256


def test_bad_streamid_not_recorded_without_recinvsid():
    """§1.8/§3.2: C_BAD_STREAMID needs CR2.RECINVSID=1; otherwise abort silently."""
    _, _, smmu, sw = world()
    smmu.write_reg(R.CR2, 0)
    r = smmu.translate(1 << 8, None, 0)
    assert r.aborted and not r.fault.recorded and sw.events() == []


def test_two_level_table():
    """§6.1 2-level: L1STD at base + (SID>>SPLIT)*8, STE at L2Ptr + SID[SPLIT-1:0]*64."""
    mem, _, smmu, sw = world(two_level=True, split=6)
    s = make_s1_stream(sw, 0x45)
    s.tables[0].map(0x3000, DATA)
    assert smmu.translate(0x45, None, 0x3000).pa == DATA
    assert sw.l2[1] + 5 * 64 == s.ste_addr


@pytest.mark.parametrize("span,sid_low", [(0, 0), (12, 0), (8, 0), (3, 4)])
def test_two_level_span_rules_give_bad_streamid(span, sid_low):
    """§6.1 + pitfall 9: Span 0/reserved, Span > SPLIT+1, or SID beyond 2^(Span-1) is C_BAD_STREAMID (not C_BAD_STE)."""
    mem, alloc, smmu, sw = world(two_level=True, split=6)
    l2 = alloc.alloc(4096)
    mem.write(sw.strtab + 8, rec.L1STD.encode(Span=span, L2Ptr=l2))
    r = smmu.translate(64 + sid_low, None, 0)
    assert r.fault.event == EventId.C_BAD_STREAMID
    assert only_event(sw).EventID == EventId.C_BAD_STREAMID


def test_ste_fetch_abort():
    """§6.1: an abort fetching the L1STD/STE is F_STE_FETCH with FetchAddr."""
    mem, alloc, smmu, sw = world(two_level=True, split=6)
    mem.write(sw.strtab + 16, rec.L1STD.encode(Span=7, L2Ptr=0x4000_0000))  # unbacked
    r = smmu.translate(2 * 64 + 3, None, 0)
    assert r.fault.event == EventId.F_STE_FETCH
    ev = only_event(sw)
    assert ev.EventID == EventId.F_STE_FETCH and ev.FetchAddr == 0x4000_0000 + 3 * 64


def test_ste_v0_is_bad_ste():
    """§6.2: V=0 -> C_BAD_STE."""
    _, _, smmu, sw = world()
    assert smmu.translate(3, None, 0).fault.event == EventId.C_BAD_STE
    assert only_event(sw).StreamID == 3


def test_ste_config_abort_is_silent():
    """§3.3: STE.Config=0b000 (and reserved 0b0xx) abort without an event."""
    _, _, smmu, sw = world()
    for config in (0b000, 0b010):
        sw.write_ste(3, dict(V=1, Config=config))
        smmu.write_reg(R.CR0, smmu.read_reg(R.CR0))
        sw.cmd(rec.Opcode.CMD_CFGI_ALL if hasattr(rec.Opcode, "CMD_CFGI_ALL") else rec.Opcode.CMD_CFGI_STE_RANGE,
               Range=31)
        r = smmu.translate(3, None, 0)
        assert r.aborted and not r.fault.recorded
    assert sw.events() == []


def test_ste_bypass():
    """§6.2 Config=0b100: the address passes through; beyond OAS -> F_ADDR_SIZE (§7.5)."""
    _, _, smmu, sw = world()
    sw.write_ste(4, dict(V=1, Config=SteConfig.BYPASS))
    assert smmu.translate(4, None, 0xABC000).pa == 0xABC000
    r = smmu.translate(4, None, 1 << 50)
    assert r.fault.event == EventId.F_ADDR_SIZE and only_event(sw).CLASS == rec.EventClass.IN


ILLEGAL_STES = {
    "EATS split": dict(EATS=rec.EATS_SPLIT),
    "EATS DPT": dict(EATS=rec.EATS_DPT),
    "S1STALLD without stall": dict(S1STALLD=1),
    "S1CDMax > SSIDSIZE": dict(S1CDMax=21),
    "S1ContextPtr beyond OAS": dict(S1ContextPtr=1 << 50),
}
ILLEGAL_S2 = {
    "S2S with terminate model": dict(S2S=1),
    "S2AA64=0": dict(S2AA64=0),
    "S2HA": dict(S2HA=1),
    "S2TG 64K": dict(S2TG=1),
    "S2T0SZ too small": dict(S2T0SZ=15),
    "S2T0SZ too big": dict(S2T0SZ=40),
    "S2SL0 inconsistent": dict(S2T0SZ=34, S2SL0=2),
    "S2ENDI": dict(S2ENDI=1),
    "S2TTB beyond S2PS": dict(S2PS=0, S2TTB=1 << 40),
}


@pytest.mark.parametrize("name", list(ILLEGAL_STES))
def test_illegal_s1_ste(name):
    """§6.3 ILLEGAL STE rules (stage-1 and EATS) -> C_BAD_STE."""
    mem, _, smmu, sw = world()
    s = make_s1_stream(sw, 6)
    sw.write_ste(6, ste_s1(s.cd_table, **ILLEGAL_STES[name]))
    assert smmu.translate(6, None, 0).fault.event == EventId.C_BAD_STE
    assert only_event(sw).EventID == EventId.C_BAD_STE


@pytest.mark.parametrize("name", list(ILLEGAL_S2))
def test_illegal_s2_ste(name):
    """§6.3 ILLEGAL STE rules for stage-2 fields -> C_BAD_STE."""
    _, _, smmu, sw = world()
    sw.write_ste(6, dict(V=1, Config=SteConfig.S2_TRANS, **s2_fields(1, **ILLEGAL_S2[name])))
    assert smmu.translate(6, None, 0).fault.event == EventId.C_BAD_STE


def test_stage_not_implemented_is_illegal():
    """§6.3: Config=0b11x with IDR0.S2P=0 is ILLEGAL."""
    _, _, smmu, sw = world(profile=R.SmmuProfile(s2p=False))
    sw.write_ste(6, dict(V=1, Config=SteConfig.S2_TRANS, **s2_fields(1)))
    assert smmu.translate(6, None, 0).fault.event == EventId.C_BAD_STE


# ---------------------------------------------------------------- substreams and CDs

def test_ssid_without_substreams():
    """§6.4: SSV=1 with S1CDMax=0 -> C_BAD_SUBSTREAMID (SubstreamID valid, no SSV)."""
    _, _, smmu, sw = world()
    make_s1_stream(sw, 7)
    assert smmu.translate(7, 3, 0).fault.event == EventId.C_BAD_SUBSTREAMID
    ev = only_event(sw)
    assert ev.SubstreamID == 3 and ev.SSV == 0


def test_ssid_on_stage1_bypass_stream():
    """§3.2: SSID given while stage 1 is off -> C_BAD_SUBSTREAMID."""
    _, _, smmu, sw = world()
    sw.write_ste(4, dict(V=1, Config=SteConfig.BYPASS))
    assert smmu.translate(4, 1, 0).fault.event == EventId.C_BAD_SUBSTREAMID


def test_ssid_beyond_s1cdmax():
    """§3.2: SSID >= 2^S1CDMax -> C_BAD_SUBSTREAMID."""
    _, _, smmu, sw = world()
    make_s1_stream(sw, 7, s1cdmax=2, ssids=(1,))
    assert smmu.translate(7, 4, 0).fault.event == EventId.C_BAD_SUBSTREAMID


def test_substreams_select_cd():
    """§6.4: the SSID indexes a linear CD table; each CD has its own page table."""
    _, _, smmu, sw = world()
    s = make_s1_stream(sw, 7, s1cdmax=2, ssids=(1, 2))
    s.tables[1].map(0x5000, DATA)
    s.tables[2].map(0x5000, DATA + 0x1000)
    assert smmu.translate(7, 1, 0x5000).pa == DATA
    assert smmu.translate(7, 2, 0x5000).pa == DATA + 0x1000


@pytest.mark.parametrize("s1dss,ssid", [(rec.S1DSS_TERMINATE, None), (rec.S1DSS_SSID0, 0), (0b11, None)])
def test_stream_disabled(s1dss, ssid):
    """§6.2 S1DSS: 0b00 (and reserved 0b11) terminate SSID-less traffic; 0b10 makes SSID 0 illegal."""
    _, _, smmu, sw = world()
    make_s1_stream(sw, 8, s1cdmax=1, s1dss=s1dss)
    assert smmu.translate(8, ssid, 0).fault.event == EventId.F_STREAM_DISABLED
    ev = only_event(sw)
    assert ev.StreamID == 8 and ev.InputAddr == 0


def test_s1dss_bypass_and_ssid0():
    """§6.2 S1DSS=0b01 bypasses stage 1 for traffic without SSID; 0b10 uses CD 0."""
    _, _, smmu, sw = world()
    make_s1_stream(sw, 8, s1cdmax=1, s1dss=rec.S1DSS_BYPASS)
    assert smmu.translate(8, None, 0x7000).pa == 0x7000
    s = make_s1_stream(sw, 9, s1cdmax=1, s1dss=rec.S1DSS_SSID0)
    s.tables[0].map(0x7000, DATA)
    assert smmu.translate(9, None, 0x7000).pa == DATA


def test_two_level_cd_table():
    """§6.4: 2-level CD table with 4K leaves; L1CD.V=0 -> C_BAD_SUBSTREAMID."""
    mem, alloc, smmu, sw = world()
    l1 = alloc.alloc(4096)
    leaf = alloc.alloc(4096)
    from devmodel.iommu.builder import PageTable
    pt = PageTable(mem, alloc)
    pt.map(0x2000, DATA)
    mem.write(l1 + 8, rec.L1CD.encode(V=1, L2Ptr=leaf))
    sw.write_cd(leaf + 3 * 64, cd_fields(pt.root))
    sw.write_ste(10, ste_s1(l1, s1cdmax=8, s1fmt=rec.S1FMT_64_4K))
    assert smmu.translate(10, 64 + 3, 0x2000).pa == DATA
    assert smmu.translate(10, 128, 0x2000).fault.event == EventId.C_BAD_SUBSTREAMID


def test_cd_fetch_abort():
    """§6.4: abort fetching the CD -> F_CD_FETCH with FetchAddr."""
    _, _, smmu, sw = world()
    sw.write_ste(11, ste_s1(0x40_0000_0000 >> 8 << 8))
    assert smmu.translate(11, None, 0).fault.event == EventId.F_CD_FETCH
    assert only_event(sw).FetchAddr == 0x40_0000_0000 >> 8 << 8


ILLEGAL_CDS = {
    "V=0": dict(V=0),
    "S=1 without stall": dict(S=1),
    "ENDI big-endian": dict(ENDI=1),
    "AA64=0": dict(AA64=0),
    "HA": dict(HA=1),
    "HD": dict(HD=1),
    "T0SZ=15": dict(T0SZ=15),
    "T0SZ=40": dict(T0SZ=40),
    "TG0 64K": dict(TG0=rec.TG0_64K),
    "TTB0 beyond IPS": dict(IPS=0, TTB0=1 << 33),
    "TTB1 enabled with TG1 in TG0 encoding": dict(EPD1=0, T1SZ=25, TG1=0),
}


@pytest.mark.parametrize("name", list(ILLEGAL_CDS))
def test_illegal_cd(name):
    """§6.6 ILLEGAL CD rules -> C_BAD_CD (pitfall 8: TG1 has its own encoding)."""
    _, _, smmu, sw = world()
    s = make_s1_stream(sw, 12)
    fields = cd_fields(s.tables[0].root)
    fields.update(ILLEGAL_CDS[name])
    sw.write_cd(s.cd_addr(0), fields)
    assert smmu.translate(12, None, 0).fault.event == EventId.C_BAD_CD
    assert only_event(sw).EventID == EventId.C_BAD_CD


def test_epd1_fields_not_checked():
    """Pitfall 8: EPD1=1 means TTB1 fields (here a reserved TG1 and T1SZ=0) are not validity-checked."""
    _, _, smmu, sw = world()
    s = make_s1_stream(sw, 12, cd_extra=dict(T1SZ=0, TG1=0))
    s.tables[0].map(0, DATA)
    assert smmu.translate(12, None, 0).ok


def test_term_model_requires_a():
    """§6.6: with TERM_MODEL=1, CD.A=0 is ILLEGAL."""
    _, _, smmu, sw = world(profile=R.SmmuProfile(term_model=True))
    make_s1_stream(sw, 12, cd_extra=dict(A=0))
    assert smmu.translate(12, None, 0).fault.event == EventId.C_BAD_CD


def test_priority_bad_substream_before_cd_fetch():
    """§3.3 priority: C_BAD_SUBSTREAMID is reported before F_CD_FETCH."""
    _, _, smmu, sw = world()
    sw.write_ste(13, ste_s1(0x40_0000_0000 >> 8 << 8))
    assert smmu.translate(13, 5, 0).fault.event == EventId.C_BAD_SUBSTREAMID
