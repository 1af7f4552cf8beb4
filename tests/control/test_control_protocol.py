"""Control socket: documented replies for good and bad requests; the server keeps serving."""

from __future__ import annotations

import os
import stat

import pytest

from devmodel.control import ControlClient, ControlError, ControlServer, Param
from devmodel.control.protocol import MAX_LINE
from devmodel.trace import Tracer


@pytest.fixture
def server(tmp_path):
    tr = Tracer()
    srv = ControlServer(str(tmp_path / "control.sock"), tracer=tr)
    calls = []
    srv.register("echo", lambda n, name, flag: calls.append((n, name, flag)) or {"n": n, "name": name, "flag": flag},
                 {"n": Param(int, required=True, min=0, max=10), "name": Param(str, default="x", choices=("x", "y")),
                  "flag": Param(bool, default=False)})
    srv.register("boom", lambda: 1 / 0)
    srv.add_stats("demo", lambda: {"count": len(calls)})
    srv.start()
    srv.calls = calls
    srv.tracer_ = tr
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    c = ControlClient(server.path, timeout=5)
    yield c
    c.close()


def test_socket_mode_is_0600(server):
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600


def test_call_returns_result_with_defaults(client, server):
    assert client.call("echo", n=3) == {"n": 3, "name": "x", "flag": False}
    assert client.call("echo", n="0x4", name="y", flag=True) == {"n": 4, "name": "y", "flag": True}
    assert server.calls == [(3, "x", False), (4, "y", True)]


@pytest.mark.parametrize("args,needle", [
    ({}, "missing argument: n"),
    ({"n": 11}, "above the maximum"),
    ({"n": -1}, "below the minimum"),
    ({"n": "abc"}, "expected an integer"),
    ({"n": True}, "expected an integer"),
    ({"n": 1, "name": "z"}, "not one of"),
    ({"n": 1, "flag": 1}, "expected true/false"),
    ({"n": 1, "extra": 2}, "unexpected argument"),
])
def test_bad_args_are_rejected_and_nothing_runs(client, server, args, needle):
    with pytest.raises(ControlError) as ei:
        client.call("echo", **args)
    assert ei.value.code == "bad-args" and needle in ei.value.message
    assert server.calls == []


def test_unknown_command_and_handler_error(client):
    with pytest.raises(ControlError) as ei:
        client.call("nope")
    assert ei.value.code == "unknown-command"
    with pytest.raises(ControlError) as ei:
        client.call("boom")
    assert ei.value.code == "failed" and "ZeroDivisionError" in ei.value.message


@pytest.mark.parametrize("raw,code", [
    (b"\xff\xfe garbage\n", "bad-json"),
    (b"{not json\n", "bad-json"),
    (b"[1, 2]\n", "bad-json"),
    (b'{"id": 5}\n', "bad-json"),
    (b'{"id": 6, "cmd": "echo", "args": [1]}\n', "bad-args"),
])
def test_garbage_gets_error_reply_and_connection_keeps_working(client, raw, code):
    client.send_raw(raw)
    reply = client.read_reply()
    assert reply["ok"] is False and reply["error"]["code"] == code
    assert client.call("echo", n=1)["n"] == 1


def test_over_long_line_is_rejected_once_then_serving_continues(client):
    client.send_raw(b"x" * (MAX_LINE + 10) + b"\n")
    reply = client.read_reply()
    assert reply["error"]["code"] == "too-long"
    assert client.call("echo", n=2)["n"] == 2


def test_stats_include_providers_and_bad_request_count(client):
    with pytest.raises(ControlError):
        client.call("nope")
    stats = client.call("stats")
    assert stats["demo"] == {"count": 0}
    assert stats["control"]["bad_requests"] == 1


def test_help_lists_commands_with_parameters(client):
    h = client.call("help")
    assert h["echo"]["params"]["n"] == {"type": "int", "required": True, "min": 0, "max": 10}
    assert "trace.follow" in h and "stats" in h


def test_trace_dump_and_follow_stream_events(server, client):
    tr = server.tracer_
    fid = tr.begin("smmu.fault", sid=1)
    assert client.call("trace.dump", fault=fid) == [
        {"fault": fid, "hop": "smmu.fault", "t_ns": tr.events(fid)[0].t_ns, "sid": 1}]
    with ControlClient(server.path, timeout=5) as follower:
        stream = follower.follow()
        tr.hop(fid, "host.evtq", slot=2)
        ev = next(stream)
        assert ev["fault"] == fid and ev["hop"] == "host.evtq" and ev["slot"] == 2
    # the follower went away: later events do not break the server
    tr.hop(fid, "iommufd.veventq")
    assert client.call("echo", n=0)["n"] == 0


def test_many_clients_and_abrupt_disconnect(server):
    clients = [ControlClient(server.path, timeout=5) for _ in range(5)]
    clients[0].send_raw(b'{"id": 1, "cmd": "ec')  # half a request, then vanish
    clients[0].close()
    for i, c in enumerate(clients[1:]):
        assert c.call("echo", n=i)["n"] == i
        c.close()
