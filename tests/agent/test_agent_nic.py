"""The agent's NIC driver (``dm nic ...``) against the real NIC model, in-process.

The NIC is ``devmodel.devices.nic_pci.NicFunction`` at vSID 0x28 behind the emulated
SMMUv3 (hostsim), on a ``SocketPairBackend`` wire whose peer plays the network.
Contract: the NIC model (devmodel/devices/nic.py docstring: RX/TX semantics, PRI behaviour) and
``devmodel.devices.nic_records`` (registers, descriptors, counters); SMMUv3 event fields
per reference smmuv3-pcie.md §3, PRI per §8.5-8.6.
"""

from __future__ import annotations

import hashlib
import socket
import time

from devmodel.devices.nic_records import DEFAULT_MAC

from devmodel_agent import hostsim
from devmodel_agent.agent import Agent
from devmodel_agent.nic import generated_frame

from .conftest import kv, ok, run

NIC_VSID = 0x28





def frames_on_wire(world, n: int, timeout: float = 2.0) -> list[bytes]:
    """Frames the NIC sent, read from the peer end of the socket pair (real fd)."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    world.wire.peer.settimeout(0.1)
    while len(got) < n and time.monotonic() < deadline:
        try:
            got.append(world.wire.peer.recv(65536))
        except (socket.timeout, BlockingIOError):
            continue
    world.wire.peer.setblocking(False)
    return got



def test_nic_up_maps_rings_and_posts_buffers(host_agent):
    """``nic up`` writes the NIC's STE (s1) itself, maps rings and buffers in CD 0 (identity),
    posts N buffers: RX_TAIL = N, RX/TX enabled (nic_records.Reg / StatusBit)."""
    agent, world = host_agent
    assert NIC_VSID not in agent.smmu.streams  # no context before
    out = ok(agent, "nic", "up", "--buffers", "5", "--rx-log2", "3")
    up, bufs = out[0], out[1:]
    assert up["sid"] == hex(NIC_VSID) and up["buffers"] == "5" and up["rx_entries"] == "8"
    assert [b["slot"] for b in bufs] == ["0", "1", "2", "3", "4"]
    assert agent.smmu.streams[NIC_VSID].mode == "s1"
    ctx = agent.smmu.streams[NIC_VSID].contexts[0]
    for b in bufs:
        assert ctx.table.lookup(int(b["iova"], 16)).pa == int(b["iova"], 16)
    status = ok(agent, "nic", "status")[0]
    assert status["state"] == "LINK_UP|RX_ENABLED|TX_ENABLED" and status["rx_tail"] == "5"
    assert status["posted"] == "5"
    assert run(agent, "nic", "up")[0] == 1  # already up: EBUSY, not a second set of rings


def test_ste_for_nic_vsid_then_up(host_agent):
    """``dm ste 0x28 s1`` works for the NIC's vSID (stream table covers it); up keeps that STE."""
    agent, _ = host_agent
    ste = ok(agent, "ste", "0x28", "s1")[0]
    assert ste["sid"] == "0x28" and ste["mode"] == "s1"
    cd_table = agent.smmu.streams[NIC_VSID].cd_table
    ok(agent, "nic", "up")
    assert agent.smmu.streams[NIC_VSID].cd_table == cd_table


def test_rx_tx_round_trip_bytes(host_agent):
    """RX: frames from the wire land in posted buffers (DONE, FrameLen, bytes); TX: HEX and
    seeded frames reach the wire byte for byte; buffers are re-posted (tail advances)."""
    agent, world = host_agent
    ok(agent, "nic", "up", "--buffers", "4")
    sent = [bytes(range(i, i + 60)) for i in range(6)]  # more frames than buffers: re-posting works
    for frame in sent:
        assert world.wire.inject(frame)
        ok(agent, "nic", "recv", "--wait", "1", "--since", str(sent.index(frame)), "--timeout", "3")
    rx = ok(agent, "nic", "recv")
    assert [r["status"] for r in rx] == ["DONE"] * 6
    assert [bytes.fromhex(r["hex"]) for r in rx] == sent
    assert [r["slot"] for r in rx] == ["0", "1", "2", "3", "4", "5"]
    long = bytes(range(256)) * 5
    world.wire.inject(long)
    r = ok(agent, "nic", "recv", "--since", "6", "--wait", "1", "--timeout", "3")[0]
    assert r["len"] == str(len(long)) and "hex" not in r  # long frames: sha256 only
    assert r["sha256"] == hashlib.sha256(long).hexdigest()

    frame = bytes.fromhex("ffffffffffff525400dd000188b5") + b"hello nic" + bytes(40)
    tx = ok(agent, "nic", "send", frame.hex())
    assert tx[0]["status"] == "DONE"
    assert frames_on_wire(world, 1) == [frame]
    tx = ok(agent, "nic", "send", "--len", "100", "--seed", "7", "--count", "3")
    assert [t["status"] for t in tx] == ["DONE"] * 3
    want = [generated_frame(100, 7 + i, DEFAULT_MAC) for i in range(3)]
    assert frames_on_wire(world, 3) == want
    c = ok(agent, "nic", "counters")[0]
    assert (c["rx_packets"], c["tx_packets"], c["rx_drops"]) == ("7", "4", "0")


def test_rx_ring_with_pasid(host_agent):
    """Rings and buffers reached with the ring PASID as SubstreamID (RX_CFG.PASID_EN)."""
    agent, world = host_agent
    ok(agent, "nic", "up", "--pasid", "5", "--buffers", "2")
    assert 5 in agent.smmu.streams[NIC_VSID].contexts
    world.wire.inject(b"\xaa" * 64)
    r = ok(agent, "nic", "recv", "--wait", "1", "--timeout", "3")[0]
    assert r["status"] == "DONE" and bytes.fromhex(r["hex"]) == b"\xaa" * 64
    assert ok(agent, "nic", "send", "--len", "64", "--seed", "1")[0]["status"] == "DONE"


def test_unmapped_rx_buffer_faults_then_next_frame_delivered(host_agent):
    """The driver unmapped the next buffer (+ TLBI): the frame's buffer write faults ->
    F_TRANSLATION for StreamID 0x28 at the buffer IOVA, a write (RnW=0) (§3); the descriptor
    says DMA_FAULT / F_TRANSLATION, counted drop; the next frame goes to the next buffer,
    and the faulted buffer is parked until ``remap-rx``."""
    agent, world = host_agent
    ok(agent, "nic", "up", "--buffers", "3")
    un = ok(agent, "nic", "unmap-rx")[0]
    assert un["slot"] == "0"
    iova = un["iova"]
    world.wire.inject(b"\x01" * 64)
    world.wire.inject(b"\x02" * 64)
    rx = ok(agent, "nic", "recv", "--wait", "2", "--timeout", "3")
    assert (rx[0]["slot"], rx[0]["status"], rx[0]["event"]) == ("0", "DMA_FAULT", "F_TRANSLATION")
    assert (rx[1]["slot"], rx[1]["status"]) == ("1", "DONE") and bytes.fromhex(rx[1]["hex"]) == b"\x02" * 64
    ev = ok(agent, "events", "--wait", "1", "--timeout", "3")[0]
    assert (ev["name"], ev["sid"], ev["addr"], ev["rnw"]) == ("F_TRANSLATION", "0x28", iova, "0")
    c = ok(agent, "nic", "counters")[0]
    assert (c["rx_dma_faults"], c["rx_drops"], c["rx_packets"]) == ("1", "1", "1")
    st = ok(agent, "nic", "status")[0]
    assert (st["parked"], st["unmapped"], st["posted"]) == ("1", "1", "2")
    back = ok(agent, "nic", "remap-rx")
    assert back[0]["buffer"] == "0" and back[1]["iova"] == iova  # mapped, then re-posted
    assert ok(agent, "nic", "status")[0]["posted"] == "3"


def test_unmap_rx_burst_counts_exactly(host_agent):
    """N unmapped buffers and N frames: exactly N DMA_FAULT write-backs, N events, N drops."""
    agent, world = host_agent
    ok(agent, "nic", "up", "--buffers", "6")
    assert len(ok(agent, "nic", "unmap-rx", "--count", "4")) == 4
    for i in range(4):
        world.wire.inject(bytes([i]) * 64)
    rx = ok(agent, "nic", "recv", "--wait", "4", "--timeout", "3")
    assert [r["status"] for r in rx] == ["DMA_FAULT"] * 4
    assert len(ok(agent, "events", "--wait", "4", "--timeout", "3")) == 4
    assert ok(agent, "nic", "counters")[0]["rx_dma_faults"] == "4"


def test_pri_delivers_after_success_response(host_agent):
    """ATS + PRI on the NIC (``--dev nic``): the unmapped buffer raises a page request instead
    of a fault; the agent's Success policy maps the buffer's own page back and answers; the
    NIC retries and delivers the frame into that buffer (DONE, bytes intact)."""
    agent, world = host_agent
    assert ok(agent, "ats", "on", "--dev", "nic")[0]["enabled"] == "1"
    assert ok(agent, "pri", "enable", "--dev", "nic")[0]["enabled"] == "1"
    assert ok(agent, "pri", "status")[0]["enabled"] == "0"  # the engine's PRI is untouched
    ok(agent, "pri", "auto", "success")
    ok(agent, "nic", "up", "--buffers", "3")
    assert agent.smmu.streams[NIC_VSID].eats  # STE.EATS follows the NIC's ATS
    un = ok(agent, "nic", "unmap-rx")[0]
    frame = b"\x5a" * 80
    world.wire.inject(frame)
    r = ok(agent, "nic", "recv", "--wait", "1", "--timeout", "3")[0]
    assert (r["slot"], r["status"]) == (un["slot"], "DONE") and bytes.fromhex(r["hex"]) == frame
    req = ok(agent, "prq")[0]
    assert (req["sid"], req["addr"], req["w"], req["state"]) == ("0x28", un["iova"], "1", "auto-success")
    c = ok(agent, "nic", "counters")[0]
    assert (c["page_requests"], c["prg_success"], c["rx_dma_faults"]) == ("1", "1", "0")
    assert ok(agent, "nic", "status")[0]["unmapped"] == "0"  # the fix-up mapped it back
    assert ok(agent, "events") == []


def test_nic_commands_without_a_nic_fail_with_enodev():
    """No NIC on the bus: every ``nic`` command is a clean ENODEV, the daemon goes on."""
    world = hostsim.build(nic=False)
    agent = Agent(world.backends)
    agent.start()
    try:
        for argv in (["nic", "status"], ["nic", "up"], ["ats", "on", "--dev", "nic"]):
            rc, out = run(agent, *argv)
            assert rc == 1 and kv(out[0])["errno"] == "ENODEV", out
        assert run(agent, "status")[0] == 0
    finally:
        agent.stop()
        world.close()


def test_nic_down_returns_rings_and_buffers_to_reserved_memory(host_agent):
    """Repeated ``nic up``/``nic down`` must not use up the reserved window: down unmaps
    every page and frees what up allocated, so the next up reuses the same addresses."""
    agent, _ = host_agent
    ok(agent, "nic", "up")
    ok(agent, "nic", "down")  # the first up also built the NIC's STE and context: kept
    baseline = agent.alloc.used
    first = ok(agent, "nic", "up", "--buffers", "7")[0]
    for _ in range(40):  # far more than the window holds without freeing
        down = ok(agent, "nic", "down")[0]
        assert int(down["reserved_used"]) == baseline
        up = ok(agent, "nic", "up", "--buffers", "7")[0]
        assert (up["rx_ring"], up["tx_ring"]) == (first["rx_ring"], first["tx_ring"])
