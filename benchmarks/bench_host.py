"""Host fault-path throughput: SMMU fault -> host driver -> iommufd fd -> reader.

* ``host-vevent-rate``: F_TRANSLATION of a nested master (guest stage 1 lacks the page)
  from ``SMMUv3.translate`` through the physical EVTQ, the host's event handler and
  ``report_event`` to a record read back from the vEVENTQ fd.
* ``host-prg-rate``: a page request group of 3 from ``SMMUv3.page_request`` through the
  PRIQ and host grouping to the FAULT fd, read, answered SUCCESS, and the CMD_PRI_RESP
  delivered to the endpoint.
"""

from __future__ import annotations

import logging
import time

from devmodel.host import HostMachine
from devmodel.host.scenario import make_nested_master, user_memory
from devmodel.iommu.faults import Access
from devmodel.iommufd import uapi

SID, VSID = 0x10, 0x5
DURATION = 2.0


def _setup():
    user = user_memory()
    host = HostMachine(user)
    return host, make_nested_master(host, user, SID, VSID)


def bench_vevents() -> float:
    host, m = _setup()
    ctx, smmu = host.ctx, host.smmu
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < DURATION:
        for i in range(100):
            smmu.translate(SID, None, 0x4000_0000 + (i << 12), 4, Access.READ)
            if len(ctx.read(m.veventq_fd, 40)) != 40:
                raise RuntimeError("vEVENTQ record missing")
        n += 100
    rate = n / (time.perf_counter() - start)
    host.close()
    return rate


def bench_prgs() -> float:
    host, m = _setup()
    ctx, smmu = host.ctx, host.smmu
    got: list = []
    smmu.register_endpoint(SID, prg_response=lambda ssid, idx, code: got.append(idx))
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < DURATION:
        for prg in range(100):
            for page in range(3):
                smmu.page_request(SID, None, 0x4000_0000 + (page << 12), prg, last=page == 2)
            data = ctx.read(m.fault_fd, 3 * uapi.PGFAULT_SIZE)
            cookie = uapi.unpack("iommu_hwpt_pgfault", data[:uapi.PGFAULT_SIZE]).cookie
            ctx.page_response(m.fault_fd, cookie, uapi.IOMMUFD_PAGE_RESP_SUCCESS)
        n += 100
    rate = n / (time.perf_counter() - start)
    if len(got) != n:
        raise RuntimeError(f"{len(got)} PRG responses for {n} groups")
    host.close()
    return rate


def main() -> None:
    logging.disable(logging.CRITICAL)
    print(f"host-vevent-rate: {bench_vevents():.0f} events/s")
    print(f"host-prg-rate: {bench_prgs():.0f} groups/s")


if __name__ == "__main__":
    main()
