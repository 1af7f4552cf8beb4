"""SMMU trace hops: ``smmu.fault``, ``smmu.evtq`` and ``smmu.priq`` with the correlation links other
layers take (devmodel.trace (correlation keys): keys ("smmu.evtq", slot PA) and ("smmu.priq", slot PA)).

The queue rules the hops report are reference smmuv3-pcie.md §2 (overflow, OVFLG toggled once,
PRI auto-responses), §3.3 (which faults record / abort / RAZ-WI) and §1.5 (GBPA.ABORT).
"""

from __future__ import annotations

import pytest

from devmodel.iommu import records as rec
from devmodel.iommu import registers as R
from devmodel.iommu.builder import make_s1_stream, make_world
from devmodel.iommu.faults import Access
from devmodel.iommu.records import EventId
from devmodel.trace import TRACER


@pytest.fixture
def t0() -> int:
    assert TRACER.enabled
    return TRACER.clock()


def world(**kw):
    mem, alloc, smmu, sw = make_world(eventq_log2=1, priq_log2=1, **kw)
    sw.enable()
    return mem, smmu, sw


def fault_at(smmu, sid: int, iova: int, access: Access = Access.READ) -> int:
    """One untranslated access inside an endpoint origin scope; returns the fault id born there."""
    with TRACER.origin("endpoint.dma", sid=sid, ssid=None, addr=iova, access=access.name.lower()) as o:
        r = smmu.translate(sid, None, iova, 4, access)
    assert not r.ok and r.fault.trace_id == o.fault != 0
    return o.fault


def journey(fid: int) -> list[tuple[str, dict]]:
    return [(e.hop, e.detail) for e in TRACER.events(fid)]


def test_fault_then_evtq_slot_linked(t0):
    """§3.3: an unmapped stage-1 access records F_TRANSLATION; the trace is origin, smmu.fault, then
    smmu.evtq with the slot index and PA, linked for the consumer, holding that record."""
    mem, smmu, sw = world()
    make_s1_stream(sw, 1)
    fids = [fault_at(smmu, 1, 0x5000 + i * 0x1000, Access.WRITE) for i in range(2)]
    for slot, fid in enumerate(fids):
        (h0, origin), (h1, f), (h2, q) = journey(fid)
        assert (h0, h1, h2) == ("endpoint.dma", "smmu.fault", "smmu.evtq")
        assert f["event"] == EventId.F_TRANSLATION and f["sid"] == 1 and f["ssid"] is None and f["stage"] == 1
        assert f["addr"] == 0x5000 + slot * 0x1000 and f["outcome"] == "abort" and f["record"] is True
        assert q["slot"] == slot and q["pa"] == sw.eventq + slot * rec.EVENT_SIZE
        assert TRACER.take(("smmu.evtq", q["pa"])) == fid
        ev = rec.EVENT.decode(mem.read(q["pa"], rec.EVENT_SIZE))
        assert ev.EventID == EventId.F_TRANSLATION and ev.InputAddr == f["addr"] and ev.RnW == 0


def test_evtq_full_hop_reports_drop_and_overflow(t0):
    """§2: a record for a full queue is discarded and OVFLG toggles once; the hop says dropped/overflow
    and no slot is linked; a second drop does not toggle again."""
    _, smmu, sw = world()
    make_s1_stream(sw, 1)
    for i in range(2):
        fault_at(smmu, 1, 0x1000 * (i + 1))  # 2 entries: full
    a = fault_at(smmu, 1, 0x9000)
    b = fault_at(smmu, 1, 0xA000)
    qa = journey(a)[-1]
    qb = journey(b)[-1]
    assert qa[0] == qb[0] == "smmu.evtq"
    assert qa[1]["dropped"] and qa[1]["reason"] == "full" and qa[1]["overflow"] and qa[1]["ovflg_toggled"]
    assert qb[1]["dropped"] and not qb[1]["ovflg_toggled"]
    assert smmu.read_reg(R.EVENTQ_PROD) & R.Q_OVFLG


def test_evtq_disabled_hop_reports_drop_without_overflow(t0):
    """§2: with EVENTQEN=0 records are discarded without signalling overflow."""
    _, smmu, sw = world()
    make_s1_stream(sw, 1)
    smmu.write_reg(R.CR0, smmu.read_reg(R.CR0) & ~R.Cr0.EVENTQEN)
    fid = fault_at(smmu, 1, 0x3000)
    hop, d = journey(fid)[-1]
    assert hop == "smmu.evtq" and d["dropped"] and d["reason"] == "EVENTQEN=0" and "overflow" not in d


def test_raz_wi_fault_traced_without_record(t0):
    """§3.3: CD.A=0, R=0 makes a stage-1 translation fault RAZ/WI with no record: smmu.fault says so and
    there is no smmu.evtq hop."""
    _, smmu, sw = world()
    make_s1_stream(sw, 1, cd_extra=dict(A=0, R=0))
    with TRACER.origin("endpoint.dma", sid=1, ssid=None, addr=0x4000, access="read") as o:
        r = smmu.translate(1, None, 0x4000)
    assert r.raz_wi and o.fault
    hops = journey(o.fault)
    assert [h for h, _ in hops] == ["endpoint.dma", "smmu.fault"]
    assert hops[1][1]["outcome"] == "raz_wi" and hops[1][1]["record"] is False


def test_gbpa_abort_traced_as_silent_fault(t0):
    """§1.5: SMMUEN=0 with GBPA.ABORT=1 aborts with no event: smmu.fault (no event id), no smmu.evtq."""
    _, smmu, sw = world()
    smmu.write_reg(R.CR0, 0)
    smmu.write_reg(R.GBPA, R.GBPA_UPDATE | R.GBPA_ABORT)
    fid = fault_at(smmu, 1, 0x1000)
    hops = journey(fid)
    assert [h for h, _ in hops] == ["endpoint.dma", "smmu.fault"] and hops[1][1]["event"] is None


def test_page_request_priq_slot_linked(t0):
    """§4.1: a page request inside an endpoint.page_request origin is written to the PRIQ; smmu.priq
    carries slot, PA, PRG index and Last; the slot is linked and holds the request."""
    mem, smmu, sw = world()
    make_s1_stream(sw, 3)
    with TRACER.origin("endpoint.page_request", sid=3, ssid=7, addr=0x7000, prg=9) as o:
        assert smmu.page_request(3, 7, 0x7000, 9, True, read=True, write=True)
    (h0, _), (h1, q) = journey(o.fault)
    assert (h0, h1) == ("endpoint.page_request", "smmu.priq")
    assert q["slot"] == 0 and q["pa"] == sw.priq and q["prg"] == 9 and q["last"] is True
    assert TRACER.take(("smmu.priq", sw.priq)) == o.fault
    pr = rec.PRI.decode(mem.read(q["pa"], rec.PRI_SIZE))
    assert pr.PageAddr == 0x7000 and pr.PRGIndex == 9 and pr.SubstreamID == 7 and pr.L == 1


def test_priq_overflow_and_disabled_hops_report_auto_responses(t0):
    """§2: a request arriving at a full PRIQ toggles OVFLG and is dropped; Last=1 gets an automatic
    Success. With PRIQEN=0 every request gets an automatic Response Failure. Both show in smmu.priq."""
    _, smmu, sw = world()
    make_s1_stream(sw, 3)
    responses = []
    smmu.register_endpoint(3, prg_response=lambda ssid, prg, code: responses.append((prg, code)))
    for i in range(2):
        assert smmu.page_request(3, None, 0x1000 * i, i, False)
    fid = TRACER.begin("endpoint.page_request")
    assert not smmu.page_request(3, None, 0x9000, 5, True, trace_id=fid)
    (hop, d), = [(e.hop, e.detail) for e in TRACER.events(fid)][1:]
    assert hop == "smmu.priq" and d["dropped"] and d["overflow"] and d["ovflg_toggled"]
    assert d["auto_response"] == "SUCCESS" and responses == [(5, rec.PrgResponseCode.SUCCESS)]
    smmu.write_reg(R.CR0, smmu.read_reg(R.CR0) & ~R.Cr0.PRIQEN)
    fid2 = TRACER.begin("endpoint.page_request")
    assert not smmu.page_request(3, None, 0xA000, 6, True, trace_id=fid2)
    hop, d = [(e.hop, e.detail) for e in TRACER.events(fid2)][-1]
    assert d["dropped"] and d["auto_response"] == "RESPONSE_FAILURE" and d["reason"] == "PRIQ effectively disabled"


def test_no_origin_fault_is_born_at_the_smmu(t0):
    """A fault outside any endpoint scope (injected traffic) is still traced, born at smmu.fault."""
    _, smmu, sw = world()
    make_s1_stream(sw, 1)
    r = smmu.translate(1, None, 0x6000)
    fid = r.fault.trace_id
    assert fid and [e.hop for e in TRACER.events(fid)] == ["smmu.fault", "smmu.evtq"]
