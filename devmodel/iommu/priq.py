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

Tracing: a page request belongs to the fault of its Page Request Group
(:data:`devmodel.trace.TRACER`; the endpoint's ``endpoint.page_request`` origin). A
written record links ``("smmu.priq", slot PA)`` to that fault id before PROD moves and
the interrupt fires; every request emits one ``smmu.priq`` hop (slot index and PA, or
``dropped``, why, and the automatic response code if one was sent).
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
from devmodel.trace import TRACER

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

    def _auto(self, req: PageRequest, code: PrgResponseCode, pasid: bool, why: str) -> str:
        """Send an automatic PRG Response for ``req``; returns the code's name (for the trace)."""
        self.auto_responses += 1
        ssid = req.ssid if pasid else None
        log.info("priq: auto PRG response %s to sid=%#x prg=%d pasid=%s: %s",
                 code.name, req.sid, req.prg_index, ssid, why)
        self.respond(req.sid, ssid, req.prg_index, code)
        return code.name

    def _drop(self, fid: int, what: str, reason: str, auto: str | None = None, **detail: object) -> bool:
        """Count, log and trace a discarded request; always False."""
        self.dropped += 1
        log.info("priq: %s discarded: %s%s", what, reason, f" (auto response {auto})" if auto else "")
        TRACER.hop(fid, "smmu.priq", dropped=True, reason=reason, auto_response=auto, **detail)
        return False

    def page_request(self, req: PageRequest, trace_id: int = 0) -> bool:
        """Accept one Page Request; return True when it was written to the queue.

        ``trace_id`` is the fault id of the request's PRG (0: the page request in
        progress on this thread, born here if the endpoint did not already).
        """
        fid = trace_id or TRACER.current()
        what = (f"page request sid={req.sid:#x} ssid={req.ssid} addr={req.addr:#x} "
                f"prg={req.prg_index} L={int(req.last)} [f{fid}]")
        if not self.enabled or self.irqs.active(R.Gerror.PRIQ_ABT_ERR):
            why = "PRIQ effectively disabled" if not self.enabled else "PRIQ_ABT_ERR active"
            # The hop goes first: the auto response may reach the endpoint synchronously.
            auto = None if req.stop_marker else PrgResponseCode.RESPONSE_FAILURE
            self._drop(fid, what, why, auto.name if auto is not None else None)
            if auto is not None:
                self._auto(req, auto, False, why)
            return False
        toggled = False
        if not self.overflow and self.is_full():
            self.ovflg = toggled = not self.ovflg
            log.warning("priq: %s arrived at a full queue: OVFLG toggled to %d", what, self.ovflg)
        if self.overflow:
            respond = req.last and not req.stop_marker
            code = self._overflow_code(req) if respond else None
            self._drop(fid, what, "overflow present", code.name if code is not None else None, overflow=True,
                       ovflg_toggled=toggled)
            if code is not None:
                self._auto(req, code, code == PrgResponseCode.SUCCESS and self._pasid_in_response(req),
                           "overflow discard of Last=1")
                if self.irq_lo:
                    self.irqs.signal(IrqSource.PRIQ)
            return False
        was_empty = self.is_empty()
        slot = self.index(self.prod)
        addr = self.entry_addr(self.prod)
        try:
            self.memory.write(addr, req.encode())
        except BusError as e:
            log.warning("priq: %s write at %#x aborted (%s): PRIQ_ABT_ERR", what, addr, e)
            auto = None if req.stop_marker else PrgResponseCode.RESPONSE_FAILURE
            self._drop(fid, what, "write abort", auto.name if auto is not None else None, pa=addr)
            self.irqs.raise_gerror(R.Gerror.PRIQ_ABT_ERR)
            if auto is not None:
                self._auto(req, auto, False, "PRIQ write abort")
            return False
        TRACER.link(("smmu.priq", addr), fid)
        self.prod = self.incr(self.prod)
        self.written += 1
        log.info("priq: %s written at %#x (slot %d), PROD=%#x", what, addr, slot, self.prod)
        TRACER.hop(fid, "smmu.priq", slot=slot, pa=addr, prod=self.prod, prg=req.prg_index, last=req.last)
        if (self.irq_lo and req.last) or (not self.irq_lo and was_empty):
            self.irqs.signal(IrqSource.PRIQ)
        return True

    def _overflow_code(self, req: PageRequest) -> PrgResponseCode:
        """Success for a discarded Last=1 request; Response Failure if the STE is unusable."""
        return PrgResponseCode.RESPONSE_FAILURE if self.ste_ppar(req.sid) is None else PrgResponseCode.SUCCESS

    def _pasid_in_response(self, req: PageRequest) -> bool:
        """Overflow Success responses carry the PASID when IDR3.PPS or STE.PPAR says so (§2)."""
        return self.pps or bool(self.ste_ppar(req.sid))
