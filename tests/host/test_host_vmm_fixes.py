"""Host-layer fixes the VMM relies on: IOAS_UNMAP invalidates cached stage 2, the guest
STE's EATS request survives validation, one shared lock, trace hops host/iommufd.

References: iommufd.md section 1.5.2 (driver data), 3.3 (vEVENTQ producer), 3.7 (SMMUv3
vEVENT forwarding); smmuv3-pcie.md section 6.2 (STE.EATS), 6.7 (caching obligations);
kernel arm-smmu-v3-iommufd: EATS cleared from the vSTE, kept as the domain's enable_ats.
"""

from __future__ import annotations

import threading

from devmodel.host import HostMachine
from devmodel.host.scenario import make_nested_master, user_memory
from devmodel.host.ste import guest_s1_ste
from devmodel.iommu import records as rec
from devmodel.iommu.faults import Access
from devmodel.iommufd import uapi
from devmodel.trace import TRACER

from .conftest import SID, VSID


def test_ioas_unmap_drops_cached_stage2(nested):
    """A translation cached through stage 2 must fail right after IOMMU_IOAS_UNMAP of its
    IPA, with no extra flush call (the kernel flushes inside the unmap)."""
    host, ctx = nested.host, nested.host.ctx
    gpa = 0x60_0000
    nested.map_guest_page(0x1000_0000, gpa)
    assert host.smmu.translate(SID, None, 0x1000_0000, 4, Access.READ).pa is not None
    ctx.ioas_unmap(nested.ioas_id, 0, nested.guest.size)
    assert host.smmu.translate(SID, None, 0x1000_0000, 4, Access.READ).pa is None


def test_guest_eats_enables_ats_on_an_ats_master():
    """Guest STE EATS=0b01 on an ATS-capable master -> physical STE EATS=0b01; EATS=0 ->
    0 (the request is not lost by validate_vste clearing the field)."""
    user = user_memory()
    host = HostMachine(user)
    m = make_nested_master(host, user, SID, VSID)
    dev = host.ctx.device(m.dev_id)
    host.hw.masters[SID].ats = True
    for eats in (rec.EATS_FULL, rec.EATS_OFF):
        raw = bytearray(guest_s1_ste(m.cd_addr))
        val = int.from_bytes(raw, "little") | rec.STE.fields["EATS"].put(eats)
        hwpt = host.ctx.hwpt_alloc(dev.id, m.viommu_id, 0, uapi.IOMMU_HWPT_DATA_ARM_SMMUV3,
                                   val.to_bytes(16, "little"))
        host.ctx.replace(dev.id, hwpt)
        ste = rec.STE.decode(host.memory.read(host.hw.ste_addr(SID), rec.STE_SIZE))
        assert ste.EATS == eats
    host.close()


def test_one_given_lock_is_used_everywhere():
    """HostMachine(lock=L): the iommufd context and the driver take L itself."""
    lock = threading.RLock()
    host = HostMachine(user_memory(), lock=lock)
    assert host.ctx.lock is lock and host.hw.lock is lock and host.lock is lock
    host.close()


def test_event_trace_hops_host_and_iommufd(nested):
    """host.evtq and iommufd.veventq once, and the ("veventq", id, seq) key linked."""
    host = nested.host
    with TRACER.origin("endpoint.dma", sid=SID) as o:
        host.smmu.translate(SID, None, 0x7000_0000, 4, Access.WRITE)
    hops = [e.hop for e in TRACER.events(o.fault)]
    assert hops.count("host.evtq") == 1 and hops.count("iommufd.veventq") == 1
    assert TRACER.take(("veventq", nested.veventq_id, 0)) == o.fault
