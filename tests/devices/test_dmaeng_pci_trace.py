"""Issue 4 criterion: "a trace of one fault shows each step from descriptor to queue record".

One descriptor is run into one fault through the PCI function and the real SMMUv3; the
hops recorded for that single fault id (devmodel.trace, hop names of ``HOPS``, keys of
devmodel.trace (correlation keys)) must be exactly the ordered journey, and the queue slot the
SMMU linked must hold the record of that fault (reference smmuv3-pcie.md §3 event
records, §4.1 PRI records, §8.6 PRG responses).
"""

from __future__ import annotations

import pytest

from devmodel.devices.dma_engine_records import CompletionStatus, DmaOpcode
from devmodel.iommu import records as rec
from devmodel.iommu.records import EventId
from devmodel.trace import TRACER

from .conftest import DST, PASID, SID, SRC, detail, hops, only_fault  # t0: a conftest fixture



def test_translation_fault_trace_descriptor_to_evtq_record(rig, t0):
    """endpoint.dma -> smmu.fault -> smmu.evtq (slot PA linked) -> endpoint.complete for one fault id;
    the record at the linked PA is that F_TRANSLATION event."""
    rig.bring_up()
    rig.submit(DmaOpcode.FILL, 0xA5A5A5A5A5A5A5A5, DST + 0x40, 64)
    fid = only_fault(t0)
    assert hops(fid) == ["endpoint.dma", "smmu.fault", "smmu.evtq", "endpoint.complete"]
    assert detail(fid, "endpoint.dma") == {"sid": SID, "ssid": PASID, "addr": DST + 0x40, "access": "write"}
    f = detail(fid, "smmu.fault")
    assert (f["event"], f["sid"], f["ssid"], f["addr"], f["stage"]) == (EventId.F_TRANSLATION, SID, PASID,
                                                                      DST + 0x40, 1)
    q = detail(fid, "smmu.evtq")
    assert q["slot"] == 0 and q["pa"] == rig.sw.eventq and "dropped" not in q
    assert TRACER.take(("smmu.evtq", q["pa"])) == fid
    ev = rec.EVENT.decode(rig.mem.read(q["pa"], rec.EVENT_SIZE))
    assert ev.EventID == EventId.F_TRANSLATION and ev.StreamID == SID and ev.SubstreamID == PASID
    assert ev.InputAddr == DST + 0x40
    c = detail(fid, "endpoint.complete")
    assert c["status"] == "PAGE_FAULT" and c["fault_addr"] == DST + 0x40
    assert rig.completion().Status == CompletionStatus.PAGE_FAULT


def test_page_request_trace_to_priq_record_and_response(rig, t0):
    """endpoint.page_request -> smmu.priq (slot PA linked) -> endpoint.prg_response(SUCCESS) ->
    endpoint.complete(SUCCESS) for the PRG's fault id; the PRIQ record at the linked PA is the request."""
    rig.bring_up(ats=True, pri=True)
    rig.map(SRC)
    rig.submit(DmaOpcode.COPY, SRC, DST, 32)
    fid = only_fault(t0)
    assert hops(fid) == ["endpoint.page_request", "smmu.priq"]
    q = detail(fid, "smmu.priq")
    assert q["slot"] == 0 and q["pa"] == rig.sw.priq and q["last"] is True
    assert TRACER.take(("smmu.priq", q["pa"])) == fid
    pr = rec.PRI.decode(rig.mem.read(q["pa"], rec.PRI_SIZE))
    assert pr.StreamID == SID and pr.SSV == 1 and pr.SubstreamID == PASID and pr.PageAddr == DST
    assert pr.PRGIndex == q["prg"] == detail(fid, "endpoint.page_request")["prg"]
    (req,) = rig.sw.page_requests()
    rig.map(DST)
    rig.respond(req, rec.PriResp.SUCCESS)
    assert hops(fid) == ["endpoint.page_request", "smmu.priq", "endpoint.prg_response", "endpoint.complete"]
    assert detail(fid, "endpoint.prg_response")["code"] == "SUCCESS"
    assert detail(fid, "endpoint.complete")["status"] == "SUCCESS"
    assert TRACER.faults(since=t0) == [fid]  # the successful retry faulted nowhere


def test_invalid_request_trace_ends_with_fault_address(rig, t0):
    """§8.6 Invalid Request: the PRG's trace ends with endpoint.complete(PAGE_FAULT, fault address)."""
    rig.bring_up(ats=True, pri=True)
    rig.map(SRC)
    rig.submit(DmaOpcode.COPY, SRC, DST + 0x80, 16)
    (req,) = rig.sw.page_requests()
    rig.respond(req, rec.PriResp.INVALID_REQUEST)
    fid = only_fault(t0)
    assert hops(fid)[-2:] == ["endpoint.prg_response", "endpoint.complete"]
    assert detail(fid, "endpoint.prg_response")["code"] == "INVALID_REQUEST"
    c = detail(fid, "endpoint.complete")
    assert c["status"] == "PAGE_FAULT" and c["fault_addr"] == DST + 0x80


def test_fault_the_smmu_never_saw_is_born_by_the_engine(rig, t0):
    """ATS no-access without PRI, and Bus Master off: no SMMU hop, but the failed descriptor still has a
    trace (endpoint.dma -> endpoint.complete), so every failed completion can be looked up."""
    rig.bring_up(ats=True, pri=False)
    rig.map(SRC)
    rig.submit(DmaOpcode.COPY, SRC, DST, 16)
    fid = only_fault(t0)
    assert hops(fid) == ["endpoint.dma", "endpoint.complete"]
    assert detail(fid, "endpoint.dma")["addr"] == DST and detail(fid, "endpoint.complete")["status"] == "PAGE_FAULT"
