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

The memory requests, the ATC and the PRG bookkeeping are the shared
:class:`~devmodel.devices.dma_port.DmaPort` (the NIC uses the same one); this module
keeps what is the engine's own: descriptors, which pages a PRG asks for, completions.
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

import logging
from dataclasses import dataclass, field
from typing import Callable

from devmodel.devices.dma_engine_records import (COMPLETION, DESC_SIZE, DESCRIPTOR, CompletionStatus,
                                                 DescFlags, DmaOpcode, FaultCounter,
                                                 MSIX_VECTOR_COMPLETION, MSIX_VECTOR_ERROR)
from devmodel.devices.dma_port import (DMA_HOP, PAGE, PAGE_REQUEST_HOP, PRG_INDEX_COUNT, AtsPort, DmaFault,
                                       DmaPort, FaultKind, PriPort, RunLoop, SimpleAts, SimplePri)
from devmodel.iommu.faults import Access
from devmodel.iommu.records import PrgResponseCode
from devmodel.memory import Memory
from devmodel.trace import TRACER

log = logging.getLogger(__name__)

__all__ = ["AtsPort", "DmaEngine", "PriPort", "SimpleAts", "SimplePri", "DMA_HOP", "PAGE_REQUEST_HOP",
           "PRG_INDEX_COUNT", "PAGE"]

MAX_PAGES_PER_PRG = 16
MAX_PRG_ROUNDS = 16  # per descriptor: a simulation must not livelock on repeated Success

#: How each kind of failed memory request completes a descriptor, and which counter it bumps.
_FAULT_OUTCOME: dict[FaultKind, tuple[CompletionStatus, FaultCounter]] = {
    FaultKind.TRANSLATION: (CompletionStatus.PAGE_FAULT, FaultCounter.TRANSLATION),
    FaultKind.ATS_NO_ACCESS: (CompletionStatus.PAGE_FAULT, FaultCounter.ATS_NO_ACCESS),
    FaultKind.ATS_ERROR: (CompletionStatus.DMA_ABORT, FaultCounter.ATS_ERROR),
    FaultKind.BUS_ERROR: (CompletionStatus.DMA_ABORT, FaultCounter.BUS_ERROR),
    FaultKind.TRANSLATED_REFUSED: (CompletionStatus.DMA_ABORT, FaultCounter.TRANSLATED_REFUSED),
}


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
    first_fault: DmaFault | None = None
    faults: list[int] = field(default_factory=list)  # trace fault ids met while running
    epoch: int = 0


class DmaEngine(RunLoop):
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
        self.port = DmaPort(smmu, sid, dma, pri=pri, ats=ats, may_master=may_master,
                            prg_response=self.on_prg_response, name="dmaeng")
        self.reset()

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
        self.port.reset()
        self._clear_inbox()

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
            self.port.flush_atc()
        self.enabled = on
        if on:
            self.kick()

    def doorbell(self, tail: int) -> None:
        self.tail = tail & ((1 << self.queue_log2) - 1)
        self.kick()

    @property
    def waiting_prg(self) -> bool:
        return self.port.waiting_prg

    @property
    def pri_outstanding(self) -> int:
        """Page requests sent and not yet answered (for PRI Status.Stopped)."""
        return self.port.outstanding

    def pri_reset(self) -> None:
        """PRI Control.Reset: discard outstanding page-request state and credits.

        A descriptor waiting for a discarded PRG is retried (and, with PRI now
        disabled, completes with PAGE_FAULT).
        """
        self.port.pri_reset()
        self.kick()

    def flush_atc(self) -> None:
        """Drop every cached translation (ATS disabled: the ATC contents become stale)."""
        self.port.flush_atc()

    def count(self, which: FaultCounter) -> int:
        return self.counters[which]

    # ------------------------------------------------------------ SMMU-facing callbacks
    def on_prg_response(self, ssid: int | None, prg_index: int, code: PrgResponseCode) -> None:
        """A PRG Response Message for this function (queued, handled by the run loop)."""
        self._inbox.append((ssid, prg_index, code))
        self.kick()

    def on_atc_invalidate(self, ssid: int | None, addr: int, length: int, global_: bool) -> bool:
        """ATS Invalidation Request: drop cached translations in [addr, addr+length)."""
        return self.port.on_atc_invalidate(ssid, addr, length, global_)

    # ------------------------------------------------------------ run loop (RunLoop)
    def _step(self) -> bool:
        return self._advance()

    def _advance(self) -> bool:
        if not self.enabled or self.halted or self.port.waiting_prg:
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
        self.port.sink = faults = []
        try:
            raw = self.port.read(self.queue_pasid, addr, DESC_SIZE, False)
        except DmaFault as f:
            log.warning("dmaeng sid=%#x: descriptor fetch at %#x failed: %s -> halt [f%d]", self.sid, addr,
                        f.reason, f.fault_id)
            self.counters[_FAULT_OUTCOME[f.kind][1]] += 1
            for fid in dict.fromkeys(faults):
                TRACER.hop(fid, "endpoint.complete", status="FETCH_FAULT", fault_addr=f.addr, descriptor=self.head,
                           halted=True)
            self._halt()
            return None
        finally:
            self.port.sink = None
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
        self.port.sink = op.faults
        try:
            while op.done < op.length:
                n = self._chunk(op, priv)
                if op.epoch != self.epoch:
                    log.info("dmaeng sid=%#x: descriptor %d abandoned by a reset/disable", self.sid, op.index)
                    return
                op.done += n
        except DmaFault as f:
            if op.epoch != self.epoch:
                return
            status, counter = _FAULT_OUTCOME[f.kind]
            self.counters[counter] += 1
            log.info("dmaeng sid=%#x: descriptor %d fault at %#x (%s): %s [f%d]", self.sid, op.index, f.addr,
                     f.access.name, f.reason, f.fault_id)
            if f.recoverable and self._try_pri(op, f, priv):
                return
            if not f.fault_id and f.origin is not None:
                # Nobody below saw it (ATS no-access without PRI): the engine is the detecting layer.
                op.faults.append(DmaPort.birth(f))
            self._complete(op, status, f)
            return
        finally:
            self.port.sink = None
        self._complete(op, CompletionStatus.SUCCESS)

    def _chunk(self, op: _Op, priv: bool) -> int:
        remaining = op.length - op.done
        if op.opcode == DmaOpcode.COPY:
            src = op.src + op.done
            dst = op.dst + op.done
            n = min(remaining, PAGE - (src & (PAGE - 1)), PAGE - (dst & (PAGE - 1)))
            data = self.port.read(op.pasid, src, n, priv)
            self.port.write(op.pasid, dst, data, priv)
            return n
        dst = op.dst + op.done
        n = min(remaining, PAGE - (dst & (PAGE - 1)))
        pattern = op.src.to_bytes(8, "little")
        start = (dst - op.dst) % 8
        data = (pattern * ((n + start) // 8 + 2))[start:start + n]
        self.port.write(op.pasid, dst, data, priv)
        return n

    # ------------------------------------------------------------ PRI
    def _try_pri(self, op: _Op, f: DmaFault, priv: bool) -> bool:
        """Send a PRG for the faulting page(s); True when the op now waits for the response."""
        why = self.port.pri_unavailable()
        if why is not None:
            log.info("dmaeng sid=%#x: %s: descriptor %d fails", self.sid, why, op.index)
            return False
        if op.prg_rounds >= MAX_PRG_ROUNDS:
            log.warning("dmaeng sid=%#x: descriptor %d still faulting after %d PRGs: giving up", self.sid,
                        op.index, op.prg_rounds)
            return False
        pages = self._gather_pages(op, f, priv, min(self.port.credits, MAX_PAGES_PER_PRG))
        prg = self.port.send_prg(op.pasid, pages, priv, descriptor=op.index)
        if prg is None:
            return False
        op.prg_rounds += 1
        op.first_fault = op.first_fault or f
        op.faults.append(prg.fault)
        self.counters[FaultCounter.PAGE_REQUEST] += prg.count
        return True

    def _gather_pages(self, op: _Op, f: DmaFault, priv: bool, limit: int) -> list[tuple[int, bool, bool]]:
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
                    if self.port.lacks_access(op.pasid, max(page, start), access, priv):
                        flags = wanted.setdefault(page, [False, False])
                        flags[access is Access.WRITE] = True
                page += PAGE
        return [(p, r, w) for p, (r, w) in list(wanted.items())[:limit]]

    def _handle_response(self, ssid: int | None, index: int, code: PrgResponseCode) -> None:
        prg, unexpected = self.port.take_response(index, code)
        if unexpected:
            self.counters[FaultCounter.UNEXPECTED_PRG] += 1
        if prg is None:
            return
        op = self._op
        if code == PrgResponseCode.SUCCESS:
            self.counters[FaultCounter.PRG_SUCCESS] += 1
            return  # the run loop retries the op from where it stopped
        if code == PrgResponseCode.INVALID_REQUEST:
            self.counters[FaultCounter.PRG_INVALID] += 1
            if op is not None:
                self._complete(op, CompletionStatus.PAGE_FAULT, op.first_fault)
            return
        self.counters[FaultCounter.PRG_FAILURE] += 1
        self.port.pri_failed()  # RF latched; no other group will be answered
        if op is not None:
            self._complete(op, CompletionStatus.PRI_RESPONSE_FAILURE, op.first_fault)
        self._halt()

    # ------------------------------------------------------------ completion
    def _complete(self, op: _Op, status: CompletionStatus, f: DmaFault | None = None) -> None:
        if op.epoch != self.epoch:
            log.info("dmaeng sid=%#x: descriptor %d dropped: engine reset while it ran", self.sid, op.index)
            return
        self._op = None
        self.head = (self.head + 1) & ((1 << self.queue_log2) - 1)
        fault_addr = f.addr if f is not None else 0
        log.info("dmaeng sid=%#x: descriptor %d completes %s (%d/%d bytes)%s", self.sid, op.index, status.name,
                 op.done, op.length, f" fault at {fault_addr:#x}" if f else "")
        self.port.sink = op.faults
        try:
            recorded = self._write_completion(op, status, f, fault_addr)
        finally:
            self.port.sink = None
        for fid in dict.fromkeys(op.faults):
            TRACER.hop(fid, "endpoint.complete", status=status.name, fault_addr=fault_addr, descriptor=op.index,
                       bytes=op.done)
        if not recorded:
            self.interrupt(MSIX_VECTOR_ERROR)
        elif op.flags & DescFlags.RCI:
            self.interrupt(MSIX_VECTOR_COMPLETION)

    def _write_completion(self, op: _Op, status: CompletionStatus, f: DmaFault | None, fault_addr: int) -> bool:
        """Write the completion record if RCR asks for one; False when that write failed."""
        if not op.flags & DescFlags.RCR:
            return True
        rec = COMPLETION.encode(Status=int(status), FaultRnW=int(f is not None and f.access is not Access.WRITE),
                                BytesCompleted=min(op.done, 0xFFFFFFFF), FaultAddr=fault_addr,
                                FaultEvent=f.event if f is not None else 0)
        try:
            self.port.write(op.pasid, op.completion, rec, bool(op.flags & DescFlags.PRIV))
        except DmaFault as g:
            self.counters[_FAULT_OUTCOME[g.kind][1]] += 1
            log.warning("dmaeng sid=%#x: completion record write at %#x failed: %s [f%d]", self.sid,
                        op.completion, g.reason, g.fault_id)
            return False
        return True

    def _halt(self) -> None:
        self.halted = True
        log.warning("dmaeng sid=%#x: engine halted", self.sid)
        self.interrupt(MSIX_VECTOR_ERROR)
