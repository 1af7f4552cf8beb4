"""vIOMMU / vDEVICE / vEVENTQ: selftests viommu_negative_tests, vdevice_alloc,
vdevice_cache, vdevice_tombstone (reference section 5.5) and the vEVENTQ rules of
section 3 (sequence numbers, lost header, depth, allocation failures, poll)."""

from __future__ import annotations

import errno
import select
import struct

import pytest

from devmodel.iommufd import uapi

HDR = struct.Struct("<II")
SEL_Q = uapi.IOMMU_VEVENTQ_TYPE_SELFTEST
LOST = uapi.IOMMU_VEVENTQ_FLAG_LOST_EVENTS


def _readable(fd: int, timeout: float = 0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def read_vevents(ctx, fd: int, n: int, virt_id: int, prev_seq: list[int]) -> None:
    """``_test_cmd_read_vevents``: poll, read n*(8+4), walk 12-byte slots; EOVERFLOW on a
    LOST header or a sequence gap, EINVAL on a virt_id mismatch."""
    assert _readable(fd, 1.0)
    data = ctx.read(fd, n * 12)
    assert len(data) > 0
    for i in range(n):
        flags, seq = HDR.unpack_from(data, i * 12)
        if flags & LOST or seq - prev_seq[0] > 1:
            prev_seq[0] = seq
            raise OSError(errno.EOVERFLOW, "lost events")
        prev_seq[0] = seq
        (vid,) = struct.unpack_from("<I", data, 8)  # the helper's first-payload quirk
        if vid != virt_id:
            raise OSError(errno.EINVAL, "virt_id")


def test_viommu_negative_tests(raw, mock_ioas):
    """viommu_negative_tests: hwpt 0 ENOENT, non-parent EINVAL, bad type EOPNOTSUPP,
    parent/vIOMMU busy."""
    ioas, _stdev, _hwpt, dev = mock_ioas
    parent = raw.hwpt_alloc(dev, ioas, uapi.IOMMU_HWPT_ALLOC_NEST_PARENT)
    not_parent = raw.hwpt_alloc(dev, ioas, 0)
    for hwpt, vtype, want in [(0, uapi.IOMMU_VIOMMU_TYPE_SELFTEST, errno.ENOENT),
                              (not_parent, uapi.IOMMU_VIOMMU_TYPE_SELFTEST, errno.EINVAL),
                              (parent, 0xDEAD, errno.EOPNOTSUPP),
                              (parent, uapi.IOMMU_VIOMMU_TYPE_DEFAULT, errno.EOPNOTSUPP)]:
        raw.err(want, uapi.IOMMU_VIOMMU_ALLOC, "iommu_viommu_alloc", type=vtype, dev_id=dev,
                hwpt_id=hwpt)
    viommu = raw.viommu_alloc(dev, parent)
    raw.err(errno.EBUSY, uapi.IOMMU_DESTROY, "iommu_destroy", id=parent)
    raw.destroy(viommu)
    raw.destroy(parent)
    # no_viommu variant: no device.
    raw.err(errno.ENOENT, uapi.IOMMU_VIOMMU_ALLOC, "iommu_viommu_alloc",
            type=uapi.IOMMU_VIOMMU_TYPE_SELFTEST, dev_id=0, hwpt_id=0)


def test_viommu_alloc_with_data_echo(raw, mock_ioas):
    """viommu_alloc_with_data: in_data echoed to out_data through data_uptr."""
    ioas, _stdev, _hwpt, dev = mock_ioas
    parent = raw.hwpt_alloc(dev, ioas, uapi.IOMMU_HWPT_ALLOC_NEST_PARENT)
    uptr = raw.put(struct.pack("<IIQQ", 0xFADE, 0, 0, 0))
    raw.call(uapi.IOMMU_VIOMMU_ALLOC, "iommu_viommu_alloc", type=uapi.IOMMU_VIOMMU_TYPE_SELFTEST,
             dev_id=dev, hwpt_id=parent, data_len=24, data_uptr=uptr)
    assert struct.unpack("<II", raw.mem.read(uptr, 8)) == (0xFADE, 0xFADE)


def test_vdevice_alloc(raw, viommu_fx):
    """vdevice_alloc: EEXIST rules, then trigger 3 / read 3 -> EOVERFLOW, then seq 4."""
    fx, ctx = viommu_fx, raw.ctx
    raw.test_err(errno.ENOENT, uapi.TestOp.MOCK_DOMAIN_REPLACE, fx["stdev"],
                 mock_domain_replace={"pt_id": fx["nested"]})
    q_id, q_fd = raw.veventq_alloc(fx["viommu"])
    raw.err(errno.EEXIST, uapi.IOMMU_VEVENTQ_ALLOC, "iommu_veventq_alloc",
            viommu_id=fx["viommu"], type=SEL_Q, veventq_depth=2)
    vdev = raw.vdevice_alloc(fx["viommu"], fx["dev"], 0x99)
    raw.replace(fx["stdev"], fx["nested"])
    prev = [-1]
    raw.trigger_vevents(fx["dev"], 1)
    read_vevents(ctx, q_fd, 1, 0x99, prev)
    assert prev == [0]
    raw.err(errno.EEXIST, uapi.IOMMU_VDEVICE_ALLOC, "iommu_vdevice_alloc",
            viommu_id=fx["viommu"], dev_id=fx["dev"], virt_id=0x99)
    raw.replace(fx["stdev"], fx["ioas"])
    raw.destroy(vdev)
    vdev = raw.vdevice_alloc(fx["viommu"], fx["dev"], 0x88)
    raw.replace(fx["stdev"], fx["nested"])
    raw.trigger_vevents(fx["dev"], 3)  # depth 2: E1, E2, LOST(3)
    with pytest.raises(OSError) as e:
        read_vevents(ctx, q_fd, 3, 0x88, prev)
    assert e.value.errno == errno.EOVERFLOW
    assert prev == [3]
    raw.trigger_vevents(fx["dev"], 1)
    read_vevents(ctx, q_fd, 1, 0x88, prev)  # seq 4, delta 1: overflow state cleared
    assert prev == [4]
    ctx.close_fd(q_fd)
    raw.replace(fx["stdev"], fx["ioas"])
    raw.destroy(vdev)
    raw.destroy(q_id)


def test_worked_example_bytes(raw, viommu_fx):
    """Section 3.4 worked example, byte for byte: read of 36 returns 32 (E1, E2, LOST)."""
    fx, ctx = viommu_fx, raw.ctx
    _q, fd = raw.veventq_alloc(fx["viommu"])
    raw.vdevice_alloc(fx["viommu"], fx["dev"], 0x99)
    raw.replace(fx["stdev"], fx["nested"])
    raw.trigger_vevents(fx["dev"], 1)
    assert ctx.read(fd, 12) == HDR.pack(0, 0) + struct.pack("<I", 0x99)
    raw.trigger_vevents(fx["dev"], 3)
    data = ctx.read(fd, 36)
    assert data == (HDR.pack(0, 1) + struct.pack("<I", 0x99) + HDR.pack(0, 2)
                    + struct.pack("<I", 0x99) + HDR.pack(LOST, 3))
    assert not _readable(fd)
    assert ctx.read(fd, 100) == b""


def test_no_queue_is_eopnotsupp_and_write_einval(raw, viommu_fx):
    """Section 3.3 step 2 (TRIGGER_VEVENT returns report_event's -EOPNOTSUPP) and 3.6
    (write EINVAL); trigger without vDEVICE attachment -> ENOENT."""
    fx, ctx = viommu_fx, raw.ctx
    raw.test_err(errno.ENOENT, uapi.TestOp.TRIGGER_VEVENT, trigger_vevent={"dev_id": fx["dev"]})
    raw.vdevice_alloc(fx["viommu"], fx["dev"], 0x99)
    raw.replace(fx["stdev"], fx["nested"])
    raw.test_err(errno.EOPNOTSUPP, uapi.TestOp.TRIGGER_VEVENT, trigger_vevent={"dev_id": fx["dev"]})
    _q, fd = raw.veventq_alloc(fx["viommu"])
    with pytest.raises(OSError) as e:
        ctx.write(fd, b"\0" * 8)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        ctx.read(fd, 12, offset=1)
    assert e.value.errno == errno.ESPIPE


def test_veventq_alloc_validation(raw, viommu_fx):
    """Section 3.1 order: EOPNOTSUPP (flags/reserved/type 0), EINVAL depth 0, ENOENT."""
    v = viommu_fx["viommu"]
    for fields, want in [(dict(viommu_id=v, type=0, veventq_depth=2), errno.EOPNOTSUPP),
                         (dict(viommu_id=v, type=SEL_Q, veventq_depth=2, flags=1), errno.EOPNOTSUPP),
                         (dict(viommu_id=v, type=SEL_Q, veventq_depth=2, __reserved=1), errno.EOPNOTSUPP),
                         (dict(viommu_id=v, type=SEL_Q, veventq_depth=0), errno.EINVAL),
                         (dict(viommu_id=999, type=SEL_Q, veventq_depth=2), errno.ENOENT)]:
        raw.err(want, uapi.IOMMU_VEVENTQ_ALLOC, "iommu_veventq_alloc", **fields)
    q1, fd1 = raw.veventq_alloc(v, SEL_Q)
    q2, fd2 = raw.veventq_alloc(v, 7)  # any non-zero type is a key
    raw.err(errno.EBUSY, uapi.IOMMU_DESTROY, "iommu_destroy", id=q1)  # fd open
    raw.err(errno.EBUSY, uapi.IOMMU_DESTROY, "iommu_destroy", id=v)  # queues hold it
    raw.ctx.close_fd(fd1)
    raw.destroy(q1)
    assert raw.ctx.viommu_report_event(v, SEL_Q, b"x") == -errno.EOPNOTSUPP


def test_sequence_loss_and_lost_header_rules(raw, viommu_fx):
    """Section 3.3: every report takes a sequence number; one trailing LOST header that
    moves to the tail; a normal event after it drops it (gap only); full is not an error."""
    fx, ctx = viommu_fx, raw.ctx
    q_id, fd = raw.veventq_alloc(fx["viommu"], depth=3)
    v = fx["viommu"]
    ev = struct.pack("<I", 0xAB)
    assert not _readable(fd)
    for _ in range(5):  # 3 queued, 2 lost (seq 3, 4)
        assert ctx.viommu_report_event(v, SEL_Q, ev) == 0
    q = ctx.veventq(q_id)
    assert q.lost_full == 2
    assert ctx.read(fd, 12) == HDR.pack(0, 0) + ev  # frees one slot
    assert ctx.viommu_report_event(v, SEL_Q, ev) == 0  # seq 5 queued, LOST(4) dropped
    data = ctx.read(fd, 1000)
    seqs = [HDR.unpack_from(data, o) for o in (0, 12, 24)]
    assert seqs == [(0, 1), (0, 2), (0, 5)] and len(data) == 36
    # A lost header alone is readable and needs only 8 bytes.
    for _ in range(4):
        ctx.viommu_report_event(v, SEL_Q, ev)  # seq 6,7,8 queued, 9 lost
    assert ctx.read(fd, 36) == b"".join(HDR.pack(0, s) + ev for s in (6, 7, 8))
    assert _readable(fd)
    assert ctx.read(fd, 7) == b""  # fewer than 8 bytes: nothing
    assert ctx.read(fd, 8) == HDR.pack(LOST, 9)
    assert not _readable(fd)


def test_sequence_wraps_at_int_max(raw, viommu_fx):
    """Section 3.2: after 0x7FFFFFFF comes 0."""
    fx, ctx = viommu_fx, raw.ctx
    q_id, fd = raw.veventq_alloc(fx["viommu"])
    ctx.veventq(q_id).sequence = uapi.INT_MAX
    ctx.viommu_report_event(fx["viommu"], SEL_Q, b"\1\2\3\4")
    ctx.viommu_report_event(fx["viommu"], SEL_Q, b"\1\2\3\4")
    data = ctx.read(fd, 24)
    assert [HDR.unpack_from(data, o)[1] for o in (0, 12)] == [uapi.INT_MAX, 0]


def test_injected_allocation_failures(raw, viommu_fx):
    """Section 3.3: an allocation failure returns -ENOMEM, takes a sequence number and
    leaves the LOST header; counted separately from full-queue losses."""
    fx, ctx = viommu_fx, raw.ctx
    q_id, fd = raw.veventq_alloc(fx["viommu"], depth=8)
    ev = b"\x11\x22\x33\x44"
    assert ctx.viommu_report_event(fx["viommu"], SEL_Q, ev) == 0
    ctx.inject_vevent_alloc_failures(q_id, 2)
    assert ctx.viommu_report_event(fx["viommu"], SEL_Q, ev) == -errno.ENOMEM
    assert ctx.viommu_report_event(fx["viommu"], SEL_Q, ev) == -errno.ENOMEM
    assert _readable(fd)
    assert ctx.read(fd, 100) == HDR.pack(0, 0) + ev + HDR.pack(LOST, 2)
    assert ctx.viommu_report_event(fx["viommu"], SEL_Q, ev) == 0
    assert ctx.read(fd, 100) == HDR.pack(0, 3) + ev
    q = ctx.veventq(q_id)
    assert (q.reported, q.lost_nomem, q.lost_full) == (4, 2, 0)


def test_events_never_split(raw, viommu_fx):
    """Section 3.5: an event that does not fit stays queued; no multiple-of rule."""
    fx, ctx = viommu_fx, raw.ctx
    _q, fd = raw.veventq_alloc(fx["viommu"], qtype=uapi.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3)
    evt = bytes(range(32))
    ctx.viommu_report_event(fx["viommu"], uapi.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3, evt)
    assert ctx.read(fd, 39) == b""
    assert ctx.read(fd, 41) == HDR.pack(0, 0) + evt


def test_fd_close_keeps_collecting(raw, viommu_fx):
    """Section 3.6: after fd close the queue still collects until destroyed."""
    fx, ctx = viommu_fx, raw.ctx
    q_id, fd = raw.veventq_alloc(fx["viommu"])
    ctx.close_fd(fd)
    assert ctx.viommu_report_event(fx["viommu"], SEL_Q, b"abcd") == 0
    assert ctx.veventq(q_id).num_events == 1
    raw.destroy(q_id)
    assert ctx.viommu_report_event(fx["viommu"], SEL_Q, b"abcd") == -errno.EOPNOTSUPP


def test_vdevice_cache(raw, viommu_fx):
    """vdevice_cache: the vIOMMU invalidation table with entry_num out (section 5.5)."""
    fx = viommu_fx
    v, dev = fx["viommu"], fx["dev"]
    T = uapi.IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST
    TI = uapi.IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST_INVALID
    sz = uapi.sizeof("iommu_viommu_invalidate_selftest")
    D = uapi.IOMMU_TEST_DEV_CACHE_DEFAULT

    def inv(flags: int = 0, vdev: int = 0x99, cache: int = 0) -> bytes:
        return struct.pack("<III", flags, vdev, cache)

    def check(values: list[int]) -> None:
        for i, val in enumerate(values):
            raw.test(uapi.TestOp.DEV_CHECK_CACHE, dev, check_dev_cache={"id": i, "cache": val})

    raw.vdevice_alloc(v, dev, 0x99)
    check([D] * 4)
    zeroed = bytes(2 * sz)
    assert raw.invalidate(v, T, zeroed, sz, 0) == (0, 0)
    assert raw.invalidate(v, TI, zeroed, sz, 1) == (errno.EINVAL, 0)
    assert raw.invalidate(v, T, zeroed, sz + 1, 1) == (errno.EINVAL, 0)
    assert raw.invalidate(v, T, zeroed, 1, 1) == (errno.EINVAL, 0)
    assert raw.invalidate(v, T, inv(0xFFFFFFFF), sz, 1) == (errno.EOPNOTSUPP, 0)
    assert raw.invalidate(v, T, b"", sz, 1, uptr=0) == (errno.EINVAL, 0)
    assert raw.invalidate(v, T, inv(), 0, 1) == (errno.EINVAL, 0)
    assert raw.invalidate(v, T, inv(cache=4), sz, 1) == (errno.EINVAL, 0)
    assert raw.invalidate(v, T, inv(vdev=0x9), sz, 1) == (errno.EINVAL, 0)
    check([D] * 4)
    assert raw.invalidate(v, T, inv(cache=0) + inv(0xFFFFFFFF, cache=1), sz, 2) == (errno.EOPNOTSUPP, 1)
    check([0, D, D, D])
    assert raw.invalidate(v, T, inv(cache=0) + inv(cache=4), sz, 2) == (errno.EINVAL, 1)
    assert raw.invalidate(v, T, inv(cache=1), sz, 1) == (0, 1)
    check([0, 0, D, D])
    assert raw.invalidate(v, T, inv(cache=2) + inv(cache=3), sz, 2) == (0, 2)
    check([0] * 4)
    raw.ctx.device(dev).priv["cache"][:] = [D] * 4
    assert raw.invalidate(v, T, inv(uapi.IOMMU_TEST_INVALIDATE_FLAG_ALL), sz, 1) == (0, 1)
    check([0] * 4)
    # Full-array rule: a longer entry with a non-zero tail is E2BIG (section 4.2).
    assert raw.invalidate(v, T, inv(cache=1) + b"\x01", sz + 1, 1) == (errno.E2BIG, 0)


def test_vdevice_tombstone(raw, viommu_fx):
    """vdevice_tombstone: unbinding the device tombstones the vDEVICE ID (ENOENT, not reused)."""
    fx = viommu_fx
    vdev = raw.vdevice_alloc(fx["viommu"], fx["dev"], 0x99)
    raw.destroy(fx["stdev"])
    raw.err(errno.ENOENT, uapi.IOMMU_DESTROY, "iommu_destroy", id=vdev)
    new_ids = [raw.ioas_alloc() for _ in range(3)]
    assert vdev not in new_ids


def test_no_device_variant(raw):
    """The no_viommu variant: VDEVICE_ALLOC with nothing -> ENOENT."""
    raw.err(errno.ENOENT, uapi.IOMMU_VDEVICE_ALLOC, "iommu_vdevice_alloc", viommu_id=0,
            dev_id=0, virt_id=0x99)


def test_poll_readiness_on_real_fds(raw, viommu_fx, mock_ioas):
    """Sections 2.6 / 3.6 with poll(2): FAULT fd POLLOUT always and POLLIN while groups
    wait; vEVENTQ fd POLLIN while entries wait and never POLLOUT; both idle when empty."""
    import select as sel
    fx, ctx = viommu_fx, raw.ctx
    q_id, qfd = raw.veventq_alloc(fx["viommu"])
    fault_id, ffd = raw.fault_alloc()
    p = sel.poll()
    p.register(qfd, sel.POLLIN | sel.POLLOUT)
    p.register(ffd, sel.POLLIN | sel.POLLOUT)
    assert dict(p.poll(0)) == {ffd: sel.POLLOUT}
    ctx.viommu_report_event(fx["viommu"], SEL_Q, b"abcd")
    assert dict(p.poll(0)) == {ffd: sel.POLLOUT, qfd: sel.POLLIN}
    ctx.read(qfd, 12)
    assert dict(p.poll(0)) == {ffd: sel.POLLOUT}
    # A FAULT fed by the fault-capable HWPT of another mock device.
    _ioas, stdev, _h, dev = mock_ioas
    hwpt = raw.hwpt_alloc(dev, _ioas, uapi.IOMMU_HWPT_FAULT_ID_VALID, fault_id=fault_id)
    raw.replace(stdev, hwpt)
    raw.trigger_iopf(dev)
    assert dict(p.poll(0)) == {ffd: sel.POLLOUT | sel.POLLIN}
    ctx.read(ffd, 40)
    assert dict(p.poll(0)) == {ffd: sel.POLLOUT}
    # Readiness wakes a blocked poller (the event loop's use).
    ctx.viommu_report_event(fx["viommu"], SEL_Q, b"abcd")
    assert dict(p.poll(1000)).get(qfd) == sel.POLLIN
