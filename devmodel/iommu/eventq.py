"""The Event queue: 32-byte records written by the SMMU, consumed by software (§2, §3).

Writable when EVENTQEN=1, not full and EVENTQ_ABT_ERR inactive. A record that cannot be
written is discarded; if the reason was "full", OVFLG toggles once (only when no
overflow is already present: PROD.OVFLG == CONS.OVACKFLG). An unacknowledged overflow
does not stop recording: new records are written as soon as space frees up. Records
dropped because EVENTQEN=0 do not signal overflow. The interrupt fires on empty ->
non-empty, after PROD is updated.

Tracing: every record belongs to a fault (:data:`devmodel.trace.TRACER`). A written
record links ``("smmu.evtq", slot PA)`` to its fault id before PROD moves and the
interrupt fires, so the consumer can :meth:`~devmodel.trace.Tracer.take` it; each
record also emits one ``smmu.evtq`` hop (slot index and PA, or ``dropped`` and why).
"""

from __future__ import annotations

import logging

from devmodel.iommu import registers as R
from devmodel.iommu.irq import Interrupts, IrqSource
from devmodel.iommu.queue import OutputQueue
from devmodel.iommu.records import EVENT_SIZE, decode_event
from devmodel.memory import BusError, Memory
from devmodel.trace import TRACER

log = logging.getLogger(__name__)


class EventQueue(OutputQueue):
    """EVENTQ_BASE / EVENTQ_PROD (Page 1) / EVENTQ_CONS (Page 1)."""

    def __init__(self, memory: Memory, irqs: Interrupts, max_log2: int) -> None:
        super().__init__("eventq", EVENT_SIZE, max_log2)
        self.memory = memory
        self.irqs = irqs
        self.enabled = False
        self.written = 0
        self.dropped = 0

    def reset(self) -> None:
        super().reset()
        self.enabled = False

    def prod_locked(self) -> bool:
        return self.enabled

    def record(self, data: bytes, trace_id: int = 0) -> bool:
        """Try to write one event record; return True when it reached the queue.

        ``trace_id`` is the fault id of the transaction (0: the access in progress on
        this thread, born here if nobody reported it yet).
        """
        fid = trace_id or TRACER.current()
        ev = decode_event(data)
        what = f"event {ev.EventID:#04x} sid={ev.StreamID:#x} addr={ev.InputAddr:#x} [f{fid}]"
        if not self.enabled:
            return self._drop(fid, what, "EVENTQEN=0", "(no overflow signalled)")
        if self.irqs.active(R.Gerror.EVENTQ_ABT_ERR):
            return self._drop(fid, what, "EVENTQ_ABT_ERR active")
        if self.is_full():
            toggled = not self.overflow
            if toggled:
                self.ovflg = not self.ovflg
                log.warning("eventq: queue full, OVFLG toggled to %d", self.ovflg)
            return self._drop(fid, what, "full", "(OVFLG toggled)" if toggled else "(overflow already signalled)",
                              overflow=True, ovflg_toggled=toggled)
        was_empty = self.is_empty()
        slot = self.index(self.prod)
        addr = self.entry_addr(self.prod)
        try:
            self.memory.write(addr, data)
        except BusError as e:
            log.warning("eventq: %s write at %#x aborted (%s): EVENTQ_ABT_ERR", what, addr, e)
            self._drop(fid, what, "write abort", pa=addr)
            self.irqs.raise_gerror(R.Gerror.EVENTQ_ABT_ERR)
            return False
        TRACER.link(("smmu.evtq", addr), fid)
        self.prod = self.incr(self.prod)
        self.written += 1
        log.info("eventq: %s written at %#x (slot %d), PROD=%#x", what, addr, slot, self.prod)
        TRACER.hop(fid, "smmu.evtq", slot=slot, pa=addr, prod=self.prod, event=ev.EventID)
        if was_empty:
            self.irqs.signal(IrqSource.EVENTQ)
        return True

    def _drop(self, fid: int, what: str, reason: str, note: str = "", **detail: object) -> bool:
        """Discard a record (counted, logged, traced); always False."""
        self.dropped += 1
        log.info("eventq: %s discarded: %s %s", what, reason, note)
        TRACER.hop(fid, "smmu.evtq", dropped=True, reason=reason, **detail)
        return False
