"""Circular-queue index arithmetic shared by the Command, Event and PRI queues (§2).

PROD/CONS hold ``index | wrap << QS`` in bits [19:0]. Empty: both equal. Full: index
equal, wrap different. Every slot is usable.
"""

from __future__ import annotations

from devmodel.iommu import registers as R


class QueueRegs:
    """BASE (64-bit), PROD and CONS of one queue, plus derived geometry."""

    def __init__(self, name: str, entry_size: int, max_log2: int) -> None:
        self.name = name
        self.entry_size = entry_size
        self.max_log2 = max_log2
        self.base_reg = 0
        self.prod = 0
        self.cons = 0

    def reset(self) -> None:
        self.base_reg = 0
        self.prod = 0
        self.cons = 0

    @property
    def log2size(self) -> int:
        """Effective LOG2SIZE: the written value capped at the IDR1 maximum."""
        return min(self.base_reg & R.Q_BASE_LOG2SIZE_MASK, self.max_log2)

    @property
    def entries(self) -> int:
        return 1 << self.log2size

    @property
    def base(self) -> int:
        """Effective base: ADDR aligned to MAX(queue bytes, 32)."""
        align = max(self.entries * self.entry_size, 32)
        return self.base_reg & R.Q_BASE_ADDR_MASK & ~(align - 1)

    def _ptr_mask(self) -> int:
        return (1 << (self.log2size + 1)) - 1

    def wrapped(self, ptr: int) -> int:
        """The index+wrap part of a PROD/CONS value (bits above QS+1 are RAZ)."""
        return ptr & self._ptr_mask()

    def index(self, ptr: int) -> int:
        return ptr & (self.entries - 1)

    def entry_addr(self, ptr: int) -> int:
        return self.base + self.index(ptr) * self.entry_size

    def incr(self, ptr: int) -> int:
        return (self.wrapped(ptr) + 1) & self._ptr_mask()

    def is_empty(self) -> bool:
        return self.wrapped(self.prod) == self.wrapped(self.cons)

    def is_full(self) -> bool:
        p, c = self.wrapped(self.prod), self.wrapped(self.cons)
        return p != c and self.index(p) == self.index(c)

    def count(self) -> int:
        """Entries between CONS and PROD: (prod - cons) mod 2^(QS+1)."""
        return (self.wrapped(self.prod) - self.wrapped(self.cons)) & self._ptr_mask()
