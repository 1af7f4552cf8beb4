"""VFIO_USER_VERSION negotiation (spec "VFIO_USER_VERSION"; reference: errors are EINVAL)."""

import errno
import json
import os

from vfio_user import protocol as P
from vfio_user.protocol import Command


def _version(c, payload, fds=()):
    return c.request(Command.VERSION, payload, fds)


def test_negotiation_reply_is_version_0_0_with_nul_terminated_json(vfu) -> None:
    c = vfu.client(negotiate=False)
    r = _version(c, P.build_version(0, 3, P.Capabilities(max_msg_fds=16, write_multiple=True)))
    assert not r.is_error and r.is_reply and r.command == Command.VERSION
    major, minor = P.VERSION.unpack(r.payload)
    assert (major, minor) == (0, 0)  # QEMU rejects a minor above what it proposed / 0
    assert r.payload.endswith(b"\0")
    caps = json.loads(r.payload[4:-1])["capabilities"]
    assert caps["max_msg_fds"] >= 1 and caps["pgsizes"] & 4096
    assert caps["max_data_xfer_size"] == 1 << 20
    assert caps["write_multiple"] is True
    assert vfu.device.events == ["attach"]
    c.close()


def test_write_multiple_not_advertised_unless_proposed(vfu) -> None:
    """Capabilities in the reply must be a subset of those proposed."""
    c = vfu.client(negotiate=False)
    r = _version(c, P.build_version(0, 0, P.Capabilities()))
    assert "write_multiple" not in json.loads(r.payload[4:-1])["capabilities"]
    c.close()


def test_version_without_json_is_accepted(vfu) -> None:
    c = vfu.client(negotiate=False)
    assert not _version(c, P.VERSION.pack(0, 0)).is_error
    c.close()


def test_request_before_version_is_einval(vfu) -> None:
    c = vfu.client(negotiate=False)
    r = c.request(Command.DEVICE_GET_INFO, P.DEVICE_INFO.pack(16, 0, 0, 0))
    assert r.is_error and r.error == errno.EINVAL and len(r.payload) == 0
    assert not _version(c, P.build_version(0, 0, P.Capabilities())).is_error
    c.close()


def test_second_version_is_einval(client) -> None:
    r = _version(client, P.build_version(0, 0, P.Capabilities()))
    assert r.is_error and r.error == errno.EINVAL


def test_bad_versions_are_einval_and_connection_survives(vfu) -> None:
    c = vfu.client(negotiate=False)
    bad = [
        P.build_version(1, 0, P.Capabilities()),                      # major != 0
        P.VERSION.pack(0, 0) + b'{"capabilities":{}}',                 # JSON without NUL
        P.VERSION.pack(0, 0) + b'{"capabilities":{"max_msg_fds":0}}\0',
        P.VERSION.pack(0, 0) + b'{"capabilities":{"max_msg_fds":"x"}}\0',
        P.VERSION.pack(0, 0) + b'{"capabilities":{"max_msg_fds":100000}}\0',
        P.VERSION.pack(0, 0) + b'{"capabilities":{"max_data_xfer_size":-1}}\0',
        P.VERSION.pack(0, 0) + b'{not json}\0',
        P.VERSION.pack(0, 0) + b'[1,2]\0',
        b"\0\0",                                                       # truncated
    ]
    for payload in bad:
        r = _version(c, payload)
        assert r.is_error and r.error == errno.EINVAL, payload
    assert vfu.device.events == []
    assert not _version(c, P.build_version(0, 0, P.Capabilities())).is_error
    c.close()


def test_fds_on_rejected_version_are_closed(vfu, tdev) -> None:
    """Reference: fds carried by a rejected request are closed."""
    c = vfu.client(negotiate=False)
    rd, wr = os.pipe()
    r = _version(c, P.VERSION.pack(2, 0), [wr])
    os.close(wr)
    assert r.is_error and r.error == errno.EINVAL
    assert tdev.fd_closed_by_peer(rd)
    os.close(rd)
    c.close()
