"""The PRI queue: 16-byte Page Request records (Chapter 8; reference §2, §4.1).

Differences from the Event queue that matter (pitfall 2):

* writable only while effective PRIQEN (PRIQEN && SMMUEN) = 1, PRIQ_ABT_ERR inactive,
  **no overflow present** and not full;
* a request arriving at a full queue toggles OVFLG; while the overflow is present *every*
  request is discarded; a discarded request with Last=1 gets an automatic PRG Response
  Success (Response Failure if its STE cannot be checked); Last=0 and Stop Markers get
  nothing;
* with PRIQEN effectively 0 or PRIQ_ABT_ERR active, each request gets an automatic
  Response Failure without PASID and nothing is written (§8.2).

The interrupt follows PRIQ_IRQ_CFG2.LO: 0 = empty -> non-empty, 1 = only when a Last=1
request is written or discarded by overflow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from devmodel.iommu import registers as R
from devmodel.iommu.irq import Interrupts, IrqSource
from devmodel.iommu.queue import OutputQueue
from devmodel.iommu.records import PRI, PRI_SIZE, PrgResponseCode
from devmodel.memory import BusError, Memory

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PageRequest:
    """One PCIe Page Request Message as it reaches the SMMU."""

    sid: int
    ssid: int | None
    addr: int
    prg_index: int
    last: bool
    read: bool
    write: bool
    exec_: bool = False
    priv: bool = False

    @property
    def stop_marker(self) -> bool:
        """L=1, W=0, R=0 with a PASID is a Stop Marker (no response)."""
        return self.ssid is not None and self.last and not self.read and not self.write

    def encode(self) -> bytes:
        ssv = self.ssid is not None
        return PRI.encode(StreamID=self.sid, SubstreamID=self.ssid or 0, SSV=int(ssv),
                          Priv=int(self.priv and ssv), Exec=int(self.exec_ and ssv),
                          R=int(self.read), W=int(self.write), L=int(self.last),
                          PRGIndex=self.prg_index, PageAddr=self.addr & ~0xFFF)


#: respond(sid, ssid or None, prg_index, PCIe response code)
Responder = Callable[[int, "int | None", int, PrgResponseCode], None]
#: ppar(sid) -> STE.PPAR, or None when the STE cannot be checked
SteChecker = Callable[[int], "bool | None"]


class PriQueue(OutputQueue):
    """PRIQ_BASE / PRIQ_PROD (Page 1) / PRIQ_CONS (Page 1)."""

    def __init__(self, memory: Memory, irqs: Interrupts, max_log2: int, pps: bool,
                 respond: Responder, ste_ppar: SteChecker) -> None:
        super().__init__("priq", PRI_SIZE, max_log2)
        self.memory = memory
        self.irqs = irqs
        self.pps = pps
        self.respond = respond
        self.ste_ppar = ste_ppar
        self.enabled = False  # effective PRIQEN (PRIQEN && SMMUEN)
        self.guard = False  # the real PRIQEN ACK, which guards PROD/BASE writes
        self.irq_lo = False
        self.written = 0
        self.dropped = 0
        self.auto_responses = 0

    def reset(self) -> None:
        super().reset()
        self.enabled = self.guard = False

    def prod_locked(self) -> bool:
        return self.guard

    def _auto(self, req: PageRequest, code: PrgResponseCode, pasid: bool, why: str) -> None:
        self.auto_responses += 1
        ssid = req.ssid if pasid else None
        log.info("priq: auto PRG response %s to sid=%#x prg=%d pasid=%s: %s",
                 code.name, req.sid, req.prg_index, ssid, why)
        self.respond(req.sid, ssid, req.prg_index, code)

    def page_request(self, req: PageRequest, trace_id: int = 0) -> bool:
        """Accept one Page Request; return True when it was written to the queue."""
        what = (f"page request sid={req.sid:#x} ssid={req.ssid} addr={req.addr:#x} "
                f"prg={req.prg_index} L={int(req.last)} [t{trace_id}]")
        if not self.enabled or self.irqs.active(R.Gerror.PRIQ_ABT_ERR):
            self.dropped += 1
            why = "PRIQ effectively disabled" if not self.enabled else "PRIQ_ABT_ERR active"
            if not req.stop_marker:
                self._auto(req, PrgResponseCode.RESPONSE_FAILURE, False, why)
            else:
                log.info("priq: %s (stop marker) discarded: %s", what, why)
            return False
        if not self.overflow and self.is_full():
            self.ovflg = not self.ovflg
            log.warning("priq: %s arrived at a full queue: OVFLG toggled to %d", what, self.ovflg)
        if self.overflow:
            self.dropped += 1
            log.info("priq: %s discarded: overflow present", what)
            if req.last and not req.stop_marker:
                self._overflow_response(req)
                if self.irq_lo:
                    self.irqs.signal(IrqSource.PRIQ)
            return False
        was_empty = self.is_empty()
        addr = self.entry_addr(self.prod)
        try:
            self.memory.write(addr, req.encode())
        except BusError as e:
            self.dropped += 1
            log.warning("priq: %s write at %#x aborted (%s): PRIQ_ABT_ERR", what, addr, e)
            self.irqs.raise_gerror(R.Gerror.PRIQ_ABT_ERR)
            if not req.stop_marker:
                self._auto(req, PrgResponseCode.RESPONSE_FAILURE, False, "PRIQ write abort")
            return False
        self.prod = self.incr(self.prod)
        self.written += 1
        log.info("priq: %s written at %#x, PROD=%#x", what, addr, self.prod)
        if (self.irq_lo and req.last) or (not self.irq_lo and was_empty):
            self.irqs.signal(IrqSource.PRIQ)
        return True

    def _overflow_response(self, req: PageRequest) -> None:
        """Success for a discarded Last=1 request; Response Failure if the STE is unusable."""
        ppar = self.ste_ppar(req.sid)
        if ppar is None:
            self._auto(req, PrgResponseCode.RESPONSE_FAILURE, False, "overflow; STE cannot be checked")
        else:
            self._auto(req, PrgResponseCode.SUCCESS, self.pps or ppar, "overflow discard of Last=1")
