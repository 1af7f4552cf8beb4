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
