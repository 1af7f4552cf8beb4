"""ATS Translation Requests and ATS-Translated traffic (reference §3.2 F_BAD_ATS_TREQ / F_TRANSL_FORBIDDEN, §6.2 EATS)."""

from devmodel.iommu import records as rec
from devmodel.iommu import registers as R
from devmodel.iommu.builder import make_s1_stream, make_world
from devmodel.iommu.faults import Access, AtsStatus
from devmodel.iommu.records import EventId

DATA = 0x800000


def world(**kw):
    mem, alloc, smmu, sw = make_world(**kw)
    sw.enable(atschk=True)
    return mem, alloc, smmu, sw


def test_ats_success_with_permissions():
    """An ATS completion returns the page's translated address and R/W/X for the requester's privilege."""
    _, _, smmu, sw = world()
    pt = make_s1_stream(sw, 1, eats=rec.EATS_FULL).tables[0]
    pt.map(0x1000, DATA, write=False, uxn=True)
    c = smmu.ats_translate(1, None, 0x1234)
    assert c.status == AtsStatus.SUCCESS and c.translated_addr == DATA and c.size == 4096
    assert (c.r, c.w, c.x) == (True, False, False)


def test_ats_translation_fault_is_no_access_without_event():
    """Translation-related faults on an ATS request give Success with R=W=0 and record nothing (the device uses PRI)."""
    _, _, smmu, sw = world()
    make_s1_stream(sw, 1, eats=rec.EATS_FULL)
    c = smmu.ats_translate(1, None, 0x1000)
    assert c.status == AtsStatus.SUCCESS and not (c.r or c.w) and c.fault.event == EventId.F_TRANSLATION
    assert sw.events() == []


def test_ats_not_allowed():
    """§3.2 F_BAD_ATS_TREQ: EATS=0 -> UR + event; SMMUEN=0 -> UR; STE V=0 -> CA with no event."""
    _, _, smmu, sw = world()
    make_s1_stream(sw, 1, eats=rec.EATS_OFF)
    assert smmu.ats_translate(1, None, 0).status == AtsStatus.UR
    assert sw.events()[0].EventID == EventId.F_BAD_ATS_TREQ
    assert smmu.ats_translate(2, None, 0).status == AtsStatus.CA
    assert sw.events() == []
    smmu.write_reg(R.CR0, smmu.read_reg(R.CR0) & ~R.Cr0.SMMUEN)
    assert smmu.ats_translate(1, None, 0).status == AtsStatus.UR


def test_translated_traffic_checked_in_safe_mode():
    """§1.5 ATSCHK=1: ATS-Translated traffic from an STE with EATS=0 -> F_TRANSL_FORBIDDEN; ATSCHK=0 bypasses."""
    _, _, smmu, sw = world()
    make_s1_stream(sw, 1, eats=rec.EATS_FULL)
    make_s1_stream(sw, 2, eats=rec.EATS_OFF)
    assert smmu.translated_access(1, DATA, Access.WRITE)
    assert not smmu.translated_access(2, DATA, Access.WRITE)
    ev = sw.events()[0]
    assert ev.EventID == EventId.F_TRANSL_FORBIDDEN and ev.RnW == 0 and ev.InputAddr == DATA
    smmu.write_reg(R.CR0, smmu.read_reg(R.CR0) & ~R.Cr0.ATSCHK)
    assert smmu.translated_access(2, DATA, Access.WRITE)
