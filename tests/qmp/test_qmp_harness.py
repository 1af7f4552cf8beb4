"""The harness's QMP socket and its shutdown ladder: guest poweroff, QMP quit, kill.

What is checked and why (task: every Guest gets a QMP socket in a private directory the
harness removes; close() leaves no QEMU and no socket directory, also when the guest shell
is hung; guest reference guest.md "pexpect": ``poweroff -f`` then EOF is the clean end):

- the socket is private (0700 directory) and ``guest.qmp`` is connected to the right QEMU;
- a clean close is the guest's own poweroff (QEMU reports SHUTDOWN "guest-shutdown");
- with a busy shell close() uses QMP quit (SHUTDOWN "host-qmp-quit", QEMU exit status 0),
  without waiting for a poweroff that cannot happen when the harness knows the shell is
  busy, and after a short bounded wait when it does not know;
- a caller-chosen socket path is honoured and removed.
"""

from __future__ import annotations

import os
import stat
import time

import pytest

from guest.harness import POWEROFF_WAIT, Guest, GuestError

pytestmark = pytest.mark.qemu


def shutdown_reasons(events: list[dict]) -> list[str]:
    return [e["data"]["reason"] for e in events if e["event"] == "SHUTDOWN"]


def assert_gone(pid: int, path: str) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not os.path.exists(path)


def test_private_qmp_socket_and_clean_poweroff():
    guest = Guest()
    try:
        guest.start()
        path, mon, child = guest.qmp_path, guest.qmp, guest.child
        directory = os.path.dirname(path)
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert mon.command("query-status")["status"] == "running"
        # The monitor talks to this QEMU: its command line names this very socket.
        with open(f"/proc/{child.pid}/cmdline", "rb") as f:
            assert path.encode() in f.read()
    finally:
        guest.close()
    assert guest.qmp is None and guest.child is None
    assert shutdown_reasons(mon.events) == ["guest-shutdown"]
    assert_gone(child.pid, directory)


def test_busy_shell_is_ended_through_qmp_quit_and_a_chosen_path_is_removed(tmp_path):
    path = str(tmp_path / "my-qmp.sock")
    guest = Guest(qmp_socket=path)
    try:
        guest.start()
        assert guest.qmp_path == path and os.path.exists(path)
        mon, child = guest.qmp, guest.child
        with pytest.raises(GuestError, match="did not finish"):
            guest.run("sleep 600", timeout=1)  # the shell stays busy with it
        t0 = time.monotonic()
    finally:
        guest.close()
    # The harness knew the shell was busy: no poweroff attempt, straight to QMP quit.
    assert time.monotonic() - t0 < POWEROFF_WAIT * guest.scale
    assert shutdown_reasons(mon.events) == ["host-qmp-quit"]
    assert child.exitstatus == 0 and child.signalstatus is None  # QEMU exited, not killed
    assert_gone(child.pid, path)


def test_hung_shell_the_harness_did_not_know_about():
    """A command typed behind the harness's back (a loop ignoring signals): poweroff is
    tried for a bounded time, then QMP quit ends QEMU cleanly."""
    guest = Guest()
    try:
        guest.start()
        mon, child, directory = guest.qmp, guest.child, os.path.dirname(guest.qmp_path)
        child.sendline("trap '' INT TERM; while :; do :; done")
        t0 = time.monotonic()
    finally:
        guest.close()
    elapsed = time.monotonic() - t0
    assert POWEROFF_WAIT * guest.scale <= elapsed < (POWEROFF_WAIT + 5) * guest.scale
    assert shutdown_reasons(mon.events) == ["host-qmp-quit"]
    assert child.exitstatus == 0 and child.signalstatus is None
    assert_gone(child.pid, directory)


def test_failed_start_leaves_no_socket_directory(monkeypatch):
    """QEMU that cannot start: the private directory made for its socket goes too."""
    import guest.harness as harness

    made: list[str] = []
    real = harness.temp_socket_dir
    monkeypatch.setattr(harness, "temp_socket_dir", lambda: made.append(real()) or made[-1])
    monkeypatch.setattr(Guest, "argv", lambda self: ["/nonexistent/qemu-system-x86_64"])
    guest = Guest()
    with pytest.raises(Exception, match="nonexistent"):
        guest.start()
    assert len(made) == 1 and not os.path.exists(made[0])
    guest.close()  # still safe
    assert guest.qmp_path is None
