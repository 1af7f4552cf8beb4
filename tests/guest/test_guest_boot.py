"""End to end: the real guest boots under the chosen accelerator and obeys the harness."""

import os
import signal

import pytest

from guest.harness import Guest, GuestError

pytestmark = pytest.mark.qemu


def test_boot_run_and_power_off(boot_guest):
    guest = boot_guest()
    assert guest.boot_seconds is not None
    rc, out = guest.run("uname -r; echo hello-$((6*7))")
    assert rc == 0
    assert out.splitlines()[-1] == "hello-42"
    assert guest.run("exit_code() { return 3; }; exit_code")[0] == 3
    assert "memmap=16M$0x20000000" in guest.check("cat /proc/cmdline")
    # The reserved window the agent uses is inside RAM and not handed to the kernel.
    assert "20000000-20ffffff : Reserved" in guest.check("cat /proc/iomem")
    pid = guest.child.pid
    guest.close()
    assert guest.child is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_failed_command_and_timeout_raise_with_console(boot_guest):
    guest = boot_guest()
    with pytest.raises(GuestError, match="exited 1"):
        guest.check("false")
    with pytest.raises(GuestError, match="did not finish") as info:
        guest.run("sleep 30", timeout=1)
    assert "@@DEVMODEL-READY@@" in info.value.console


def test_qemu_killed_even_when_guest_hangs(boot_guest):
    guest = boot_guest()
    pid = guest.child.pid
    guest.child.sendline("trap '' INT; while :; do :; done")  # a busy shell ignores poweroff
    guest.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_plain_ram_boot_without_memory_backend(boot_guest):
    guest = boot_guest(memory_backend=None)
    assert "-object" not in guest.argv()
    assert guest.check("echo ok").strip() == "ok"
