"""A stage-1 AArch64 page table with a 4 KiB granule, in reserved memory (Arm ARM D8.3).

One table per PASID (CD). Leaves are 4 KiB pages; intermediate tables are allocated on
demand. PCIe DMA is unprivileged unless the descriptor says otherwise, so every page has
AP[1]=1 (EL0 access, reference pitfall 7); read-only pages add AP[2].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from devmodel.iommu.stage1 import (DESC_AF, DESC_AP_RO, DESC_AP_UNPRIV, DESC_NG, DESC_TABLE, DESC_VALID,
                                   GRANULE_SHIFT, LEVEL_BITS, OA_MASK_48, level_shift, start_level)

from devmodel_agent.hw import PAGE, Allocator, Memory, read64, write64

log = logging.getLogger(__name__)

LAST_LEVEL = 3
ENTRIES = 1 << LEVEL_BITS
ADDR_MASK = OA_MASK_48 & ~(PAGE - 1)


@dataclass(frozen=True)
class Leaf:
    """A mapped page as the table describes it."""

    iova: int
    pa: int
    writable: bool
    desc_addr: int


class PageTable:
    """Map, unmap and look up 4 KiB pages of one stage-1 address space."""

    def __init__(self, mem: Memory, alloc: Allocator, t0sz: int) -> None:
        self.mem = mem
        self.alloc = alloc
        self.t0sz = t0sz
        self.ia_bits = 64 - t0sz
        self.start = start_level(self.ia_bits)
        self.root = alloc.alloc(PAGE)

    def check_iova(self, iova: int) -> None:
        """ValueError for an IOVA outside TTB0's range or not page aligned."""
        if iova % PAGE or not 0 <= iova < 1 << self.ia_bits:
            raise ValueError(f"iova {iova:#x} not a page inside the {self.ia_bits}-bit input range")

    def _leaf_slot(self, iova: int, create: bool) -> int | None:
        table = self.root
        for level in range(self.start, LAST_LEVEL):
            slot = table + ((iova >> level_shift(level)) & (ENTRIES - 1)) * 8
            desc = read64(self.mem, slot)
            if not desc & DESC_VALID:
                if not create:
                    return None
                nxt = self.alloc.alloc(PAGE)
                write64(self.mem, slot, nxt | DESC_VALID | DESC_TABLE)
                desc = nxt | DESC_VALID | DESC_TABLE
            table = desc & ADDR_MASK
        return table + ((iova >> GRANULE_SHIFT) & (ENTRIES - 1)) * 8

    def map(self, iova: int, pa: int, writable: bool = True) -> Leaf:
        """Install a page descriptor (replacing any previous one)."""
        self.check_iova(iova)
        slot = self._leaf_slot(iova, True)
        assert slot is not None
        desc = (pa & ADDR_MASK) | DESC_VALID | DESC_TABLE | DESC_AF | DESC_NG | DESC_AP_UNPRIV
        if not writable:
            desc |= DESC_AP_RO
        write64(self.mem, slot, desc)
        log.info("pgtable root=%#x: map %#x -> %#x %s", self.root, iova, pa, "rw" if writable else "ro")
        return Leaf(iova, pa & ADDR_MASK, writable, slot)

    def lookup(self, iova: int) -> Leaf | None:
        self.check_iova(iova & ~(PAGE - 1))
        slot = self._leaf_slot(iova & ~(PAGE - 1), False)
        if slot is None:
            return None
        desc = read64(self.mem, slot)
        if not desc & DESC_VALID:
            return None
        return Leaf(iova & ~(PAGE - 1), desc & ADDR_MASK, not desc & DESC_AP_RO, slot)

    def unmap(self, iova: int) -> Leaf | None:
        """Clear the page descriptor; the old leaf, or None when nothing was mapped."""
        leaf = self.lookup(iova)
        if leaf is not None:
            write64(self.mem, leaf.desc_addr, 0)
            log.info("pgtable root=%#x: unmap %#x (was %#x)", self.root, iova, leaf.pa)
        return leaf
