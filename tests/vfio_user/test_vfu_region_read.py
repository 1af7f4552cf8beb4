"""VFIO_USER_REGION_READ (reference: beyond end, zero-size region, bad index are EINVAL)."""

import errno
import struct

from vfio_user import protocol as P
from vfio_user.protocol import Command


def _read(c, region, offset, count):
    return c.request(Command.REGION_READ, P.REGION_ACCESS.pack(offset, region, count))


def test_config_read_256_like_qemu(client, tdev) -> None:
    data = client.region_read(7, 0, 256)
    assert len(data) == 256
    assert struct.unpack_from("<HH", data) == (tdev.VENDOR_ID, tdev.DEVICE_ID)


def test_reply_echoes_offset_region_count(client) -> None:
    r = _read(client, 7, 0x3D, 1)
    assert P.REGION_ACCESS.unpack(r.payload) == (0x3D, 7, 1) and r.payload[16:] == b"\1"


def test_extended_config_space_served(client) -> None:
    """PCIe extended capabilities live at >= 0x100."""
    assert client.region_read(7, 0x100, 4)[0] == 0x0F


def test_count_zero_allowed(client) -> None:
    assert client.region_read(7, 0, 0) == b""


def test_errors(client, tdev) -> None:
    assert _read(client, 7, tdev.CONFIG_SIZE - 2, 4).error == errno.EINVAL   # beyond end
    assert _read(client, 7, (1 << 64) - 1, 4).error == errno.EINVAL          # wraps
    assert _read(client, 6, 0, 4).error == errno.EINVAL                      # zero-sized ROM
    assert _read(client, 9, 0, 4).error == errno.EINVAL                      # bad index
    assert client.request(Command.REGION_READ, b"\0" * 8).error == errno.EINVAL  # truncated
    assert _read(client, 7, 0, (1 << 20) + 1).error == errno.EINVAL          # > max_data_xfer_size


def test_pipelined_reads_answered_in_order(client) -> None:
    """Spec "Command Concurrency": requests are processed in the order received."""
    ids = [client.send(Command.REGION_READ, P.REGION_ACCESS.pack(i, 7, 1)) for i in range(64)]
    cfg = client.region_read(7, 0, 64)
    for i, mid in enumerate(ids):
        r = client.wait_reply(mid)
        assert r.payload[16:] == cfg[i:i + 1]
