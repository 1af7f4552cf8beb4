"""An endpoint's DMA port: untranslated / ATS-translated memory requests through the SMMU,
the endpoint's ATC, and its Page Request Interface (PRG bookkeeping and credits).

Every endpoint model (the DMA engine, the NIC) issues its memory traffic through one
:class:`DmaPort`, so the ATS/PRI/SMMU machinery and the fault traces exist once:

* ATS disabled: untranslated traffic through :meth:`SMMUv3.translate`; a fault aborts the
  access (the SMMU has recorded the event) and raises :class:`DmaFault` (TRANSLATION).
* ATS enabled: ATS Translation Requests fill a small ATC (dropped by CMD_ATC_INV or when
  ATS is disabled), then ATS-Translated accesses go to memory. A completion that grants
  no access is a *recoverable* fault (ATS_NO_ACCESS): the owner may send a Page Request
  Group with :meth:`DmaPort.send_prg` and retry after the PRG Response.
* PRI (PCIe §10.4/§10.5, reference smmuv3-pcie.md §8.5/§8.6): PRG index allocation
  (9 bits, never reused while outstanding), credits (never more outstanding requests than
  the PRI Allocation), Response Failure latching RF, unexpected indexes setting UPRGI,
  PRI Reset discarding outstanding groups.

Fault traces (:data:`devmodel.trace.TRACER`): the owner's run loop opens one
``TRACER.origin("endpoint.dma")`` scope with :meth:`DmaPort.scope`; every access re-arms
it (its own timestamp and detail), so a fault the SMMU detects is born with the access as
its first hop. Fault ids met while :attr:`DmaPort.sink` is a list are appended to it, so
the owner can give each the ``endpoint.complete`` hop when its work item completes. A
non-recoverable fault nobody below reported (bus error, refused translated access) is
born here; an ATS no-access fault is born by the owner if it does not send a PRG for it
(:meth:`DmaPort.birth`). Each PRG runs in a ``TRACER.origin("endpoint.page_request")``
scope; its fault id is kept with the PRG, so the response gets ``endpoint.prg_response``.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

from devmodel.iommu.faults import Access, AtsStatus
from devmodel.iommu.records import PrgResponseCode
from devmodel.memory import BusError, Memory
from devmodel.trace import TRACER

log = logging.getLogger(__name__)

PAGE = 4096
PRG_INDEX_COUNT = 512  # 9-bit PRG Index
DMA_HOP = "endpoint.dma"
PAGE_REQUEST_HOP = "endpoint.page_request"
ACCESS_NAME = {Access.READ: "read", Access.WRITE: "write", Access.EXEC: "exec"}

PrgResponseHandler = Callable[[int | None, int, PrgResponseCode], None]


class PriPort(Protocol):
    """What an endpoint needs from the PRI extended capability (PCIe §10.5.2)."""

    @property
    def enabled(self) -> bool: ...

    @property
    def allocation(self) -> int: ...

    @property
    def response_failure(self) -> bool: ...

    def set_response_failure(self) -> None: ...

    def set_unexpected_prg_index(self) -> None: ...


class AtsPort(Protocol):
    """What an endpoint needs from the ATS extended capability."""

    @property
    def enabled(self) -> bool: ...


@dataclass
class SimplePri:
    """A plain PRI state holder implementing :class:`PriPort` (Enable 0->1 clears RF/UPRGI)."""

    allocation: int = 32
    response_failure: bool = False
    unexpected_prg_index: bool = False
    _enabled: bool = True

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if value and not self._enabled:
            self.response_failure = self.unexpected_prg_index = False
        self._enabled = value

    def set_response_failure(self) -> None:
        self.response_failure = True

    def set_unexpected_prg_index(self) -> None:
        self.unexpected_prg_index = True


@dataclass
class SimpleAts:
    enabled: bool = True


class FaultKind(enum.Enum):
    """Why a memory request could not be performed (the owner maps it to its status/counter)."""

    TRANSLATION = "translation"  # SMMU refused an untranslated access (event recorded there)
    ATS_NO_ACCESS = "ats_no_access"  # ATS completion without the permission (PRI candidate)
    ATS_ERROR = "ats_error"  # ATS completion UR / CA
    BUS_ERROR = "bus_error"  # bus master disabled, or the memory behind the PA failed
    TRANSLATED_REFUSED = "translated_refused"  # ATS-Translated access refused by the SMMU


class DmaFault(Exception):
    """A memory request that could not be performed."""

    def __init__(self, kind: FaultKind, addr: int, access: Access, reason: str, recoverable: bool = False,
                 event: int = 0) -> None:
        super().__init__(reason)
        self.kind = kind
        self.addr = addr
        self.access = access
        self.reason = reason
        self.recoverable = recoverable
        self.event = event  # SMMU event ID when the SMMU recorded one (0 otherwise)
        self.fault_id = 0  # trace fault id of the access (0: nobody reported it)
        self.origin: tuple[str, int, dict] | None = None  # (hop, t_ns, detail) of the access


@dataclass
class Prg:
    """One outstanding Page Request Group."""

    index: int
    ssid: int | None
    pages: list[tuple[int, bool, bool]] = field(default_factory=list)  # (page, R, W)
    fault: int = 0  # trace fault id of the group

    @property
    def count(self) -> int:
        return len(self.pages)


class DmaPort:
    """Memory requests, ATC and PRI state of one endpoint (StreamID ``sid``)."""

    def __init__(self, smmu, sid: int, dma: Memory, *, pri: PriPort | None = None, ats: AtsPort | None = None,
                 may_master: Callable[[], bool] | None = None, prg_response: PrgResponseHandler | None = None,
                 name: str = "endpoint") -> None:
        """``prg_response`` receives every PRG Response Message for ``sid`` (the owner queues
        it and calls :meth:`take_response` from its run loop); ``may_master`` gates every
        request (ATS Translation Requests too): False fails it with BUS_ERROR before it
        reaches the SMMU."""
        self.smmu = smmu
        self.sid = sid
        self.dma = dma
        self.pri = pri
        self.ats = ats
        self.may_master = may_master
        self.name = name
        #: Fault ids of the accesses made while this is a list (the owner's work item).
        self.sink: list[int] | None = None
        self._origin = None
        self._atc: dict[tuple[int | None, int], tuple[int, int, bool, bool]] = {}
        self._prgs: dict[int, Prg] = {}
        self._next_prg = 0
        self._outstanding = 0
        self.reset()
        smmu.register_endpoint(sid, prg_response=prg_response, atc_invalidate=self.on_atc_invalidate)

    def reset(self) -> None:
        """Function reset: no PRG outstanding, no credit used, empty ATC."""
        self._prgs.clear()
        self._next_prg = 0
        self._set_outstanding(0)
        self._atc.clear()
        self.sink = None

    # ------------------------------------------------------------ trace scope
    @contextmanager
    def scope(self) -> Iterator[None]:
        """One ``endpoint.dma`` origin scope for a run loop; each access re-arms it."""
        if self._origin is not None:  # nested run: the outer scope serves
            yield
            return
        with TRACER.origin(DMA_HOP, sid=self.sid) as self._origin:
            try:
                yield
            finally:
                self._origin = None

    @staticmethod
    def birth(f: DmaFault) -> int:
        """Give a fault nobody below reported (an ATS no-access that gets no PRG) its trace id."""
        if not f.fault_id and f.origin is not None:
            hop, t_ns, detail = f.origin
            f.fault_id = TRACER.begin(hop, _t_ns=t_ns, **detail)
        return f.fault_id

    # ------------------------------------------------------------ memory requests
    def read(self, pasid: int | None, iova: int, n: int, priv: bool = False) -> bytes:
        out = bytearray()
        while len(out) < n:
            out += self.access(pasid, iova + len(out), Access.READ, priv, n - len(out), None)
        return bytes(out)

    def write(self, pasid: int | None, iova: int, data: bytes, priv: bool = False) -> None:
        done = 0
        view = memoryview(data)
        while done < len(data):
            done += self.access(pasid, iova + done, Access.WRITE, priv, len(data) - done, view[done:])

    def access(self, pasid: int | None, iova: int, access: Access, priv: bool, n: int, data) -> Any:
        """One memory request (up to the end of its page): bytes read, or bytes written."""
        origin = self._origin
        if origin is None:  # called outside a run loop
            with self.scope():
                return self.access(pasid, iova, access, priv, n, data)
        origin.rearm(TRACER.clock(), ssid=pasid, addr=iova, access=ACCESS_NAME[access])
        try:
            if self.may_master is not None and not self.may_master():
                raise DmaFault(FaultKind.BUS_ERROR, iova, access, "bus master disabled")
            pa, valid = self._translate(pasid, iova, access, priv)
            k = min(valid, n)
            if data is None:
                return bytes(k) if pa is None else self.dma.read(pa, k)
            if pa is not None:
                self.dma.write(pa, bytes(data[:k]))
            return k
        except BusError as e:
            f = DmaFault(FaultKind.BUS_ERROR, iova, access, str(e))
            self._traced_fault(f, origin)
            raise f from None
        except DmaFault as f:
            self._traced_fault(f, origin)
            raise
        finally:
            if origin.fault and self.sink is not None:
                self.sink.append(origin.fault)

    @staticmethod
    def _traced_fault(f: DmaFault, origin) -> None:
        """Snapshot the access's trace origin; a non-recoverable fault nobody reported is born here."""
        if not origin.fault and not f.recoverable:
            TRACER.current()
        f.fault_id = origin.fault
        f.origin = (origin.hop, origin.t_ns, dict(origin.detail))

    def _translate(self, pasid: int | None, iova: int, access: Access, priv: bool) -> tuple[int | None, int]:
        """Return (pa, bytes valid) or (None, n) for RAZ/WI; raise DmaFault."""
        if self.ats is not None and self.ats.enabled:
            return self._ats(pasid, iova, access, priv)
        r = self.smmu.translate(self.sid, pasid, iova, 1, access, priv)
        if r.ok:
            return r.pa, r.length if r.length > 1 else PAGE - (iova & (PAGE - 1))
        if r.raz_wi:
            return None, PAGE - (iova & (PAGE - 1))
        ev = int(r.fault.event) if r.fault.event is not None else 0
        raise DmaFault(FaultKind.TRANSLATION, iova, access, f"SMMU {r.fault.name}: {r.fault.reason}", event=ev)

    def _ats(self, pasid: int | None, iova: int, access: Access, priv: bool) -> tuple[int, int]:
        page = iova & ~(PAGE - 1)
        hit = self._atc.get((pasid, page))
        if hit is None:
            c = self.smmu.ats_translate(self.sid, pasid, iova, priv, access is Access.WRITE, access is Access.EXEC)
            if c.status != AtsStatus.SUCCESS:
                raise DmaFault(FaultKind.ATS_ERROR, iova, access, f"ATS translation completion {c.status.name}")
            if c.r or c.w:
                size = c.size
                base_va = iova & ~(size - 1)
                hit = (c.translated_addr + (page - base_va), PAGE, c.r, c.w)
                self._atc[(pasid, page)] = hit
            else:
                hit = (0, PAGE, False, False)
        pa_page, _, r, w = hit
        if not (w if access is Access.WRITE else r):
            raise DmaFault(FaultKind.ATS_NO_ACCESS, iova, access, "ATS completion grants no access",
                           recoverable=True)
        pa = pa_page | (iova & (PAGE - 1))
        if not self.smmu.translated_access(self.sid, pa, access):
            raise DmaFault(FaultKind.TRANSLATED_REFUSED, iova, access, "ATS-Translated access refused by the SMMU")
        return pa, PAGE - (iova & (PAGE - 1))

    def lacks_access(self, pasid: int | None, addr: int, access: Access, priv: bool = False) -> bool:
        """Would ``addr`` fault recoverably (ATS no-access)? For gathering a PRG's pages."""
        try:
            self._ats(pasid, addr, access, priv)
        except DmaFault as g:
            return g.recoverable
        return False

    # ------------------------------------------------------------ ATC
    def flush_atc(self) -> None:
        """Drop every cached translation (ATS disabled: the ATC contents become stale)."""
        if self._atc:
            log.info("%s sid=%#x: ATC flushed (%d entries)", self.name, self.sid, len(self._atc))
        self._atc.clear()

    def on_atc_invalidate(self, ssid: int | None, addr: int, length: int, global_: bool) -> bool:
        """ATS Invalidation Request: drop cached translations in [addr, addr+length)."""
        end = addr + length
        doomed = [k for k, v in self._atc.items()
                  if (ssid is None or k[0] == ssid) and k[1] < end and addr < k[1] + v[1]]
        for k in doomed:
            del self._atc[k]
        log.info("%s sid=%#x: ATC invalidate ssid=%s %#x+%#x dropped %d entries", self.name, self.sid, ssid, addr,
                 length, len(doomed))
        return True

    # ------------------------------------------------------------ PRI
    @property
    def waiting_prg(self) -> bool:
        return bool(self._prgs)

    @property
    def outstanding(self) -> int:
        """Page requests sent and not yet answered (for PRI Status.Stopped)."""
        return self._outstanding

    def _set_outstanding(self, n: int) -> None:
        self._outstanding = n
        note = getattr(self.pri, "note_outstanding", None)
        if note is not None:
            note(n)

    def pri_unavailable(self) -> str | None:
        """Why no page request may be sent now (None: PRI usable, credits left)."""
        pri = self.pri
        if pri is None:
            return "no PRI capability"
        if not pri.enabled:
            return "PRI disabled"
        if pri.response_failure:
            return "PRI Response Failure latched (RF)"
        if self.credits <= 0:
            return f"no PRI credits (allocation {pri.allocation})"
        return None

    @property
    def credits(self) -> int:
        return (self.pri.allocation - self._outstanding) if self.pri is not None else 0

    def _alloc_prg_index(self) -> int | None:
        for i in range(PRG_INDEX_COUNT):
            idx = (self._next_prg + i) % PRG_INDEX_COUNT
            if idx not in self._prgs:
                self._next_prg = (idx + 1) % PRG_INDEX_COUNT
                return idx
        return None

    def send_prg(self, pasid: int | None, pages: list[tuple[int, bool, bool]], priv: bool = False,
                 **detail: Any) -> Prg | None:
        """Send one Page Request Group for ``pages`` (already within :attr:`credits`).

        Returns the outstanding group (its ``fault`` is the group's trace id), or None when
        no PRG index is free. ``detail`` goes into the ``endpoint.page_request`` hop.
        """
        index = self._alloc_prg_index()
        if index is None or not pages:
            log.warning("%s sid=%#x: no free PRG index: page request not sent", self.name, self.sid)
            return None
        prg = Prg(index, pasid, list(pages))
        self._prgs[index] = prg
        self._set_outstanding(self._outstanding + prg.count)
        with TRACER.origin(PAGE_REQUEST_HOP, sid=self.sid, ssid=pasid, addr=pages[0][0], prg=index,
                           pages=prg.count, **detail):
            prg.fault = TRACER.current()
            for i, (page, r, w) in enumerate(pages):
                last = i == prg.count - 1
                log.info("%s sid=%#x: page request pasid=%s page=%#x R=%d W=%d prg=%d L=%d (%d/%d credits) [f%d]",
                         self.name, self.sid, pasid, page, r, w, index, last, self._outstanding,
                         self.pri.allocation if self.pri is not None else 0, prg.fault)
                self.smmu.page_request(self.sid, pasid, page, index, last, read=r, write=w,
                                       priv=priv and pasid is not None, trace_id=prg.fault)
        return prg

    def take_response(self, index: int, code: PrgResponseCode) -> tuple[Prg | None, bool]:
        """Match a PRG Response to its group: ``(prg, unexpected)``.

        ``(None, False)``: ignored (RF latched, PCIe §10.5.2.3). ``(None, True)``: no such
        outstanding index (UPRGI set). Otherwise the group's credits are released and, on
        Success, its pages leave the ATC so the retry asks for a fresh translation.
        """
        pri = self.pri
        if pri is not None and pri.response_failure:
            log.info("%s sid=%#x: PRG response %d %s ignored: RF set", self.name, self.sid, index, code.name)
            return None, False
        prg = self._prgs.pop(index, None)
        if prg is None:
            log.warning("%s sid=%#x: PRG response for unknown index %d: UPRGI", self.name, self.sid, index)
            if pri is not None:
                pri.set_unexpected_prg_index()
            return None, True
        TRACER.hop(prg.fault, "endpoint.prg_response", code=code.name, prg=index)
        self._set_outstanding(self._outstanding - prg.count)
        log.info("%s sid=%#x: PRG response prg=%d %s (%d credits outstanding)", self.name, self.sid, index,
                 code.name, self._outstanding)
        if code == PrgResponseCode.SUCCESS:
            for page, _, _ in prg.pages:
                self._atc.pop((prg.ssid, page), None)
        return prg, False

    def pri_failed(self) -> None:
        """A Response Failure: latch RF and forget every outstanding group (no response will match)."""
        if self.pri is not None:
            self.pri.set_response_failure()
        self._prgs.clear()
        self._set_outstanding(0)

    def pri_reset(self) -> list[Prg]:
        """PRI Control.Reset: discard outstanding page-request state and credits; returns the groups."""
        dropped = list(self._prgs.values())
        for prg in dropped:
            TRACER.hop(prg.fault, "endpoint.prg_response", code=None, prg=prg.index, discarded=True)
        self._prgs.clear()
        self._set_outstanding(0)
        return dropped


class RunLoop:
    """The run loop of an endpoint core (DMA engine, NIC).

    Why one: a core is kicked from several places (doorbells, PRG responses, a readable
    backend) and from inside its own run (a response delivered synchronously while it
    DMAs), yet must never re-enter itself. :meth:`run` therefore handles queued PRG
    responses, then :meth:`_step`, until nothing progresses; a kick that arrives while it
    runs only asks for another round. Subclasses set ``schedule`` and ``port`` and
    implement ``_handle_response(*message)`` and ``_step``.
    """

    schedule: Callable[[Callable[[], None]], None]
    port: DmaPort
    _running: bool = False
    _rerun: bool = False

    def _clear_inbox(self) -> None:
        self._inbox: deque = deque()

    def kick(self) -> None:
        self.schedule(self.run)

    def run(self) -> None:
        if self._running:
            self._rerun = True
            return
        self._running = True
        try:
            with self.port.scope():  # one endpoint.dma origin, re-armed by each access
                while True:
                    self._rerun = False
                    while self._inbox:
                        self._handle_response(*self._inbox.popleft())
                    if not self._step() and not self._rerun and not self._inbox:
                        break
        finally:
            self._running = False
            self._ran()

    def _handle_response(self, *message: Any) -> None:
        raise NotImplementedError

    def _step(self) -> bool:
        """One round of the core's work; whether anything progressed."""
        raise NotImplementedError

    def _ran(self) -> None:
        """After a run, even a failed one (the NIC raises its coalesced interrupts here)."""
