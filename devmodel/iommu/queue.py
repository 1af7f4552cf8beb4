"""Circular-queue index arithmetic shared by the Command, Event and PRI queues (§2).

PROD/CONS hold ``index | wrap << QS`` in bits [19:0]. Empty: both equal. Full: index
equal, wrap different. Every slot is usable.
"""

from __future__ import annotations

import logging

from devmodel.iommu import registers as R

log = logging.getLogger(__name__)


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


class OutputQueue(QueueRegs):
    """A queue the SMMU produces into (EVENTQ, PRIQ): PROD carries OVFLG, CONS OVACKFLG.

    The SMMU toggles OVFLG once when it drops a record on a full queue; software
    acknowledges by writing CONS with OVACKFLG equal to it (§2 of the reference). PROD is
    software-writable only while the queue's enable is not acknowledged.
    """

    def __init__(self, name: str, entry_size: int, max_log2: int) -> None:
        super().__init__(name, entry_size, max_log2)
        self.ovflg = self.ovackflg = False

    def reset(self) -> None:
        super().reset()
        self.ovflg = self.ovackflg = False

    def prod_locked(self) -> bool:
        """True while the queue enable is acknowledged and PROD writes are ignored."""
        raise NotImplementedError

    @property
    def overflow(self) -> bool:
        return self.ovflg != self.ovackflg

    def read_prod(self) -> int:
        return self.prod | (R.Q_OVFLG if self.ovflg else 0)

    def read_cons(self) -> int:
        return self.cons | (R.Q_OVFLG if self.ovackflg else 0)

    def write_prod(self, value: int) -> None:
        if self.prod_locked():
            log.info("%s_PROD write %#x ignored: queue enabled", self.name, value)
            return
        self.prod = value & R.Q_IDX_MASK
        self.ovflg = bool(value & R.Q_OVFLG)

    def write_cons(self, value: int) -> None:
        """CONS is always writable: RD advances, OVACKFLG acknowledges an overflow."""
        self.cons = value & R.Q_IDX_MASK
        self.ovackflg = bool(value & R.Q_OVFLG)

