"""SMMUv3 model throughput: warm-IOTLB and cold 4-level translations, DMA engine copy bandwidth.

Run: python benchmarks/bench_iommu.py  (one "metric: value unit" line per metric)
"""

from __future__ import annotations

import time

from devmodel.devices.dma_engine import DmaEngine, SimpleAts, SimplePri
from devmodel.devices.dma_engine_records import DESCRIPTOR, DescFlags, DmaOpcode
from devmodel.iommu import records as rec
from devmodel.iommu.builder import make_s1_stream, make_world
from devmodel.iommu.faults import Access

PAGES = 256
DATA = 0x1000000


def setup(t0sz: int = 16):
    mem, alloc, smmu, sw = make_world(mem_size=1 << 26)
    sw.enable()
    s = make_s1_stream(sw, 1, cd_extra=dict(T0SZ=t0sz))
    pt = s.tables[0]
    pt.t0sz = t0sz
    for i in range(PAGES):
        pt.map(0x7F00_0000_0000 + i * 0x1000, DATA + i * 0x1000)
    return mem, smmu, sw, pt


def bench_warm(seconds: float = 2.0) -> float:
    _, smmu, _, _ = setup()
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(PAGES):
            smmu.translate(1, None, 0x7F00_0000_0000 + i * 0x1000 + 8, 8, Access.READ)
        n += PAGES
    return n / (time.perf_counter() - start)


def bench_cold(seconds: float = 2.0) -> float:
    _, smmu, sw, _ = setup()
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        smmu.iotlb.inv_all()  # what CMD_TLBI_NSNH_ALL does, without the queue overhead
        for i in range(PAGES):
            smmu.translate(1, None, 0x7F00_0000_0000 + i * 0x1000, 8, Access.READ)
        n += PAGES
    return n / (time.perf_counter() - start)


def bench_copy(ats: bool, seconds: float = 2.0) -> float:
    mem, smmu, sw, pt = setup(t0sz=25)
    s = make_s1_stream(sw, 2, ssids=(1,), s1cdmax=1, eats=rec.EATS_FULL)
    pt = s.tables[1]
    ring, compl, src, dst = 0x100000, 0x200000, 0x1000000, 0x2000000
    size = 64 * 1024
    nxt = 0x2000000
    for va in [ring, compl] + [src + i for i in range(0, size, 4096)] + [dst + i for i in range(0, size, 4096)]:
        pt.map(va, nxt)
        nxt += 0x1000
    eng = DmaEngine(smmu, 2, mem, pri=SimplePri(), ats=SimpleAts(ats))
    eng.configure(ring, 4, 1)
    eng.set_enabled(True)
    ring_pa = smmu.translate(2, 1, ring).pa
    total = 0
    slot = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        mem.write(ring_pa + (slot % 16) * 64, DESCRIPTOR.encode(
            Opcode=DmaOpcode.COPY, Flags=int(DescFlags.RCR), PASID_EN=1, PASID=1, CompletionAddr=compl,
            Src=src, Dst=dst, Length=size))
        slot += 1
        eng.doorbell(slot % 16)
        total += size
    return total / (time.perf_counter() - start) / 1e6


def main() -> None:
    print(f"iommu-translate-warm-iotlb: {bench_warm():.0f} translations/s")
    print(f"iommu-translate-cold-4level-walk: {bench_cold():.0f} translations/s")
    print(f"dmaeng-copy-untranslated-via-smmu: {bench_copy(False):.1f} MB/s")
    print(f"dmaeng-copy-ats: {bench_copy(True):.1f} MB/s")


if __name__ == "__main__":
    main()
