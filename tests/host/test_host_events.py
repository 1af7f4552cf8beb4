"""Physical EVTQ -> host driver -> vEVENTQ fd, with real faults from the emulated SMMU.

References: iommufd.md section 3.7 (which events are forwarded, vSID swapped into DW0
[63:32], stage-2 faults never forwarded), 3.2/3.4 (vEVENTQ record: 8-byte header
{flags, sequence} then the 32-byte SMMUv3 event; sequences +1 per report);
smmuv3-pcie.md section 3.1 (event layout), 2 (EVTQ overflow: OVFLG vs OVACKFLG),
1.7 (interrupt on empty -> non-empty).
"""

from __future__ import annotations

import select
import struct

from devmodel.host.scenario import GPA_BASE, make_nested_master
from devmodel.iommu import records as rec
from devmodel.iommu import registers as R
from devmodel.iommu.faults import Access
from devmodel.iommufd import uapi

from .conftest import SID, VSID, make_host

VEVENT_RECORD = 8 + 32


def _read_vevents(ctx, fd):  # noqa: ANN001
    """Parse whole vEVENTQ records: [(flags, seq, decoded event or None)]."""
    data = ctx.read(fd, 4096)
    out, pos = [], 0
    while pos < len(data):
        flags, seq = struct.unpack_from("<II", data, pos)
        pos += 8
        if flags & uapi.IOMMU_VEVENTQ_FLAG_LOST_EVENTS:
            out.append((flags, seq, None))
            continue
        out.append((flags, seq, rec.decode_event(data[pos:pos + 32])))
        pos += 32
    return out


def test_stage1_translation_fault_reaches_veventq_with_vsid(nested):
    """A nested master's guest stage-1 table lacks the page: F_TRANSLATION (S2=0, CLASS=IN)
    on the physical EVTQ; the host forwards it with StreamID replaced by the vSID; header
    sequence 0 then 1; the fd polls readable while a record waits (section 3.6)."""
    host, ctx = nested.host, nested.host.ctx
    r = host.smmu.translate(SID, None, 0x4000_2000, 8, Access.WRITE)
    assert r.fault.event == rec.EventId.F_TRANSLATION and r.fault.recorded
    assert select.select([nested.veventq_fd], [], [], 0)[0]
    (flags, seq, evt), = _read_vevents(ctx, nested.veventq_fd)
    assert (flags, seq) == (0, 0)
    assert evt.EventID == rec.EventId.F_TRANSLATION
    assert evt.StreamID == VSID  # the guest's StreamID, not the physical 0x10
    assert evt.InputAddr == 0x4000_2000 and evt.RnW == 0 and evt.S2 == 0
    assert evt.CLASS == rec.EventClass.IN
    assert not select.select([nested.veventq_fd], [], [], 0)[0]
    host.smmu.translate(SID, None, 0x4000_3000, 8, Access.READ)
    (flags, seq, evt), = _read_vevents(ctx, nested.veventq_fd)
    assert seq == 1 and evt.RnW == 1
    c = host.counters
    assert c.events["F_TRANSLATION"] == 2 and c.events_forwarded == 2


def test_bad_guest_cd_is_forwarded_as_c_bad_cd(nested):
    """C_BAD_CD is one of the forwarded configuration events (section 3.7): the guest
    made its CD invalid (and issued CFGI_CD through the vSMMU)."""
    host, ctx = nested.host, nested.host.ctx
    nested.guest.write(nested.cd_addr, rec.CD.encode(V=0))
    ctx.hwpt_invalidate(nested.viommu_id, uapi.IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
                        [struct.pack("<QQ", rec.Opcode.CMD_CFGI_CD_ALL | VSID << 32, 0)])
    host.smmu.translate(SID, None, 0x1000, 4, Access.READ)
    (_, _, evt), = _read_vevents(ctx, nested.veventq_fd)
    assert evt.EventID == rec.EventId.C_BAD_CD and evt.StreamID == VSID


def test_stage2_fault_is_counted_not_forwarded(nested):
    """The guest maps a VA to an IPA outside the IOAS: the SMMU reports a stage-2
    F_TRANSLATION (S2=1, IPA valid); the host keeps it (counted) and the vEVENTQ stays
    empty (section 3.7: not a stage-1 fault)."""
    host, ctx = nested.host, nested.host.ctx
    nested.map_guest_page(0x4000_0000, 0x4000_0000_0000)  # IPA far outside guest RAM
    r = host.smmu.translate(SID, None, 0x4000_0010, 4, Access.READ)
    assert r.fault.event == rec.EventId.F_TRANSLATION and r.fault.stage == 2
    assert ctx.read(nested.veventq_fd, 4096) == b""
    c = host.counters
    assert c.events_stage2 == 1 and c.events_forwarded == 0 and c.events["F_TRANSLATION"] == 1


def test_event_of_non_nested_master_is_logged_only(world):
    """A master on a plain paging HWPT has no vEVENTQ: its events are counted unhandled."""
    host, user = world
    ctx = host.ctx
    dev = host.bind(0x20, "plain")
    ioas = ctx.ioas_alloc()
    ctx.attach(dev, ioas)
    host.smmu.translate(0x20, 7, 0x1000, 4, Access.READ)  # SSID with no stage 1
    c = host.counters
    assert c.events["C_BAD_SUBSTREAMID"] == 1 and c.events_unhandled == 1
    assert c.events_forwarded == 0


def test_forwarding_without_veventq_is_dropped_and_counted(world):
    """report_event answers -EOPNOTSUPP when the vIOMMU has no ARM_SMMUV3 vEVENTQ
    (section 3.3): the host counts the event as dropped."""
    host, user = world
    m = make_nested_master(host, user, SID, VSID)
    host.ctx.close_fd(m.veventq_fd)
    host.ctx.destroy(m.veventq_id)
    host.smmu.translate(SID, None, 0x4000_0000, 4, Access.READ)
    assert host.counters.events_dropped == 1 and host.counters.events_forwarded == 0


def test_physical_evtq_overflow_is_counted_and_acknowledged():
    """Threaded interrupts and a 4-entry EVTQ: 6 faults before the handler runs -> 4
    recorded, OVFLG toggled once (section 2). The handler drains 4, notices PROD.OVFLG !=
    its OVACKFLG, counts one overflow and copies OVFLG into CONS.OVACKFLG; the next fault
    flows normally and the overflow is not counted again."""
    host, user = make_host(threaded=True, evtq=2)
    try:
        m = make_nested_master(host, user, SID, VSID)
        s = host.smmu
        for i in range(6):
            s.translate(SID, None, 0x4000_0000 + i * 0x1000, 4, Access.READ)
        assert host.counters.events_forwarded == 0  # nothing serviced yet
        assert select.select([host.irq_fd], [], [], 0)[0]
        prod = s.read_reg(R.EVENTQ_PROD)
        assert prod & R.Q_OVFLG and not s.read_reg(R.EVENTQ_CONS) & R.Q_OVFLG
        assert host.service() >= 1
        c = host.counters
        assert c.evtq_overflows == 1 and c.events_forwarded == 4
        assert s.read_reg(R.EVENTQ_CONS) & R.Q_OVFLG == s.read_reg(R.EVENTQ_PROD) & R.Q_OVFLG
        assert [seq for _, seq, _ in _read_vevents(host.ctx, m.veventq_fd)] == [0, 1, 2, 3]
        s.translate(SID, None, 0x4800_0000, 4, Access.READ)
        host.service()
        assert c.evtq_overflows == 1 and c.events_forwarded == 5
        (_, seq, evt), = _read_vevents(host.ctx, m.veventq_fd)
        assert seq == 4 and evt.InputAddr == 0x4800_0000
    finally:
        host.close()


def test_guest_tlbi_through_vsmmu_reaches_physical_iotlb(nested):
    """Guest invalidations via IOMMU_HWPT_INVALIDATE on the vIOMMU (iommufd.md 4.3) are
    issued on the physical CMDQ with the vSMMU VMID: a stale stage-1 translation stays
    until the guest's TLBI_NH_ASID, then the new mapping is used. ATC_INV arrives at the
    endpoint with the physical StreamID's function."""
    host, ctx = nested.host, nested.host.ctx
    va = 0x4000_0000
    nested.map_guest_page(va, GPA_BASE + 0x50_0000)
    assert host.smmu.translate(SID, None, va, 4, Access.READ).pa == nested_pa(0x50_0000)
    nested.map_guest_page(va, GPA_BASE + 0x51_0000)
    assert host.smmu.translate(SID, None, va, 4, Access.READ).pa == nested_pa(0x50_0000)  # stale
    asid = VSID & 0xFFFF
    inv = uapi.IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3
    ctx.hwpt_invalidate(nested.viommu_id, inv, [
        struct.pack("<QQ", rec.Opcode.CMD_TLBI_NH_ASID | asid << 48, 0),
        struct.pack("<QQ", rec.Opcode.CMD_ATC_INV | VSID << 32, 52)])
    assert host.smmu.translate(SID, None, va, 4, Access.READ).pa == nested_pa(0x51_0000)
    assert len(nested.endpoint.atc) == 1 and nested.endpoint.atc[0][0] is None


def nested_pa(gpa: int) -> int:
    from devmodel.host.scenario import USER_BASE
    return USER_BASE + gpa
