"""The daemon protocol and the ``dm`` output format, over a real UNIX socket.

The daemon runs on the host over the hardware models (tests/agent/conftest.py ``served``);
the client is the real ``dm`` entry point (devmodel_agent.cli.main) with ``--socket``.
Format contract: one record per line, ``kind key=value ...``, values without spaces unless
double-quoted; exit code 0 ok, 1 error (an ``error errno=NAME`` record), 3 timeout.
"""

from __future__ import annotations

import re
import socket

import pytest

from devmodel_agent import cli
from devmodel_agent.server import RC_MARKER, request

LINE = re.compile(r'^[a-z_]+( [a-z_0-9]+=("[^"]*"|\S+))*$')


def dm(capsys, path: str, *argv: str) -> tuple[int, list[str]]:
    rc = cli.main(["--socket", path, *argv])
    out = capsys.readouterr().out.splitlines()
    for line in out:
        assert LINE.match(line), f"not a key=value record: {line!r}"
    return rc, out


def fields(line: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in line.split()[1:])


def test_status_counters_and_a_scenario_through_the_socket(served, capsys):
    path, agent, world, _ = served
    rc, out = dm(capsys, path, "status")
    assert rc == 0 and [line.split()[0] for line in out][:3] == ["smmu", "regs", "engine"]
    assert fields(out[0])["up"] == "1"
    rc, out = dm(capsys, path, "dma", "fill", "--pasid", "2", "--dst", "0x5000", "--len", "8")
    assert rc == 0 and fields(out[0])["status"] == "PAGE_FAULT"
    rc, out = dm(capsys, path, "events", "--wait", "1", "--timeout", "5")
    assert rc == 0 and out[0].startswith("event seq=1 id=0x10 name=F_TRANSLATION sid=0x20 ")
    rc, out = dm(capsys, path, "counters")
    c = fields(out[0])
    assert rc == 0 and int(c["irq_eventq"]) >= 1 and c["events_logged"] == "1"


def test_timeout_and_error_exit_codes(served, capsys):
    path, *_ = served
    rc, out = dm(capsys, path, "prq", "--wait", "1", "--timeout", "0.2")
    assert rc == 3 and out[-1].startswith("timeout want=1 got=0")
    rc, out = dm(capsys, path, "unmap", "9", "0x1000")
    assert rc == 1 and out[0].startswith("error errno=ENOENT msg=")


def test_daemon_survives_bad_requests(served):
    """Untrusted input: malformed JSON and argv the parser rejects give error records, and the
    daemon goes on serving."""
    path, *_ = served
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(b"{not json\n")
        reply = s.makefile().read().splitlines()
    assert reply[0].startswith("error errno=EINVAL") and reply[-1] == f"{RC_MARKER}1"
    rc, lines = request(path, ["map", "one", "two"])
    assert rc == 1 and lines[0].startswith("error errno=EINVAL")
    rc, lines = request(path, ["no-such-command"])
    assert rc == 1
    assert request(path, ["status"])[0] == 0


def test_client_without_daemon_and_help(tmp_path, capsys):
    rc, out = dm(capsys, str(tmp_path / "none.sock"), "status")
    assert rc == 1 and out[0].startswith("error errno=ECONNREFUSED")
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "usage: dm" in capsys.readouterr().out


def test_up_reports_running_agent_and_down_stops_it(served, capsys):
    path, agent, _, server = served
    rc, out = dm(capsys, path, "up")
    assert rc == 0 and out[0] == "up already=1"
    rc, out = dm(capsys, path, "down")
    assert rc == 0 and out == ["down ok=1"]
    assert not agent.up and agent.smmu.regs.read32(0x24) == 0  # CR0ACK: SMMU disabled
    with pytest.raises(OSError):
        for _ in range(100):  # the server shuts down right after replying
            request(path, ["status"], timeout=1)
            import time
            time.sleep(0.02)
