"""FAULT object: selftests alloc_hwpt_nested, viommu_alloc_nested_iopf, pasid_attach
(reference section 5.4) and the read/write/poll/auto-response rules of section 2."""

from __future__ import annotations

import errno
import select
import struct

import pytest

from devmodel.iommufd import PageRequest, uapi
from devmodel.iommufd.uapi import unpack

SELFTEST_DATA = struct.pack("<I", uapi.IOMMU_TEST_IOTLB_DEFAULT)
INV = "iommu_hwpt_invalidate_selftest"
LAST = uapi.IOMMU_PGFAULT_FLAGS_LAST_PAGE


def _inv(flags: int = 0, iotlb_id: int = 0) -> bytes:
    return struct.pack("<II", flags, iotlb_id)


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _check_iotlb(raw, hwpt_id: int, values: list[int]) -> None:
    for i, v in enumerate(values):
        raw.test(uapi.TestOp.MD_CHECK_IOTLB, hwpt_id, check_iotlb={"id": i, "iotlb": v})


def test_alloc_hwpt_nested(raw, mock_ioas):
    """iommufd_ioas.alloc_hwpt_nested: parent/nested negatives, IOPF HWPT, invalidation
    table with entry_num out, busy checks, IOPF round trip."""
    ioas, stdev, _hwpt, dev = mock_ioas
    P, FV = uapi.IOMMU_HWPT_ALLOC_NEST_PARENT, uapi.IOMMU_HWPT_FAULT_ID_VALID
    SEL = uapi.IOMMU_HWPT_DATA_SELFTEST
    with pytest.raises(OSError) as e:
        raw.hwpt_alloc(dev, ioas, P | FV)
    assert e.value.errno == errno.EOPNOTSUPP
    parent = raw.hwpt_alloc(dev, ioas, P)
    not_parent = raw.hwpt_alloc(dev, ioas, 0)

    cases = [  # (kwargs, errno) from section 1.5.2 "Selftest nested-alloc negatives"
        (dict(pt_id=parent, data_type=0, data=SELFTEST_DATA), errno.EINVAL),
        (dict(pt_id=parent, data_type=SEL + 1, data=SELFTEST_DATA), errno.EOPNOTSUPP),
        (dict(pt_id=parent, data_type=SEL, data=SELFTEST_DATA, data_len=3), errno.EINVAL),
        (dict(pt_id=parent, data_type=SEL, data=SELFTEST_DATA, data_uptr=0), errno.EFAULT),
        (dict(pt_id=parent, flags=P, data_type=SEL, data=SELFTEST_DATA), errno.EOPNOTSUPP),
        (dict(pt_id=not_parent, data_type=SEL, data=SELFTEST_DATA), errno.EINVAL),
    ]
    for kwargs, want in cases:
        with pytest.raises(OSError) as e:
            raw.hwpt_alloc(dev, **kwargs)
        assert e.value.errno == want, kwargs
    nested = [raw.hwpt_alloc(dev, parent, 0, SEL, SELFTEST_DATA) for _ in range(2)]
    # A nested HWPT is not a parent (any other pt type -> EINVAL).
    with pytest.raises(OSError) as e:
        raw.hwpt_alloc(dev, nested[0], 0, SEL, SELFTEST_DATA)
    assert e.value.errno == errno.EINVAL

    fault_id, fault_fd = raw.fault_alloc()
    with pytest.raises(OSError) as e:
        raw.hwpt_alloc(dev, parent, FV, SEL, SELFTEST_DATA, fault_id=uapi.U32_MAX)
    assert e.value.errno == errno.ENOENT
    iopf_hwpt = raw.hwpt_alloc(dev, parent, FV, SEL, SELFTEST_DATA, fault_id=fault_id)
    _check_iotlb(raw, nested[0], [uapi.IOMMU_TEST_IOTLB_DEFAULT] * 4)
    _check_iotlb(raw, iopf_hwpt, [uapi.IOMMU_TEST_IOTLB_DEFAULT] * 4)

    T, TI = uapi.IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, uapi.IOMMU_HWPT_INVALIDATE_DATA_SELFTEST_INVALID
    h, sz = nested[0], uapi.sizeof(INV)
    assert raw.invalidate(parent, T, _inv(), sz, 1) == (errno.EINVAL, 0)
    assert raw.invalidate(h, T, _inv(), sz, 0) == (0, 0)
    assert raw.invalidate(h, TI, _inv(), sz, 1) == (errno.EINVAL, 0)
    assert raw.invalidate(h, T, _inv() + b"\0", sz + 1, 1) == (errno.EINVAL, 0)
    assert raw.invalidate(h, T, _inv(), 1, 1) == (errno.EINVAL, 0)
    assert raw.invalidate(h, T, _inv(0xFFFFFFFF), sz, 1) == (errno.EOPNOTSUPP, 0)
    assert raw.invalidate(h, T, b"", sz, 1, uptr=0) == (errno.EINVAL, 0)
    assert raw.invalidate(h, T, _inv(), 0, 1) == (errno.EINVAL, 0)
    assert raw.invalidate(h, T, _inv(0, 4), sz, 1) == (errno.EINVAL, 0)
    _check_iotlb(raw, h, [uapi.IOMMU_TEST_IOTLB_DEFAULT] * 4)
    assert raw.invalidate(h, T, _inv(0, 0) + _inv(0xFFFFFFFF, 1), sz, 2) == (errno.EOPNOTSUPP, 1)
    _check_iotlb(raw, h, [0] + [uapi.IOMMU_TEST_IOTLB_DEFAULT] * 3)
    assert raw.invalidate(h, T, _inv(0, 0) + _inv(0, 4), sz, 2) == (errno.EINVAL, 1)
    assert raw.invalidate(h, T, _inv(0, 1), sz, 1) == (0, 1)
    _check_iotlb(raw, h, [0, 0] + [uapi.IOMMU_TEST_IOTLB_DEFAULT] * 2)
    assert raw.invalidate(h, T, _inv(0, 2) + _inv(0, 3), sz, 2) == (0, 2)
    _check_iotlb(raw, h, [0] * 4)
    assert raw.invalidate(nested[1], T, _inv(uapi.IOMMU_TEST_INVALIDATE_FLAG_ALL), sz, 1) == (0, 1)
    _check_iotlb(raw, nested[1], [0] * 4)

    # Busy checks.
    raw.replace(stdev, nested[0])
    raw.err(errno.EBUSY, uapi.IOMMU_DESTROY, "iommu_destroy", id=nested[0])
    raw.err(errno.EBUSY, uapi.IOMMU_DESTROY, "iommu_destroy", id=parent)

    # IOPF round trip.
    raw.replace(stdev, iopf_hwpt)
    raw.err(errno.EBUSY, uapi.IOMMU_DESTROY, "iommu_destroy", id=iopf_hwpt)
    rec = raw.trigger_iopf_roundtrip(dev, fault_fd)
    assert (rec.flags, rec.dev_id, rec.grpid, rec.addr, rec.cookie) == (LAST, dev, 2, 0xDEADBEAF, 1)
    raw.replace(stdev, parent)
    for h_id in (iopf_hwpt, *nested):
        raw.destroy(h_id)
    raw.err(errno.EBUSY, uapi.IOMMU_DESTROY, "iommu_destroy", id=fault_id)  # fd still open
    raw.ctx.close_fd(fault_fd)
    raw.destroy(fault_id)


def test_viommu_alloc_nested_iopf(raw, viommu_fx):
    """iommufd_viommu.viommu_alloc_nested_iopf: vDEVICE needed before attach (ENOENT)."""
    fx = viommu_fx
    FV = uapi.IOMMU_HWPT_FAULT_ID_VALID
    fault_id, fault_fd = raw.fault_alloc()
    for flags, fid, want in [(FV, uapi.U32_MAX, errno.ENOENT), (FV | 1 << 31, fault_id, errno.EOPNOTSUPP)]:
        with pytest.raises(OSError) as e:
            raw.hwpt_alloc(fx["dev"], fx["viommu"], flags, uapi.IOMMU_HWPT_DATA_SELFTEST,
                           SELFTEST_DATA, fault_id=fid)
        assert e.value.errno == want
    iopf = raw.hwpt_alloc(fx["dev"], fx["viommu"], FV, uapi.IOMMU_HWPT_DATA_SELFTEST,
                          SELFTEST_DATA, fault_id=fault_id)
    raw.test_err(errno.ENOENT, uapi.TestOp.MOCK_DOMAIN_REPLACE, fx["stdev"],
                 mock_domain_replace={"pt_id": iopf})
    raw.vdevice_alloc(fx["viommu"], fx["dev"], 0x99)
    raw.replace(fx["stdev"], iopf)
    raw.err(errno.EBUSY, uapi.IOMMU_DESTROY, "iommu_destroy", id=iopf)
    rec = raw.trigger_iopf_roundtrip(fx["dev"], fault_fd)
    assert rec.dev_id == fx["dev"] and rec.cookie == 1
    raw.replace(fx["stdev"], fx["ioas"])
    raw.destroy(iopf)
    raw.ctx.close_fd(fault_fd)
    raw.destroy(fault_id)


def test_pasid_attach_iopf(raw):
    """iommufd_device_pasid.pasid_attach (IOPF part): PASID_VALID record with the PASID."""
    ioas = raw.ioas_alloc()
    stdev, _hwpt, dev = raw.mock_domain(ioas, uapi.MOCK_FLAGS_DEVICE_PASID)
    parent = raw.hwpt_alloc(dev, ioas, uapi.IOMMU_HWPT_ALLOC_NEST_PARENT)
    fault_id, fault_fd = raw.fault_alloc()
    flags = uapi.IOMMU_HWPT_FAULT_ID_VALID | uapi.IOMMU_HWPT_ALLOC_PASID
    iopf = raw.hwpt_alloc(dev, parent, flags, uapi.IOMMU_HWPT_DATA_SELFTEST, SELFTEST_DATA,
                          fault_id=fault_id)
    no_pasid = raw.hwpt_alloc(dev, parent, 0, uapi.IOMMU_HWPT_DATA_SELFTEST, SELFTEST_DATA)
    raw.test_err(errno.EINVAL, uapi.TestOp.PASID_ATTACH, stdev, pasid_attach={"pasid": 0x400, "pt_id": no_pasid})
    raw.test(uapi.TestOp.PASID_ATTACH, stdev, pasid_attach={"pasid": 0x400, "pt_id": iopf})
    raw.test(uapi.TestOp.PASID_CHECK_HWPT, stdev, pasid_check={"pasid": 0x400, "hwpt_id": iopf})
    rec = raw.trigger_iopf_roundtrip(dev, fault_fd, pasid=0x400)
    assert rec.flags == LAST | uapi.IOMMU_PGFAULT_FLAGS_PASID_VALID and rec.pasid == 0x400
    raw.test(uapi.TestOp.PASID_DETACH, stdev, pasid_detach={"pasid": 0x400})
    raw.test(uapi.TestOp.PASID_CHECK_HWPT, stdev, pasid_check={"pasid": 0x400, "hwpt_id": 0})


@pytest.fixture
def iopf_setup(raw, mock_ioas):
    """A mock device on a fault-capable nested HWPT; returns (ctx, dev, fault_id, fd, hwpt, responses)."""
    ioas, stdev, _hwpt, dev = mock_ioas
    parent = raw.hwpt_alloc(dev, ioas, uapi.IOMMU_HWPT_ALLOC_NEST_PARENT)
    fault_id, fd = raw.fault_alloc()
    hwpt = raw.hwpt_alloc(dev, parent, uapi.IOMMU_HWPT_FAULT_ID_VALID,
                          uapi.IOMMU_HWPT_DATA_SELFTEST, SELFTEST_DATA, fault_id=fault_id)
    raw.replace(stdev, hwpt)
    responses: list[tuple[int, int, int]] = []
    raw.ctx.device(dev).page_response = lambda req, code: responses.append((req.pasid, req.grpid, code))
    return {"ctx": raw.ctx, "dev": dev, "fault": fault_id, "fd": fd, "hwpt": hwpt, "parent": parent,
            "stdev": stdev, "responses": responses, "raw": raw}


def _req(grpid: int, addr: int, last: bool, pasid: int = 0) -> PageRequest:
    flags = (LAST if last else 0) | (uapi.IOMMU_PGFAULT_FLAGS_PASID_VALID if pasid else 0)
    return PageRequest(flags, pasid, grpid, uapi.IOMMU_PGFAULT_PERM_READ, addr)


def _records(data: bytes) -> list:
    return [unpack("iommu_hwpt_pgfault", data[i:i + 40]) for i in range(0, len(data), 40)]


def test_grouping_and_whole_group_reads(iopf_setup):
    """Section 2.2/2.3: grouped by grpid until LAST; groups never split; cookie per group;
    FIFO; poll IN exactly while groups wait (section 2.6)."""
    s = iopf_setup
    ctx, dev, fd = s["ctx"], s["dev"], s["fd"]
    assert not _readable(fd)
    ctx.report_iopf(dev, _req(5, 0x1000, False))
    ctx.report_iopf(dev, _req(7, 0x9000, False))
    ctx.report_iopf(dev, _req(5, 0x2000, False))
    assert not _readable(fd)  # partial requests deliver nothing
    ctx.report_iopf(dev, _req(5, 0x3000, True))
    ctx.report_iopf(dev, _req(7, 0xA000, True))
    assert _readable(fd)
    assert select.select([], [fd], [], 0)[1]  # always writable (EPOLLOUT)
    assert ctx.read(fd, 0) == b""
    assert ctx.read(fd, 80) == b""  # the first group (3 records) does not fit: 0, stays
    data = ctx.read(fd, 160)  # 3 records fit, the second group (2) would not
    recs = _records(data)
    assert [r.addr for r in recs] == [0x1000, 0x2000, 0x3000]
    assert [r.cookie for r in recs] == [1, 1, 1]
    assert [bool(r.flags & LAST) for r in recs] == [False, False, True]
    assert _readable(fd)
    recs2 = _records(ctx.read(fd, 400))
    assert [(r.grpid, r.cookie) for r in recs2] == [(7, 2), (7, 2)]
    assert not _readable(fd)  # read-but-unanswered groups do not make it readable
    assert ctx.read(fd, 40) == b""


def test_read_write_espipe_and_errors(iopf_setup):
    """Section 2.3/2.5: ESPIPE for offsets and partial records; EINVAL for bad codes and
    unknown cookies; partial byte counts; cookies lowest-free and reused."""
    s = iopf_setup
    ctx, dev, fd = s["ctx"], s["dev"], s["fd"]
    for bad in (1, 39, 41):
        with pytest.raises(OSError) as e:
            ctx.read(fd, bad)
        assert e.value.errno == errno.ESPIPE
    with pytest.raises(OSError) as e:
        ctx.read(fd, 40, offset=40)
    assert e.value.errno == errno.ESPIPE
    with pytest.raises(OSError) as e:
        ctx.write(fd, b"\0" * 7)
    assert e.value.errno == errno.ESPIPE
    for g in (1, 2, 3):
        ctx.report_iopf(dev, _req(g, g << 12, True))
    cookies = [r.cookie for r in _records(ctx.read(fd, 120))]
    assert cookies == [1, 2, 3]
    with pytest.raises(OSError) as e:  # unknown cookie first: nothing done
        ctx.write(fd, struct.pack("<II", 9, 0))
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        ctx.write(fd, struct.pack("<II", 1, 2))  # FAILURE is not a uAPI code
    assert e.value.errno == errno.EINVAL
    # Entry 0 ok, entry 1 bad cookie: 8 bytes processed.
    assert ctx.write(fd, struct.pack("<IIII", 2, 0, 77, 0)) == 8
    assert s["responses"] == [(0, 2, uapi.IOMMU_PAGE_RESP_SUCCESS)]
    with pytest.raises(OSError) as e:  # already answered
        ctx.write(fd, struct.pack("<II", 2, 0))
    assert e.value.errno == errno.EINVAL
    ctx.report_iopf(dev, _req(4, 0x4000, True))
    assert [r.cookie for r in _records(ctx.read(fd, 40))] == [2]  # lowest free reused
    assert ctx.write(fd, struct.pack("<IIII", 1, 1, 2, 0)) == 16
    assert s["responses"][1:] == [(0, 1, uapi.IOMMU_PAGE_RESP_INVALID), (0, 4, 0)]


def test_no_handler_answers_invalid(raw, mock_ioas):
    """Section 2.2 step 1 / TRIGGER_IOPF: no fault-capable domain -> immediate INVALID."""
    _ioas, _stdev, _hwpt, dev = mock_ioas
    got = []
    assert raw.ctx.report_iopf(dev, _req(3, 0, True), lambda r, c: got.append(c)) < 0
    assert got == [uapi.IOMMU_PAGE_RESP_INVALID]
    raw.trigger_iopf(dev)  # the selftest op still returns 0


def test_auto_response_on_replace_detach_and_destroy(iopf_setup):
    """Section 2.8: replace/detach answer INVALID the old handle's queued and read groups;
    fd close answers nothing; FAULT destroy answers what is left."""
    s = iopf_setup
    ctx, raw, dev, fd = s["ctx"], s["raw"], s["dev"], s["fd"]
    ctx.report_iopf(dev, _req(1, 0x1000, True))
    ctx.report_iopf(dev, _req(2, 0x2000, True))
    assert len(_records(ctx.read(fd, 40))) == 1  # group 1 read, group 2 still queued
    raw.replace(s["stdev"], s["parent"])  # away from the fault-capable HWPT
    assert sorted(s["responses"]) == [(0, 1, 1), (0, 2, 1)]
    assert not _readable(fd)
    with pytest.raises(OSError) as e:
        ctx.write(fd, struct.pack("<II", 1, 0))
    assert e.value.errno == errno.EINVAL

    # fd close answers nothing; FAULT destroy (after the HWPT is gone) answers INVALID.
    s["responses"].clear()
    raw.replace(s["stdev"], s["hwpt"])
    ctx.report_iopf(dev, _req(3, 0x3000, True))
    ctx.close_fd(fd)
    assert s["responses"] == []
    raw.err(errno.EBUSY, uapi.IOMMU_DESTROY, "iommu_destroy", id=s["fault"])  # HWPT holds it
    ctx.detach(dev)
    assert s["responses"] == [(0, 3, 1)]


def test_fault_destroy_answers_pending(raw, mock_ioas):
    """Section 2.8: FAULT destroy answers INVALID groups routed by a handle it still holds."""
    ioas, stdev, _hwpt, dev = mock_ioas
    ctx = raw.ctx
    fault_id, fd = raw.fault_alloc()
    hwpt = raw.hwpt_alloc(dev, ioas, uapi.IOMMU_HWPT_FAULT_ID_VALID, fault_id=fault_id)
    raw.replace(stdev, hwpt)
    got = []
    ctx.report_iopf(dev, _req(9, 0x9000, True), lambda r, c: got.append((r.grpid, c)))
    fault = ctx.table.lookup(fault_id)
    group = fault.deliver[0]
    fault.destroy(ctx)  # what IOMMU_DESTROY runs once users reach zero
    assert got == [(9, uapi.IOMMU_PAGE_RESP_INVALID)]
    assert group.responded and not group.respond(0)  # at most one response per group


def test_pasid_falls_back_to_nested_rid(iopf_setup):
    """Section 2.2 step 1: user_pasid_table drivers route PASID faults to the nested RID domain."""
    s = iopf_setup
    s["ctx"].report_iopf(s["dev"], _req(6, 0x6000, True, pasid=0x12))
    rec = _records(s["ctx"].read(s["fd"], 40))[0]
    assert rec.pasid == 0x12 and rec.flags & uapi.IOMMU_PGFAULT_FLAGS_PASID_VALID


def test_context_close_answers_everything(iopf_setup):
    """Section 2.8 "Context close": HWPTs detached/destroyed leaf-first (INVALID to the
    groups), every object gone, fds closed."""
    s = iopf_setup
    ctx, dev, fd = s["ctx"], s["dev"], s["fd"]
    ctx.report_iopf(dev, _req(1, 0x1000, True))
    ctx.report_iopf(dev, _req(2, 0x2000, True))
    ctx.read(fd, 40)
    ctx.close()
    assert sorted(s["responses"]) == [(0, 1, 1), (0, 2, 1)]
    assert ctx.table.objects() == []
    with pytest.raises(OSError) as e:
        ctx.read(fd, 40)
    assert e.value.errno == errno.EBADF
