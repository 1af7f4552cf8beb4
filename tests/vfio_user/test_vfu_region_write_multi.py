"""VFIO_USER_REGION_WRITE_MULTI, served only when write_multiple was negotiated."""

import errno

from vfio_user import protocol as P
from vfio_user.protocol import Command


def test_write_multi(client, tdev) -> None:
    n = client.write_multi([(0, tdev.REG_SCRATCH, b"\1\2\3\4"), (0, tdev.REG_SCRATCH + 4, b"\5\6\7\x08")])
    assert n == 2
    assert client.region_read(0, tdev.REG_SCRATCH, 8) == bytes(range(1, 9))


def test_write_multi_errors(client) -> None:
    entry = P.WRITE_MULTI_ENTRY.pack(0, 0, 9, b"\0" * 8)  # count > 8
    assert client.request(Command.REGION_WRITE_MULTI, P.WRITE_MULTI.pack(1) + entry).error == errno.EINVAL
    entry = P.WRITE_MULTI_ENTRY.pack(0, 0, 4, b"\0" * 8)
    assert client.request(Command.REGION_WRITE_MULTI, P.WRITE_MULTI.pack(2) + entry).error == errno.EINVAL
    assert client.request(Command.REGION_WRITE_MULTI, P.WRITE_MULTI.pack(0)).error == errno.EINVAL
    bad_region = P.WRITE_MULTI_ENTRY.pack(0, 6, 4, b"\0" * 8)
    assert client.request(Command.REGION_WRITE_MULTI, P.WRITE_MULTI.pack(1) + bad_region).error == errno.EINVAL


def test_not_negotiated_is_einval(vfu) -> None:
    c = vfu.client(negotiate=False)
    c.negotiate(P.Capabilities())  # no write_multiple proposed
    entry = P.WRITE_MULTI_ENTRY.pack(0, 0, 4, b"\0" * 8)
    assert c.request(Command.REGION_WRITE_MULTI, P.WRITE_MULTI.pack(1) + entry).error == errno.EINVAL
    c.close()
