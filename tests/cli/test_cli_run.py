"""``devmodel run``: the guest sees and drives the served device; statuses; teardown.

What is checked and why:
- the server listens before QEMU starts and the device is attached with the JSON
  ``-device`` form over a shared memfd backend (reference vfio-user-qemu.md, "Command line
  that works"): otherwise the guest would not enumerate 1af4:10f0 at all;
- a trapped BAR0 register write then read through devmodel_mmio round-trips through the
  vfio-user server (REGION_WRITE/REGION_READ, reference "What the client sends" item 8);
- exit statuses follow the documented rule (devmodel/commands/run.py module docstring);
- nothing outlives the command: no QEMU process, no socket file, no socket directory
  (reference: "At exit the socket just closes", so the server must clean up itself).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from devmodel.commands import run as run_cmd
from devmodel.commands import serve
from devmodel.devices.testdev import TESTDEV_DEVICE_ID, TESTDEV_MAGIC, TESTDEV_VENDOR_ID

SCRATCH = 0x08  # testdev BAR0 register (devmodel/devices/testdev.py docstring)
ID = 0x00
# Find the test endpoint's BDF and enable memory decode (command register bit 1).
FIND_BDF = ("BDF=$(for d in /sys/bus/pci/devices/*; do "
            f"[ $(cat $d/vendor) = {TESTDEV_VENDOR_ID:#06x} ] && [ $(cat $d/device) = {TESTDEV_DEVICE_ID:#06x} ] "
            "&& echo ${d##*/}; done); "
            "printf '\\002\\000' | dd of=/sys/bus/pci/devices/$BDF/config bs=1 seek=4 count=2 conv=notrunc 2>/dev/null; ")


@pytest.fixture
def private_tmp():
    """A short private TMPDIR: the socket directory lands there, so leftovers are visible."""
    path = tempfile.mkdtemp(prefix="clirun")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def devmodel_run(tmpdir: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, TMPDIR=tmpdir)
    if "--device" not in args:  # these tests exercise the lone test endpoint
        args = ("--device", "testdev", *args)
    return subprocess.run([sys.executable, "-m", "devmodel", "run", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (QEMU's names the socket path)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline[:200]}")
    return found


def assert_torn_down(tmpdir: str) -> None:
    """No socket directory (so no socket file) and no QEMU left behind."""
    assert os.listdir(tmpdir) == [], f"leftovers in TMPDIR: {os.listdir(tmpdir)}"
    assert processes_mentioning(tmpdir) == []


# -- no guest needed ------------------------------------------------------------------------


def test_device_json_comes_from_one_function_a_factory_can_influence():
    """A model's ``qemu_properties`` (e.g. a fixed slot) reach the -device JSON; the socket
    we serve cannot be overridden."""
    class Model:
        qemu_properties = {"addr": "0x4", "socket": {"path": "/elsewhere"}}

    spec = serve.qemu_device_spec("/run/s.sock", "ep0", Model())  # type: ignore[arg-type]
    assert spec == {"driver": "vfio-user-pci", "socket": {"path": "/run/s.sock", "type": "unix"},
                    "id": "ep0", "addr": "0x4"}
    assert serve.qemu_device_spec("/run/s.sock", "ep1") == {
        "driver": "vfio-user-pci", "socket": {"path": "/run/s.sock", "type": "unix"}, "id": "ep1"}


def test_memory_sizes():
    assert run_cmd.parse_memory("1G") == 1024
    assert run_cmd.parse_memory("768M") == 768
    assert run_cmd.parse_memory("512") == 512
    for bad in ("1T", "lots", "16M", "-1"):
        with pytest.raises(Exception):
            run_cmd.parse_memory(bad)


@pytest.mark.parametrize("args, message", [
    (["--memory", "lots", "--exec", "true"], "bad memory size"),
    (["--timeout", "0", "--exec", "true"], "seconds must be positive"),
    (["--accel", "xen", "--exec", "true"], "invalid choice"),
    (["--device", "no_such_device", "--exec", "true"], "unknown device"),
    (["--device", "../evil", "--exec", "true"], "bad device name"),
    ([], "needs a terminal"),  # interactive without a tty
])
def test_bad_options_exit_2_and_leave_nothing(private_tmp, args, message):
    r = devmodel_run(private_tmp, *args, timeout=60)
    assert r.returncode == run_cmd.EXIT_USAGE, r.stderr
    assert message in r.stderr
    assert_torn_down(private_tmp)


# -- booted guest ---------------------------------------------------------------------------


@pytest.mark.qemu
def test_exec_sees_testdev_and_round_trips_a_register(private_tmp):
    script = (FIND_BDF + "python3 -c \"from devmodel_mmio import Bar; b = Bar('$BDF'); "
              f"print(hex(b.read32({ID}))); b.write32({SCRATCH}, 0x5eed1234); print(hex(b.read32({SCRATCH})))\"")
    r = devmodel_run(private_tmp, "--exec", "pcilist", "--exec", script)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{TESTDEV_VENDOR_ID:04x}:{TESTDEV_DEVICE_ID:04x}" in r.stdout
    assert f"{TESTDEV_MAGIC:#x}\n0x5eed1234\n" in r.stdout
    assert_torn_down(private_tmp)


@pytest.mark.qemu
def test_exit_status_stops_at_first_failure_or_reports_it_with_keep_going(private_tmp):
    r = devmodel_run(private_tmp, "--exec", "echo one", "--exec", "echo two; exit 3", "--exec", "echo three")
    assert r.returncode == 3, r.stderr
    assert r.stdout.split() == ["one", "two"]  # the third never ran
    r = devmodel_run(private_tmp, "--keep-going", "--exec", "exit 4", "--exec", "echo ran; exit 5",
                     "--exec", "true")
    assert r.returncode == 4, r.stderr  # the first failing status
    assert r.stdout.split() == ["ran"]
    assert_torn_down(private_tmp)


@pytest.mark.qemu
def test_command_timeout_exits_124_and_tears_down(private_tmp):
    r = devmodel_run(private_tmp, "--timeout", "2", "--exec", "sleep 60")
    assert r.returncode == run_cmd.EXIT_TIMEOUT, r.stderr
    assert "did not finish" in r.stderr
    assert_torn_down(private_tmp)


@pytest.mark.qemu
def test_sigterm_during_the_run_tears_everything_down(private_tmp):
    env = dict(os.environ, TMPDIR=private_tmp)
    proc = subprocess.Popen([sys.executable, "-m", "devmodel", "run", "--device", "testdev", "--exec", "echo started; sleep 120"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        # Wait until QEMU runs with our socket (its command line names the socket directory).
        deadline = time.monotonic() + 120
        while not processes_mentioning(private_tmp + "/"):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "QEMU never started"
            time.sleep(0.2)
        sockets = [os.path.join(d, f) for d, _, fs in os.walk(private_tmp) for f in fs]
        assert any(s.endswith(".sock") for s in sockets)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_torn_down(private_tmp)


@pytest.mark.qemu
def test_run_defaults_to_the_machine_and_a_fault_reaches_the_guest(private_tmp):
    """Without --device the whole machine is served: vIOMMU at 00:03.0, engine at 00:04.0,
    and a scripted fault shows up in the guest's event queue."""
    r = devmodel_run(private_tmp, "--device", "machine", "--exec", "pcilist",
                     "--exec", "dm up >/dev/null && dm dma fill --pasid 1 --dst 0x300000 --len 64 "
                               "&& dm events --wait 1")
    assert r.returncode == 0, r.stderr
    assert "0000:00:03.0 080600 1af4:10f1" in r.stdout and "0000:00:04.0 088000 1af4:10f2" in r.stdout
    assert "name=F_TRANSLATION sid=0x20 ssv=1 ssid=1 addr=0x300000" in r.stdout
    assert "control socket" in r.stderr
