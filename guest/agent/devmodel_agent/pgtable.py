"""A stage-1 AArch64 page table with a 4 KiB granule, in reserved memory (Arm ARM D8.3).

One table per PASID (CD). Leaves are 4 KiB pages; intermediate tables are allocated on
demand. PCIe DMA is unprivileged unless the descriptor says otherwise, so every page has
AP[1]=1 (EL0 access, reference pitfall 7); read-only pages add AP[2].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from devmodel.iommu import builder
from devmodel.iommu.stage1 import DESC_AP_RO, DESC_VALID, OA_MASK_48

from devmodel_agent.hw import PAGE, Allocator, Memory

log = logging.getLogger(__name__)

ADDR_MASK = OA_MASK_48 & ~(PAGE - 1)


@dataclass(frozen=True)
class Leaf:
    """A mapped page as the table describes it."""

    iova: int
    pa: int
    writable: bool
    desc_addr: int


class PageTable(builder.PageTable):
    """Map, unmap and look up 4 KiB pages of one stage-1 address space (the walk and the
    descriptor encoding are the shared ``devmodel.iommu.builder.PageTable``)."""

    def __init__(self, mem: Memory, alloc: Allocator, t0sz: int) -> None:
        super().__init__(mem, alloc, t0sz)
        self.ia_bits = 64 - t0sz

    def check_iova(self, iova: int) -> None:
        """ValueError for an IOVA outside TTB0's range or not page aligned."""
        if iova % PAGE or not 0 <= iova < 1 << self.ia_bits:
            raise ValueError(f"iova {iova:#x} not a page inside the {self.ia_bits}-bit input range")

    def map(self, iova: int, pa: int, writable: bool = True) -> Leaf:  # type: ignore[override]
        """Install an unprivileged page descriptor (replacing any previous one)."""
        self.check_iova(iova)
        slot = super().map(iova, pa & ADDR_MASK, write=writable)
        log.info("pgtable root=%#x: map %#x -> %#x %s", self.root, iova, pa, "rw" if writable else "ro")
        return Leaf(iova, pa & ADDR_MASK, writable, slot)

    def lookup(self, iova: int) -> Leaf | None:
        page = iova & ~(PAGE - 1)
        self.check_iova(page)
        found = self.entry(page)
        if found is None or not found[1] & DESC_VALID:
            return None
        slot, desc = found
        return Leaf(page, desc & ADDR_MASK, not desc & DESC_AP_RO, slot)

    def unmap(self, iova: int) -> Leaf | None:  # type: ignore[override]
        """Clear the page descriptor; the old leaf, or None when nothing was mapped."""
        leaf = self.lookup(iova)
        if leaf is not None:
            super().unmap(iova)
            log.info("pgtable root=%#x: unmap %#x (was %#x)", self.root, iova, leaf.pa)
        return leaf
