"""The fault tracer: lazy birth at the origin, link/take correlation, bounded ring."""

from __future__ import annotations

import threading

from devmodel.trace import Tracer, format_table, iter_jsonl, journey


def fake_clock():
    t = [1000]

    def clock() -> int:
        t[0] += 1000
        return t[0]
    return clock


def test_origin_without_fault_records_nothing():
    tr = Tracer(clock=fake_clock())
    with tr.origin("endpoint.dma", sid=1) as _:
        pass
    assert tr.events() == []


def test_fault_born_in_origin_scope_keeps_origin_timestamp():
    tr = Tracer(clock=fake_clock())
    scope = tr.origin("endpoint.dma", sid=0x20, addr=0x1000)
    with scope:
        fid = tr.current()
        tr.hop(fid, "smmu.fault", event=0x10)
        assert tr.current() == fid  # same access, same id
    assert scope.fault == fid
    evs = tr.events(fid)
    assert [e.hop for e in evs] == ["endpoint.dma", "smmu.fault"]
    assert evs[0].detail == {"sid": 0x20, "addr": 0x1000}
    assert evs[0].t_ns < evs[1].t_ns


def test_each_access_gets_its_own_id_and_scopes_nest():
    tr = Tracer(clock=fake_clock())
    with tr.origin("endpoint.dma"):
        a = tr.current()
        with tr.origin("endpoint.page_request"):
            b = tr.current()
        assert tr.current() == a
    assert a != b
    assert tr.in_fault() == 0


def test_link_take_correlates_records_once():
    tr = Tracer(clock=fake_clock())
    fid = tr.begin("smmu.evtq")
    tr.link(("pa", 0x8000), fid)
    assert tr.peek(("pa", 0x8000)) == fid
    assert tr.take(("pa", 0x8000)) == fid
    assert tr.take(("pa", 0x8000)) == 0


def test_ring_overflow_is_counted():
    tr = Tracer(capacity=4, clock=fake_clock())
    for _ in range(6):
        tr.begin("smmu.fault")
    assert len(tr.events()) == 4
    assert tr.dropped == 2


def test_subscribers_see_events_and_broken_ones_are_ignored():
    tr = Tracer(clock=fake_clock())
    seen = []
    tr.subscribe(lambda e: 1 / 0)
    unsub = tr.subscribe(seen.append)
    fid = tr.begin("smmu.fault")
    unsub()
    tr.hop(fid, "host.evtq")
    assert [e.hop for e in seen] == ["smmu.fault"]


def test_disabled_tracer_and_fault_zero_record_nothing():
    tr = Tracer(clock=fake_clock())
    tr.hop(0, "host.evtq")
    tr.enabled = False
    with tr.origin("endpoint.dma"):
        assert tr.current() == 0
    assert tr.events() == []


def test_journey_table_and_jsonl_round_trip():
    tr = Tracer(clock=fake_clock())
    fid = tr.begin("endpoint.dma", sid=0x20)
    tr.hop(fid, "guest.evtq", slot=3)
    rows = journey(tr.events(fid))
    assert [r[0] for r in rows] == ["endpoint.dma", "guest.evtq"]
    assert rows[1][2] == 0.001  # 1000 ns between hops
    table = format_table(tr.events())
    assert f"fault {fid}:" in table and "sid=0x20" in table
    back = list(iter_jsonl(e.to_json() for e in tr.events()))
    assert back == tr.events()


def test_ids_unique_across_threads():
    tr = Tracer()
    ids: list[int] = []

    def worker() -> None:
        for _ in range(200):
            with tr.origin("endpoint.dma"):
                ids.append(tr.current())
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 800


def test_rearmed_origin_gives_each_access_its_own_birth():
    """One scope re-armed per access (what the DMA engine does) births one fault per
    faulting access, each with that access's time and detail."""
    tr = Tracer(clock=fake_clock())
    with tr.origin("endpoint.dma", sid=1) as origin:
        origin.rearm(tr.clock(), addr=0x1000)
        a = tr.current()
        origin.rearm(tr.clock(), addr=0x2000)
        assert tr.in_fault() == 0
        b = tr.current()
    assert a != b
    assert [tr.events(f)[0].detail for f in (a, b)] == [{"sid": 1, "addr": 0x1000}, {"sid": 1, "addr": 0x2000}]
    assert tr.events(a)[0].t_ns < tr.events(b)[0].t_ns
