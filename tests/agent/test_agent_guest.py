"""The agent in the booted guest: ``dm`` is on the PATH, ``--help`` works, nothing starts at
boot and the boot stays fast (reference guest.md: TCG boot to shell about 1.5-2.9 s)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.qemu

BOOT_BUDGET_S = 10.0  # generous on a loaded 2-core host; the agent adds no boot-time work


def test_dm_installed_help_and_not_started_at_boot(boot_guest):
    guest = boot_guest()
    assert guest.boot_seconds is not None and guest.boot_seconds < BOOT_BUDGET_S * guest.scale
    assert guest.check("command -v dm").strip() == "/usr/bin/dm"
    # Nothing of the agent runs after boot: no daemon process, no socket.
    assert "devmodel_agent" not in guest.check("ps")
    assert guest.run("test -e /run/dm.sock")[0] != 0
    out = guest.check("dm --help", timeout=60)
    assert "usage: dm" in out and "pri" in out and "events" in out
    # Without a daemon, a subcommand fails cleanly with a machine-readable error record.
    rc, out = guest.run("dm status", timeout=60)
    assert rc == 1 and "error errno=ECONNREFUSED" in out
    # The shared record modules the agent needs import in the guest's Python.
    guest.check("python3 -c 'import devmodel_agent.agent, devmodel_agent.guestio'", timeout=60)
