"""What the guest's two output queues (EVTQ, PRIQ) share: the overflow flag, slot writes
into guest memory, and "guest.consumed" trace hops when the guest's CONS passes a slot.

Index arithmetic, OVFLG/OVACKFLG and the PROD guard come from
:class:`devmodel.iommu.queue.OutputQueue` (reference smmuv3-pcie.md section 2).
"""

from __future__ import annotations

import logging
from typing import Callable

from devmodel.iommu.queue import OutputQueue
from devmodel.memory import BusError, Memory
from devmodel.trace import TRACER

log = logging.getLogger(__name__)


class GuestOutputQueue(OutputQueue):
    """A vIOMMU -> guest queue in guest RAM, written through the function's DMA port."""

    def __init__(self, name: str, entry_size: int, max_log2: int,
                 dma: Callable[[], Memory]) -> None:
        super().__init__(name, entry_size, max_log2)
        self.dma = dma
        self.enabled = False  # the queue's CR0 enable, acknowledged
        self.slot_faults: dict[int, int] = {}
        self.overflow_signals = 0  # OVFLG toggles since construction (never reset)

    def reset(self) -> None:
        super().reset()
        self.enabled = False
        self.slot_faults = {}

    def prod_locked(self) -> bool:
        return self.enabled

    def signal_overflow(self) -> bool:
        """Toggle OVFLG, but only when no overflow is already present; True if toggled."""
        if self.overflow:
            return False
        self.ovflg = not self.ovflg
        self.overflow_signals += 1
        log.warning("guest %s: overflow: OVFLG toggled to %d", self.name, self.ovflg)
        return True

    def put(self, record: bytes, fault: int) -> int:
        """Write ``record`` at PROD and advance PROD; the slot's guest physical address.

        Raises BusError when the guest's queue memory does not answer (the caller raises
        the queue's *_ABT_ERR)."""
        addr = self.entry_addr(self.prod)
        self.dma().write(addr, record)
        if fault:
            self.slot_faults[self.index(self.prod)] = fault
        self.prod = self.incr(self.prod)
        return addr

    def write_cons(self, value: int) -> None:
        """CONS always writable; every slot RD moves past was consumed by the guest."""
        old = self.wrapped(self.cons)
        super().write_cons(value)
        passed = (self.wrapped(self.cons) - old) & self._ptr_mask()
        for i in range(min(passed, self.entries)):
            slot = self.index(old + i)
            fault = self.slot_faults.pop(slot, 0)
            TRACER.hop(fault, "guest.consumed", queue=self.name, slot=slot)


__all__ = ["GuestOutputQueue", "BusError"]
