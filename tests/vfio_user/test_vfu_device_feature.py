"""VFIO_USER_DEVICE_FEATURE / MIG_DATA_*: no migration support, reported as errors."""

import errno

from vfio_user import protocol as P
from vfio_user.protocol import Command


def test_device_feature_not_supported(client) -> None:
    r = client.request(Command.DEVICE_FEATURE, P.DEVICE_FEATURE.pack(8, 1 | P.DEVICE_FEATURE_PROBE))
    assert r.error == errno.ENOTSUP
    assert client.request(Command.DEVICE_FEATURE, b"\0\0").error == errno.EINVAL


def test_mig_data_and_dirty_pages_einval(client) -> None:
    assert client.request(Command.MIG_DATA_READ, P.MIG_DATA.pack(8, 16)).error == errno.EINVAL
    assert client.request(Command.MIG_DATA_WRITE, P.MIG_DATA.pack(8, 0)).error == errno.EINVAL
    assert client.request(Command.DIRTY_PAGES, b"").error == errno.EINVAL
