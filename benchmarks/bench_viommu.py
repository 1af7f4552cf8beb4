"""vIOMMU fault-path benchmark, in process: endpoint fault -> guest EVTQ record.

A real HostMachine + emulated SMMU, the vIOMMU function with an in-process DeviceContext
(the real vEVENTQ fd is polled with select), a guest driver through BAR0. Prints
``metric-name: value unit`` lines.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "viommu"))

from conftest import SID, build  # noqa: E402

from devmodel.iommu.faults import Access  # noqa: E402
from devmodel.iommu import registers as R  # noqa: E402

IOVA = 0x1234_5000


def main() -> int:
    logging.disable(logging.CRITICAL)
    host, fn, ctx, g, _ = build(evtq_log2=8, veventq_depth=256)
    g.events()
    g.s1_stream()
    lat = []
    for i in range(2000):
        t0 = time.perf_counter_ns()
        host.smmu.translate(SID, None, IOVA + (i % 64) * 0x1000, 4, Access.WRITE)
        ctx.pump()
        lat.append(time.perf_counter_ns() - t0)
        assert g.rd(R.EVENTQ_PROD) & 0x1FF != g.evtq_cons & 0x1FF
        g.events()
    lat.sort()
    print(f"viommu-fault-to-guest-evtq-median: {statistics.median(lat) / 1e3:.1f} us")
    print(f"viommu-fault-to-guest-evtq-p99: {lat[int(len(lat) * 0.99)] / 1e3:.1f} us")
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 3.0:
        for i in range(64):
            host.smmu.translate(SID, None, IOVA + i * 0x1000, 4, Access.WRITE)
        ctx.pump()
        g.events()
        n += 64
    rate = n / (time.perf_counter() - t0)
    print(f"viommu-sustained-faults: {rate:.0f} faults/s")
    assert fn.counters.evtq_lost == 0, fn.counters.snapshot()
    host.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
