"""Fixtures for the TAP backend tests: a real namespace, a real tap, real packet sockets.

Tests that need them skip with :func:`devmodel.net.net_admin_unavailable`'s reason where
namespaces or taps cannot be made (no CAP_NET_ADMIN, no /dev/net/tun, no pyroute2).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from devmodel.net import NetNamespace, net_admin_unavailable

ETH_P_TEST = 0x88B5
"""IEEE 802 local experimental EtherType: the kernel ignores it, so it never answers."""

HOST_MAC = bytes.fromhex("020000000001")
"""A locally administered source MAC standing in for the NIC model."""


def frame(i: int, size: int = 64, dst: bytes = b"\xff" * 6) -> bytes:
    """A test Ethernet frame (no FCS) of ``size`` bytes whose payload encodes ``i``."""
    header = dst + HOST_MAC + ETH_P_TEST.to_bytes(2, "big")
    payload = i.to_bytes(4, "big") + bytes((i + k) & 0xFF for k in range(size - len(header) - 4))
    return header + payload


def needs_net_admin() -> None:
    reason = net_admin_unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def ns() -> Iterator[NetNamespace]:
    """An opened namespace with its tap; always closed."""
    needs_net_admin()
    namespace = NetNamespace()
    namespace.open()
    try:
        yield namespace
    finally:
        namespace.close()


@pytest.fixture
def capture(ns: NetNamespace) -> Iterator[socket.socket]:
    """The namespace side of the wire: a packet socket on the tap, 2 s timeout."""
    sock = ns.packet_socket()
    sock.settimeout(2.0)
    try:
        yield sock
    finally:
        sock.close()
