"""Fault injection at every layer through the control socket while a guest runs (issue 8).

Each test injects through ``control.sock`` (a real UNIX socket and the documented JSON
protocol) and checks what the guest agent sees, what the counters say and what the trace
records (every hop once; lost events counted exactly).
"""

from __future__ import annotations


import pytest

from devmodel.control import ControlClient, ControlError
from devmodel.machine import ENDPOINT_VSID, HOST_SID
from devmodel.session import machine_session
from devmodel.trace import TRACER
from guest.harness import parse_records as parse

pytestmark = pytest.mark.qemu


@pytest.fixture
def rig(tmp_path):
    TRACER.clear()
    with machine_session(directory=str(tmp_path / "s")) as s:
        client = ControlClient(s.control.path, timeout=60)

        def dm(cmd: str, rc: int = 0) -> list[dict]:
            code, out = s.guest.run(f"dm {cmd}", timeout=60)
            assert code == rc, f"dm {cmd}: rc {code}\n{out}"
            return parse(out)
        s.dm = dm
        s.ctl = client
        yield s
        client.close()


def events(rig, n: int) -> list[dict]:
    return [r for r in rig.dm(f"events --wait {n} --timeout 30") if r["_"] == "event"]


def counters(rig) -> dict:
    return [r for r in rig.dm("counters") if r["_"] == "counters"][0]


def test_endpoint_dma_injection_reaches_guest_with_every_hop_once(rig):
    rig.dm("up")
    rig.dm("map 3 0x1000")  # PASID 3 gets a valid CD; 0x700000 stays unmapped
    res = rig.ctl.call("inject.endpoint.dma", iova=0x700000, pasid=3, write=False)
    assert res["faulted"] == 1
    (ev,) = events(rig, 1)
    assert (ev["name"], ev["sid"], ev["ssid"], ev["addr"], ev["rnw"]) == ("F_TRANSLATION", ENDPOINT_VSID, 3,
                                                                          0x700000, 1)
    (fault,) = res["fault_ids"]
    hops = [e.hop for e in TRACER.events(fault)]
    for hop in ("endpoint.dma", "smmu.fault", "smmu.evtq", "host.evtq", "iommufd.veventq", "viommu.read",
                "guest.evtq", "guest.consumed"):
        assert hops.count(hop) == 1, hops
    dump = rig.ctl.call("trace.dump", fault=fault)
    assert [d["hop"] for d in dump] == hops


def test_smmu_event_injection_any_event_id_is_forwarded_with_vsid(rig):
    rig.dm("up")
    res = rig.ctl.call("inject.smmu.event", event_id=0x12, ssid=5, addr=0xABC000, write=True)
    assert res == {"written": 1, "dropped": 0, "fault_ids": res["fault_ids"]}
    (ev,) = events(rig, 1)
    assert (ev["name"], ev["sid"], ev["ssid"], ev["addr"], ev["rnw"]) == ("F_ACCESS", ENDPOINT_VSID, 5,
                                                                          0xABC000, 0)
    hops = [e.hop for e in TRACER.events(res["fault_ids"][0])]
    assert hops[0] == "inject" and "host.evtq" in hops and "guest.evtq" in hops


def test_smmu_event_for_unknown_stream_is_counted_not_forwarded(rig):
    rig.dm("up")
    before = rig.ctl.call("stats")["machine"]["host"]
    rig.ctl.call("inject.smmu.event", event_id=0x10, stream=HOST_SID + 7)
    after = rig.ctl.call("stats")["machine"]["host"]
    assert after["unknown_sid"] + after["events_unhandled"] > before["unknown_sid"] + before["events_unhandled"]
    assert counters(rig)["events_logged"] == 0


def test_host_vevent_injection_like_trigger_vevent(rig):
    rig.dm("up")
    res = rig.ctl.call("inject.host.vevent", event_id=0x10, vsid=ENDPOINT_VSID, addr=0x5000, count=2)
    assert res == {"queued": 2, "failed": 0}
    evs = events(rig, 2)
    assert [(e["name"], e["sid"], e["addr"]) for e in evs] == [("F_TRANSLATION", ENDPOINT_VSID, 0x5000)] * 2


def test_alloc_failures_are_lost_events_counted_exactly(rig):
    rig.dm("up")
    rig.dm("map 1 0x1000")
    rig.ctl.call("inject.host.alloc_failures", count=3)
    res = rig.ctl.call("inject.endpoint.dma", iova=0x800000, pasid=1, write=True, count=5)
    assert res["faulted"] == 5
    evs = events(rig, 2)
    assert len(evs) == 2
    c = counters(rig)
    assert (c["viommu_veventq_lost"], c["viommu_evtq_lost"]) == (3, 3)
    assert c["evtq_overflow_seen"] == 1
    lost = [e.fault for e in TRACER.events() if e.hop == "iommufd.lost"]
    assert len(lost) == 3 and all(e.detail["reason"] == "nomem" for e in TRACER.events() if e.hop == "iommufd.lost")
    assert rig.ctl.call("stats")["machine"]["viommu"]["events_lost_host"] == 3


def test_viommu_hold_overflows_the_guest_evtq_exactly(rig):
    rig.dm("up --evtq-log2 2")  # a 4-entry guest event queue
    rig.dm("map 1 0x1000")
    rig.dm("evtq hold")  # the guest driver stops draining too
    rig.ctl.call("inject.viommu.hold", on=True)
    rig.ctl.call("inject.endpoint.dma", iova=0xA00000, pasid=1, write=True, count=10)
    held = rig.ctl.call("inject.viommu.hold", on=False)
    assert held["held"] is False
    rig.dm("evtq release")
    evs = events(rig, 4)
    assert len(evs) == 4
    c = counters(rig)
    assert c["viommu_evtq_lost"] == 6 and c["viommu_veventq_lost"] == 0
    assert c["evtq_overflow_seen"] == 1
    assert len([e for e in TRACER.events() if e.hop == "guest.overflow"]) == 6


def test_viommu_gerror_injection_is_seen_and_acknowledged_by_the_guest(rig):
    rig.dm("up")
    res = rig.ctl.call("inject.viommu.gerror", bit="SFM_ERR")
    assert res["active"] is True
    gerr = [r for r in rig.dm("gerror") if r["_"] == "gerror"]
    assert any(g["bit"] == "SFM_ERR" for g in gerr)


def test_dropped_page_response_leaves_the_prg_outstanding_then_held_one_is_released(rig):
    rig.dm("up")
    for cmd in ("ats on", "pri enable", "pri auto success"):
        rig.dm(cmd)
    rig.ctl.call("inject.host.response", mode="hold", count=1)
    r = rig.dm("dma fill --pasid 2 --dst 0x610000 --len 64 --timeout 3", rc=3)
    assert any(x.get("state", "").endswith("WAIT_PRG") or "WAIT_PRG" in str(x.get("state", "")) for x in r)
    assert rig.ctl.call("inject.host.response", mode="release") == {"released": 1}
    done = [x for x in rig.dm("dma wait 0") if x["_"] == "dma"][0]
    assert done["status"] == "SUCCESS"


def test_bad_control_requests_get_errors_and_the_machine_keeps_running(rig):
    rig.dm("up")
    for raw in (b"\x00\xff\xfe\n", b"{\"cmd\": 7}\n", b"[]\n"):
        rig.ctl.send_raw(raw)
        assert rig.ctl.read_reply()["error"]["code"] == "bad-json"
    for cmd, args, code in (("inject.nope", {}, "unknown-command"),
                            ("inject.endpoint.dma", {"iova": -1}, "bad-args"),
                            ("inject.endpoint.dma", {"iova": "x"}, "bad-args"),
                            ("inject.smmu.event", {"event_id": 0x100}, "bad-args"),
                            ("inject.viommu.gerror", {"bit": "NOPE"}, "bad-args")):
        with pytest.raises(ControlError) as ei:
            rig.ctl.call(cmd, **args)
        assert ei.value.code == code
    assert rig.ctl.call("inject.endpoint.dma", iova=0x300000, pasid=1)["faulted"] == 1
    assert len(events(rig, 1)) == 1
