"""VFIO_USER_DEVICE_GET_REGION_IO_FDS: no ioeventfds offered, an empty sub-region list."""

import errno

from vfio_user import protocol as P
from vfio_user.protocol import Command


def test_empty_list(client) -> None:
    r = client.request(Command.DEVICE_GET_REGION_IO_FDS, P.REGION_IO_FDS.pack(16, 0, 0, 0))
    assert not r.is_error and not r.fds
    assert P.REGION_IO_FDS.unpack(r.payload) == (16, 0, 0, 0)


def test_errors(client) -> None:
    assert client.request(Command.DEVICE_GET_REGION_IO_FDS, P.REGION_IO_FDS.pack(16, 0, 12, 0)).error == errno.EINVAL
    assert client.request(Command.DEVICE_GET_REGION_IO_FDS, P.REGION_IO_FDS.pack(16, 1, 0, 0)).error == errno.EINVAL
    assert client.request(Command.DEVICE_GET_REGION_IO_FDS, b"\0" * 8).error == errno.EINVAL
