"""VFIO_USER_REGION_WRITE incl. posted writes (header flag NO_REPLY: process, send nothing)."""

import errno

from vfio_user import protocol as P
from vfio_user.protocol import Command


def test_write_then_read_back(client, tdev) -> None:
    client.region_write(0, tdev.REG_SCRATCH, b"\x11\x22\x33\x44\x55\x66\x77\x88")  # 8-byte access
    assert client.region_read(0, tdev.REG_SCRATCH, 8) == b"\x11\x22\x33\x44\x55\x66\x77\x88"


def test_reply_echoes_header_without_data(client) -> None:
    r = client.request(Command.REGION_WRITE, P.REGION_ACCESS.pack(0, 0, 4) + b"abcd")
    assert r.payload == P.REGION_ACCESS.pack(0, 0, 4)


def test_posted_writes_get_no_reply_and_are_ordered(client, tdev) -> None:
    for i in range(10):
        client.region_write(0, tdev.REG_SCRATCH, bytes([i]) * 4, posted=True)
    # The next non-posted request's reply comes after all posted writes were processed.
    assert client.region_read(0, tdev.REG_SCRATCH, 4) == b"\x09" * 4
    assert client.replies == {}  # nothing else arrived


def test_bad_posted_write_sends_nothing(client) -> None:
    client.send(Command.REGION_WRITE, P.REGION_ACCESS.pack(0, 0, 8) + b"ab", flags=P.FLAG_NO_REPLY)
    assert client.region_read(7, 0, 2)
    assert client.replies == {}


def test_errors(client, tdev) -> None:
    def w(payload):
        return client.request(Command.REGION_WRITE, payload).error
    assert w(P.REGION_ACCESS.pack(0, 0, 8) + b"abcd") == errno.EINVAL          # count exceeds data
    assert w(P.REGION_ACCESS.pack(0, 0, 2) + b"abcd") == errno.EINVAL          # data exceeds count
    assert w(P.REGION_ACCESS.pack(tdev.BAR0_SIZE - 2, 0, 4) + b"abcd") == errno.EINVAL
    assert w(P.REGION_ACCESS.pack(0, 6, 4) + b"abcd") == errno.EINVAL
    assert w(P.REGION_ACCESS.pack(0, 100, 4) + b"abcd") == errno.EINVAL
    assert w(b"\0" * 15) == errno.EINVAL
    assert client.request(Command.REGION_WRITE, P.REGION_ACCESS.pack(0, 0, 0)).error == 0  # count 0
