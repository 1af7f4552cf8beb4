"""Software side of an SMMU output queue (EVTQ, PRIQ): draining and overflow acknowledge.

The SMMU owns PROD, software owns CONS (reference smmuv3-pcie.md section 2). Indexes carry
a wrap bit above the LOG2SIZE index bits. Overflow is present while PROD.OVFLG differs from
CONS.OVACKFLG; software notices it when the PROD it reads shows OVFLG toggled against the
OVACKFLG it last wrote, and acknowledges by copying OVFLG into CONS.OVACKFLG after
draining (what Linux's queue_sync_prod_in / queue_sync_cons_ovf do).
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol

from devmodel.iommu import registers as R
from devmodel.memory import Memory

log = logging.getLogger(__name__)


class SmmuMmio(Protocol):
    """The SMMU's register interface: all the host driver touches besides memory."""

    def read_reg(self, offset: int, size: int = 4) -> int: ...

    def write_reg(self, offset: int, value: int, size: int = 4) -> None: ...


class OutputQueue:
    """One SMMU->software queue in host memory: ``base`` with 2^``log2`` records."""

    def __init__(self, name: str, mmio: SmmuMmio, memory: Memory, base: int, log2: int,
                 entry_size: int, prod_reg: int, cons_reg: int) -> None:
        self.name = name
        self.mmio = mmio
        self.memory = memory
        self.base = base
        self.log2 = log2
        self.entry_size = entry_size
        self.prod_reg = prod_reg
        self.cons_reg = cons_reg
        self.cons = 0
        self.ovack = 0

    @property
    def entries(self) -> int:
        return 1 << self.log2

    def _wrap_mask(self) -> int:
        return (1 << (self.log2 + 1)) - 1

    def reset(self) -> None:
        """Initial PROD/CONS (written while the queue is disabled)."""
        self.cons = 0
        self.ovack = 0
        self.mmio.write_reg(self.prod_reg, 0)
        self.mmio.write_reg(self.cons_reg, 0)

    def drain(self, handle: Callable[[bytes, int], None], on_overflow: Callable[[], None]) -> int:
        """Consume every record up to PROD (re-reading PROD until it stops moving);
        ``handle(record, slot_address)`` gets each one (the slot address is the trace
        correlation key the SMMU linked when it wrote the record); returns the number handled. An overflow seen in PROD is reported through
        ``on_overflow`` once, *after* the records written before it were handled, and
        then acknowledged (CONS.OVACKFLG = PROD.OVFLG)."""
        handled = 0
        mask = self._wrap_mask()
        while True:
            prod = self.mmio.read_reg(self.prod_reg)
            ovflg = prod & R.Q_OVFLG
            while (self.cons & mask) != (prod & mask):
                addr = self.base + (self.cons & (self.entries - 1)) * self.entry_size
                record = self.memory.read(addr, self.entry_size)
                self.cons = (self.cons + 1) & mask
                # Free the slot before handling: handling may cause more records.
                self.mmio.write_reg(self.cons_reg, self.cons | self.ovack)
                handle(record, addr)
                handled += 1
            if ovflg != self.ovack:
                log.warning("%s: overflow detected (PROD=%#x): records were lost", self.name, prod)
                on_overflow()
                self.ovack = ovflg
                self.mmio.write_reg(self.cons_reg, self.cons | self.ovack)
            if (self.mmio.read_reg(self.prod_reg) & mask) == (self.cons & mask):
                return handled
