"""``devmodel run --nic-netns``: the NIC cabled to a tap in a private namespace, from the CLI.

A frame the guest sends must be taken by the tap (TX_PACKETS 1, TX_DROPS 0: a backend that
refused it, or no backend, would count a drop), the run must name the namespace, and the
namespace must be gone when the run ends.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from devmodel.net import net_admin_unavailable

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(net_admin_unavailable() is not None,
                                 reason=f"TAP backend unavailable: {net_admin_unavailable()}")]


def test_run_nic_netns_sends_a_frame_and_removes_the_namespace():
    from pyroute2 import netns
    cmd = [sys.executable, "-m", "devmodel", "run", "--nic-netns",
           "--exec", "dm up && dm nic up --buffers 2 && dm nic send --len 64 --seed 3 && dm nic counters"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"network namespace (\S+);", proc.stderr)
    assert m, proc.stderr[-2000:]
    counters = [line for line in proc.stdout.splitlines() if line.startswith("nic_counters")]
    assert counters and "tx_packets=1" in counters[0] and "tx_drops=0" in counters[0], proc.stdout
    assert m.group(1) not in netns.listnetns()


def test_serve_hotplug_machine_with_nic_netns_prints_root_port_and_cleans_up(tmp_path):
    """``devmodel serve --device machine-hotplug --nic-netns``: the printed QEMU arguments put
    the root port before the engine that sits on it (QEMU needs the bus first); the
    namespace exists while serving and is gone after SIGTERM."""
    import os
    import signal
    import time

    from pyroute2 import netns
    proc = subprocess.Popen([sys.executable, "-m", "devmodel", "serve", "--device", "machine-hotplug",
                             "--nic-netns", "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(tmp_path / "control.sock"):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        alive = [n for n in netns.listnetns() if n.startswith(f"devmodel-{proc.pid}-")]
        assert len(alive) == 1
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"network namespace {alive[0]}" in err
    port = out.index("-device pcie-root-port,id=hp0,bus=pcie.0")
    engine = out.index('"id":"dma_engine","bus":"hp0"')
    assert port < engine
    assert alive[0] not in netns.listnetns()
