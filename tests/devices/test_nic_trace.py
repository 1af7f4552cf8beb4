"""Fault traces of the NIC (devmodel.trace, hop names of ``HOPS``, the correlation keys of devmodel.trace):
an RX buffer fault is one fault id whose journey is exactly endpoint.dma -> smmu.fault -> smmu.evtq ->
endpoint.complete, and the EVTQ slot the SMMU linked holds that F_TRANSLATION record (reference
smmuv3-pcie.md §3); a PRI-resolved RX fault is endpoint.page_request -> smmu.priq ->
endpoint.prg_response -> endpoint.complete (§4.1, §8.6).
"""

from __future__ import annotations

import pytest

from devmodel.devices.nic_records import DescStatus
from devmodel.iommu import records as rec
from devmodel.iommu.records import EventId
from devmodel.trace import TRACER

from .conftest import detail, hops, only_fault  # t0: a conftest fixture
from .test_nic_function import PASID, RX_BUF, SID, frame, nic  # noqa: F401 - nic is a fixture



def test_rx_fault_trace_is_one_journey(nic, t0):
    """endpoint.dma -> smmu.fault -> smmu.evtq (slot PA linked) -> endpoint.complete(DMA_FAULT) under one id."""
    nic.bring_up()
    nic.post_rx(1, mapped=False)
    nic.inject(frame(1))
    fid = only_fault(t0)
    assert hops(fid) == ["endpoint.dma", "smmu.fault", "smmu.evtq", "endpoint.complete"]
    assert detail(fid, "endpoint.dma") == {"sid": SID, "ssid": PASID, "addr": RX_BUF, "access": "write"}
    f = detail(fid, "smmu.fault")
    assert (f["event"], f["sid"], f["ssid"], f["addr"]) == (EventId.F_TRANSLATION, SID, PASID, RX_BUF)
    q = detail(fid, "smmu.evtq")
    assert TRACER.take(("smmu.evtq", q["pa"])) == fid
    ev = rec.EVENT.decode(nic.mem.read(q["pa"], rec.EVENT_SIZE))
    assert ev.EventID == EventId.F_TRANSLATION and ev.StreamID == SID and ev.InputAddr == RX_BUF
    c = detail(fid, "endpoint.complete")
    assert (c["ring"], c["status"], c["fault_addr"], c["descriptor"]) == ("rx", "DMA_FAULT", RX_BUF, 0)
    assert nic.rx_desc(0).Status == DescStatus.DMA_FAULT


def test_rx_page_request_trace_to_delivery(nic, t0):
    """endpoint.page_request -> smmu.priq -> endpoint.prg_response(SUCCESS) -> endpoint.complete(DONE)."""
    nic.bring_up(ats=True, pri=True)
    nic.post_rx(1, mapped=False)
    nic.inject(frame(1))
    fid = only_fault(t0)
    assert hops(fid) == ["endpoint.page_request", "smmu.priq"]
    assert detail(fid, "endpoint.page_request")["ring"] == "rx"
    (req,) = nic.sw.page_requests()
    nic.map(RX_BUF)
    nic.respond(req, rec.PriResp.SUCCESS)
    assert hops(fid) == ["endpoint.page_request", "smmu.priq", "endpoint.prg_response", "endpoint.complete"]
    assert detail(fid, "endpoint.prg_response")["code"] == "SUCCESS"
    assert detail(fid, "endpoint.complete")["status"] == "DONE"
    assert TRACER.faults(since=t0) == [fid]  # the retry faulted nowhere
