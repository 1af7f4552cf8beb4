"""Throughput of the simulated iommufd's two upward paths.

vevents: reports into a vEVENTQ plus reads of the fd (batches of 16, SMMUv3-sized events).
iopf groups: page-request groups (4 requests each) reported, read from the FAULT fd and
answered by cookie, the response reaching the driver callback.
"""

from __future__ import annotations

import logging
import struct
import time

from devmodel.iommufd import IommufdContext, PageRequest, uapi
from devmodel.memory import ByteMemory

DURATION = 2.0
BATCH = 16


def _vsmmu(ctx: IommufdContext) -> tuple[int, int, int, int]:
    ioas = ctx.ioas_alloc()
    stdev, _hwpt, dev = ctx.mock_domain(ioas)
    parent = ctx.hwpt_alloc(dev, ioas, uapi.IOMMU_HWPT_ALLOC_NEST_PARENT)
    viommu = ctx.viommu_alloc(dev, parent, uapi.IOMMU_VIOMMU_TYPE_SELFTEST)
    return stdev, dev, viommu, parent


def bench_vevents() -> float:
    ctx = IommufdContext(ByteMemory(4096))
    _stdev, _dev, viommu, _parent = _vsmmu(ctx)
    _q, fd = ctx.veventq_alloc(viommu, uapi.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3, 1024)
    evt = bytes(32)
    n = 0
    end = time.perf_counter() + DURATION
    start = time.perf_counter()
    while time.perf_counter() < end:
        for _ in range(BATCH):
            ctx.viommu_report_event(viommu, uapi.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3, evt)
        data = ctx.read(fd, BATCH * 40)
        assert len(data) == BATCH * 40
        n += BATCH
    rate = n / (time.perf_counter() - start)
    ctx.close()
    return rate


def bench_iopf_groups(group_size: int = 4) -> float:
    ctx = IommufdContext(ByteMemory(4096))
    ioas = ctx.ioas_alloc()
    stdev, _hwpt, dev = ctx.mock_domain(ioas)
    fault_id, fd = ctx.fault_alloc()
    hwpt = ctx.hwpt_alloc(dev, ioas, 0, fault_id=fault_id)
    ctx.mock_domain_replace(stdev, hwpt)
    answered = [0]
    ctx.device(dev).page_response = lambda req, code: answered.__setitem__(0, answered[0] + 1)
    reqs = [PageRequest(0, 0, 0, uapi.IOMMU_PGFAULT_PERM_READ, i << 12) for i in range(group_size - 1)]
    last = PageRequest(uapi.IOMMU_PGFAULT_FLAGS_LAST_PAGE, 0, 0, uapi.IOMMU_PGFAULT_PERM_READ, 0x9000)
    n = 0
    end = time.perf_counter() + DURATION
    start = time.perf_counter()
    while time.perf_counter() < end:
        for r in reqs:
            ctx.report_iopf(dev, r)
        ctx.report_iopf(dev, last)
        rec = ctx.read(fd, 40 * group_size)
        (cookie,) = struct.unpack_from("<I", rec, 36)
        ctx.write(fd, struct.pack("<II", cookie, uapi.IOMMUFD_PAGE_RESP_SUCCESS))
        n += 1
    rate = n / (time.perf_counter() - start)
    assert answered[0] == n
    ctx.close()
    return rate


def main() -> int:
    logging.disable(logging.INFO)
    print(f"iommufd-vevent-report-read: {bench_vevents():.0f} events/s")
    print(f"iommufd-iopf-group-roundtrip: {bench_iopf_groups():.0f} groups/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
