"""`devmodel stats|trace|inject` against a live control server (real socket, real process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from devmodel.control import ControlServer, Param
from devmodel.trace import TRACER


@pytest.fixture
def server(tmp_path):
    srv = ControlServer(str(tmp_path / "c.sock"))
    got = []
    srv.register("inject.demo.fault", lambda iova, write: got.append((iova, write)) or {"queued": True},
                 {"iova": Param(int, required=True, min=0), "write": Param(bool, default=False)},
                 help="demo injection")
    srv.add_stats("demo", lambda: {"injected": len(got)})
    srv.start()
    srv.got = got
    yield srv
    srv.stop()


def devmodel(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "devmodel", *args], capture_output=True, text=True, timeout=60)


def test_inject_parses_values_and_stats_show_it(server):
    r = devmodel("inject", "--control", server.path, "demo.fault", "iova=0x2000", "write=true")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"queued": True}
    assert server.got == [(0x2000, True)]
    r = devmodel("stats", "--control", server.path)
    assert json.loads(r.stdout)["demo"] == {"injected": 1}


def test_inject_bad_value_is_a_clear_error(server):
    r = devmodel("inject", "--control", server.path, "demo.fault", "iova=-5")
    assert r.returncode == 1 and "bad-args" in r.stderr and "minimum" in r.stderr
    r = devmodel("inject", "--control", server.path, "demo.fault", "iova")
    assert r.returncode == 2 and "key=value" in r.stderr
    assert server.got == []


def test_inject_list_shows_commands(server):
    r = devmodel("inject", "--control", server.path, "--list")
    assert "demo.fault" in r.stdout and "iova=<int>" in r.stdout


def test_trace_table_json_and_file(server, tmp_path):
    fid = TRACER.begin("smmu.fault", sid=0x100)
    TRACER.hop(fid, "host.evtq", slot=3)
    r = devmodel("trace", "--control", server.path, "--fault", str(fid))
    assert f"fault {fid}:" in r.stdout and "host.evtq" in r.stdout and "slot=3" in r.stdout
    out = tmp_path / "t.jsonl"
    r = devmodel("trace", "--control", server.path, "--fault", str(fid), "--json", "--file", str(out))
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [d["hop"] for d in lines] == ["smmu.fault", "host.evtq"]
    assert [json.loads(x) for x in out.read_text().splitlines()] == lines
