"""``devmodel serve``: socket planning, the printed QEMU arguments, and a real run.

The QEMU argument rules come from reference vfio-user-qemu.md ("Command line that
works"): JSON ``-device`` form only, memory-backend-memfd with share=on.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from devmodel.commands import serve
from devmodel.pci import regs
from vfio_user.device import PciRegion


def test_plan_with_dir_and_sockets():
    plan = serve.plan_sockets(["testdev", "testdev"], None, "/run/x")
    assert plan == [("testdev", "/run/x/testdev0.sock", "ep0"), ("testdev", "/run/x/testdev1.sock", "ep1")]
    plan = serve.plan_sockets(["testdev"], ["/a.sock", "/b.sock"], None)
    assert [p for _, p, _ in plan] == ["/a.sock", "/b.sock"]
    with pytest.raises(ValueError):
        serve.plan_sockets(["testdev", "testdev", "testdev"], ["/a.sock", "/b.sock"], None)


def test_qemu_arguments_use_json_device_and_shared_memfd():
    args = serve.qemu_arguments([("testdev", "/run/my dir/t.sock", "ep0")])
    assert any("memory-backend-memfd" in a and "share=on" in a for a in args)
    device = [a for a in args if a.startswith("-device ")][0]
    parsed = shlex.split(device)
    spec = json.loads(parsed[1])
    assert spec == {"driver": "vfio-user-pci", "socket": {"path": "/run/my dir/t.sock", "type": "unix"},
                    "id": "ep0"}


def test_unknown_device_is_rejected():
    with pytest.raises(ValueError):
        serve.create_device("no_such_device")
    with pytest.raises(ValueError):
        serve.create_device("../evil")
    dev = serve.create_device("testdev")
    try:
        assert dev.region_info(PciRegion.CONFIG).size == regs.PCI_CFG_SPACE_EXP_SIZE
    finally:
        dev.close()


def test_serve_runs_until_sigterm():
    """The command creates a 0600 socket a client can use, prints the QEMU arguments,
    and exits 0 on SIGTERM, removing the socket."""
    from vfio_user.client import Client

    tmp = tempfile.mkdtemp(prefix="pci-serve-")
    sock = os.path.join(tmp, "t.sock")
    proc = subprocess.Popen([sys.executable, "-m", "devmodel", "serve", "--device", "testdev", "--socket", sock],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "socket never appeared"
            time.sleep(0.05)
        assert os.stat(sock).st_mode & 0o777 == 0o600
        with Client(sock) as client:
            client.negotiate()
            vendor = int.from_bytes(client.region_read(PciRegion.CONFIG, 0, 2), "little")
            assert vendor == 0x1AF4
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert '"driver":"vfio-user-pci"' in out and sock in out
        assert not os.path.exists(sock)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if os.path.exists(sock):
            os.unlink(sock)
        os.rmdir(tmp)


def test_serve_machine_sockets_slots_and_control():
    """The default machine: one socket per function, fixed slots in the QEMU arguments, a
    control socket that answers ``devmodel stats``; everything removed on SIGTERM."""
    import json as _json
    tmp = tempfile.mkdtemp(prefix="pci-serve-m-")
    proc = subprocess.Popen([sys.executable, "-m", "devmodel", "serve", "--dir", tmp],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    names = ("viommu.sock", "dma_engine.sock", "nic.sock", "control.sock")
    try:
        deadline = time.monotonic() + 30
        while not all(os.path.exists(os.path.join(tmp, n)) for n in names):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, os.listdir(tmp)
            time.sleep(0.05)
        for n in names:
            assert stat.S_IMODE(os.stat(os.path.join(tmp, n)).st_mode) == 0o600
        stats = subprocess.run([sys.executable, "-m", "devmodel", "stats", "--control", os.path.join(tmp, "control.sock")],
                               capture_output=True, text=True, timeout=60)
        assert stats.returncode == 0, stats.stderr
        assert set(_json.loads(stats.stdout)["machine"]) == {"endpoint", "host", "viommu", "nic", "vmm"}
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert '"addr":"0x3.0"' in out and '"addr":"0x4.0"' in out and '"addr":"0x5.0"' in out
    assert not any(os.path.exists(os.path.join(tmp, n)) for n in names)
