"""The guest's PRI queue: one 16-byte record per page request of a FAULT group.

SMMUv3 rules (smmuv3-pcie.md section 2, "Full PRI queue"; section 8.2): writable while
effective PRIQEN (PRIQEN && SMMUEN) = 1, PRIQ_ABT_ERR inactive, **no overflow present**
and not full. A request arriving at a full queue toggles OVFLG; while the overflow is
present every request is discarded, and a discarded Last=1 request is answered Success
automatically. While PRIQ is effectively disabled (or PRIQ_ABT_ERR is active) each
request is answered Response Failure and nothing is written. The PRIQ interrupt (MSI-X
vector 1, gated by IRQ_CTRL.PRIQ_IRQEN) follows PRIQ_IRQ_CFG2.LO: empty -> non-empty, or
only on written Last=1 requests (and discarded ones) when LO=1.
"""

from __future__ import annotations

import enum
import logging
from typing import Callable

from devmodel.iommu.records import PRI, PRI_SIZE
from devmodel.memory import BusError, Memory
from devmodel.trace import TRACER
from devmodel.viommu.outq import GuestOutputQueue
from devmodel.viommu.registers import QUEUE_LOG2_MAX

log = logging.getLogger(__name__)


class PriOutcome(enum.Enum):
    WRITTEN = "written"
    OVERFLOW = "overflow"    # discarded: Last=1 needs the automatic Success
    DISABLED = "disabled"    # discarded: every request needs Response Failure
    ABORT = "abort"          # write aborted: PRIQ_ABT_ERR, Response Failure


class GuestPriQueue(GuestOutputQueue):
    """PRIQ_BASE / PRIQ_PROD / PRIQ_CONS of the vIOMMU."""

    def __init__(self, dma: Callable[[], Memory], writable: Callable[[], bool],
                 last_only: Callable[[], bool], on_abort: Callable[[], None],
                 irq: Callable[[], None]) -> None:
        super().__init__("priq", PRI_SIZE, QUEUE_LOG2_MAX, dma)
        self.writable = writable  # effective PRIQEN and PRIQ_ABT_ERR inactive
        self.last_only = last_only
        self.on_abort = on_abort
        self.irq = irq

    def record(self, record: bytes, last: bool, fault: int = 0) -> PriOutcome:
        """Try to write one PRI record; the caller answers discarded groups."""
        rec = PRI.decode(record)
        what = f"ppr vsid={rec.StreamID:#x} prg={rec.PRGIndex} addr={rec.PageAddr:#x} L={rec.L}"
        if not self.enabled or not self.writable():
            log.info("guest priq: %s discarded: PRIQ effectively disabled", what)
            return PriOutcome.DISABLED
        if not self.overflow and self.is_full():
            self.signal_overflow()
        if self.overflow:
            TRACER.hop(fault if last else 0, "guest.overflow", queue="priq", ovflg=int(self.ovflg))
            log.info("guest priq: %s discarded: overflow present", what)
            if last and self.last_only():
                self.irq()
            return PriOutcome.OVERFLOW
        was_empty = self.is_empty()
        try:
            addr = self.put(record, fault if last else 0)
        except BusError as e:
            log.warning("guest priq: %s: write aborted (%s): PRIQ_ABT_ERR", what, e)
            self.on_abort()
            return PriOutcome.ABORT
        if last:
            TRACER.hop(fault, "guest.priq", slot_gpa=addr, prod=self.prod, vsid=rec.StreamID,
                       prg=rec.PRGIndex)
        log.info("guest priq: %s written at GPA %#x, PROD=%#x", what, addr, self.prod)
        if (self.last_only() and last) or (not self.last_only() and was_empty):
            self.irq()
        return PriOutcome.WRITTEN
