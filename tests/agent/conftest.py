"""Fixtures: the guest agent's driver logic on the host, against the real models.

``host_agent`` is an :class:`Agent` brought up over ``devmodel_agent.hostsim`` (the
emulated SMMUv3 with the vIOMMU's ID profile, the DMA engine core at vSID 0x20, reserved
RAM at the guest's address). ``served`` additionally serves it on a real UNIX socket.
The agent package lives in guest/agent (shipped to the guest), so it is put on sys.path.
"""

from __future__ import annotations

import shlex
import sys
import threading
from pathlib import Path

import pytest

AGENT_DIR = Path(__file__).resolve().parents[2] / "guest" / "agent"
if str(AGENT_DIR) not in sys.path:
    sys.path.insert(0, str(AGENT_DIR))

from devmodel_agent import hostsim  # noqa: E402
from devmodel_agent.agent import Agent  # noqa: E402
from devmodel_agent.cliparse import RaisingParser, build  # noqa: E402
from devmodel_agent.server import AgentServer  # noqa: E402


def make_agent(**options: int) -> tuple[Agent, hostsim.HostWorld]:
    world = hostsim.build()
    agent = Agent(world.backends, **options)
    agent.start()
    return agent, world


@pytest.fixture
def host_agent():
    agent, world = make_agent()
    yield agent, world
    agent.stop()
    world.close()


@pytest.fixture
def small_evtq_agent():
    agent, world = make_agent(evtq_log2=2)
    yield agent, world
    agent.stop()
    world.close()


@pytest.fixture
def served(tmp_path):
    agent, world = make_agent()
    path = str(tmp_path / "dm.sock")
    server = AgentServer(path, agent)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield path, agent, world, server
    if not server.stopping:
        server.shutdown()
    thread.join(timeout=5)
    server.server_close()
    if agent.up:
        agent.stop()
    world.close()


# --- driving the agent as `dm` would (its argument parser, its `kind key=value` lines) ----
PARSER = build(RaisingParser)


def run(agent, *argv: str) -> tuple[int, list[str]]:
    return agent.handle(PARSER.parse_args(list(argv)))


def kv(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in shlex.split(line)[1:])


def ok(agent, *argv: str) -> list[dict[str, str]]:
    rc, out = run(agent, *argv)
    assert rc == 0, out
    return [kv(line) for line in out]
