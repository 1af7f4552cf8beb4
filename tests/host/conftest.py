"""Fixtures: a brought-up HostMachine over 8 MiB of guest RAM and a nested master
(sid 0x10 nested under a vSMMU as vSID 0x5) whose PRG responses and ATC invalidations
are recorded as an endpoint would receive them."""

from __future__ import annotations

import pytest

from devmodel.host import HostMachine, QueueSizes
from devmodel.host.scenario import make_nested_master, user_memory

SID = 0x10
VSID = 0x5


class Endpoint:
    """What the PCIe function behind ``sid`` receives from the SMMU."""

    def __init__(self, host: HostMachine, sid: int) -> None:
        self.prg: list[tuple] = []
        self.atc: list[tuple] = []
        host.smmu.register_endpoint(sid, prg_response=lambda ssid, idx, code: self.prg.append(
            (ssid, idx, code)), atc_invalidate=self._atc)

    def _atc(self, ssid, addr, length, glob):  # noqa: ANN001
        self.atc.append((ssid, addr, length, glob))
        return True


def make_host(threaded: bool = False, **sizes: int):
    user = user_memory()
    host = HostMachine(user, threaded_irqs=threaded, sizes=QueueSizes(**sizes))
    return host, user


@pytest.fixture
def world():
    host, user = make_host()
    yield host, user
    host.close()


@pytest.fixture
def nested(world):
    host, user = world
    m = make_nested_master(host, user, SID, VSID)
    m.endpoint = Endpoint(host, SID)  # type: ignore[attr-defined]
    return m
