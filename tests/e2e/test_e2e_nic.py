"""The NIC in a booted guest on a real TAP backend inside a network namespace (issue 9).

The machine's NIC (00:05.0, vSID 0x28) is cabled to a tap that devmodel.net moved into a
private namespace; the test plays the network with an AF_PACKET socket bound to that tap
inside the namespace, so frames really cross the kernel both ways. The guest agent (``dm
nic ...``) drives the NIC through the vIOMMU. Frames use the local experimental EtherType
0x88B5, so the namespace's own stack never answers them.

Skips (with the reason) where the machine cannot make namespaces and taps.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time

import pytest

from devmodel.devices.nic_records import DEFAULT_MAC
from devmodel.machine import NIC_HOST_SID, NIC_VSID
from devmodel.net import NetNamespace, net_admin_unavailable
from devmodel.session import machine_session
from devmodel.trace import TRACER
from guest.harness import parse_records as parse

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(net_admin_unavailable() is not None,
                                 reason=f"TAP backend unavailable: {net_admin_unavailable()}")]

ETHERTYPE = b"\x88\xb5"
#: An unrecoverable fault's hops, endpoint to guest driver (as in test_e2e_faults).
EVENT_JOURNEY = ["endpoint.dma", "smmu.fault", "smmu.evtq", "host.evtq", "iommufd.veventq",
                 "viommu.read", "guest.evtq", "guest.consumed"]


class Wire:
    """The network side: a packet socket on the tap inside the namespace."""

    def __init__(self, ns: NetNamespace) -> None:
        self.ns = ns
        self.sock = ns.packet_socket()
        self.sock.settimeout(0.2)

    def frame(self, payload: bytes) -> bytes:
        return DEFAULT_MAC + self.ns.mac + ETHERTYPE + payload

    def send(self, payload: bytes) -> bytes:
        frame = self.frame(payload)
        self.sock.send(frame)
        return frame

    def collect(self, n: int, timeout: float = 30.0) -> list[bytes]:
        """Frames of our EtherType the NIC sent, in order (others are the stack's)."""
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if data[12:14] == ETHERTYPE:
                got.append(data)
        return got


@pytest.fixture
def rig(tmp_path):
    TRACER.clear()
    with NetNamespace() as ns:
        tap = ns.backend
        with machine_session(directory=str(tmp_path / "s")) as s:
            s.machine.set_nic_backend(tap)

            def dm(cmd: str, rc: int = 0, timeout: float = 60) -> list[dict]:
                code, out = s.guest.run(f"dm {cmd}", timeout=timeout)
                assert code == rc, f"dm {cmd}: rc {code}\n{out}"
                return parse(out)

            s.dm = dm
            s.wire = Wire(ns)
            s.ns = ns
            dm("up --evtq-log2 2")  # a 4-entry guest event queue, for the overflow test
            try:
                yield s
            finally:
                s.wire.sock.close()
                s.machine.set_nic_backend(None)


def recv(rig, n: int, since: int = 0) -> list[dict]:
    return [r for r in rig.dm(f"nic recv --wait {n} --since {since} --timeout 30") if r["_"] == "rx"]


def assert_journey(fault: int, expected: list[str]) -> None:
    """Every expected hop exactly once, in order, timestamps monotonic."""
    evs = TRACER.events(fault)
    hops = [e.hop for e in evs]
    assert [h for h in hops if h in expected] == expected, hops
    assert all(a.t_ns <= b.t_ns for a, b in zip(evs, evs[1:]))


def nic_counters(rig) -> dict:
    return rig.client().call("stats")["machine"]["nic"]


def wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_frames_cross_the_namespace_both_ways_byte_exact(rig):
    """Host -> guest: frames sent on the namespace's tap land in the guest's RX buffers with
    identical bytes (through the SMMU, stage 1 + stage 2). Guest -> host: frames the guest
    queues on the TX ring arrive on the tap in the namespace, identical."""
    rig.dm("nic up --buffers 8")
    sent = [rig.wire.send(bytes([i]) * 50 + os.urandom(i * 97 % 1400)) for i in range(6)]
    rx = recv(rig, 6)
    assert [r["status"] for r in rx] == ["DONE"] * 6
    for r, frame in zip(rx, sent):
        assert r["len"] == len(frame)
        if "hex" in r:
            assert bytes.fromhex(r["hex"]) == frame
        else:
            assert r["sha256"] == hashlib.sha256(frame).hexdigest()
    out = [rig.wire.frame(b"guest-to-host %d " % i + bytes(range(40))) for i in range(3)]
    for frame in out:
        assert rig.dm(f"nic send {frame.hex()}")[0]["status"] == "DONE"
    assert rig.wire.collect(3) == out
    c = nic_counters(rig)
    assert (c["rx_packets"], c["rx_bytes"]) == (6, sum(map(len, sent)))
    assert (c["tx_packets"], c["tx_bytes"], c["rx_drops"], c["tx_drops"]) == (3, sum(map(len, out)), 0, 0)


def test_unmapped_rx_buffer_faults_at_every_layer_then_next_frame_arrives(rig):
    """The driver unmapped the next RX buffer: the frame's write faults. The guest EVTQ shows
    F_TRANSLATION for the NIC's vSID at the buffer IOVA, the descriptor says DMA_FAULT, the
    frame is counted as dropped, the trace has every hop once; the next frame is delivered."""
    rig.dm("nic up --buffers 4")
    (un,) = [r for r in rig.dm("nic unmap-rx") if "iova" in r]
    rig.wire.send(b"\x01" * 60)
    good = rig.wire.send(b"\x02" * 60)
    rx = recv(rig, 2)
    assert (rx[0]["status"], rx[0]["event"]) == ("DMA_FAULT", "F_TRANSLATION")
    assert rx[1]["status"] == "DONE" and bytes.fromhex(rx[1]["hex"]) == good
    (ev,) = [r for r in rig.dm("events --wait 1 --timeout 30") if r["_"] == "event"]
    assert (ev["name"], ev["sid"], ev["addr"], ev["rnw"]) == ("F_TRANSLATION", NIC_VSID, un["iova"], 0)
    c = nic_counters(rig)
    assert (c["rx_dma_faults"], c["rx_drops"], c["rx_packets"]) == (1, 1, 1)
    faults = [e.fault for e in TRACER.events() if e.hop == "endpoint.dma" and e.detail.get("sid") == NIC_HOST_SID
              and any(x.hop == "smmu.fault" for x in TRACER.events(e.fault))]
    assert len(faults) == 1
    assert_journey(faults[0], EVENT_JOURNEY)


def test_burst_into_unmapped_buffers_counts_drops_and_lost_events_exactly(rig):
    """10 frames into 10 unmapped buffers while the guest's 4-entry EVTQ is not drained:
    10 faults, 10 drops, 4 events reach the guest and the other 6 are counted lost (the
    SMMUv3 overflow rule: the guest sees the overflow flag once)."""
    rig.dm("nic up --buffers 12")
    assert len([r for r in rig.dm("nic unmap-rx --count 10") if "iova" in r]) == 10
    rig.dm("evtq hold")
    ctl = rig.client()
    ctl.call("inject.viommu.hold", on=True)
    for i in range(10):
        rig.wire.send(bytes([i]) * 64)
    assert wait_for(lambda: nic_counters(rig)["rx_dma_faults"] == 10), nic_counters(rig)
    ctl.call("inject.viommu.hold", on=False)
    rig.dm("evtq release")
    evs = [r for r in rig.dm("events --wait 4 --timeout 30") if r["_"] == "event"]
    assert len(evs) == 4 and {e["sid"] for e in evs} == {NIC_VSID}
    c = nic_counters(rig)
    assert (c["rx_dma_faults"], c["rx_drops"], c["rx_packets"]) == (10, 10, 0)
    (g,) = [r for r in rig.dm("counters") if r["_"] == "counters"]
    assert (g["viommu_evtq_lost"], g["viommu_veventq_lost"], g["evtq_overflow_seen"]) == (6, 0, 1)
    rx = recv(rig, 10)
    assert [r["status"] for r in rx] == ["DMA_FAULT"] * 10


def test_pri_delivers_the_frame_after_a_success_response(rig):
    """With ATS and PRI enabled on the NIC, the unmapped buffer raises a page request (no
    event); the guest answers Success after mapping the page, and the NIC delivers the frame
    into that very buffer."""
    rig.dm("nic up --buffers 4")
    rig.dm("ats on --dev nic")
    rig.dm("pri enable --dev nic")
    rig.dm("pri auto success")
    rig.dm("nic unmap-rx")
    frame = rig.wire.send(b"\x5a" * 80)
    (r,) = recv(rig, 1)
    assert r["status"] == "DONE" and bytes.fromhex(r["hex"]) == frame
    c = nic_counters(rig)
    assert (c["page_requests"], c["prg_success"], c["rx_packets"], c["rx_drops"]) == (1, 1, 1, 0)
    assert not [r for r in rig.dm("events") if r["_"] == "event"]


def test_teardown_leaves_no_namespace_link_or_process(tmp_path):
    """After the machine and the namespace close: no devmodel namespace, no tap, no QEMU."""
    with NetNamespace() as ns:
        name = ns.name
        tap = ns.backend
        with machine_session(directory=str(tmp_path / "s")) as s:
            s.machine.set_nic_backend(tap)
            qemu_pid = s.guest.child.pid
            s.machine.set_nic_backend(None)
    from pyroute2 import IPRoute, netns
    assert name not in netns.listnetns()
    with IPRoute() as ip:
        names = [link.get_attr("IFLA_IFNAME") for link in ip.get_links()]
    assert not [n for n in names if n.startswith("dm")], names
    assert not os.path.exists(f"/proc/{qemu_pid}")
