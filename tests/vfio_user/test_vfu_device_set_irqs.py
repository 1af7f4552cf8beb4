"""VFIO_USER_DEVICE_SET_IRQS (spec; Linux vfio_set_irqs_validate_and_prepare rules)."""

import errno
import os
import select

import pytest

from vfio_user import protocol as P
from vfio_user.client import VfioUserError
from vfio_user.device import PciIrq
from vfio_user.protocol import Command

EVENTFD_TRIGGER = P.IRQ_SET_DATA_EVENTFD | P.IRQ_SET_ACTION_TRIGGER
NONE_TRIGGER = P.IRQ_SET_DATA_NONE | P.IRQ_SET_ACTION_TRIGGER


def _efd():
    return os.eventfd(0, os.EFD_NONBLOCK)


def _fired(fd) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def _set(c, index, flags, start, count, fds=(), data=b"", argsz=None):
    body = P.IRQ_SET.pack(P.IRQ_SET.size + len(data) if argsz is None else argsz, flags, index, start,
                          count) + data
    return c.request(Command.DEVICE_SET_IRQS, body, list(fds))


def _trigger(vfu, index, sub):
    return vfu.device.ctx.trigger_irq(index, sub)


def test_msix_eventfds_in_chunks_and_trigger(client, vfu) -> None:
    """QEMU sends fds in chunks of at most max_msg_fds; each chunk is its own start/count."""
    efds = [_efd() for _ in range(4)]
    client.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, 2, efds[:2])
    client.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 2, 2, efds[2:])
    assert vfu.device.irq_changes[-1] == PciIrq.MSIX
    for i in range(4):
        assert _trigger(vfu, PciIrq.MSIX, i)
        assert _fired(efds[i]) == 1
    assert not _trigger(vfu, PciIrq.MSIX, 4)  # out of range
    for fd in efds:
        os.close(fd)


def test_qemu_msix_enable_without_fd_then_unmask_vector(client, vfu) -> None:
    """QEMU enables MSI-X with count 1 and no fd, then sends the vector's eventfd."""
    client.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, 1)
    assert not _trigger(vfu, PciIrq.MSIX, 0)
    fd = _efd()
    client.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 2, 1, [fd])
    assert _trigger(vfu, PciIrq.MSIX, 2) and _fired(fd) == 1
    os.close(fd)


def test_eventfd_without_fds_deassigns(client, vfu, tdev) -> None:
    rd, wr = os.pipe()
    client.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 1, 1, [wr])
    os.close(wr)
    client.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 1, 1)
    assert tdev.fd_closed_by_peer(rd)
    assert not _trigger(vfu, PciIrq.MSIX, 1)
    os.close(rd)


def test_count_zero_data_none_trigger_disables_and_closes(client, vfu, tdev) -> None:
    rd, wr = os.pipe()
    client.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, 1, [wr])
    os.close(wr)
    client.set_irqs(PciIrq.MSIX, NONE_TRIGGER, 0, 0)
    assert tdev.fd_closed_by_peer(rd)
    os.close(rd)
    # Disabled: INTx may now be enabled.
    fd = _efd()
    client.set_irqs(PciIrq.INTX, EVENTFD_TRIGGER, 0, 1, [fd])
    os.close(fd)


def test_mask_unmask_intx(client, vfu) -> None:
    fd = _efd()
    client.set_irqs(PciIrq.INTX, EVENTFD_TRIGGER, 0, 1, [fd])
    client.set_irqs(PciIrq.INTX, P.IRQ_SET_DATA_NONE | P.IRQ_SET_ACTION_MASK, 0, 1)
    assert not _trigger(vfu, PciIrq.INTX, 0)
    client.set_irqs(PciIrq.INTX, P.IRQ_SET_DATA_BOOL | P.IRQ_SET_ACTION_UNMASK, 0, 1, data=b"\1")
    assert _trigger(vfu, PciIrq.INTX, 0) and _fired(fd) == 1
    os.close(fd)


def test_unmask_eventfd_unmasks_when_written(client, vfu) -> None:
    """Under KVM QEMU passes a resample eventfd with UNMASK; writing it unmasks INTx."""
    fd, resample = _efd(), _efd()
    client.set_irqs(PciIrq.INTX, EVENTFD_TRIGGER, 0, 1, [fd])
    client.set_irqs(PciIrq.INTX, P.IRQ_SET_DATA_EVENTFD | P.IRQ_SET_ACTION_UNMASK, 0, 1, [resample])
    client.set_irqs(PciIrq.INTX, P.IRQ_SET_DATA_NONE | P.IRQ_SET_ACTION_MASK, 0, 1)
    assert not _trigger(vfu, PciIrq.INTX, 0)
    os.eventfd_write(resample, 1)
    for _ in range(200):
        if _trigger(vfu, PciIrq.INTX, 0):
            break
        select.select([], [], [], 0.005)
    assert _fired(fd) == 1
    os.close(fd)
    os.close(resample)


def test_client_trigger_with_data_none_and_bool(client, vfu) -> None:
    fds = [_efd() for _ in range(4)]
    client.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, 4, fds)
    client.set_irqs(PciIrq.MSIX, NONE_TRIGGER, 1, 1)
    client.set_irqs(PciIrq.MSIX, P.IRQ_SET_DATA_BOOL | P.IRQ_SET_ACTION_TRIGGER, 0, 4, data=b"\0\0\1\0")
    assert [_fired(fd) for fd in fds] == [0, 1, 1, 0]
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("index,flags,start,count", [
    (PciIrq.MSI, EVENTFD_TRIGGER, 0, 1),                        # zero vectors
    (PciIrq.MSI, NONE_TRIGGER, 0, 0),                           # zero vectors, even to disable
    (PciIrq.MSIX, NONE_TRIGGER, 4, 1),                          # start beyond count
    (PciIrq.MSIX, NONE_TRIGGER, 2, 3),                          # start + count beyond
    (PciIrq.MSIX, P.IRQ_SET_DATA_NONE | P.IRQ_SET_DATA_BOOL | P.IRQ_SET_ACTION_TRIGGER, 0, 1),
    (PciIrq.MSIX, P.IRQ_SET_DATA_NONE | P.IRQ_SET_ACTION_MASK | P.IRQ_SET_ACTION_TRIGGER, 0, 1),
    (PciIrq.MSIX, P.IRQ_SET_DATA_NONE, 0, 1),                   # no action
    (PciIrq.MSIX, NONE_TRIGGER | (1 << 6), 0, 1),               # unknown flag
    (PciIrq.ERR, P.IRQ_SET_DATA_NONE | P.IRQ_SET_ACTION_MASK, 0, 1),  # ERR: trigger only
    (PciIrq.REQ, P.IRQ_SET_DATA_NONE | P.IRQ_SET_ACTION_UNMASK, 0, 1),
    (PciIrq.MSIX, P.IRQ_SET_DATA_EVENTFD | P.IRQ_SET_ACTION_TRIGGER, 0, 0),  # count 0 needs DATA_NONE
    (PciIrq.MSIX, P.IRQ_SET_DATA_NONE | P.IRQ_SET_ACTION_MASK, 0, 0),        # count 0 needs TRIGGER
    (5, NONE_TRIGGER, 0, 1),                                    # bad index
])
def test_invalid_set_irqs_einval(client, index, flags, start, count) -> None:
    assert _set(client, index, flags, start, count).error == errno.EINVAL


def test_bool_data_shorter_than_count_einval(client) -> None:
    assert _set(client, PciIrq.MSIX, P.IRQ_SET_DATA_BOOL | P.IRQ_SET_ACTION_TRIGGER, 0, 4,
                data=b"\1").error == errno.EINVAL


def test_argsz_must_match_payload(client) -> None:
    assert _set(client, PciIrq.MSIX, NONE_TRIGGER, 0, 1, argsz=16).error == errno.EINVAL
    assert _set(client, PciIrq.MSIX, NONE_TRIGGER, 0, 1, argsz=40).error == errno.EINVAL
    assert client.request(Command.DEVICE_SET_IRQS, b"\0" * 12).error == errno.EINVAL


def test_fd_count_mismatch_einval_and_fds_closed(client, tdev) -> None:
    r1, w1 = os.pipe()
    r = _set(client, PciIrq.MSIX, EVENTFD_TRIGGER, 0, 2, [w1])
    os.close(w1)
    assert r.error == errno.EINVAL and tdev.fd_closed_by_peer(r1)
    os.close(r1)


def test_fds_with_data_none_einval_and_closed(client, tdev) -> None:
    r1, w1 = os.pipe()
    r = _set(client, PciIrq.MSIX, NONE_TRIGGER, 0, 1, [w1])
    os.close(w1)
    assert r.error == errno.EINVAL and tdev.fd_closed_by_peer(r1)
    os.close(r1)


def test_intx_msix_mutually_exclusive(client) -> None:
    fd = _efd()
    client.set_irqs(PciIrq.INTX, EVENTFD_TRIGGER, 0, 1, [fd])
    with pytest.raises(VfioUserError) as exc:
        client.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, 1, [fd])
    assert exc.value.errno == errno.EINVAL
    client.set_irqs(PciIrq.INTX, NONE_TRIGGER, 0, 0)
    client.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, 1, [fd])
    os.close(fd)


def test_err_and_req_eventfds(client, vfu) -> None:
    e, q = _efd(), _efd()
    client.set_irqs(PciIrq.ERR, EVENTFD_TRIGGER, 0, 1, [e])
    client.set_irqs(PciIrq.REQ, EVENTFD_TRIGGER, 0, 1, [q])
    assert _trigger(vfu, PciIrq.ERR, 0) and _fired(e) == 1
    assert _trigger(vfu, PciIrq.REQ, 0) and _fired(q) == 1
    os.close(e)
    os.close(q)
