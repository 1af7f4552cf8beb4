"""The NIC core: one RX and one TX descriptor ring in IOVA space, a packet backend as the
wire, counters, and recoverable RX faults through PRI. No PCI here (see nic_pci.py).

Layouts (registers, descriptors, counters) are ``nic_records``; every descriptor and
buffer access goes through the shared :class:`~devmodel.devices.dma_port.DmaPort` with
the NIC's StreamID and the ring's PASID as SubstreamID, so the SMMU, ATS, PRI and the
fault traces behave exactly as for the DMA engine.

Receive
-------
The backend fd is read from the event loop (:meth:`Nic.backend_readable`, no DMA there)
into a small device FIFO (:data:`RX_FIFO_DEPTH` frames, like a NIC's on-chip buffer); the
run loop, on the device worker, moves each frame into the descriptor at RX_HEAD:

* RX disabled or halted, or no posted descriptor (HEAD == TAIL): dropped
  (RX_NO_BUFFER + RX_DROPS).
* Descriptor fetch fault: dropped (RX_DMA_FAULTS + RX_DROPS), the ring halts (ERROR).
* Frame longer than BufLen: Status=TOO_BIG, RX_DROPS.
* Buffer write fault (SMMU translation/permission fault, or ATS no-access without PRI):
  Status=DMA_FAULT, Event=<SMMU event id> (0 when the SMMU recorded none),
  RX_DMA_FAULTS + RX_DROPS; the next frame goes to the next descriptor.
* ATS no-access with PRI usable: a Page Request Group for the buffer's faulting page(s);
  the frame is held (STATUS.RX_WAIT_PRG) and the backend is not read any more
  (backpressure). Success: the write is retried (DONE, or a new fault); Invalid Request:
  DMA_FAULT (Event 0: no SMMU event exists for an ATS no-access), RX_DMA_FAULTS +
  RX_DROPS; Response Failure: PRI RF set, Status=PRI_FAILURE, the ring halts (ERROR).
* Write-back fault: the ring halts (ERROR) without advancing HEAD.
Each written-back descriptor latches IrqCause.RX.

Transmit
--------
The TX_TAIL doorbell schedules the run loop; each descriptor's frame is read by DMA and
sent to the backend: Length outside MIN_FRAME..MAX_FRAME gives TOO_BIG; a read fault
DMA_FAULT (TX_DMA_FAULTS + TX_DROPS); no backend LINK_DOWN (TX_DROPS); a backend that
drops the frame (congested) DONE with TX_DROPS counted instead of TX_PACKETS. TX does not
use PRI (a no-access completion is a DMA_FAULT). Each written-back descriptor latches
IrqCause.TX; a fetch or write-back fault halts the ring (ERROR).

Interrupts are coalesced per run of the loop: each latched cause fires its MSI-X vector
once at the end of the run (a NIC's interrupt moderation, minimal form).

Fault traces: every access is an ``endpoint.dma`` origin; each fault id a descriptor
collected gets ``endpoint.complete`` (ring, status, fault address) when that descriptor
is written back, or when its ring halts.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Callable

from devmodel.devices.dma_port import PAGE, AtsPort, DmaFault, DmaPort, PriPort, RunLoop
from devmodel.devices.nic_records import (CFG_LOG2SIZE_MASK, CFG_MAX_LOG2SIZE, CFG_PASID_EN, CFG_PASID_MASK,
                                          CFG_PASID_SHIFT, DEFAULT_MAC, DESC_SIZE, MAX_FRAME, MIN_FRAME,
                                          MSIX_VECTOR_ERROR, MSIX_VECTOR_RX, MSIX_VECTOR_TX, RX_DESC, TX_DESC,
                                          CtrlBit, DescStatus, IrqCause, NicCounter, StatusBit)
from devmodel.devices.packet_backend import PacketBackend
from devmodel.iommu.faults import Access
from devmodel.iommu.records import PrgResponseCode
from devmodel.memory import Memory
from devmodel.trace import TRACER

log = logging.getLogger(__name__)

RX_FIFO_DEPTH = 64  # frames read from the backend and not yet placed
MAX_PRG_ROUNDS = 16  # per frame: a simulation must not livelock on repeated Success
COUNTER_MASK = 0xFFFFFFFF
_CAUSE_VECTOR = {IrqCause.RX: MSIX_VECTOR_RX, IrqCause.TX: MSIX_VECTOR_TX, IrqCause.ERROR: MSIX_VECTOR_ERROR,
                 IrqCause.LINK: MSIX_VECTOR_ERROR}
CFG_FIELDS = CFG_LOG2SIZE_MASK | CFG_PASID_MASK << CFG_PASID_SHIFT | CFG_PASID_EN


@dataclass
class Ring:
    """One descriptor ring: its registers and the device's position in it."""

    name: str
    base: int = 0
    cfg: int = 0
    head: int = 0
    tail: int = 0
    enabled: bool = False
    halted: bool = False

    @property
    def log2size(self) -> int:
        return min(self.cfg & CFG_LOG2SIZE_MASK, CFG_MAX_LOG2SIZE)

    @property
    def mask(self) -> int:
        return (1 << self.log2size) - 1

    @property
    def pasid(self) -> int | None:
        return (self.cfg >> CFG_PASID_SHIFT) & CFG_PASID_MASK if self.cfg & CFG_PASID_EN else None

    @property
    def posted(self) -> bool:
        """Software has handed the device at least one descriptor."""
        return self.head != self.tail

    @property
    def running(self) -> bool:
        return self.enabled and not self.halted

    def slot(self, index: int) -> int:
        return self.base + index * DESC_SIZE

    def advance(self) -> None:
        self.head = (self.head + 1) & self.mask


@dataclass
class _RxWork:
    """A frame being placed into one RX descriptor (held while its PRG is outstanding)."""

    frame: bytes
    index: int
    addr: int
    buflen: int
    epoch: int
    faults: list[int] = field(default_factory=list)
    prg: int | None = None  # index of the outstanding PRG (None: not waiting)
    prg_rounds: int = 0
    first_fault: DmaFault | None = None


class Nic(RunLoop):
    """The NIC core; :class:`~devmodel.devices.nic_pci.NicFunction` puts it behind PCI."""

    def __init__(self, smmu, sid: int, dma: Memory, *, pri: PriPort | None = None, ats: AtsPort | None = None,
                 interrupt: Callable[[int], None] | None = None,
                 schedule: Callable[[Callable[[], None]], None] | None = None,
                 may_master: Callable[[], bool] | None = None, watch: Callable[[], None] | None = None,
                 mac: bytes = DEFAULT_MAC) -> None:
        """``schedule`` runs DMA work on the device worker; ``watch()`` is called when
        :attr:`watching` (should the backend fd be read?) changes; ``may_master`` is Bus
        Master Enable."""
        if len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        self.sid = sid
        self.mac = bytes(mac)
        self.interrupt = interrupt or (lambda vector: None)
        self.schedule = schedule or (lambda fn: fn())
        self.watch = watch or (lambda: None)
        self.backend: PacketBackend | None = None
        self.watching = False
        self.epoch = 0
        self._pending_vectors: set[int] = set()
        self.port = DmaPort(smmu, sid, dma, pri=pri, ats=ats, may_master=may_master,
                            prg_response=self.on_prg_response, name="nic")
        self.reset()

    # ------------------------------------------------------------ state
    def reset(self) -> None:
        """Power-on state (function reset, FLR, Bus Master off): rings stopped and
        unprogrammed, counters zero, FIFO and held frame dropped, no PRG. The backend
        (the link) stays."""
        self.epoch += 1
        self.rx = Ring("rx")
        self.tx = Ring("tx")
        self.counters = [0] * len(NicCounter)
        self.irq_status = 0
        self.fifo: collections.deque[bytes] = collections.deque()
        self._held: _RxWork | None = None
        self._clear_inbox()
        self._pending_vectors.clear()
        self.port.reset()
        self._update_watch()

    @property
    def link_up(self) -> bool:
        return self.backend is not None

    @property
    def waiting_prg(self) -> bool:
        return self._held is not None and self._held.prg is not None

    def status(self) -> int:
        """STATUS register value."""
        bits = StatusBit(0)
        for on, bit in ((self.link_up, StatusBit.LINK_UP), (self.rx.enabled, StatusBit.RX_ENABLED),
                        (self.tx.enabled, StatusBit.TX_ENABLED), (self.rx.halted, StatusBit.RX_HALTED),
                        (self.tx.halted, StatusBit.TX_HALTED), (self.waiting_prg, StatusBit.RX_WAIT_PRG)):
            if on:
                bits |= bit
        return int(bits)

    def ctrl(self) -> int:
        return (CtrlBit.RX_ENABLE if self.rx.enabled else 0) | (CtrlBit.TX_ENABLE if self.tx.enabled else 0)

    def count(self, which: NicCounter) -> int:
        return self.counters[which] & COUNTER_MASK

    def counter_dict(self) -> dict[str, int]:
        return {c.name.lower(): self.count(c) for c in NicCounter}

    def _bump(self, *which: NicCounter, by: int = 1) -> None:
        for c in which:
            self.counters[c] += by

    # ------------------------------------------------------------ software interface
    def configure(self, ring: Ring, *, base: int | None = None, cfg: int | None = None) -> bool:
        """Program a ring's BASE / CFG (only while the ring is disabled; HEAD/TAIL go to 0)."""
        if ring.enabled:
            log.warning("guest error: nic sid=%#x: %s ring reconfiguration ignored while enabled", self.sid,
                        ring.name)
            return False
        if base is not None:
            ring.base = base & ~(DESC_SIZE - 1) & ((1 << 64) - 1)
        if cfg is not None:
            ring.cfg = cfg & CFG_FIELDS
        ring.head = ring.tail = 0
        log.info("nic sid=%#x: %s ring base=%#x size=%d pasid=%s", self.sid, ring.name, ring.base,
                 1 << ring.log2size, ring.pasid)
        return True

    def set_ctrl(self, value: int) -> None:
        """CTRL: enabling a ring (0->1) clears its HALTED; disabling stops it (RX drops its held frame)."""
        for ring, bit in ((self.rx, CtrlBit.RX_ENABLE), (self.tx, CtrlBit.TX_ENABLE)):
            on = bool(value & bit)
            if on == ring.enabled:
                continue
            log.info("nic sid=%#x: %s ring %s", self.sid, ring.name, "enabled" if on else "disabled")
            ring.enabled = on
            if on:
                ring.halted = False
            elif ring is self.rx and self._held is not None:
                log.info("nic sid=%#x: RX disabled: held frame for descriptor %d dropped", self.sid,
                         self._held.index)
                self._held = None
                self._bump(NicCounter.RX_DROPS)
        self._update_watch()
        self.kick()

    def doorbell(self, ring: Ring, tail: int) -> None:
        ring.tail = tail & ring.mask
        log.debug("nic sid=%#x: %s tail=%d", self.sid, ring.name, ring.tail)
        self.kick()

    def ack_irq(self, bits: int) -> None:
        """IRQ_STATUS is RW1C."""
        self.irq_status &= ~bits

    def raise_cause(self, cause: IrqCause) -> None:
        """Latch ``cause`` and fire its vector (now, or at the end of the current run)."""
        self.irq_status |= cause
        vector = _CAUSE_VECTOR[cause]
        if self._running:
            self._pending_vectors.add(vector)
        else:
            self.interrupt(vector)

    # ------------------------------------------------------------ backend (the wire)
    def set_backend(self, backend: PacketBackend | None, *, notify: bool = True) -> None:
        """Attach or detach the wire: link up/down (IrqCause.LINK when it changes, unless
        ``notify`` is False: the wire present at power-on is no link *change*).

        The previous backend is not closed: its owner decides (a TAP may be reattached).
        """
        was = self.link_up
        self.backend = backend
        log.info("nic sid=%#x: backend %s: link %s", self.sid, type(backend).__name__ if backend else "none",
                 "up" if self.link_up else "down")
        self._update_watch()
        if was != self.link_up and notify:
            self.raise_cause(IrqCause.LINK)

    def _accepting(self) -> bool:
        """May the backend be read now? Not while a frame waits for a PRG (backpressure) or the FIFO is full."""
        return self.backend is not None and self._held is None and len(self.fifo) < RX_FIFO_DEPTH

    def _update_watch(self) -> None:
        want = self._accepting()
        if want != self.watching:
            self.watching = want
            self.watch()

    def backend_readable(self) -> int:
        """The backend fd is readable (event loop, no DMA): move frames into the FIFO."""
        backend = self.backend
        n = 0
        while self._accepting():
            frame = backend.recv()
            if frame is None:
                break
            self.fifo.append(frame)
            n += 1
        self._update_watch()
        if n:
            self.kick()
        return n

    # ------------------------------------------------------------ SMMU-facing callbacks
    def on_prg_response(self, ssid: int | None, prg_index: int, code: PrgResponseCode) -> None:
        """A PRG Response Message for this function (queued, handled by the run loop)."""
        self._inbox.append((prg_index, code))
        self.kick()

    # ------------------------------------------------------------ run loop (RunLoop)
    def _step(self) -> bool:
        """Send, then receive: both get a turn every round."""
        progressed = self._tx_step()
        return self._rx_step() or progressed

    def _ran(self) -> None:
        """Raise each cause's vector once for the whole run (coalesced), then watch the
        backend again if the device can take frames."""
        vectors, self._pending_vectors = self._pending_vectors, set()
        for vector in sorted(vectors):
            self.interrupt(vector)
        self._update_watch()

    def pri_reset(self) -> None:
        """PRI Control.Reset: outstanding groups are discarded; a held frame is retried
        (and, with PRI now disabled, dropped as DMA_FAULT)."""
        self.port.pri_reset()
        if self._held is not None:
            self._held.prg = None
        self.kick()

    def flush_atc(self) -> None:
        self.port.flush_atc()

    # ------------------------------------------------------------ descriptors
    def _fetch(self, ring: Ring, faults: list[int]) -> bytes | None:
        """Read the descriptor at HEAD; on a fault halt the ring (None)."""
        addr = ring.slot(ring.head)
        self.port.sink = faults
        try:
            return self.port.read(ring.pasid, addr, DESC_SIZE)
        except DmaFault as f:
            log.warning("nic sid=%#x: %s descriptor %d fetch at %#x failed: %s -> halt [f%d]", self.sid,
                        ring.name, ring.head, addr, f.reason, f.fault_id)
            self._halt(ring, faults, f, "FETCH_FAULT")
            return None
        finally:
            self.port.sink = None

    def _write_back(self, ring: Ring, index: int, record: bytes, faults: list[int]) -> bool:
        """Write a descriptor back in place; on a fault halt the ring (False)."""
        self.port.sink = faults
        try:
            self.port.write(ring.pasid, ring.slot(index), record)
            return True
        except DmaFault as f:
            log.warning("nic sid=%#x: %s descriptor %d write-back failed: %s -> halt [f%d]", self.sid, ring.name,
                        index, f.reason, f.fault_id)
            self._halt(ring, faults, f, "WRITEBACK_FAULT")
            return False
        finally:
            self.port.sink = None

    def _halt(self, ring: Ring, faults: list[int], f: DmaFault | None, status: str) -> None:
        self._bump(NicCounter.RX_DMA_FAULTS if ring is self.rx else NicCounter.TX_DMA_FAULTS)
        ring.halted = True
        if f is not None and not f.fault_id:
            faults.append(DmaPort.birth(f))
        for fid in dict.fromkeys(faults):
            TRACER.hop(fid, "endpoint.complete", ring=ring.name, status=status,
                       fault_addr=f.addr if f is not None else 0, descriptor=ring.head, halted=True)
        log.warning("nic sid=%#x: %s ring halted at descriptor %d", self.sid, ring.name, ring.head)
        self.raise_cause(IrqCause.ERROR)

    def _completed(self, ring: Ring, index: int, status: DescStatus, faults: list[int], fault_addr: int) -> None:
        """A descriptor was written back: HEAD moves, the cause latches, its faults complete."""
        ring.advance()
        for fid in dict.fromkeys(faults):
            TRACER.hop(fid, "endpoint.complete", ring=ring.name, status=status.name, fault_addr=fault_addr,
                       descriptor=index)
        self.raise_cause(IrqCause.RX if ring is self.rx else IrqCause.TX)

    # ------------------------------------------------------------ transmit
    def _tx_step(self) -> bool:
        ring = self.tx
        if not ring.running or not ring.posted:
            return False
        epoch, index, faults = self.epoch, ring.head, []
        raw = self._fetch(ring, faults)
        if raw is None:
            return True
        d = TX_DESC.decode(raw)
        status, event, fault_addr = self._transmit(ring, d.Addr, d.Length, faults)
        if epoch != self.epoch:
            log.info("nic sid=%#x: TX descriptor %d abandoned by a reset", self.sid, index)
            return True
        record = TX_DESC.encode(Addr=d.Addr, Length=d.Length, Status=int(status), Event=event)
        if self._write_back(ring, index, record, faults):
            self._completed(ring, index, status, faults, fault_addr)
        return True

    def _transmit(self, ring: Ring, addr: int, length: int, faults: list[int]) -> tuple[DescStatus, int, int]:
        """Read one frame and hand it to the backend: (status, event, fault address)."""
        if not MIN_FRAME <= length <= MAX_FRAME:
            log.info("guest error: nic sid=%#x: TX descriptor %d length %d outside %d..%d", self.sid, ring.head,
                     length, MIN_FRAME, MAX_FRAME)
            self._bump(NicCounter.TX_DROPS)
            return DescStatus.TOO_BIG, 0, 0
        self.port.sink = faults
        try:
            frame = self.port.read(ring.pasid, addr, length)
        except DmaFault as f:
            if not f.fault_id:
                faults.append(DmaPort.birth(f))
            log.info("nic sid=%#x: TX descriptor %d read fault at %#x: %s [f%d]", self.sid, ring.head, f.addr,
                     f.reason, f.fault_id)
            self._bump(NicCounter.TX_DMA_FAULTS, NicCounter.TX_DROPS)
            return DescStatus.DMA_FAULT, f.event, f.addr
        finally:
            self.port.sink = None
        if self.backend is None:
            self._bump(NicCounter.TX_DROPS)
            return DescStatus.LINK_DOWN, 0, 0
        if self.backend.send(frame):
            self._bump(NicCounter.TX_PACKETS)
            self._bump(NicCounter.TX_BYTES, by=length)
        else:
            self._bump(NicCounter.TX_DROPS)
        return DescStatus.DONE, 0, 0

    # ------------------------------------------------------------ receive
    def _rx_step(self) -> bool:
        work = self._held
        if work is not None:
            if work.epoch != self.epoch:  # held across a reset (DMA released the lock): drop it
                self._held = None
                return True
            if work.prg is not None:
                return False  # waiting for the PRG response
            self._held = None
            self._place(work)  # retry after Success / a discarded PRG
            return True
        if not self.fifo:
            return False
        self._receive(self.fifo.popleft())
        return True

    def _receive(self, frame: bytes) -> None:
        ring = self.rx
        if not ring.running or not ring.posted:
            log.debug("nic sid=%#x: RX frame of %d bytes dropped: %s", self.sid, len(frame),
                      "ring not running" if not ring.running else "no posted buffer")
            self._bump(NicCounter.RX_NO_BUFFER, NicCounter.RX_DROPS)
            return
        faults: list[int] = []
        index = ring.head
        raw = self._fetch(ring, faults)
        if raw is None:
            self._bump(NicCounter.RX_DROPS)
            return
        d = RX_DESC.decode(raw)
        work = _RxWork(frame, index, d.Addr, d.BufLen, self.epoch, faults)
        if len(frame) > min(d.BufLen, MAX_FRAME):
            log.info("nic sid=%#x: RX frame of %d bytes does not fit descriptor %d (BufLen %d)", self.sid,
                     len(frame), index, d.BufLen)
            self._bump(NicCounter.RX_DROPS)
            self._finish_rx(work, DescStatus.TOO_BIG)
            return
        self._place(work)

    def _place(self, work: _RxWork) -> None:
        """Write the frame into its buffer; on a recoverable fault send a PRG and hold it."""
        self.port.sink = work.faults
        try:
            self.port.write(self.rx.pasid, work.addr, work.frame)
        except DmaFault as f:
            log.info("nic sid=%#x: RX descriptor %d buffer fault at %#x: %s [f%d]", self.sid, work.index, f.addr,
                     f.reason, f.fault_id)
            if f.recoverable and self._try_pri(work, f):
                return
            if not f.fault_id:
                work.faults.append(DmaPort.birth(f))
            self._bump(NicCounter.RX_DMA_FAULTS, NicCounter.RX_DROPS)
            self._finish_rx(work, DescStatus.DMA_FAULT, event=f.event, fault_addr=f.addr)
            return
        finally:
            self.port.sink = None
        if self._finish_rx(work, DescStatus.DONE, frame_len=len(work.frame)):
            self._bump(NicCounter.RX_PACKETS)
            self._bump(NicCounter.RX_BYTES, by=len(work.frame))

    def _finish_rx(self, work: _RxWork, status: DescStatus, *, frame_len: int = 0, event: int = 0,
                   fault_addr: int = 0) -> bool:
        """Write the RX descriptor back; False when a reset overtook it or the write-back faulted."""
        if work.epoch != self.epoch:
            log.info("nic sid=%#x: RX descriptor %d abandoned by a reset", self.sid, work.index)
            return False
        record = RX_DESC.encode(Addr=work.addr, BufLen=work.buflen, FrameLen=frame_len, Status=int(status),
                                Event=event)
        if not self._write_back(self.rx, work.index, record, work.faults):
            if status == DescStatus.DONE:
                self._bump(NicCounter.RX_DROPS)
            return False
        log.debug("nic sid=%#x: RX descriptor %d %s (%d bytes)", self.sid, work.index, status.name, frame_len)
        self._completed(self.rx, work.index, status, work.faults, fault_addr)
        return True

    # ------------------------------------------------------------ PRI (RX buffers)
    def _try_pri(self, work: _RxWork, f: DmaFault) -> bool:
        """Send a PRG for the buffer's faulting page(s) and hold the frame; False if PRI cannot help."""
        if work.epoch != self.epoch:
            return False  # a reset overtook this frame: nothing may be requested for it
        why = self.port.pri_unavailable()
        if why is not None:
            log.info("nic sid=%#x: %s: RX descriptor %d drops its frame", self.sid, why, work.index)
            return False
        if work.prg_rounds >= MAX_PRG_ROUNDS:
            log.warning("nic sid=%#x: RX descriptor %d still faulting after %d PRGs: giving up", self.sid,
                        work.index, work.prg_rounds)
            return False
        pages = self._gather_pages(work, f)
        prg = self.port.send_prg(self.rx.pasid, pages, descriptor=work.index, ring="rx")
        if prg is None:
            return False
        self._bump(NicCounter.PAGE_REQUESTS, by=prg.count)
        work.prg = prg.index
        work.prg_rounds += 1
        work.first_fault = work.first_fault or f
        work.faults.append(prg.fault)
        self._held = work
        log.info("nic sid=%#x: RX descriptor %d holds its frame for PRG %d [f%d]", self.sid, work.index, prg.index,
                 prg.fault)
        return True

    def _gather_pages(self, work: _RxWork, f: DmaFault) -> list[tuple[int, bool, bool]]:
        """The faulting page first, then the buffer's later pages that lack write access (within credits)."""
        first = f.addr & ~(PAGE - 1)
        pages = [first]
        end = work.addr + len(work.frame)
        page = first + PAGE
        while page < end and len(pages) < self.port.credits:
            if self.port.lacks_access(self.rx.pasid, page, Access.WRITE):
                pages.append(page)
            page += PAGE
        return [(p, False, True) for p in pages]

    def _handle_response(self, index: int, code: PrgResponseCode) -> None:
        prg, _unexpected = self.port.take_response(index, code)
        if prg is None:
            return
        self._bump({PrgResponseCode.SUCCESS: NicCounter.PRG_SUCCESS,
                    PrgResponseCode.INVALID_REQUEST: NicCounter.PRG_INVALID}.get(code, NicCounter.PRG_FAILURE))
        work = self._held
        if work is None or work.prg != prg.index:
            log.info("nic sid=%#x: PRG %d answered %s but its frame is gone", self.sid, index, code.name)
            if code not in (PrgResponseCode.SUCCESS, PrgResponseCode.INVALID_REQUEST):
                self.port.pri_failed()
            return
        work.prg = None
        if code == PrgResponseCode.SUCCESS:
            return  # the run loop retries the write
        self._held = None
        f = work.first_fault
        if code == PrgResponseCode.INVALID_REQUEST:
            self._bump(NicCounter.RX_DMA_FAULTS, NicCounter.RX_DROPS)
            self._finish_rx(work, DescStatus.DMA_FAULT, fault_addr=f.addr if f else 0)
            return
        self.port.pri_failed()
        self._bump(NicCounter.RX_DROPS)
        if self._finish_rx(work, DescStatus.PRI_FAILURE, fault_addr=f.addr if f else 0):
            self.rx.halted = True
            log.warning("nic sid=%#x: PRG Response Failure: RX ring halted after descriptor %d", self.sid,
                        work.index)
            self.raise_cause(IrqCause.ERROR)
