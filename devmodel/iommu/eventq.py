"""The Event queue: 32-byte records written by the SMMU, consumed by software (§2, §3).

Writable when EVENTQEN=1, not full and EVENTQ_ABT_ERR inactive. A record that cannot be
written is discarded; if the reason was "full", OVFLG toggles once (only when no
overflow is already present: PROD.OVFLG == CONS.OVACKFLG). An unacknowledged overflow
does not stop recording: new records are written as soon as space frees up. Records
dropped because EVENTQEN=0 do not signal overflow. The interrupt fires on empty ->
non-empty, after PROD is updated.
"""

from __future__ import annotations

import logging

from devmodel.iommu import registers as R
from devmodel.iommu.irq import Interrupts, IrqSource
from devmodel.iommu.queue import OutputQueue
from devmodel.iommu.records import EVENT_SIZE, decode_event
from devmodel.memory import BusError, Memory

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
        """Try to write one event record; return True when it reached the queue."""
        ev = decode_event(data)
        what = f"event {ev.EventID:#04x} sid={ev.StreamID:#x} addr={ev.InputAddr:#x} [t{trace_id}]"
        if not self.enabled:
            self.dropped += 1
            log.info("eventq: %s discarded: EVENTQEN=0 (no overflow signalled)", what)
            return False
        if self.irqs.active(R.Gerror.EVENTQ_ABT_ERR):
            self.dropped += 1
            log.info("eventq: %s discarded: EVENTQ_ABT_ERR active", what)
            return False
        if self.is_full():
            self.dropped += 1
            if not self.overflow:
                self.ovflg = not self.ovflg
                log.warning("eventq: %s discarded: queue full, OVFLG toggled to %d", what, self.ovflg)
            else:
                log.info("eventq: %s discarded: queue full, overflow already signalled", what)
            return False
        was_empty = self.is_empty()
        addr = self.entry_addr(self.prod)
        try:
            self.memory.write(addr, data)
        except BusError as e:
            self.dropped += 1
            log.warning("eventq: %s write at %#x aborted (%s): EVENTQ_ABT_ERR", what, addr, e)
            self.irqs.raise_gerror(R.Gerror.EVENTQ_ABT_ERR)
            return False
        self.prod = self.incr(self.prod)
        self.written += 1
        log.info("eventq: %s written at %#x, PROD=%#x", what, addr, self.prod)
        if was_empty:
            self.irqs.signal(IrqSource.EVENTQ)
        return True
