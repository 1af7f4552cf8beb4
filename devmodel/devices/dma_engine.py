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
:class:`SimpleAts` (plain state, for unit use) can supply it.
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

log = logging.getLogger(__name__)

PRG_INDEX_COUNT = 512  # 9-bit PRG Index
MAX_PAGES_PER_PRG = 16
MAX_PRG_ROUNDS = 16  # per descriptor: a simulation must not livelock on repeated Success
PAGE = 4096


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


@dataclass
class _Prg:
    index: int
    count: int
    pages: list[tuple[int, bool, bool]] = field(default_factory=list)


class DmaEngine:
    """The engine core: unit-testable on a ByteMemory with a real SMMUv3."""

    def __init__(self, smmu, sid: int, dma: Memory, *, pri: PriPort | None = None, ats: AtsPort | None = None,
                 interrupt: Callable[[int], None] | None = None,
                 schedule: Callable[[Callable[[], None]], None] | None = None) -> None:
        self.smmu = smmu
        self.sid = sid
        self.dma = dma
        self.pri = pri
        self.ats = ats
        self.interrupt = interrupt or (lambda vector: None)
        self.schedule = schedule or (lambda fn: fn())
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
        self._outstanding = 0
        self._atc: dict[tuple[int | None, int], tuple[int, int, bool, bool]] = {}
        self._inbox: collections.deque = collections.deque()
        self._running = False
        self._rerun = False
        smmu.register_endpoint(sid, prg_response=self.on_prg_response, atc_invalidate=self.on_atc_invalidate)

    # ------------------------------------------------------------ software interface
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
        """PRI Control.Reset: discard outstanding page-request state and credits."""
        self._prgs.clear()
        self._outstanding = 0

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
            while True:
                self._rerun = False
                while self._inbox:
                    self._handle_response(*self._inbox.popleft())
                progressed = self._advance()
                if not progressed and not self._rerun and not self._inbox:
                    break
        finally:
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
        try:
            raw = self._read(self.queue_pasid, addr, DESC_SIZE, False)
        except _Fault as f:
            log.warning("dmaeng sid=%#x: descriptor fetch at %#x failed: %s -> halt", self.sid, addr, f.reason)
            self.counters[f.counter] += 1
            self._halt()
            return None
        d = DESCRIPTOR.decode(raw)
        op = _Op(index=self.head, opcode=d.Opcode, flags=d.Flags, pasid=d.PASID if d.PASID_EN else None,
                 src=d.Src, dst=d.Dst, length=d.Length, completion=d.CompletionAddr)
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
        try:
            while op.done < op.length:
                op.done += self._chunk(op, priv)
        except _Fault as f:
            self.counters[f.counter] += 1
            log.info("dmaeng sid=%#x: descriptor %d fault at %#x (%s): %s", self.sid, op.index, f.addr,
                     f.access.name, f.reason)
            if f.recoverable and self._try_pri(op, f, priv):
                return
            self._complete(op, f.status, f)
            return
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
                     f"SMMU {r.fault.name}: {r.fault.reason} [t{r.fault.trace_id}]", event=ev)

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
            pa, valid = self._translate(pasid, cur, Access.READ, priv)
            k = min(valid, n - len(out))
            if pa is None:
                out += bytes(k)
                continue
            try:
                out += self.dma.read(pa, k)
            except BusError as e:
                raise _Fault(CompletionStatus.DMA_ABORT, cur, Access.READ, FaultCounter.BUS_ERROR, str(e)) from None
        return bytes(out)

    def _write(self, pasid: int | None, iova: int, data: bytes, priv: bool) -> None:
        done = 0
        while done < len(data):
            cur = iova + done
            pa, valid = self._translate(pasid, cur, Access.WRITE, priv)
            k = min(valid, len(data) - done)
            if pa is not None:
                try:
                    self.dma.write(pa, data[done:done + k])
                except BusError as e:
                    raise _Fault(CompletionStatus.DMA_ABORT, cur, Access.WRITE, FaultCounter.BUS_ERROR,
                                 str(e)) from None
            done += k

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
        self._outstanding += len(pages)
        for i, (page, r, w) in enumerate(pages):
            last = i == len(pages) - 1
            self.counters[FaultCounter.PAGE_REQUEST] += 1
            log.info("dmaeng sid=%#x: page request pasid=%s page=%#x R=%d W=%d prg=%d L=%d (%d/%d credits)",
                     self.sid, op.pasid, page, r, w, index, last, self._outstanding, pri.allocation)
            self.smmu.page_request(self.sid, op.pasid, page, index, last, read=r, write=w,
                                   priv=priv and op.pasid is not None)
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
        if prg is None:
            self.counters[FaultCounter.UNEXPECTED_PRG] += 1
            log.warning("dmaeng sid=%#x: PRG response for unknown index %d: UPRGI", self.sid, index)
            if pri is not None:
                pri.set_unexpected_prg_index()
            return
        self._outstanding -= prg.count
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
        self._outstanding = 0
        self._halt()

    # ------------------------------------------------------------ completion
    def _complete(self, op: _Op, status: CompletionStatus, f: _Fault | None = None) -> None:
        self._op = None
        self.head = (self.head + 1) & ((1 << self.queue_log2) - 1)
        fault_addr = f.addr if f is not None else 0
        log.info("dmaeng sid=%#x: descriptor %d completes %s (%d/%d bytes)%s", self.sid, op.index, status.name,
                 op.done, op.length, f" fault at {fault_addr:#x}" if f else "")
        if op.flags & DescFlags.RCR:
            rec = COMPLETION.encode(Status=int(status), FaultRnW=int(f is not None and f.access is not Access.WRITE),
                                    BytesCompleted=min(op.done, 0xFFFFFFFF), FaultAddr=fault_addr,
                                    FaultEvent=f.event if f is not None else 0)
            try:
                self._write(op.pasid, op.completion, rec, bool(op.flags & DescFlags.PRIV))
            except _Fault as g:
                self.counters[g.counter] += 1
                log.warning("dmaeng sid=%#x: completion record write at %#x failed: %s", self.sid,
                            op.completion, g.reason)
                self.interrupt(MSIX_VECTOR_ERROR)
                return
        if op.flags & DescFlags.RCI:
            self.interrupt(MSIX_VECTOR_COMPLETION)

    def _halt(self) -> None:
        self.halted = True
        log.warning("dmaeng sid=%#x: engine halted", self.sid)
        self.interrupt(MSIX_VECTOR_ERROR)
