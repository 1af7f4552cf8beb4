"""A small DSA-like DMA engine endpoint: descriptor ring in IOVA space, per-descriptor
PASID, COPY and FILL, completion records and an MSI-X vector on completion.

Every DMA goes through the SMMU with the engine's StreamID and the descriptor's PASID as
SubstreamID:

* ATS disabled: untranslated traffic through :meth:`SMMUv3.translate`; a fault aborts the
  access (the SMMU has recorded the event) and the descriptor completes with PAGE_FAULT.
* ATS enabled: ATS Translation Requests fill a small ATC (dropped by CMD_ATC_INV), then
  ATS-Translated accesses go to memory. A completion with insufficient permission is a
  recoverable fault: with PRI enabled the engine sends a Page Request Group (PRG index
  allocation, Last bit, never more outstanding requests than the PRI Allocation), waits
  for the PRG Response, and on Success retries; Invalid Request completes the descriptor
  with PAGE_FAULT and the faulting address; Response Failure sets PRI Status.RF,
  completes with PRI_RESPONSE_FAILURE and halts the engine.

The PRI and ATS capability state is reached through the tiny :class:`PriPort` /
:class:`AtsPort` interfaces so the real PCI capabilities or :class:`SimplePri` /
:class:`SimpleAts` (plain state, for unit use) can supply it. A PriPort that also has
``note_outstanding(n)`` is told the number of page requests in flight after each change
(the PCI capability derives PRI Status.Stopped from it).

Fault traces (:data:`devmodel.trace.TRACER`): every DMA access (one page of a transfer,
a descriptor fetch, a completion write) runs inside ``TRACER.origin("endpoint.dma")``,
so a fault the SMMU detects is born with the access as its first hop. Every Page
Request Group runs inside ``TRACER.origin("endpoint.page_request")``; its fault id is
kept with the PRG, so the response gets ``endpoint.prg_response`` (code). When a
descriptor completes, each fault id it collected gets ``endpoint.complete`` (status and
fault address). A fault nobody below reported (bus error, ATS no-access without PRI) is
born by the engine itself.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Callable, Protocol

from devmodel.devices.dma_engine_records import (COMPLETION, DESC_SIZE, DESCRIPTOR, CompletionStatus,
                                                 DescFlags, DmaOpcode, FaultCounter,
                                                 MSIX_VECTOR_COMPLETION, MSIX_VECTOR_ERROR)
from devmodel.iommu.faults import Access, AtsStatus
from devmodel.iommu.records import PrgResponseCode
from devmodel.memory import BusError, Memory
from devmodel.trace import TRACER

log = logging.getLogger(__name__)

PRG_INDEX_COUNT = 512  # 9-bit PRG Index
MAX_PAGES_PER_PRG = 16
MAX_PRG_ROUNDS = 16  # per descriptor: a simulation must not livelock on repeated Success
PAGE = 4096
DMA_HOP = "endpoint.dma"
PAGE_REQUEST_HOP = "endpoint.page_request"
_ACCESS_NAME = {Access.READ: "read", Access.WRITE: "write", Access.EXEC: "exec"}


class PriPort(Protocol):
    """What the engine needs from the PRI extended capability (PCIe §10.5.2)."""

    @property
    def enabled(self) -> bool: ...

    @property
    def allocation(self) -> int: ...

    @property
    def response_failure(self) -> bool: ...

    def set_response_failure(self) -> None: ...

    def set_unexpected_prg_index(self) -> None: ...


class AtsPort(Protocol):
    """What the engine needs from the ATS extended capability."""

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


class _Fault(Exception):
    """A DMA access that could not be performed."""

    def __init__(self, status: CompletionStatus, addr: int, access: Access, counter: FaultCounter,
                 reason: str, recoverable: bool = False, event: int = 0) -> None:
        super().__init__(reason)
        self.status = status
        self.addr = addr
        self.access = access
        self.counter = counter
        self.reason = reason
        self.recoverable = recoverable
        self.event = event
        self.fault_id = 0  # trace fault id of the access (0: nobody reported it)
        self.origin: tuple[str, int, dict] | None = None  # (hop, t_ns, detail) of the access


@dataclass
class _Op:
    """The descriptor being executed and how far it got."""

    index: int
    opcode: int
    flags: int
    pasid: int | None
    src: int
    dst: int
    length: int
    completion: int
    done: int = 0
    prg_rounds: int = 0
    first_fault: _Fault | None = None
    faults: list[int] = field(default_factory=list)  # trace fault ids met while running
    epoch: int = 0


@dataclass
class _Prg:
    index: int
    count: int
    pages: list[tuple[int, bool, bool]] = field(default_factory=list)
    fault: int = 0  # trace fault id of the group


class DmaEngine:
    """The engine core: unit-testable on a ByteMemory with a real SMMUv3."""

    def __init__(self, smmu, sid: int, dma: Memory, *, pri: PriPort | None = None, ats: AtsPort | None = None,
                 interrupt: Callable[[int], None] | None = None,
                 schedule: Callable[[Callable[[], None]], None] | None = None,
                 may_master: Callable[[], bool] | None = None) -> None:
        """``may_master`` gates every memory request (ATS Translation Requests too): the
        PCI function passes its Bus Master Enable; False makes each access fail with
        DMA_ABORT before it reaches the SMMU."""
        self.smmu = smmu
        self.sid = sid
        self.dma = dma
        self.pri = pri
        self.ats = ats
        self.interrupt = interrupt or (lambda vector: None)
        self.schedule = schedule or (lambda fn: fn())
        self.may_master = may_master
        self.epoch = 0
        self._running = False
        self._rerun = False
        self.reset()
        smmu.register_endpoint(sid, prg_response=self.on_prg_response, atc_invalidate=self.on_atc_invalidate)

    # ------------------------------------------------------------ software interface
    def reset(self) -> None:
        """Power-on state: disabled, ring unprogrammed, counters zero, no PRG, empty ATC.

        Work already scheduled or in flight belongs to the previous epoch and is dropped
        (a function reset must not let an old descriptor complete into the new state).
        """
        self.epoch += 1
        self.counters = [0] * len(FaultCounter)
        self.enabled = False
        self.halted = False
        self.queue_base = 0
        self.queue_log2 = 0
        self.queue_pasid: int | None = None
        self.head = 0
        self.tail = 0
        self._op: _Op | None = None
        self._prgs: dict[int, _Prg] = {}
        self._next_prg = 0
        self._set_outstanding(0)
        self._atc: dict[tuple[int | None, int], tuple[int, int, bool, bool]] = {}
        self._inbox: collections.deque = collections.deque()
        self._sink: list[int] | None = None
        self._origin = None

    def configure(self, base: int, log2size: int, pasid: int | None = None) -> None:
        """Program the descriptor ring (only while disabled)."""
        if self.enabled:
            log.info("dmaeng sid=%#x: ring reconfiguration ignored while enabled", self.sid)
            return
        self.queue_base = base & ~(DESC_SIZE - 1)
        self.queue_log2 = min(log2size, 16)
        self.queue_pasid = pasid
        self.head = self.tail = 0

    def set_enabled(self, on: bool) -> None:
        """Enable, or disable (which also clears HALTED and drops the ATC and current op)."""
        if on and not self.enabled:
            self.halted = False
        if not on:
            if self._op is not None:
                self.epoch += 1  # an op running on another thread must not complete
            self._op = None
            self._atc.clear()
        self.enabled = on
        if on:
            self.kick()

    def doorbell(self, tail: int) -> None:
        self.tail = tail & ((1 << self.queue_log2) - 1)
        self.kick()

    @property
    def waiting_prg(self) -> bool:
        return bool(self._prgs)

    @property
    def pri_outstanding(self) -> int:
        """Page requests sent and not yet answered (for PRI Status.Stopped)."""
        return self._outstanding

    def pri_reset(self) -> None:
        """PRI Control.Reset: discard outstanding page-request state and credits.

        A descriptor waiting for a discarded PRG is retried (and, with PRI now
        disabled, completes with PAGE_FAULT).
        """
        for prg in self._prgs.values():
            TRACER.hop(prg.fault, "endpoint.prg_response", code=None, prg=prg.index, discarded=True)
        self._prgs.clear()
        self._set_outstanding(0)
        self.kick()

    def flush_atc(self) -> None:
        """Drop every cached translation (ATS disabled: the ATC contents become stale)."""
        if self._atc:
            log.info("dmaeng sid=%#x: ATC flushed (%d entries)", self.sid, len(self._atc))
        self._atc.clear()

    def _set_outstanding(self, n: int) -> None:
        self._outstanding = n
        note = getattr(self.pri, "note_outstanding", None)
        if note is not None:
            note(n)

    def count(self, which: FaultCounter) -> int:
        return self.counters[which]

    # ------------------------------------------------------------ SMMU-facing callbacks
    def on_prg_response(self, ssid: int | None, prg_index: int, code: PrgResponseCode) -> None:
        """A PRG Response Message for this function (queued, handled by the run loop)."""
        self._inbox.append((ssid, prg_index, code))
        self.kick()

    def on_atc_invalidate(self, ssid: int | None, addr: int, length: int, global_: bool) -> bool:
        """ATS Invalidation Request: drop cached translations in [addr, addr+length)."""
        end = addr + length
        doomed = [k for k, v in self._atc.items()
                  if (ssid is None or k[0] == ssid) and k[1] < end and addr < k[1] + v[1]]
        for k in doomed:
            del self._atc[k]
        log.info("dmaeng sid=%#x: ATC invalidate ssid=%s %#x+%#x dropped %d entries", self.sid, ssid, addr,
                 length, len(doomed))
        return True

    # ------------------------------------------------------------ run loop
    def kick(self) -> None:
        self.schedule(self.run)

    def run(self) -> None:
        """Process responses and descriptors until nothing can progress."""
        if self._running:
            self._rerun = True
            return
        self._running = True
        try:
            with TRACER.origin(DMA_HOP, sid=self.sid) as self._origin:  # re-armed by each access, see _access
                while True:
                    self._rerun = False
                    while self._inbox:
                        self._handle_response(*self._inbox.popleft())
                    progressed = self._advance()
                    if not progressed and not self._rerun and not self._inbox:
                        break
        finally:
            self._origin = None
            self._running = False

    def _advance(self) -> bool:
        if not self.enabled or self.halted or self._prgs:
            return False
        if self._op is None:
            if self.head == self.tail:
                return False
            self._op = self._fetch()
            if self._op is None:
                return True
        self._execute(self._op)
        return True

    def _fetch(self) -> _Op | None:
        addr = self.queue_base + self.head * DESC_SIZE
        self._sink = faults = []
        try:
            raw = self._read(self.queue_pasid, addr, DESC_SIZE, False)
        except _Fault as f:
            log.warning("dmaeng sid=%#x: descriptor fetch at %#x failed: %s -> halt [f%d]", self.sid, addr,
                        f.reason, f.fault_id)
            self.counters[f.counter] += 1
            for fid in dict.fromkeys(faults):
                TRACER.hop(fid, "endpoint.complete", status="FETCH_FAULT", fault_addr=f.addr, descriptor=self.head,
                           halted=True)
            self._halt()
            return None
        finally:
            self._sink = None
        d = DESCRIPTOR.decode(raw)
        op = _Op(index=self.head, opcode=d.Opcode, flags=d.Flags, pasid=d.PASID if d.PASID_EN else None,
                 src=d.Src, dst=d.Dst, length=d.Length, completion=d.CompletionAddr, faults=faults,
                 epoch=self.epoch)
        log.debug("dmaeng sid=%#x: descriptor %d op=%d pasid=%s len=%#x", self.sid, op.index, op.opcode,
                  op.pasid, op.length)
        return op

    def _execute(self, op: _Op) -> None:
        if op.opcode not in (DmaOpcode.NOP, DmaOpcode.COPY, DmaOpcode.FILL):
            self._complete(op, CompletionStatus.BAD_OPCODE)
            return
        if op.flags & ~int(DescFlags.RCR | DescFlags.RCI | DescFlags.PRIV) or (
                op.flags & DescFlags.PRIV and op.pasid is None):
            self._complete(op, CompletionStatus.BAD_DESCRIPTOR)
            return
        priv = bool(op.flags & DescFlags.PRIV)
        self._sink = op.faults
        try:
            while op.done < op.length:
                n = self._chunk(op, priv)
                if op.epoch != self.epoch:
                    log.info("dmaeng sid=%#x: descriptor %d abandoned by a reset/disable", self.sid, op.index)
                    return
                op.done += n
        except _Fault as f:
            if op.epoch != self.epoch:
                return
            self.counters[f.counter] += 1
            log.info("dmaeng sid=%#x: descriptor %d fault at %#x (%s): %s [f%d]", self.sid, op.index, f.addr,
                     f.access.name, f.reason, f.fault_id)
            if f.recoverable and self._try_pri(op, f, priv):
                return
            if not f.fault_id and f.origin is not None:
                # Nobody below saw it (ATS no-access without PRI): the engine is the detecting layer.
                hop, t_ns, detail = f.origin
                f.fault_id = TRACER.begin(hop, _t_ns=t_ns, **detail)
                op.faults.append(f.fault_id)
            self._complete(op, f.status, f)
            return
        finally:
            self._sink = None
        self._complete(op, CompletionStatus.SUCCESS)

    def _chunk(self, op: _Op, priv: bool) -> int:
        remaining = op.length - op.done
        if op.opcode == DmaOpcode.COPY:
            src = op.src + op.done
            dst = op.dst + op.done
            n = min(remaining, PAGE - (src & (PAGE - 1)), PAGE - (dst & (PAGE - 1)))
            data = self._read(op.pasid, src, n, priv)
            self._write(op.pasid, dst, data, priv)
            return n
        dst = op.dst + op.done
        n = min(remaining, PAGE - (dst & (PAGE - 1)))
        pattern = op.src.to_bytes(8, "little")
        start = (dst - op.dst) % 8
        data = (pattern * ((n + start) // 8 + 2))[start:start + n]
        self._write(op.pasid, dst, data, priv)
        return n

    # ------------------------------------------------------------ DMA through the SMMU
    def _translate(self, pasid: int | None, iova: int, access: Access, priv: bool) -> tuple[int | None, int]:
        """Return (pa, bytes valid) or (None, n) for RAZ/WI; raise _Fault."""
        if self.ats is not None and self.ats.enabled:
            return self._ats(pasid, iova, access, priv)
        r = self.smmu.translate(self.sid, pasid, iova, 1, access, priv)
        if r.ok:
            return r.pa, r.length if r.length > 1 else PAGE - (iova & (PAGE - 1))
        if r.raz_wi:
            return None, PAGE - (iova & (PAGE - 1))
        ev = int(r.fault.event) if r.fault.event is not None else 0
        raise _Fault(CompletionStatus.PAGE_FAULT, iova, access, FaultCounter.TRANSLATION,
                     f"SMMU {r.fault.name}: {r.fault.reason}", event=ev)

    def _ats(self, pasid: int | None, iova: int, access: Access, priv: bool) -> tuple[int, int]:
        page = iova & ~(PAGE - 1)
        hit = self._atc.get((pasid, page))
        if hit is None:
            c = self.smmu.ats_translate(self.sid, pasid, iova, priv, access is Access.WRITE, access is Access.EXEC)
            if c.status != AtsStatus.SUCCESS:
                raise _Fault(CompletionStatus.DMA_ABORT, iova, access, FaultCounter.ATS_ERROR,
                             f"ATS translation completion {c.status.name}")
            if c.r or c.w:
                size = c.size
                base_va = iova & ~(size - 1)
                hit = (c.translated_addr + (page - base_va), PAGE, c.r, c.w)
                self._atc[(pasid, page)] = hit
            else:
                hit = (0, PAGE, False, False)
        pa_page, _, r, w = hit
        allowed = w if access is Access.WRITE else r
        if not allowed:
            raise _Fault(CompletionStatus.PAGE_FAULT, iova, access, FaultCounter.ATS_NO_ACCESS,
                         "ATS completion grants no access", recoverable=True)
        pa = pa_page | (iova & (PAGE - 1))
        if not self.smmu.translated_access(self.sid, pa, access):
            raise _Fault(CompletionStatus.DMA_ABORT, iova, access, FaultCounter.TRANSLATED_REFUSED,
                         "ATS-Translated access refused by the SMMU")
        return pa, PAGE - (iova & (PAGE - 1))

    def _read(self, pasid: int | None, iova: int, n: int, priv: bool) -> bytes:
        out = bytearray()
        while len(out) < n:
            cur = iova + len(out)
            out += self._access(pasid, cur, Access.READ, priv, n - len(out), None)
        return bytes(out)

    def _write(self, pasid: int | None, iova: int, data: bytes, priv: bool) -> None:
        done = 0
        while done < len(data):
            done += self._access(pasid, iova + done, Access.WRITE, priv, len(data) - done, data[done:])

    def _access(self, pasid: int | None, iova: int, access: Access, priv: bool, n: int, data: bytes | None):
        """One memory request (up to the end of its page): bytes read, or bytes written.

        Each access is a trace origin (``endpoint.dma``): a fault reported below is born
        with it. The run loop holds one ``TRACER.origin`` scope and each access re-arms
        it (own timestamp, detail, no fault yet), which costs a fraction of opening a
        scope per page and is otherwise the same thing.
        """
        origin = self._origin
        if origin is None:  # called outside the run loop
            with TRACER.origin(DMA_HOP, sid=self.sid) as self._origin:
                try:
                    return self._access(pasid, iova, access, priv, n, data)
                finally:
                    self._origin = None
        origin.rearm(TRACER.clock(), ssid=pasid, addr=iova, access=_ACCESS_NAME[access])
        try:
            if self.may_master is not None and not self.may_master():
                raise _Fault(CompletionStatus.DMA_ABORT, iova, access, FaultCounter.BUS_ERROR,
                             "bus master disabled")
            pa, valid = self._translate(pasid, iova, access, priv)
            k = min(valid, n)
            if data is None:
                return bytes(k) if pa is None else self.dma.read(pa, k)
            if pa is not None:
                self.dma.write(pa, data[:k])
            return k
        except BusError as e:
            f = _Fault(CompletionStatus.DMA_ABORT, iova, access, FaultCounter.BUS_ERROR, str(e))
            self._traced_fault(f, origin)
            raise f from None
        except _Fault as f:
            self._traced_fault(f, origin)
            raise
        finally:
            if origin.fault and self._sink is not None:
                self._sink.append(origin.fault)

    @staticmethod
    def _traced_fault(f: _Fault, origin) -> None:
        """Snapshot the access's trace origin; a non-recoverable fault nobody reported is born here."""
        if not origin.fault and not f.recoverable:
            TRACER.current()
        f.fault_id = origin.fault
        f.origin = (origin.hop, origin.t_ns, dict(origin.detail))

    # ------------------------------------------------------------ PRI
    def _try_pri(self, op: _Op, f: _Fault, priv: bool) -> bool:
        """Send a PRG for the faulting page(s); True when the op now waits for the response."""
        pri = self.pri
        if pri is None or not pri.enabled or pri.response_failure:
            log.info("dmaeng sid=%#x: PRI unavailable (%s): descriptor %d fails", self.sid,
                     "no capability" if pri is None else ("disabled" if not pri.enabled else "RF set"), op.index)
            return False
        if op.prg_rounds >= MAX_PRG_ROUNDS:
            log.warning("dmaeng sid=%#x: descriptor %d still faulting after %d PRGs: giving up", self.sid,
                        op.index, op.prg_rounds)
            return False
        credits = pri.allocation - self._outstanding
        if credits <= 0:
            log.warning("dmaeng sid=%#x: no PRI credits (allocation %d): descriptor %d fails", self.sid,
                        pri.allocation, op.index)
            return False
        index = self._alloc_prg_index()
        if index is None:
            return False
        pages = self._gather_pages(op, f, priv, min(credits, MAX_PAGES_PER_PRG))
        op.prg_rounds += 1
        op.first_fault = op.first_fault or f
        prg = _Prg(index, len(pages), pages)
        self._prgs[index] = prg
        self._set_outstanding(self._outstanding + len(pages))
        with TRACER.origin(PAGE_REQUEST_HOP, sid=self.sid, ssid=op.pasid, addr=pages[0][0], prg=index,
                           pages=len(pages), descriptor=op.index):
            prg.fault = TRACER.current()
            op.faults.append(prg.fault)
            for i, (page, r, w) in enumerate(pages):
                last = i == len(pages) - 1
                self.counters[FaultCounter.PAGE_REQUEST] += 1
                log.info("dmaeng sid=%#x: page request pasid=%s page=%#x R=%d W=%d prg=%d L=%d (%d/%d credits) "
                         "[f%d]", self.sid, op.pasid, page, r, w, index, last, self._outstanding, pri.allocation,
                         prg.fault)
                self.smmu.page_request(self.sid, op.pasid, page, index, last, read=r, write=w,
                                       priv=priv and op.pasid is not None, trace_id=prg.fault)
        return True

    def _alloc_prg_index(self) -> int | None:
        for i in range(PRG_INDEX_COUNT):
            idx = (self._next_prg + i) % PRG_INDEX_COUNT
            if idx not in self._prgs:
                self._next_prg = (idx + 1) % PRG_INDEX_COUNT
                return idx
        return None

    def _gather_pages(self, op: _Op, f: _Fault, priv: bool, limit: int) -> list[tuple[int, bool, bool]]:
        """The faulting page first, then later pages of this descriptor that also lack access."""
        wanted: dict[int, list[bool]] = {f.addr & ~(PAGE - 1): [f.access is not Access.WRITE,
                                                               f.access is Access.WRITE]}
        ranges = []
        if op.opcode == DmaOpcode.COPY:
            ranges.append((op.src + op.done, Access.READ))
        ranges.append((op.dst + op.done, Access.WRITE))
        remaining = op.length - op.done
        for start, access in ranges:
            page = start & ~(PAGE - 1)
            while page < start + remaining and len(wanted) < limit:
                if page not in wanted or not wanted[page][access is Access.WRITE]:
                    try:
                        self._ats(op.pasid, max(page, start), access, priv)
                    except _Fault as g:
                        if g.recoverable:
                            flags = wanted.setdefault(page, [False, False])
                            flags[access is Access.WRITE] = True
                page += PAGE
        return [(p, r, w) for p, (r, w) in list(wanted.items())[:limit]]

    def _handle_response(self, ssid: int | None, index: int, code: PrgResponseCode) -> None:
        pri = self.pri
        if pri is not None and pri.response_failure:
            log.info("dmaeng sid=%#x: PRG response %d %s ignored: RF set", self.sid, index, code.name)
            return
        prg = self._prgs.pop(index, None)
        if prg is not None:
            TRACER.hop(prg.fault, "endpoint.prg_response", code=code.name, prg=index)
        if prg is None:
            self.counters[FaultCounter.UNEXPECTED_PRG] += 1
            log.warning("dmaeng sid=%#x: PRG response for unknown index %d: UPRGI", self.sid, index)
            if pri is not None:
                pri.set_unexpected_prg_index()
            return
        self._set_outstanding(self._outstanding - prg.count)
        op = self._op
        log.info("dmaeng sid=%#x: PRG response prg=%d %s (%d credits outstanding)", self.sid, index, code.name,
                 self._outstanding)
        if code == PrgResponseCode.SUCCESS:
            self.counters[FaultCounter.PRG_SUCCESS] += 1
            for page, _, _ in prg.pages:
                self._atc.pop((op.pasid if op else None, page), None)
            return  # the run loop retries the op from where it stopped
        if code == PrgResponseCode.INVALID_REQUEST:
            self.counters[FaultCounter.PRG_INVALID] += 1
            if op is not None:
                self._complete(op, CompletionStatus.PAGE_FAULT, op.first_fault)
            return
        self.counters[FaultCounter.PRG_FAILURE] += 1
        if pri is not None:
            pri.set_response_failure()
        if op is not None:
            self._complete(op, CompletionStatus.PRI_RESPONSE_FAILURE, op.first_fault)
        self._prgs.clear()
        self._set_outstanding(0)
        self._halt()

    # ------------------------------------------------------------ completion
    def _complete(self, op: _Op, status: CompletionStatus, f: _Fault | None = None) -> None:
        if op.epoch != self.epoch:
            log.info("dmaeng sid=%#x: descriptor %d dropped: engine reset while it ran", self.sid, op.index)
            return
        self._op = None
        self.head = (self.head + 1) & ((1 << self.queue_log2) - 1)
        fault_addr = f.addr if f is not None else 0
        log.info("dmaeng sid=%#x: descriptor %d completes %s (%d/%d bytes)%s", self.sid, op.index, status.name,
                 op.done, op.length, f" fault at {fault_addr:#x}" if f else "")
        self._sink = op.faults
        try:
            recorded = self._write_completion(op, status, f, fault_addr)
        finally:
            self._sink = None
        for fid in dict.fromkeys(op.faults):
            TRACER.hop(fid, "endpoint.complete", status=status.name, fault_addr=fault_addr, descriptor=op.index,
                       bytes=op.done)
        if not recorded:
            self.interrupt(MSIX_VECTOR_ERROR)
        elif op.flags & DescFlags.RCI:
            self.interrupt(MSIX_VECTOR_COMPLETION)

    def _write_completion(self, op: _Op, status: CompletionStatus, f: _Fault | None, fault_addr: int) -> bool:
        """Write the completion record if RCR asks for one; False when that write failed."""
        if not op.flags & DescFlags.RCR:
            return True
        rec = COMPLETION.encode(Status=int(status), FaultRnW=int(f is not None and f.access is not Access.WRITE),
                                BytesCompleted=min(op.done, 0xFFFFFFFF), FaultAddr=fault_addr,
                                FaultEvent=f.event if f is not None else 0)
        try:
            self._write(op.pasid, op.completion, rec, bool(op.flags & DescFlags.PRIV))
        except _Fault as g:
            self.counters[g.counter] += 1
            log.warning("dmaeng sid=%#x: completion record write at %#x failed: %s [f%d]", self.sid,
                        op.completion, g.reason, g.fault_id)
            return False
        return True

    def _halt(self) -> None:
        self.halted = True
        log.warning("dmaeng sid=%#x: engine halted", self.sid)
        self.interrupt(MSIX_VECTOR_ERROR)
