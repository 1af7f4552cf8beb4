"""Page requests: physical PRIQ -> host grouping -> FAULT fd -> response -> CMD_PRI_RESP
-> the endpoint's PRG response.

References: iommufd.md section 2.2 (io-pgfault: partial list, group closed by
LAST_PAGE, one response per group), 2.3/2.4 (FAULT read: whole groups, 40-byte records,
one cookie per group), 2.5 (response write), 2.8 (auto INVALID on detach);
smmuv3-pcie.md section 4.1 (PRI record, Stop Marker), 4.2 (CMD_PRI_RESP Resp encodings:
Success=0b10, InvalidRequest=0b01, ResponseFailure=0b00), 8.6 (PCIe response codes),
2 (PRIQ overflow: everything discarded, Last auto-answered Success).
"""

from __future__ import annotations

import errno
import select
import struct

import pytest

from devmodel.host.priq import IOPF_TO_PRI_RESP
from devmodel.iommu import registers as R
from devmodel.iommu.faults import Access
from devmodel.iommu.records import PrgResponseCode, PriResp
from devmodel.iommufd import uapi

from .conftest import SID, VSID, Endpoint, make_host

PAGES = (0x4000_0000, 0x4000_1000, 0x4000_2000)


def _faults(ctx, fd, count=16):  # noqa: ANN001
    data = ctx.read(fd, count * uapi.PGFAULT_SIZE)
    return [uapi.unpack("iommu_hwpt_pgfault", data[i:i + uapi.PGFAULT_SIZE])
            for i in range(0, len(data), uapi.PGFAULT_SIZE)]


def _send_group(smmu, prg: int, ssid=None, pages=PAGES, write=False):  # noqa: ANN001
    for i, addr in enumerate(pages):
        assert smmu.page_request(SID, ssid, addr, prg, last=i == len(pages) - 1, read=True,
                                 write=write)


def test_group_of_three_becomes_one_fault_group_and_success_response(nested):
    """3 page requests, Last on the third -> one FAULT group of 3 records with one cookie,
    dev_id of the bound device, LAST_PAGE only on the third; SUCCESS written to the fd ->
    CMD_PRI_RESP Resp=Success -> the endpoint gets (PRG index, PCIe Success)."""
    host, ctx, ep = nested.host, nested.host.ctx, nested.endpoint
    for addr in PAGES[:2]:  # not yet: no Last
        assert host.smmu.page_request(SID, None, addr, 0x21, last=False, read=True, write=True)
    assert ctx.read(nested.fault_fd, 10 * uapi.PGFAULT_SIZE) == b""
    assert host.smmu.page_request(SID, None, PAGES[2], 0x21, last=True, read=True, write=True)
    assert select.select([nested.fault_fd], [], [], 0)[0]
    recs = _faults(ctx, nested.fault_fd)
    assert len(recs) == 3
    assert {r.cookie for r in recs} == {recs[0].cookie} and recs[0].cookie >= 1
    assert [r.addr for r in recs] == list(PAGES)
    assert all(r.dev_id == nested.dev_id and r.grpid == 0x21 for r in recs)
    assert [r.flags & uapi.IOMMU_PGFAULT_FLAGS_LAST_PAGE for r in recs] == [0, 0, 2]
    assert recs[2].perm == uapi.IOMMU_PGFAULT_PERM_READ | uapi.IOMMU_PGFAULT_PERM_WRITE
    assert ep.prg == []
    assert ctx.page_response(nested.fault_fd, recs[0].cookie, uapi.IOMMUFD_PAGE_RESP_SUCCESS) == 8
    assert ep.prg == [(None, 0x21, PrgResponseCode.SUCCESS)]
    c = host.counters
    assert c.page_requests == 3 and c.groups == 1 and c.responses == {"SUCCESS": 1}


def test_invalid_response_with_pasid(nested):
    """A PASID-tagged group (routed to the nested RID domain: user_pasid_table) answered
    INVALID -> Resp=InvalidRequest with SSV and the PASID -> endpoint sees Invalid Request."""
    host, ctx, ep = nested.host, nested.host.ctx, nested.endpoint
    _send_group(host.smmu, prg=7, ssid=0x42)
    recs = _faults(ctx, nested.fault_fd)
    assert len(recs) == 3 and all(r.pasid == 0x42 for r in recs)
    assert all(r.flags & uapi.IOMMU_PGFAULT_FLAGS_PASID_VALID for r in recs)
    ctx.page_response(nested.fault_fd, recs[0].cookie, uapi.IOMMUFD_PAGE_RESP_INVALID)
    assert ep.prg == [(0x42, 7, PrgResponseCode.INVALID_REQUEST)]
    with pytest.raises(OSError) as e:  # answered once: the cookie is gone (section 2.5)
        ctx.page_response(nested.fault_fd, recs[0].cookie, uapi.IOMMUFD_PAGE_RESP_SUCCESS)
    assert e.value.errno == errno.EINVAL
    assert len(ep.prg) == 1


def test_interleaved_groups_keep_their_own_members(nested):
    """Members of different PRGs interleave in the PRIQ (section 4.1); each Last closes only
    its own PRG index."""
    host, ctx = nested.host, nested.host.ctx
    s = host.smmu
    s.page_request(SID, None, 0x1000, 1, last=False)
    s.page_request(SID, None, 0x2000, 2, last=False)
    s.page_request(SID, None, 0x3000, 1, last=True)
    recs = _faults(ctx, nested.fault_fd)
    assert [(r.grpid, r.addr) for r in recs] == [(1, 0x1000), (1, 0x3000)]
    s.page_request(SID, None, 0x4000, 2, last=True)
    assert [(r.grpid, r.addr) for r in _faults(ctx, nested.fault_fd)] == [(2, 0x2000), (2, 0x4000)]


def test_detach_with_group_outstanding_auto_invalid(nested):
    """Detach while a group is read but unanswered, and another is unread: iommufd answers
    both INVALID (section 2.8) -> two CMD_PRI_RESP InvalidRequest reach the endpoint; the
    STE is blocked afterwards (silent abort, no event)."""
    host, ctx, ep = nested.host, nested.host.ctx, nested.endpoint
    _send_group(host.smmu, prg=3)
    recs = _faults(ctx, nested.fault_fd)
    _send_group(host.smmu, prg=4, pages=PAGES[:1])  # unread
    ctx.detach(nested.dev_id)
    assert sorted(ep.prg) == [(None, 3, PrgResponseCode.INVALID_REQUEST),
                              (None, 4, PrgResponseCode.INVALID_REQUEST)]
    with pytest.raises(OSError) as e:
        ctx.page_response(nested.fault_fd, recs[0].cookie, uapi.IOMMUFD_PAGE_RESP_SUCCESS)
    assert e.value.errno == errno.EINVAL
    r = host.smmu.translate(SID, None, 0x1000, 4, Access.READ)
    assert r.aborted and r.fault.event is None
    assert host.counters.responses == {"INVALID_REQUEST": 2}


def test_request_after_detach_gets_invalid_at_once(nested):
    """No fault-capable domain: io-pgfault answers INVALID immediately (section 2.2 step 1),
    exactly one PRG response per group even for a 3-request group."""
    host, ctx, ep = nested.host, nested.host.ctx, nested.endpoint
    ctx.detach(nested.dev_id)
    _send_group(host.smmu, prg=9)
    assert ep.prg == [(None, 9, PrgResponseCode.INVALID_REQUEST)]
    assert ctx.read(nested.fault_fd, 4 * uapi.PGFAULT_SIZE) == b""


def test_stop_marker_is_discarded(nested):
    """SSV=1, L=1, R=W=0 is a Stop Marker: no FAULT record, no response (section 4.1)."""
    host, ctx, ep = nested.host, nested.host.ctx, nested.endpoint
    host.smmu.page_request(SID, 0x42, 0, 5, last=True, read=False, write=False)
    assert host.counters.stop_markers == 1 and host.counters.page_requests == 0
    assert ctx.read(nested.fault_fd, uapi.PGFAULT_SIZE) == b"" and ep.prg == []


def test_unknown_streamid_last_request_answered_invalid(world):
    """A page request from a StreamID the host does not manage: InvalidRequest for Last."""
    host, _ = world
    ep = Endpoint(host, 0x77)
    host.smmu.page_request(0x77, None, 0x1000, 2, last=True)
    assert ep.prg == [(None, 2, PrgResponseCode.INVALID_REQUEST)]
    assert host.counters.unknown_sid == 1


def test_response_code_mapping_by_value():
    """iommufd SUCCESS/INVALID/FAILURE -> CMD_PRI_RESP Resp 0b10/0b01/0b00 (section 4.2)."""
    assert IOPF_TO_PRI_RESP == {uapi.IOMMU_PAGE_RESP_SUCCESS: PriResp.SUCCESS,
                                uapi.IOMMU_PAGE_RESP_INVALID: PriResp.INVALID_REQUEST,
                                uapi.IOMMU_PAGE_RESP_FAILURE: PriResp.RESPONSE_FAILURE}
    assert (int(PriResp.SUCCESS), int(PriResp.INVALID_REQUEST), int(PriResp.RESPONSE_FAILURE)) \
        == (0b10, 0b01, 0b00)


def test_priq_overflow_discards_partials():
    """Threaded interrupts, 2-entry PRIQ: two L=0 requests fill it, a Last arriving at the
    full queue toggles OVFLG and is auto-answered Success by the SMMU (section 2). The
    host drains the two partials, sees the overflow, counts it, discards the partials
    (io-pgfault) and acknowledges; a later Last of PRG 1 forms a group of one."""
    from devmodel.host.scenario import make_nested_master
    host, user = make_host(threaded=True, priq=1)
    try:
        m = make_nested_master(host, user, SID, VSID)
        ep = Endpoint(host, SID)
        s = host.smmu
        assert s.page_request(SID, None, 0x1000, 1, last=False)
        assert s.page_request(SID, None, 0x2000, 2, last=False)
        assert not s.page_request(SID, None, 0x3000, 3, last=True)
        assert ep.prg == [(None, 3, PrgResponseCode.SUCCESS)]  # SMMU auto-response
        assert s.read_reg(R.PRIQ_PROD) & R.Q_OVFLG
        host.service()
        c = host.counters
        assert c.priq_overflows == 1 and c.partials_discarded == 2 and c.page_requests == 2
        assert s.read_reg(R.PRIQ_CONS) & R.Q_OVFLG == s.read_reg(R.PRIQ_PROD) & R.Q_OVFLG
        assert s.page_request(SID, None, 0x4000, 1, last=True)
        host.service()
        recs = _faults(host.ctx, m.fault_fd)
        assert [(r.grpid, r.addr) for r in recs] == [(1, 0x4000)]
    finally:
        host.close()


def test_fault_record_layout_roundtrip(nested):
    """The FAULT record is read as raw bytes: 40 bytes per request (section 2.4)."""
    host, ctx = nested.host, nested.host.ctx
    host.smmu.page_request(SID, None, 0x5000, 0x1FF, last=True, read=True, write=False)
    raw = ctx.read(nested.fault_fd, uapi.PGFAULT_SIZE)
    flags, dev_id, pasid, grpid, perm, _res, addr, length, cookie = struct.unpack("<IIIIIIQII", raw)
    assert (flags, dev_id, grpid, perm, addr, length) == (
        uapi.IOMMU_PGFAULT_FLAGS_LAST_PAGE, nested.dev_id, 0x1FF, uapi.IOMMU_PGFAULT_PERM_READ,
        0x5000, 0)
    assert cookie >= 1


def test_injected_response_drop_and_hold(nested):
    """Fault injection on the response path (devmodel's ``inject.host.response``, not a
    kernel feature): a dropped response is accepted by the fd (the write succeeds, the
    cookie is spent) but never reaches the endpoint; a held one arrives on release."""
    host, ctx, ep = nested.host, nested.host.ctx, nested.endpoint
    policy = ctx.response_policy
    policy.mode, policy.remaining = "drop", 1
    _send_group(host.smmu, 0x31, pages=PAGES[:1])
    (rec,) = _faults(ctx, nested.fault_fd)
    assert ctx.page_response(nested.fault_fd, rec.cookie, uapi.IOMMUFD_PAGE_RESP_SUCCESS) == 8
    assert ep.prg == [] and policy.dropped == 1
    with pytest.raises(OSError) as e:  # the cookie was consumed like any answered one
        ctx.page_response(nested.fault_fd, rec.cookie, uapi.IOMMUFD_PAGE_RESP_SUCCESS)
    assert e.value.errno == errno.EINVAL
    policy.mode, policy.remaining = "hold", 1
    _send_group(host.smmu, 0x32, pages=PAGES[:1])
    (rec,) = _faults(ctx, nested.fault_fd)
    ctx.page_response(nested.fault_fd, rec.cookie, uapi.IOMMUFD_PAGE_RESP_INVALID)
    assert ep.prg == [] and len(policy.held) == 1
    assert policy.release() == 1
    assert ep.prg == [(None, 0x32, PrgResponseCode.INVALID_REQUEST)]
    _send_group(host.smmu, 0x33, pages=PAGES[:1])  # count exhausted: responses pass again
    (rec,) = _faults(ctx, nested.fault_fd)
    ctx.page_response(nested.fault_fd, rec.cookie, uapi.IOMMUFD_PAGE_RESP_SUCCESS)
    assert ep.prg[-1] == (None, 0x33, PrgResponseCode.SUCCESS)
