"""TapBackend as a PacketBackend over a real tap in a real namespace.

Contract: the NIC contract's PacketBackend protocol (devmodel/devices/packet_backend.py):
fileno is a non-blocking fd readable when a frame waits; recv returns one whole frame or
None (EAGAIN); send returns False for a dropped frame (EAGAIN/ENOBUFS/EIO) and never
raises for those. Frames are whole Ethernet frames without FCS (IFF_TAP | IFF_NO_PI).
"""

from __future__ import annotations

import select
import socket
import time

import pytest
from pyroute2 import IPRoute

from devmodel.devices.packet_backend import PacketBackend
from devmodel.net import NetNamespace, TapBackend

from .conftest import frame, needs_net_admin

BURST = 200


def wait_readable(fd: int, timeout: float = 2.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def recv_from_tap(tap: TapBackend, timeout: float = 2.0) -> bytes:
    """The next frame on the tap, waiting on fileno() like the model's event loop does."""
    deadline = time.monotonic() + timeout
    while True:
        got = tap.recv()
        if got is not None:
            return got
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no frame arrived on the tap fd"
        wait_readable(tap.fileno(), remaining)


@pytest.mark.parametrize("size", [60, 64, 1514])
def test_frame_to_tap_fd_arrives_on_packet_socket(ns: NetNamespace, capture: socket.socket, size: int) -> None:
    """A frame the model sends enters the namespace byte for byte (no FCS, no PI header)."""
    sent = frame(7, size)
    assert ns.backend.send(sent) is True
    assert capture.recv(4096) == sent


@pytest.mark.parametrize("size", [60, 64, 1514])
def test_frame_from_packet_socket_arrives_on_tap_fd(ns: NetNamespace, capture: socket.socket, size: int) -> None:
    """A frame sent out of the namespace's tap is one whole frame on the model's fd."""
    sent = frame(9, size)
    capture.send(sent)
    assert wait_readable(ns.backend.fileno()), "fileno() not readable while a frame waits"
    assert ns.backend.recv() == sent
    assert ns.backend.recv() is None  # exactly one frame per read


def test_tap_backend_is_a_packet_backend(ns: NetNamespace) -> None:
    """The NIC model accepts any PacketBackend; the tap must satisfy the protocol."""
    assert isinstance(ns.backend, PacketBackend)


def test_recv_none_when_idle(ns: NetNamespace) -> None:
    """EAGAIN on the non-blocking fd is 'no frame', never an exception."""
    assert ns.backend.recv() is None
    assert ns.backend.recv() is None


def test_no_unsolicited_frames_after_setup(ns: NetNamespace) -> None:
    """IPv6 off, IPv4 quiet: the kernel sends nothing unasked (test traffic is deterministic)."""
    assert not wait_readable(ns.backend.fileno(), 1.0), f"unsolicited frame: {ns.backend.recv()!r}"


def test_burst_model_to_namespace_complete_and_in_order(ns: NetNamespace, capture: socket.socket) -> None:
    frames = [frame(i) for i in range(BURST)]
    assert all(ns.backend.send(f) for f in frames)
    assert [capture.recv(4096) for _ in range(BURST)] == frames


def test_burst_namespace_to_model_complete_and_in_order(ns: NetNamespace, capture: socket.socket) -> None:
    frames = [frame(i) for i in range(BURST)]
    for f in frames:
        capture.send(f)
    assert [recv_from_tap(ns.backend) for _ in range(BURST)] == frames
    assert ns.backend.recv() is None


def test_send_returns_false_when_link_down(ns: NetNamespace) -> None:
    """A write to a tap whose interface is down fails with EIO: a drop, not an exception."""
    with IPRoute(netns=ns.name, flags=0) as ipr:
        ipr.link("set", index=ns.ifindex, state="down")
        assert ns.backend.send(frame(1)) is False
        ipr.link("set", index=ns.ifindex, state="up")
    assert ns.backend.send(frame(2)) is True


def test_send_returns_false_for_runt_frame(ns: NetNamespace) -> None:
    """A 'frame' shorter than an Ethernet header (guest garbage) is refused, not a crash."""
    assert ns.backend.send(b"\x01\x02\x03") is False


def test_closed_backend_is_a_dead_link_and_removes_only_its_tap(ns: NetNamespace) -> None:
    """Closing the backend drops the non-persistent tap; the namespace stays for ns.close()."""
    tap = ns.backend
    tap.close()
    tap.close()
    assert tap.fileno() == -1
    assert tap.recv() is None
    assert tap.send(frame(3)) is False
    with IPRoute(netns=ns.name, flags=0) as ipr:
        assert ipr.link_lookup(ifname=ns.ifname) == []
        assert ipr.link_lookup(ifname="lo") != []


def test_ifname_follows_the_kernel() -> None:
    """TapBackend('') gets a kernel-chosen name, read back through TUNGETIFF."""
    needs_net_admin()
    with TapBackend() as tap:
        assert tap.ifname.startswith("tap")
        with IPRoute() as ipr:
            assert len(ipr.link_lookup(ifname=tap.ifname)) == 1
        name = tap.ifname
    with IPRoute() as ipr:
        assert ipr.link_lookup(ifname=name) == []
