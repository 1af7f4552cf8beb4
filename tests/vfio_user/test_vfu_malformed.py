"""Malformed messages: errno replies, fds closed, the server keeps serving (reference list)."""

import errno
import os

import pytest

from vfio_user import protocol as P
from vfio_user.protocol import Command


def _alive(c) -> None:
    assert c.device_info().num_regions == 9


def test_message_size_below_header(client) -> None:
    client.send_raw(P.HEADER.pack(5, Command.REGION_READ, 8, 0, 0))
    assert client.wait_reply(5).error == errno.EINVAL
    _alive(client)


def test_message_size_beyond_maximum(client) -> None:
    client.send_raw(P.HEADER.pack(6, Command.REGION_WRITE, 1 << 31, 0, 0))
    assert client.wait_reply(6).error == errno.EINVAL
    _alive(client)


def test_reply_type_from_client(client) -> None:
    client.send_raw(P.pack_header(7, Command.DEVICE_GET_INFO, 0, P.MsgType.REPLY))
    assert client.wait_reply(7).error == errno.EINVAL
    _alive(client)


def test_unknown_type_and_commands(client) -> None:
    client.send_raw(P.pack_header(8, Command.DEVICE_GET_INFO, 0, 2))
    assert client.wait_reply(8).error == errno.EINVAL
    for cmd in (0, 19, 99, 0xFFFF, Command.DMA_READ, Command.DMA_WRITE):
        r = client.request(cmd, b"\0" * 16)
        assert r.is_error and r.error == errno.EINVAL, cmd
    _alive(client)


@pytest.mark.parametrize("cmd", [Command.DMA_MAP, Command.DMA_UNMAP, Command.DEVICE_GET_INFO,
                                 Command.DEVICE_GET_REGION_INFO, Command.DEVICE_GET_REGION_IO_FDS,
                                 Command.DEVICE_GET_IRQ_INFO, Command.DEVICE_SET_IRQS,
                                 Command.REGION_READ, Command.REGION_WRITE,
                                 Command.REGION_WRITE_MULTI, Command.DEVICE_FEATURE])
def test_truncated_payloads(client, cmd) -> None:
    for n in (0, 3, 7):
        assert client.request(cmd, b"\0" * n).error == errno.EINVAL
    _alive(client)


def test_fds_of_rejected_request_are_closed(client, tdev) -> None:
    rd, wr = os.pipe()
    r = client.request(Command.REGION_READ, b"\0" * 3, [wr])
    os.close(wr)
    assert r.error == errno.EINVAL and tdev.fd_closed_by_peer(rd)
    os.close(rd)
    rd, wr = os.pipe()
    r = client.request(Command.DEVICE_GET_INFO, P.DEVICE_INFO.pack(16, 0, 0, 0), [wr])
    os.close(wr)
    assert not r.is_error  # accepted request that takes no fds: the stray fd is still closed
    assert tdev.fd_closed_by_peer(rd)
    os.close(rd)


def test_error_reply_has_header_only(client) -> None:
    r = client.request(Command.REGION_READ, b"")
    assert r.is_reply and r.is_error and r.payload == b"" and r.command == Command.REGION_READ
