"""``devmodel run`` with QMP, and ``devmodel qemu plug|unplug|query`` through its control socket.

What is checked and why (task: run gives QEMU a QMP socket and prints its path, ends QEMU
through QMP after --exec and on SIGTERM, and offers qemu.plug/unplug/query on the control
socket; control protocol devmodel/control/protocol.py: a bad argument is ``bad-args``, a
command QEMU refuses is ``failed`` with QEMU's message):

- the printed QMP path lies in the run's private directory, and after the run neither
  QEMU nor the directory is left;
- ``devmodel qemu query`` against a running ``devmodel run`` lists the served function
  with its QEMU id; unknown names and out-of-range timeouts are ``bad-args`` (exit 2);
  a plug QEMU refuses is ``failed`` carrying QEMU's words (exit 1);
- on SIGTERM the run asks QEMU to quit over QMP (logged) and tears everything down;
- with the hot-pluggable machine, unplug/plug of the DMA engine really removes and
  restores the function in the guest (DEVICE_DELETED needs the guest's acknowledgement).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from devmodel.commands import run as run_cmd
from devmodel.commands import serve
from devmodel.devices.testdev import TESTDEV_DEVICE_ID, TESTDEV_VENDOR_ID

pytestmark = pytest.mark.qemu

QMP_LINE = re.compile(r"devmodel run: QMP socket (\S+)")
CONTROL_LINE = re.compile(r"devmodel run: control socket (\S+)")
DEVMODEL = [sys.executable, "-m", "devmodel"]


@pytest.fixture
def private_tmp():
    """A short private TMPDIR: the run's socket directory lands there, so leftovers show."""
    path = tempfile.mkdtemp(prefix="qmprun")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def qemu_processes(text: str) -> list[str]:
    """Live processes whose command line mentions ``text`` (QEMU's names its sockets)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(pid) != os.getpid():
            found.append(f"{pid}: {cmdline[:200]}")
    return found


def assert_torn_down(tmpdir: str) -> None:
    assert os.listdir(tmpdir) == [], f"leftovers: {os.listdir(tmpdir)}"
    assert qemu_processes(tmpdir + "/") == []


def devmodel_qemu(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*DEVMODEL, "qemu", *args], capture_output=True, text=True, timeout=60,
                          env=env, stdin=subprocess.DEVNULL)


def test_exec_prints_the_qmp_path_and_leaves_no_qemu(private_tmp):
    r = subprocess.run([*DEVMODEL, "run", "--device", "testdev", "--exec", "echo inside"],
                       env=dict(os.environ, TMPDIR=private_tmp), capture_output=True, text=True,
                       timeout=180, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "inside"
    qmp = QMP_LINE.search(r.stderr)
    control = CONTROL_LINE.search(r.stderr)
    assert qmp and control, r.stderr
    # Next to the control socket, in the run's private directory under TMPDIR.
    assert os.path.dirname(qmp.group(1)) == os.path.dirname(control.group(1))
    assert qmp.group(1).startswith(private_tmp + "/")
    assert_torn_down(private_tmp)


class BackgroundRun:
    """``devmodel -v run --exec 'sleep ...'`` in the background; stderr collected by a thread."""

    def __init__(self, tmpdir: str, *args: str) -> None:
        self.proc = subprocess.Popen([*DEVMODEL, "-v", "run", *args], env=dict(os.environ, TMPDIR=tmpdir),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: re.Pattern, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            m = pattern.search(self.stderr)
            if m:
                return m
            assert self.proc.poll() is None, f"devmodel run ended early:\n{self.stderr[-4000:]}"
            assert time.monotonic() < deadline, f"no {pattern.pattern!r} in:\n{self.stderr[-4000:]}"
            time.sleep(0.1)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=60)
        self._reader.join(10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_qemu_query_bad_args_and_refused_plug_against_a_running_run(private_tmp):
    run = BackgroundRun(private_tmp, "--device", "testdev", "--timeout", "300", "--exec", "sleep 300")
    try:
        control = run.wait_for(CONTROL_LINE).group(1)
        run.wait_for(QMP_LINE)

        r = devmodel_qemu("query", "--control", control)
        assert r.returncode == 0, r.stderr
        ids = f"{TESTDEV_VENDOR_ID:04x}:{TESTDEV_DEVICE_ID:04x}"
        assert re.search(rf"^\S+\s+{ids}\s+class \S+\s+ep0\b", r.stdout, re.M), r.stdout

        # DEVMODEL_CONTROL works like for `devmodel stats`; --json gives the summary itself.
        r = devmodel_qemu("query", "--json", env=dict(os.environ, DEVMODEL_CONTROL=control))
        assert r.returncode == 0, r.stderr
        entries = [d for d in json.loads(r.stdout) if d["qdev_id"] == "ep0"]
        assert entries and entries[0]["vendor_id"] == f"{TESTDEV_VENDOR_ID:#06x}"

        for args in (["unplug", "no_such_device"], ["plug", "no_such_device"],
                     ["unplug", "testdev", "--timeout", "0"]):
            r = devmodel_qemu(*args, "--control", control)
            assert r.returncode == 2, (args, r.stdout, r.stderr)
            assert "bad-args" in r.stderr, (args, r.stderr)

        # The lone testdev sits on the root bus, which q35 cannot hot-plug: QEMU refuses
        # and the control reply carries its words.
        r = devmodel_qemu("plug", "testdev", "--control", control)
        assert r.returncode == 1, r.stderr
        assert "failed: QEMU refused device_add ep0: GenericError:" in r.stderr, r.stderr
        assert "does not support hotplugging" in r.stderr, r.stderr

        # The model is undisturbed: the query still answers the same.
        assert "ep0" in devmodel_qemu("query", "--control", control).stdout

        rc = run.terminate()
        assert rc != 0
        assert "qmp: quit" in run.stderr  # QEMU ended through QMP, not by a signal
    finally:
        run.kill()
    assert_torn_down(private_tmp)


HOTPLUG_BDF = "0000:01:00.0"


@pytest.mark.skipif(not hasattr(serve, "MACHINE_HOTPLUG"), reason="no hot-pluggable machine layout")
def test_unplug_and_plug_the_dma_engine_in_process():
    """The machine with its endpoint behind a root port: ``qemu.unplug`` returns once the
    guest released the function, ``qemu.plug`` brings it back (guest sysfs both times)."""
    from devmodel.control import ControlClient
    from devmodel.control.client import ControlError

    with run_cmd.machine([serve.MACHINE_HOTPLUG]) as (guest, served):
        names = [s.name for s in served]
        assert "dma_engine" in names, names
        with ControlClient(serve.control_path(served), timeout=60) as c:
            before = c.call("qemu.query")
            assert any(d["qdev_id"] == "dma_engine" and d["bdf"] == "01:00.0" for d in before), before
            assert HOTPLUG_BDF in guest.check("ls /sys/bus/pci/devices")
            # The vIOMMU (MSI-X, which this QEMU aborts on when it really unplugs it) sits on
            # bus 0: QEMU refuses the request itself, and QEMU and the function stay.
            with pytest.raises(ControlError, match=r"QEMU refused device_del viommu: .*does not support hotplugging"):
                c.call("qemu.unplug", device="viommu")
            assert any(d["qdev_id"] == "viommu" for d in c.call("qemu.query"))
            result = c.call("qemu.unplug", device="dma_engine")
            assert result["unplugged"] is True
            assert HOTPLUG_BDF not in guest.check("ls /sys/bus/pci/devices")
            assert not any(d["qdev_id"] == "dma_engine" for d in c.call("qemu.query"))
            c.call("qemu.plug", device="dma_engine")
            deadline = time.monotonic() + 10 * guest.scale
            while HOTPLUG_BDF not in guest.check("ls /sys/bus/pci/devices"):
                assert time.monotonic() < deadline, "the re-plugged engine never appeared in the guest"
                time.sleep(0.2)
