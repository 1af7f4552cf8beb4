"""Event queue and PRI queue: recording, interrupts, and their different overflow rules (reference §2, pitfall 2)."""

from devmodel.iommu import registers as R
from devmodel.iommu.builder import make_s1_stream, make_world
from devmodel.iommu.irq import IrqSource
from devmodel.iommu.records import PrgResponseCode


def world(**kw):
    mem, alloc, smmu, sw = make_world(eventq_log2=2, priq_log2=2, **kw)
    sw.enable()
    return mem, alloc, smmu, sw


def fault(smmu, n=1, sid=1):
    for i in range(n):
        assert not smmu.translate(sid, None, 0x1000 * (i + 1)).ok


# ---------------------------------------------------------------- event queue

def test_event_interrupt_on_empty_to_nonempty():
    """§1.7: the Event queue interrupt fires when the queue goes empty -> non-empty (after PROD moves)."""
    _, _, smmu, sw = world()
    make_s1_stream(sw, 1)
    seen = []
    smmu.connect_irq(IrqSource.EVENTQ, lambda: seen.append(smmu.read_reg(R.EVENTQ_PROD)))
    fault(smmu, 2)
    assert seen == [1]
    sw.events()
    fault(smmu)
    assert seen == [1, 3]


def test_event_queue_overflow_toggles_once_and_keeps_recording():
    """§2 Full Event queue: drop, toggle OVFLG once, and keep recording as space frees up."""
    _, _, smmu, sw = world()
    make_s1_stream(sw, 1)
    fault(smmu, 4)  # 4 entries: full
    assert not smmu.read_reg(R.EVENTQ_PROD) & R.Q_OVFLG
    fault(smmu, 3)  # dropped: OVFLG toggles once only
    prod = smmu.read_reg(R.EVENTQ_PROD)
    assert prod & R.Q_OVFLG and prod & 0xFFFFF == 4
    # consume two entries WITHOUT acknowledging: recording continues (differs from the PRIQ)
    smmu.write_reg(R.EVENTQ_CONS, 2)
    fault(smmu, 1)
    assert smmu.read_reg(R.EVENTQ_PROD) == R.Q_OVFLG | 5
    assert smmu.eventq.dropped == 3


def test_event_overflow_ack_and_second_overflow():
    """§2: acknowledging (OVACKFLG = OVFLG) ends the overflow; a later overflow toggles OVFLG back."""
    _, _, smmu, sw = world()
    make_s1_stream(sw, 1)
    fault(smmu, 5)
    assert len(sw.events(ack_overflow=True)) == 4
    assert smmu.read_reg(R.EVENTQ_CONS) & R.Q_OVFLG
    fault(smmu, 5)
    assert not smmu.read_reg(R.EVENTQ_PROD) & R.Q_OVFLG  # toggled back to 0 = new overflow


def test_events_dropped_when_eventq_disabled_signal_no_overflow():
    """§2: records discarded because EVENTQEN=0 do not signal overflow."""
    _, _, smmu, sw = world()
    make_s1_stream(sw, 1)
    smmu.write_reg(R.CR0, smmu.read_reg(R.CR0) & ~R.Cr0.EVENTQEN)
    fault(smmu, 6)
    assert smmu.read_reg(R.EVENTQ_PROD) == 0


def test_event_write_abort_raises_eventq_abt_err():
    """§1.6: an external abort writing the Event queue raises EVENTQ_ABT_ERR; no writes while active."""
    _, _, smmu, sw = world()
    make_s1_stream(sw, 1)
    smmu.write_reg(R.CR0, smmu.read_reg(R.CR0) & ~R.Cr0.EVENTQEN)
    smmu.write_reg(R.EVENTQ_BASE, 0x40_0000_0000 | 2, 8)
    smmu.write_reg(R.CR0, smmu.read_reg(R.CR0) | R.Cr0.EVENTQEN)
    fault(smmu)
    assert smmu.read_reg(R.GERROR) & R.Gerror.EVENTQ_ABT_ERR
    assert smmu.read_reg(R.EVENTQ_PROD) == 0


def test_eventq_msi():
    """§1.7: EVENTQ_IRQ_CFG0/1 turn the interrupt into an MSI write."""
    mem, _, smmu, sw = world()
    make_s1_stream(sw, 1)
    smmu.write_reg(R.IRQ_CTRL, 0)
    smmu.write_reg(R.EVENTQ_IRQ_CFG0, 0x900000, 8)
    smmu.write_reg(R.EVENTQ_IRQ_CFG1, 0x55)
    smmu.write_reg(R.IRQ_CTRL, R.IrqCtrl.EVENTQ_IRQEN)
    fault(smmu)
    assert int.from_bytes(mem.read(0x900000, 4), "little") == 0x55


# ---------------------------------------------------------------- PRI queue

def responses(smmu, sid):
    got = []
    smmu.register_endpoint(sid, prg_response=lambda ssid, idx, code: got.append((ssid, idx, code)))
    return got


def test_page_request_recorded():
    """§4.1: a page request becomes a 16-byte PRIQ record with SID, PASID, R/W/L and PRG index."""
    _, _, smmu, sw = world()
    assert smmu.page_request(3, 0x42, 0x7000_1234, 9, True, read=True, write=True)
    (r,) = sw.page_requests()
    assert (r.StreamID, r.SubstreamID, r.SSV, r.PRGIndex, r.L, r.R, r.W, r.PageAddr) == (
        3, 0x42, 1, 9, 1, 1, 1, 0x7000_1000)


def test_priq_overflow_drops_everything_until_ack():
    """Pitfall 2: at a full PRIQ, OVFLG toggles and *all* requests are discarded until acknowledged;
    discarded Last=1 requests get an automatic Success, Last=0 get nothing."""
    _, _, smmu, sw = world()
    make_s1_stream(sw, 3)
    got = responses(smmu, 3)
    for i in range(4):
        assert smmu.page_request(3, None, 0x1000 * i, i, False)
    assert not smmu.page_request(3, None, 0x9000, 10, False)  # full: overflow, Last=0 -> no response
    assert not smmu.page_request(3, None, 0xA000, 11, True)  # Last=1 -> auto Success
    assert smmu.read_reg(R.PRIQ_PROD) & R.Q_OVFLG
    assert got == [(None, 11, PrgResponseCode.SUCCESS)]
    smmu.write_reg(R.PRIQ_CONS, 4)  # drain WITHOUT acknowledging: still discarding (unlike the EVTQ)
    assert not smmu.page_request(3, None, 0xB000, 12, False)
    smmu.write_reg(R.PRIQ_CONS, 4 | R.Q_OVFLG)  # acknowledge
    assert smmu.page_request(3, None, 0xC000, 13, True)


def test_priq_overflow_response_failure_when_ste_unusable():
    """§2: if the STE cannot be checked, the overflow auto-response is Response Failure without PASID;
    STE.PPAR=1 puts the PASID on a Success."""
    _, _, smmu, sw = world()
    make_s1_stream(sw, 4, ste_extra=dict(PPAR=1))
    got5, got4 = responses(smmu, 5), responses(smmu, 4)
    for i in range(4):
        smmu.page_request(6, None, 0, i, False)
    smmu.page_request(5, 7, 0x1000, 1, True)  # SID 5 has no valid STE
    smmu.page_request(4, 7, 0x1000, 2, True)
    assert got5 == [(None, 1, PrgResponseCode.RESPONSE_FAILURE)]
    assert got4 == [(7, 2, PrgResponseCode.SUCCESS)]


def test_priq_stop_marker_gets_no_response():
    """§2: discarded Stop Markers (PASID, L=1, R=W=0) get no automatic response."""
    _, _, smmu, sw = world()
    got = responses(smmu, 3)
    smmu.write_reg(R.CR0, smmu.read_reg(R.CR0) & ~R.Cr0.PRIQEN)
    smmu.page_request(3, 5, 0, 1, True, read=False, write=False)
    assert got == []


def test_pri_response_failure_when_disabled():
    """§2 / §8.2: with PRIQEN=0 or SMMUEN=0 every request is auto-answered Response Failure, no PASID."""
    _, _, smmu, sw = world()
    got = responses(smmu, 3)
    smmu.write_reg(R.CR0, smmu.read_reg(R.CR0) & ~R.Cr0.PRIQEN)
    smmu.page_request(3, 5, 0, 1, False)
    smmu.write_reg(R.CR0, (smmu.read_reg(R.CR0) | R.Cr0.PRIQEN) & ~R.Cr0.SMMUEN)
    smmu.page_request(3, 5, 0, 2, True)
    assert got == [(None, 1, PrgResponseCode.RESPONSE_FAILURE), (None, 2, PrgResponseCode.RESPONSE_FAILURE)]
    assert smmu.read_reg(R.PRIQ_PROD) == 0


def test_priq_write_abort():
    """§2: a PRIQ write abort raises PRIQ_ABT_ERR and auto-answers Response Failure; later requests too."""
    _, _, smmu, sw = world()
    got = responses(smmu, 3)
    smmu.write_reg(R.CR0, smmu.read_reg(R.CR0) & ~R.Cr0.PRIQEN)
    smmu.write_reg(R.PRIQ_BASE, 0x40_0000_0000 | 2, 8)
    smmu.write_reg(R.CR0, smmu.read_reg(R.CR0) | R.Cr0.PRIQEN)
    smmu.page_request(3, None, 0, 1, True)
    smmu.page_request(3, None, 0, 2, False)
    assert smmu.read_reg(R.GERROR) & R.Gerror.PRIQ_ABT_ERR
    assert [c for _, _, c in got] == [PrgResponseCode.RESPONSE_FAILURE] * 2


def test_priq_irq_last_only():
    """§1.7 PRIQ_IRQ_CFG2.LO=1: interrupt only for Last=1 (also when discarded by overflow); LO=0: empty->non-empty."""
    _, _, smmu, sw = world()
    make_s1_stream(sw, 3)
    n = []
    smmu.connect_irq(IrqSource.PRIQ, lambda: n.append(1))
    smmu.write_reg(R.IRQ_CTRL, 0)
    smmu.write_reg(R.PRIQ_IRQ_CFG2, R.PRIQ_IRQ_CFG2_LO)
    smmu.write_reg(R.IRQ_CTRL, R.IrqCtrl.PRIQ_IRQEN)
    smmu.page_request(3, None, 0, 1, False)
    smmu.page_request(3, None, 0, 1, True)
    assert len(n) == 1
    smmu.page_request(3, None, 0, 2, False)
    smmu.page_request(3, None, 0, 3, False)
    smmu.page_request(3, None, 0, 4, True)  # overflow discard with Last=1
    assert len(n) == 2
    smmu.write_reg(R.IRQ_CTRL, 0)
    smmu.write_reg(R.PRIQ_IRQ_CFG2, 0)
    smmu.write_reg(R.IRQ_CTRL, R.IrqCtrl.PRIQ_IRQEN)
    sw.page_requests()
    smmu.page_request(3, None, 0, 5, False)
    smmu.page_request(3, None, 0, 5, True)
    assert len(n) == 3
