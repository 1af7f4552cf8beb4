"""End-to-end fault scenarios: a booted guest, real QEMU, the whole machine (issue 6).

Each test serves the machine (DMA engine + emulated SMMUv3 + simulated iommufd + vIOMMU),
boots the guest attached to it, brings the vIOMMU up with the guest agent (``dm``) and
checks what the guest sees, what the counters say, and that the fault's trace shows
every layer once under one id.
"""

from __future__ import annotations

import re

import pytest

from devmodel.devices.dma_engine_records import FaultCounter
from devmodel.machine import ENDPOINT_VSID, HOST_SID
from devmodel.session import machine_session
from devmodel.trace import TRACER
from guest.harness import parse_records as parse

pytestmark = pytest.mark.qemu

VSID = ENDPOINT_VSID
#: The hops of an unrecoverable fault, from the endpoint to the guest driver, in order.
EVENT_JOURNEY = ["endpoint.dma", "smmu.fault", "smmu.evtq", "host.evtq", "iommufd.veventq",
                 "viommu.read", "guest.evtq", "guest.consumed"]
#: The hops of a page request answered by the guest.
PRI_JOURNEY = ["endpoint.page_request", "smmu.priq", "host.priq", "iommufd.fault", "viommu.read",
               "guest.priq", "guest.consumed", "guest.response", "iommufd.response", "host.response",
               "endpoint.prg_response"]


class Bench:
    """One machine session with helpers to drive the agent."""

    def __init__(self, session) -> None:  # noqa: ANN001
        self.s = session
        self.guest = session.guest

    def dm(self, cmd: str, rc: int = 0, timeout: float = 60) -> list[dict[str, str]]:
        code, out = self.guest.run(f"dm {cmd}", timeout=timeout)
        assert code == rc, f"dm {cmd}: rc {code}\n{out}"
        return parse(out)

    def one(self, cmd: str, kind: str, rc: int = 0) -> dict[str, str]:
        recs = [r for r in self.dm(cmd, rc) if r["_"] == kind]
        assert len(recs) == 1, recs
        return recs[0]

    def counters(self) -> dict[str, str]:
        return self.one("counters", "counters")


@pytest.fixture
def bench(tmp_path):
    TRACER.clear()
    with machine_session(directory=str(tmp_path / "sock")) as s:
        b = Bench(s)
        b.dm("up")
        yield b


def hops_of(fault: int) -> list[str]:
    return [e.hop for e in TRACER.events(fault)]


def faults_with(hop: str, **detail: object) -> list[int]:
    return [e.fault for e in TRACER.events() if e.hop == hop
            and all(e.detail.get(k) == v for k, v in detail.items())]


def assert_journey(fault: int, expected: list[str]) -> None:
    """Every expected hop present exactly once, in order, with monotonic timestamps."""
    evs = TRACER.events(fault)
    hops = [e.hop for e in evs]
    for hop in expected:
        assert hops.count(hop) == 1, f"fault {fault}: hop {hop} seen {hops.count(hop)} times in {hops}"
    order = [hops.index(h) for h in expected]
    times = [evs[i].t_ns for i in order]
    assert times == sorted(times), f"fault {fault}: hops out of order: {hops}"


def test_translation_fault_reaches_guest_evtq(bench: Bench) -> None:
    """Unmapped IOVA, write: F_TRANSLATION with the guest's StreamID, PASID, address, RnW=0."""
    done = bench.one("dma fill --pasid 1 --dst 0x300000 --len 64", "dma")
    assert done["status"] == "PAGE_FAULT" and done["fault_addr"] == 0x300000
    ev = bench.one("events --wait 1 --timeout 20", "event")
    assert ev["name"] == "F_TRANSLATION" and ev["sid"] == VSID
    assert (ev["ssv"], ev["ssid"], ev["addr"], ev["rnw"]) == (1, 1, 0x300000, 0)
    (fault,) = faults_with("smmu.fault", name="F_TRANSLATION")
    assert_journey(fault, EVENT_JOURNEY)
    (born,) = TRACER.events(fault)[:1]
    assert born.detail["sid"] == HOST_SID  # physical SID at the bottom ...
    guest = [e for e in TRACER.events(fault) if e.hop == "guest.evtq"][0]
    assert guest.detail["vsid"] == ENDPOINT_VSID  # ... the guest's StreamID at the top


def test_permission_fault_on_read_only_page(bench: Bench) -> None:
    bench.dm("map 1 0x400000 --ro")
    done = bench.one("dma fill --pasid 1 --dst 0x400000 --len 64", "dma")
    assert done["status"] == "PAGE_FAULT" and done["fault_event"] == "F_PERMISSION"
    ev = bench.one("events --wait 1 --timeout 20", "event")
    assert (ev["name"], ev["sid"], ev["ssid"], ev["addr"], ev["rnw"]) == (
        "F_PERMISSION", VSID, 1, 0x400000, 0)
    (fault,) = faults_with("smmu.fault", name="F_PERMISSION")
    assert_journey(fault, EVENT_JOURNEY)


def test_bad_ste_gives_c_bad_ste_and_guest_recovers(bench: Bench) -> None:
    bench.dm("ste 0x20 bad")
    evs = [r for r in bench.dm("events --wait 1 --timeout 20") if r["_"] == "event"]
    assert [(e["name"], e["sid"]) for e in evs] == [("C_BAD_STE", VSID)]
    # The engine's traffic is aborted by the kernel's abort STE; no stray events follow.
    bench.dm("dma fill --pasid 1 --dst 0x400000 --len 64 --timeout 3", rc=3)
    bench.dm("ste 0x20 s1")
    bench.dm("dma restart")
    bench.dm("map 1 0x400000")
    done = bench.one("dma fill --pasid 1 --dst 0x400000 --len 64", "dma")
    assert done["status"] == "SUCCESS"
    assert bench.counters()["viommu_evtq_lost"] == 0


def _pri_setup(bench: Bench) -> None:
    bench.dm("ats on")
    bench.dm("pri enable")
    bench.dm("buf alloc src 4096 --fill 0x3c")
    bench.dm("buf alloc dst 4096")
    bench.dm("map 7 0x50000 --page-for-buffer src")


def test_pri_success_guest_maps_page_and_dma_completes(bench: Bench) -> None:
    _pri_setup(bench)
    slot = bench.one("dma copy --pasid 7 --src 0x50000 --dst 0x60000 --len 4096 --no-wait", "dma")["slot"]
    req = bench.one("prq --wait 1 --timeout 20", "prq")
    assert (req["sid"], req["ssid"], req["addr"], req["w"], req["l"]) == (VSID, 7, 0x60000, 1, 1)
    bench.dm("map 7 0x60000 --page-for-buffer dst")
    bench.dm(f"resp {VSID} 7 {req['prgi']} success")
    done = bench.one(f"dma wait {slot}", "dma")
    assert done["status"] == "SUCCESS" and done["bytes"] == 4096
    assert bench.one("buf cmp src dst", "cmp")["equal"] == 1
    (fault,) = faults_with("guest.response")
    assert_journey(fault, PRI_JOURNEY)
    resp = [e for e in TRACER.events(fault) if e.hop == "endpoint.prg_response"][0]
    assert resp.detail["code"] in ("SUCCESS", 0)


def test_pri_invalid_completes_with_fault_address(bench: Bench) -> None:
    _pri_setup(bench)
    bench.dm("pri auto invalid")
    done = bench.one("dma copy --pasid 7 --src 0x50000 --dst 0x60000 --len 4096", "dma")
    assert done["status"] == "PAGE_FAULT" and done["fault_addr"] == 0x60000
    (fault,) = faults_with("guest.response")
    assert_journey(fault, PRI_JOURNEY)
    resp = [e for e in TRACER.events(fault) if e.hop == "endpoint.prg_response"][0]
    assert resp.detail["code"] in ("INVALID_REQUEST", "INVALID", 1)
    assert bench.s.machine.endpoint.engine.count(FaultCounter.PRG_INVALID) == 1


def test_veventq_overflow_guest_sees_overflow_and_exact_lost_count(bench: Bench) -> None:
    """The VMM stops reading its vEVENTQ (depth 64) during a burst of 80 faults: the host
    loses 16 (LOST_EVENTS), and the guest sees its EVTQ overflow flag and exactly 16 lost."""
    with bench.s.client() as ctl:  # the control socket, as a user would drive it
        ctl.call("inject.viommu.hold", on=True, stage="fd")
        res = ctl.call("inject.endpoint.dma", iova=0x900000, pasid=1, write=True, count=80, stride=4096)
        assert res["faulted"] == 80
        ctl.call("inject.viommu.hold", on=False, stage="fd")
    evs = [r for r in bench.dm("events --wait 64 --timeout 30") if r["_"] == "event"]
    assert len(evs) == 64
    c = bench.counters()
    assert c["viommu_veventq_lost"] == 16 and c["viommu_evtq_lost"] == 16
    assert bench.s.machine.viommu.counters.events_lost_host == 16
    lost = faults_with("iommufd.lost")
    assert len(lost) == 16
    for fault in lost:
        assert "guest.overflow" in hops_of(fault)


def test_illegal_invalidation_stops_cmdq_at_index_and_guest_recovers(bench: Bench) -> None:
    recs = bench.dm("cmd tlbi s12-vmall --vmid 1", rc=1)
    cmd = [r for r in recs if r["_"] == "cmd"][0]
    gerr = [r for r in recs if r["_"] == "gerror"][0]
    assert cmd["result"] == "error"
    assert (gerr["bit"], gerr["cmdq_err"], gerr["index"]) == ("CMDQ_ERR", "CERROR_ILL", cmd["index"])
    assert gerr["recovered"] == 1
    ok = bench.one("cmd tlbi nh-all", "cmd")
    assert ok["result"] == "ok" and int(ok["index"]) > int(cmd["index"])
    regs = [r for r in bench.dm("gerror") if r["_"] == "gerror_regs"][0]
    assert regs["active"] == 0


def test_ste_replace_with_outstanding_page_request_auto_responds_invalid(bench: Bench) -> None:
    _pri_setup(bench)
    slot = bench.one("dma copy --pasid 7 --src 0x50000 --dst 0x60000 --len 4096 --no-wait", "dma")["slot"]
    bench.one("prq --wait 1 --timeout 20", "prq")
    st = bench.one("ste 0x20 s1 --new-cd --pending keep", "ste")
    assert st["pending_answered"] == 0  # the guest did not answer: the kernel must
    done = bench.one(f"dma wait {slot}", "dma")
    assert done["status"] == "PAGE_FAULT" and done["fault_addr"] == 0x60000
    resp = [e for e in TRACER.events() if e.hop == "iommufd.response" and e.detail.get("auto")]
    assert len(resp) == 1, [e for e in TRACER.events() if e.hop == "iommufd.response"]
    fault = resp[0].fault
    assert "guest.response" not in hops_of(fault)
    assert hops_of(fault)[-2:] == ["endpoint.prg_response", "endpoint.complete"] or \
        "endpoint.prg_response" in hops_of(fault)
