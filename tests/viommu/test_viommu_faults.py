"""Faults from real translations reaching the guest: EVTQ, overflow accounting, PRIQ,
page responses, and the per-fault trace.

References: iommufd.md section 3.3/3.4 (vEVENTQ sequence, LOST_EVENTS, gaps), 3.7 (vSID
swapped by the host), 2.3-2.5 and 2.8 (FAULT groups, responses, auto INVALID on replace);
smmuv3-pcie.md section 2 (EVTQ full: drop, OVFLG once; PRIQ), 3.1 (event fields), 4.1-4.2
(PRI record, CMD_PRI_RESP Resp by value), 8.6 (PCIe response codes); DESIGN.md "A fault's
journey"; the machine interface (README, devmodel/machine.py) (trace keys, MSI-X vectors).
"""

from __future__ import annotations

from devmodel.iommu import registers as R
from devmodel.iommu.faults import Access
from devmodel.iommu.records import EventId, Opcode, PrgResponseCode, PriResp
from devmodel.trace import TRACER
from devmodel.viommu import VIOMMU_EVTQ_LOST, VIOMMU_VEVENTQ_LOST, MsixVector

from .conftest import SID, VSID, Endpoint, build

IOVA = 0x1234_5000


def _fault(host, ssid=None, iova=IOVA, write=True):  # noqa: ANN001
    with TRACER.origin("endpoint.dma", sid=SID, ssid=ssid, addr=iova, access="w" if write else "r") as o:
        r = host.smmu.translate(SID, ssid, iova, 4, Access.WRITE if write else Access.READ)
    assert r.pa is None
    return o.fault


def test_translation_fault_reaches_guest_evtq_with_guest_ids(world):
    """F_TRANSLATION with the guest's StreamID (vSID), SSID, address and RnW=0 (write)
    in the guest EVTQ, vector 0 raised."""
    host, fn, ctx, g = world
    g.events()
    g.s1_stream(s1cdmax=4)
    ctx.irqs.clear()
    _fault(host, ssid=3)
    ctx.pump()
    evs = g.events()
    assert len(evs) == 1
    e = evs[0]
    assert (e.EventID, e.StreamID, e.SSV, e.SubstreamID) == (EventId.F_TRANSLATION, VSID, 1, 3)
    assert e.InputAddr == IOVA and e.RnW == 0 and e.S2 == 0
    assert MsixVector.EVENTQ in ctx.vectors()
    assert fn.counters.events_written == 1


def test_every_trace_hop_once_for_an_event_fault(world):
    """DESIGN.md journey: one fault id from the endpoint's access to the guest consuming
    the record; each hop exactly once."""
    host, fn, ctx, g = world
    g.events()
    g.s1_stream()
    fid = _fault(host)
    ctx.pump()
    g.events()
    hops = [e.hop for e in TRACER.events(fid)]
    for hop in ("endpoint.dma", "host.evtq", "iommufd.veventq", "viommu.read", "guest.evtq",
                "guest.consumed"):
        assert hops.count(hop) == 1, (hop, hops)


def test_veventq_overflow_exact_lost_count_visible_to_guest():
    """vEVENTQ depth 2, 5 faults before the VMM reads: 2 events + LOST header (seq 4):
    the guest gets 2 records, OVFLG toggled, and VIOMMU_EVTQ_LOST = 3 (iommufd.md 3.4)."""
    host, fn, ctx, g, _ = build(veventq_depth=2)
    g.events()
    g.s1_stream()
    readers, ctx.readers = ctx.readers, {}  # the VMM is slow: nobody reads the fd yet
    for i in range(5):
        _fault(host, iova=IOVA + i * 0x1000)
    ctx.readers = readers
    ctx.pump()
    assert g.rd(R.EVENTQ_PROD) & R.Q_OVFLG != g.rd(R.EVENTQ_CONS) & R.Q_OVFLG
    evs = g.events()
    assert [e.InputAddr for e in evs] == [IOVA, IOVA + 0x1000]
    assert g.rd(VIOMMU_EVTQ_LOST) == 3 and g.rd(VIOMMU_VEVENTQ_LOST) == 3
    # A later gap-free event is not counted again.
    _fault(host, iova=IOVA + 0x9000)
    ctx.pump()
    assert [e.InputAddr for e in g.events()] == [IOVA + 0x9000]
    assert g.rd(VIOMMU_EVTQ_LOST) == 3
    host.close()


def test_guest_evtq_full_drops_and_toggles_ovflg_once():
    """Guest EVTQ of 2 entries, 5 faults: 2 written, 3 dropped, OVFLG toggled once; after
    the guest drains and acks, recording resumes (smmuv3-pcie.md section 2)."""
    host, fn, ctx, g, _ = build(evtq_log2=1)
    g.events()
    g.s1_stream()
    for i in range(5):
        _fault(host, iova=IOVA + i * 0x1000)
        ctx.pump()
    prod = g.rd(R.EVENTQ_PROD)
    assert prod & R.Q_OVFLG and not g.rd(R.EVENTQ_CONS) & R.Q_OVFLG
    assert fn.counters.events_dropped_full == 3 and fn.counters.evtq_overflows == 1
    assert len(g.events()) == 2  # acks OVFLG
    assert g.rd(VIOMMU_EVTQ_LOST) == 3
    _fault(host, iova=IOVA + 0x8000)
    ctx.pump()
    assert [e.InputAddr for e in g.events()] == [IOVA + 0x8000]
    host.close()


def _pri_group(host, prg, ssid=None, pages=(0x5000_0000, 0x5000_1000)):  # noqa: ANN001
    with TRACER.origin("endpoint.page_request", sid=SID, ssid=ssid, addr=pages[0]) as o:
        for i, addr in enumerate(pages):
            assert host.smmu.page_request(SID, ssid, addr, prg, last=i == len(pages) - 1,
                                          read=True, write=True)
    return o.fault


def test_pri_success_round_trip(world):
    """A PRG of 2 -> 2 guest PRIQ records (guest StreamID, PRG index, Last on the 2nd),
    vector 1; guest CMD_PRI_RESP Success -> FAULT fd -> host CMD_PRI_RESP -> the endpoint
    gets PCIe Success; every hop of the fault once."""
    host, fn, ctx, g = world
    ep = g.endpoint
    g.s1_stream()
    fid = _pri_group(host, prg=5, ssid=7)
    ctx.pump()
    prs = g.page_requests()
    assert [(p.StreamID, p.PRGIndex, p.L, p.SSV, p.SubstreamID) for p in prs] == [
        (VSID, 5, 0, 1, 7), (VSID, 5, 1, 1, 7)]
    assert prs[0].PageAddr == 0x5000_0000 and prs[0].R and prs[0].W
    assert MsixVector.PRIQ in ctx.vectors()
    assert ep.prg == []
    g.cmd(Opcode.CMD_PRI_RESP, StreamID=VSID, SSV=1, SubstreamID=7, PRGIndex=5, Resp=PriResp.SUCCESS)
    assert ep.prg == [(7, 5, PrgResponseCode.SUCCESS)]
    hops = [e.hop for e in TRACER.events(fid)]
    for hop in ("endpoint.page_request", "host.priq", "iommufd.fault", "viommu.read",
                "guest.priq", "guest.consumed", "guest.response", "iommufd.response",
                "host.response"):
        assert hops.count(hop) == (2 if hop == "host.priq" else 1), (hop, hops)


def test_pri_invalid_and_failure_map_to_invalid(world):
    """Guest InvalidRequest -> PCIe Invalid Request; guest ResponseFailure is written as
    INVALID (the FAULT fd has no FAILURE code) -> the endpoint sees Invalid Request."""
    host, fn, ctx, g = world
    ep = g.endpoint
    g.s1_stream()
    _pri_group(host, prg=1)
    _pri_group(host, prg=2)
    ctx.pump()
    assert len(g.page_requests()) == 4
    g.cmd(Opcode.CMD_PRI_RESP, StreamID=VSID, PRGIndex=1, Resp=PriResp.INVALID_REQUEST)
    g.cmd(Opcode.CMD_PRI_RESP, StreamID=VSID, PRGIndex=2, Resp=PriResp.RESPONSE_FAILURE)
    assert ep.prg == [(None, 1, PrgResponseCode.INVALID_REQUEST),
                      (None, 2, PrgResponseCode.INVALID_REQUEST)]
    assert fn.counters.pri_resp_failure_as_invalid == 1
    g.cmd(Opcode.CMD_PRI_RESP, StreamID=VSID, PRGIndex=2, Resp=PriResp.SUCCESS)
    assert fn.counters.pri_resp_unmatched == 1 and len(ep.prg) == 2


def test_ste_replace_with_outstanding_requests_auto_invalid(world):
    """The guest changes the STE while a group is outstanding: the nested HWPT is replaced,
    iommufd answers the old handle's group INVALID (iommufd.md 1.6/2.8) and the endpoint
    sees Invalid Request; the guest's late response is ignored."""
    host, fn, ctx, g = world
    ep = g.endpoint
    g.s1_stream()
    _pri_group(host, prg=9)
    ctx.pump()
    assert len(g.page_requests()) == 2
    old = fn.endpoints[VSID].hwpt_id
    g.s1_stream()  # a new CD table: a different STE
    assert fn.endpoints[VSID].hwpt_id != old
    assert ep.prg == [(None, 9, PrgResponseCode.INVALID_REQUEST)]
    g.cmd(Opcode.CMD_PRI_RESP, StreamID=VSID, PRGIndex=9, Resp=PriResp.SUCCESS)
    assert len(ep.prg) == 1 and fn.counters.pri_resp_unmatched == 1


def test_priq_overflow_auto_success_for_last():
    """Guest PRIQ of 2: a PRG of 3 fills it, the 3rd (Last) arrives at a full queue ->
    OVFLG, discarded, answered Success automatically (smmuv3-pcie.md section 2)."""
    host, fn, ctx, g, _ = build(priq_log2=1)
    ep = Endpoint(host)
    g.s1_stream()
    _pri_group(host, prg=4, pages=(0x5000_0000, 0x5000_1000, 0x5000_2000))
    ctx.pump()
    assert g.rd(R.PRIQ_PROD) & R.Q_OVFLG
    assert ep.prg == [(None, 4, PrgResponseCode.SUCCESS)]
    assert fn.counters.pri_dropped == 1 and fn.counters.priq_overflows == 1
    host.close()
