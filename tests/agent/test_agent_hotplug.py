"""Endpoint hot-removal survived by the agent, in-process (hostsim).

``HostWorld.remove`` does to the agent what a guest's pciehp or sysfs ``remove`` does: the
devmodel_uirq file hangs up (EPOLLHUP -> ENODEV) and the BAR mapping is revoked (any later
MMIO would be SIGBUS; hostsim counts it in ``mmio_after_removal``). ``HostWorld.plug``
brings a function back, possibly at another BDF (01:00.0 behind a root port: vSID 0x100,
StreamID = BDF per the machine interface). Checks: the daemon survives, drops the driver
state, reports the device gone, fails device commands with ENODEV at once, finds the
device again (``dm rescan`` or automatically), and never answers page requests of the
removed function automatically.
"""

from __future__ import annotations

import time

from devmodel.iommu import records as rec

from devmodel_agent import hostsim

from .conftest import kv, ok, run

FAST = 1.0  # a command on a removed device must fail well within this, not time out





def devices(agent) -> dict[str, dict[str, str]]:
    return {d["dev"]: d for d in (kv(line) for line in agent.status_lines() if line.startswith("device "))}


def wait_gone(agent, kind: str, timeout: float = 3.0) -> None:
    """The interrupt thread notices the hang-up on its own (no command needed)."""
    deadline = time.monotonic() + timeout
    while devices(agent)[kind]["state"] != "gone":
        assert time.monotonic() < deadline, devices(agent)
        time.sleep(0.02)



def test_engine_removal_is_noticed_and_commands_fail_fast(host_agent):
    agent, world = host_agent
    ok(agent, "buf", "alloc", "b", "4096")
    ok(agent, "map", "0", "0x40000", "--page-for-buffer", "b")
    assert ok(agent, "dma", "fill", "--dst", "0x40000", "--len", "8")[0]["status"] == "SUCCESS"
    world.remove("engine")
    wait_gone(agent, "engine")
    d = devices(agent)["engine"]
    assert (d["state"], d["bdf"], d["removals"]) == ("gone", "0000:00:04.0", "1")
    # Driver state dropped: its STE aborts (like a detached device), no engine line in status.
    ste = rec.STE.decode(world.mem.read(agent.smmu.ste_addr(0x20), rec.STE_SIZE))
    assert ste.Config == rec.SteConfig.ABORT
    assert not any(line.startswith("engine ") for line in agent.status_lines())
    for argv in (["dma", "fill", "--dst", "0x40000", "--len", "8"], ["dma", "status"], ["pri", "status"],
                 ["ats", "on"]):
        t0 = time.monotonic()
        rc, out = run(agent, *argv)
        assert rc == 1 and kv(out[0])["errno"] == "ENODEV", out
        assert "gone" in kv(out[0])["msg"]
        assert time.monotonic() - t0 < FAST
    # The vIOMMU side keeps working and no register of the removed function was touched.
    assert run(agent, "status")[0] == 0 and run(agent, "cmd", "sync")[0] == 0
    assert world.mmio_after_removal == 0


def test_waiter_on_removed_engine_fails_instead_of_timing_out(host_agent):
    """A ``dma wait`` in progress when the engine goes returns ENODEV, not the 5 s timeout."""
    agent, world = host_agent
    # A FILL to an unmapped IOVA with PRI on and no answer: the job stays outstanding.
    ok(agent, "ats", "on")
    ok(agent, "pri", "enable")
    slot = ok(agent, "dma", "fill", "--pasid", "3", "--dst", "0x70000", "--len", "8", "--no-wait")[0]["slot"]
    ok(agent, "prq", "--wait", "1")
    t0 = time.monotonic()
    import threading
    threading.Timer(0.2, world.remove, args=("engine",)).start()
    rc, out = run(agent, "dma", "wait", slot, "--timeout", "5")
    assert rc == 1 and kv(out[-1])["errno"] == "ENODEV", out
    assert time.monotonic() - t0 < 2.0
    assert world.mmio_after_removal == 0


def test_stale_page_requests_are_never_answered_automatically(host_agent):
    """PRQ entries of a removed function turn ``stale``; a later Success policy answers none."""
    agent, world = host_agent
    ok(agent, "ats", "on")
    ok(agent, "pri", "enable")
    ok(agent, "dma", "fill", "--pasid", "3", "--dst", "0x70000", "--len", "8", "--no-wait")
    assert ok(agent, "prq", "--wait", "1")[0]["state"] == "pending"
    resp_before = agent.counters["pri_resp"]
    world.remove("engine")
    wait_gone(agent, "engine")
    assert [r["state"] for r in ok(agent, "prq")] == ["stale"]
    assert ok(agent, "prq", "--pending") == []
    assert ok(agent, "pri", "auto", "success")[0]["answered_now"] == "0"
    assert agent.counters["pri_resp"] == resp_before


def test_rescan_finds_engine_at_new_bdf_and_it_works(host_agent):
    """Re-plugged behind a root port at 01:00.0: vSID 0x100. ``dm rescan`` re-creates the driver
    state (ring mapped in a fresh CD table for the new vSID, STE s1) and DMA works again."""
    agent, world = host_agent
    world.remove("engine")
    wait_gone(agent, "engine")
    rc, out = run(agent, "rescan")
    assert rc == 0 and kv(out[0])["result"] == "absent"  # not back yet
    world.plug("engine", hostsim.HOTPLUG_VSID)
    found = ok(agent, "rescan")[0]
    assert (found["dev"], found["result"], found["bdf"], found["sid"]) == ("engine", "found", "0000:01:00.0",
                                                                          "0x100")
    assert agent.vsid == 0x100
    ste = rec.STE.decode(world.mem.read(agent.smmu.ste_addr(0x100), rec.STE_SIZE))
    assert ste.V == 1 and ste.Config == rec.SteConfig.S1_TRANS
    ok(agent, "ste", "0x100", "s1")  # the usual command works for the new vSID
    ok(agent, "buf", "alloc", "b", "4096")
    ok(agent, "map", "0", "0x40000", "--page-for-buffer", "b")  # default SID: the engine's new vSID
    assert ok(agent, "dma", "fill", "--dst", "0x40000", "--len", "8", "--pattern", "0x1122334455667788")[0][
        "status"] == "SUCCESS"
    assert world.mem.read(agent.buffers["b"].pa, 8) == (0x1122334455667788).to_bytes(8, "little")
    d = devices(agent)["engine"]
    assert (d["state"], d["removals"]) == ("present", "1")
    assert world.mmio_after_removal == 0


def test_next_command_rescans_automatically_same_bdf(host_agent):
    """Back at the same BDF: the next DMA command finds it without ``dm rescan``; the old
    mappings of that vSID were dropped with the device (fresh tables)."""
    agent, world = host_agent
    ok(agent, "map", "0", "0x40000")
    world.remove("engine")
    wait_gone(agent, "engine")
    world.plug("engine")
    ok(agent, "buf", "alloc", "b", "4096")
    rc, out = run(agent, "dma", "fill", "--dst", "0x40000", "--len", "8")
    assert rc == 0 and kv(out[0])["status"] == "PAGE_FAULT"  # old mapping gone with the old device
    ok(agent, "map", "0", "0x40000", "--page-for-buffer", "b")
    assert ok(agent, "dma", "fill", "--dst", "0x40000", "--len", "8")[0]["status"] == "SUCCESS"


def test_nic_removal_and_return(host_agent):
    """The NIC goes while up: ``nic`` commands fail with ENODEV, the engine is unaffected;
    once it is back, ``nic up`` on the new function works (RX round trip)."""
    agent, world = host_agent
    ok(agent, "nic", "up", "--buffers", "2")
    world.remove("nic")
    wait_gone(agent, "nic")
    rc, out = run(agent, "nic", "recv", "--wait", "1", "--timeout", "5")
    assert rc == 1 and kv(out[0])["errno"] == "ENODEV"
    assert ok(agent, "dma", "status")[0]["state"] == "ENABLED"
    world.plug("nic")
    assert ok(agent, "rescan", "--no-bus")[1]["result"] == "found"
    ok(agent, "nic", "up", "--buffers", "2")
    world.wire.inject(b"\x33" * 64)
    r = ok(agent, "nic", "recv", "--wait", "1", "--timeout", "3")[0]
    assert r["status"] == "DONE" and bytes.fromhex(r["hex"]) == b"\x33" * 64
    assert world.mmio_after_removal == 0


def test_removal_seen_by_sysfs_check_before_interrupt_thread(host_agent):
    """The function vanished but its interrupt line has not reported yet: the command's own
    presence check notices first and still touches no register."""
    agent, world = host_agent
    ep = world.endpoints["engine"]
    world._removable["engine"].removed = True  # node gone, no hang-up yet
    rc, out = run(agent, "dma", "status")
    assert rc == 1 and kv(out[0])["errno"] == "ENODEV"
    assert devices(agent)["engine"]["state"] == "gone"
    assert world.mmio_after_removal == 0
    ep.irq.hangup()


def test_daemon_over_socket_survives_removal(served, capsys):
    """Through the real ``dm`` client and UNIX socket: after the engine vanishes the daemon
    still answers, a DMA command prints one ``error errno=ENODEV`` record with exit code 1,
    and ``status`` reports ``device dev=engine state=gone``."""
    from devmodel_agent import cli
    path, agent, world, _ = served
    world.remove("engine")
    wait_gone(agent, "engine")
    capsys.readouterr()
    assert cli.main(["--socket", path, "dma", "fill", "--dst", "0x1000", "--len", "8"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("error errno=ENODEV ")
    assert cli.main(["--socket", path, "status"]) == 0
    status = [kv(line) for line in capsys.readouterr().out.splitlines() if line.startswith("device ")]
    assert {"dev": "engine", "state": "gone"}.items() <= status[0].items()
    assert world.mmio_after_removal == 0
