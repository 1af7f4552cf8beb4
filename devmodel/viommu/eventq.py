"""The guest's Event queue: 32-byte records the vIOMMU writes, the guest consumes.

SMMUv3 rules (smmuv3-pcie.md section 2, "Full Event queue"): writable while EVENTQEN=1,
not full and EVENTQ_ABT_ERR inactive. A record that cannot be written is discarded; only
a *full* queue enters the overflow condition (OVFLG toggles once, when none is present);
records dropped because EVENTQEN=0 signal nothing. Recording goes on as space frees up.
The EVENTQ interrupt (MSI-X vector 0, gated by IRQ_CTRL.EVENTQ_IRQEN) fires on empty ->
non-empty, after PROD moved. A failed write raises GERROR.EVENTQ_ABT_ERR.
"""

from __future__ import annotations

import enum
import logging
from typing import Callable

from devmodel.iommu.records import EVENT_SIZE, decode_event
from devmodel.memory import BusError, Memory
from devmodel.trace import TRACER
from devmodel.viommu.outq import GuestOutputQueue
from devmodel.viommu.registers import QUEUE_LOG2_MAX

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    WRITTEN = "written"
    FULL = "full"
    DISABLED = "disabled"
    ABORT = "abort"


class GuestEventQueue(GuestOutputQueue):
    """EVENTQ_BASE / EVENTQ_PROD / EVENTQ_CONS of the vIOMMU."""

    def __init__(self, dma: Callable[[], Memory], writable: Callable[[], bool],
                 on_abort: Callable[[], None], irq: Callable[[], None]) -> None:
        super().__init__("evtq", EVENT_SIZE, QUEUE_LOG2_MAX, dma)
        self.writable = writable  # EVENTQEN acknowledged and EVENTQ_ABT_ERR inactive
        self.on_abort = on_abort
        self.irq = irq

    def record(self, data: bytes, fault: int = 0) -> Outcome:
        """Try to write one event record (SMMUv3 discard/overflow rules)."""
        ev = decode_event(data)
        what = f"event {ev.EventID:#04x} vsid={ev.StreamID:#x} addr={ev.InputAddr:#x}"
        if not self.enabled or not self.writable():
            log.info("guest evtq: %s discarded: queue not writable (no overflow signalled)", what)
            return Outcome.DISABLED
        if self.is_full():
            toggled = self.signal_overflow()
            TRACER.hop(fault, "guest.overflow", queue="evtq", ovflg=int(self.ovflg), toggled=toggled)
            log.warning("guest evtq: %s discarded: queue full", what)
            return Outcome.FULL
        was_empty = self.is_empty()
        try:
            addr = self.put(data, fault)
        except BusError as e:
            log.warning("guest evtq: %s: write aborted (%s): EVENTQ_ABT_ERR", what, e)
            self.on_abort()
            return Outcome.ABORT
        TRACER.hop(fault, "guest.evtq", slot_gpa=addr, prod=self.prod, vsid=ev.StreamID)
        log.info("guest evtq: %s written at GPA %#x, PROD=%#x", what, addr, self.prod)
        if was_empty:
            self.irq()
        return Outcome.WRITTEN
