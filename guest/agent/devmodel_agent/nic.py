"""Driver for the NIC endpoint: one RX and one TX ring of write-back descriptors.

Registers, descriptor and counter layouts are the shared ones of
``devmodel.devices.nic_records``. Rings, RX buffers and TX frame buffers live in the
agent's reserved RAM and are reached by the NIC through the SMMU with its StreamID and
the rings' PASID, so the agent maps every page identity (IOVA = physical address) in
that context, like the DMA-engine driver does.

RX follows the e1000 pattern: software posts buffers HEAD..TAIL-1 with Status=0, the
device writes FrameLen/Status/Event back in place, and the RX interrupt handler reaps
slots in order while their Status is non-zero, logs each frame and re-posts its buffer
at TAIL. A buffer whose pages the driver unmapped (``unmap-rx``) is parked instead of
re-posted: re-posting would only fault again; ``remap-rx`` maps and posts it again.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field

# The guest's minimal Python has no OpenSSL (_hashlib) and ships only the modules the image
# lists: use the interpreter's built-in SHA-256 and Mersenne Twister directly.
try:
    from _sha256 import sha256  # CPython <= 3.11 built-in
except ImportError:  # pragma: no cover - newer hosts
    from hashlib import sha256
from _random import Random

from devmodel.devices.nic_records import (CFG_LOG2SIZE_MASK, CFG_MAX_LOG2SIZE, CFG_PASID_EN, CFG_PASID_SHIFT,
                                          DESC_SIZE, MAX_FRAME, MIN_FRAME, NIC_ID, RX_DESC, TX_DESC, CtrlBit,
                                          DescStatus, NicCounter, Reg, StatusBit)

from devmodel_agent.hw import PAGE, AgentError, Allocator, Memory, Regs

log = logging.getLogger(__name__)

TX_BUF_SIZE = 2048  # one MAX_FRAME frame per TX slot
SHORT_FRAME = 128  # frames up to this many bytes are printed as hex, longer ones as sha256 only
GEN_ETHERTYPE = bytes.fromhex("88b5")  # IEEE 802 local experimental EtherType
BROADCAST = b"\xff" * 6


def status_names(status: int) -> str:
    names = [bit.name for bit in StatusBit if status & bit]
    return "|".join(names) or "IDLE"


def desc_status_name(status: int) -> str:
    try:
        return DescStatus(status).name
    except ValueError:
        return f"UNKNOWN_{status:#x}"


def generated_frame(length: int, seed: int, mac: bytes) -> bytes:
    """A reproducible test frame: broadcast, from ``mac``, EtherType 0x88b5, payload from ``seed``.

    Why: a host-side test (or a peer in the namespace) regenerates the same bytes to check
    the TX path without shipping them through the console.
    """
    if not MIN_FRAME <= length <= MAX_FRAME:
        raise AgentError(errno.EINVAL, f"frame length must be {MIN_FRAME}..{MAX_FRAME}")
    n = length - MIN_FRAME
    payload = Random(seed).getrandbits(8 * n).to_bytes(n, "little") if n else b""
    return BROADCAST + mac + GEN_ETHERTYPE + payload


@dataclass
class RxBuffer:
    """One receive buffer: identity mapped (iova == pa), possibly unmapped by ``unmap-rx``."""

    index: int
    iova: int
    size: int
    mapped: bool = True

    def pages(self) -> list[int]:
        return list(range(self.iova & ~(PAGE - 1), self.iova + self.size, PAGE))


@dataclass
class RxFrame:
    """A written-back RX descriptor as the interrupt handler saw it."""

    seq: int
    slot: int
    buffer: int
    status: int
    length: int
    event: int
    data: bytes = b""


@dataclass
class TxJob:
    slot: int
    length: int
    status: int | None = None
    event: int = 0

    @property
    def done(self) -> bool:
        return self.status is not None


@dataclass
class NicRings:
    """What ``up`` built: ring addresses, buffers and the PASID they are reached with."""

    pasid: int
    rx_log2: int
    tx_log2: int
    rx_ring: int
    tx_ring: int
    tx_bufs: int
    buf_size: int
    buffers: list[RxBuffer] = field(default_factory=list)


class NicDriver:
    """Ring management over the NIC's BAR0 registers (callers hold the agent lock)."""

    def __init__(self, regs: Regs, mem: Memory, alloc: Allocator) -> None:
        self.regs = regs
        self.mem = mem
        self.alloc = alloc
        self.mac = b""
        self.rings: NicRings | None = None
        self.rx_clean = 0  # next slot the RX handler reaps
        self.rx_tail = 0  # next slot software posts into
        self.posted: dict[int, RxBuffer] = {}  # slot -> buffer
        self.parked: list[RxBuffer] = []  # completed buffers not re-posted (unmapped)
        self.tx_tail = 0
        self.tx_jobs: dict[int, TxJob] = {}
        self.frames: list[RxFrame] = []
        self.errors = 0

    # ------------------------------------------------------------ identity
    def probe(self) -> None:
        ident = self.regs.read32(Reg.ID)
        if ident != NIC_ID:
            raise AgentError(errno.ENODEV, f"NIC ID register reads {ident:#x}, not {NIC_ID:#x}")
        lo, hi = self.regs.read32(Reg.MAC_LO), self.regs.read32(Reg.MAC_HI)
        self.mac = lo.to_bytes(4, "little") + (hi & 0xFFFF).to_bytes(2, "little")
        log.info("nic: probed, MAC %s", self.mac.hex(":"))

    @property
    def is_up(self) -> bool:
        return self.rings is not None

    def status(self) -> int:
        return self.regs.read32(Reg.STATUS)

    def counters(self) -> dict[str, int]:
        return {c.name.lower(): self.regs.read32(Reg.COUNTERS + 4 * c) for c in NicCounter}

    def ack_irqs(self) -> int:
        """Read and clear (RW1C) the latched interrupt causes."""
        causes = self.regs.read32(Reg.IRQ_STATUS)
        if causes:
            self.regs.write32(Reg.IRQ_STATUS, causes)
        return causes

    # ------------------------------------------------------------ bring-up
    def allocate(self, rx_log2: int, tx_log2: int, buffers: int, buf_size: int, pasid: int) -> NicRings:
        """Rings, RX buffers (each in pages of its own, so one can be unmapped alone), TX buffers."""
        for name, n in (("rx", rx_log2), ("tx", tx_log2)):
            if not 1 <= n <= CFG_MAX_LOG2SIZE:
                raise AgentError(errno.EINVAL, f"--{name}-log2 must be 1..{CFG_MAX_LOG2SIZE}")
        if not 1 <= buffers < 1 << rx_log2:
            raise AgentError(errno.EINVAL, f"--buffers must be 1..{(1 << rx_log2) - 1} (one slot stays empty)")
        if not MIN_FRAME <= buf_size <= 0xFFFF:
            raise AgentError(errno.EINVAL, f"--buf-size must be {MIN_FRAME}..65535")
        if not 0 <= pasid < 1 << 20:
            raise AgentError(errno.EINVAL, "--pasid out of range")
        rx_size, tx_size = DESC_SIZE << rx_log2, DESC_SIZE << tx_log2
        rx_ring = self.alloc.alloc(rx_size, max(rx_size, PAGE))
        tx_ring = self.alloc.alloc(tx_size, max(tx_size, PAGE))
        tx_bufs = self.alloc.alloc(TX_BUF_SIZE << tx_log2)
        span = (buf_size + PAGE - 1) & ~(PAGE - 1)
        bufs = [RxBuffer(i, self.alloc.alloc(span), buf_size) for i in range(buffers)]
        return NicRings(pasid, rx_log2, tx_log2, rx_ring, tx_ring, tx_bufs, buf_size, bufs)

    def release(self, rings: NicRings) -> None:
        """Return the rings and buffers of a stopped, unmapped NIC to the allocator."""
        for addr in (rings.rx_ring, rings.tx_ring, rings.tx_bufs, *(b.iova for b in rings.buffers)):
            self.alloc.free(addr)

    def dma_pages(self, rings: NicRings) -> list[int]:
        """Every page the NIC must reach: rings, TX frame buffers, RX buffers."""
        out = list(range(rings.rx_ring, rings.rx_ring + (DESC_SIZE << rings.rx_log2), PAGE))
        out += range(rings.tx_ring, rings.tx_ring + (DESC_SIZE << rings.tx_log2), PAGE)
        out += range(rings.tx_bufs, rings.tx_bufs + (TX_BUF_SIZE << rings.tx_log2), PAGE)
        for b in rings.buffers:
            out += b.pages()
        return out

    def start(self, rings: NicRings) -> None:
        """Disable, program both rings, post every buffer, enable RX and TX."""
        self.regs.write32(Reg.CTRL, 0)
        cfg_pasid = (CFG_PASID_EN | rings.pasid << CFG_PASID_SHIFT) if rings.pasid else 0
        self.regs.write64(Reg.RX_BASE, rings.rx_ring)
        self.regs.write32(Reg.RX_CFG, (rings.rx_log2 & CFG_LOG2SIZE_MASK) | cfg_pasid)
        self.regs.write64(Reg.TX_BASE, rings.tx_ring)
        self.regs.write32(Reg.TX_CFG, (rings.tx_log2 & CFG_LOG2SIZE_MASK) | cfg_pasid)
        self.rings = rings
        self.rx_clean = self.regs.read32(Reg.RX_HEAD)
        self.rx_tail = self.rx_clean
        self.tx_tail = self.regs.read32(Reg.TX_HEAD)
        self.posted.clear()
        self.parked.clear()
        self.tx_jobs.clear()
        for b in rings.buffers:
            self._post(b, doorbell=False)
        self.regs.write32(Reg.RX_TAIL, self.rx_tail)
        self.regs.write32(Reg.TX_TAIL, self.tx_tail)
        self.regs.write32(Reg.CTRL, CtrlBit.RX_ENABLE | CtrlBit.TX_ENABLE)
        log.info("nic: up, rx ring %#x (%d) tx ring %#x (%d) pasid %d, %d buffers posted, status %s",
                 rings.rx_ring, 1 << rings.rx_log2, rings.tx_ring, 1 << rings.tx_log2, rings.pasid,
                 len(rings.buffers), status_names(self.status()))

    def stop(self) -> None:
        self.regs.write32(Reg.CTRL, 0)
        self.rings = None
        self.posted.clear()
        self.parked.clear()

    def restart(self) -> None:
        """Clear and set the ring enables: a halted ring resumes at its HEAD (nic_records.Reg.CTRL)."""
        self.regs.write32(Reg.CTRL, 0)
        self.regs.write32(Reg.CTRL, CtrlBit.RX_ENABLE | CtrlBit.TX_ENABLE)

    # ------------------------------------------------------------ RX
    def _mask(self, log2: int) -> int:
        return (1 << log2) - 1

    def _rx_desc_addr(self, slot: int) -> int:
        return self.rings.rx_ring + slot * DESC_SIZE

    def _post(self, buf: RxBuffer, doorbell: bool = True) -> int:
        r = self.rings
        slot = self.rx_tail
        self.mem.write(self._rx_desc_addr(slot), RX_DESC.encode(Addr=buf.iova, BufLen=buf.size))
        self.posted[slot] = buf
        self.rx_tail = (slot + 1) & self._mask(r.rx_log2)
        if doorbell:
            self.regs.write32(Reg.RX_TAIL, self.rx_tail)
        return slot

    def reap_rx(self, seq_base: int) -> list[RxFrame]:
        """Take every written-back RX descriptor in order; re-post mapped buffers at TAIL."""
        if self.rings is None:
            return []
        out: list[RxFrame] = []
        repost = False
        while self.rx_clean != self.rx_tail:
            slot = self.rx_clean
            d = RX_DESC.decode(self.mem.read(self._rx_desc_addr(slot), DESC_SIZE))
            if d.Status == DescStatus.POSTED:
                break
            buf = self.posted.pop(slot)
            length = min(d.FrameLen, buf.size)
            data = self.mem.read(buf.iova, length) if d.Status == DescStatus.DONE else b""
            frame = RxFrame(seq_base + len(out) + 1, slot, buf.index, d.Status, d.FrameLen, d.Event, data)
            out.append(frame)
            log.info("nic rx: slot %d buffer %d %s len=%d event=%d", slot, buf.index, desc_status_name(d.Status),
                     d.FrameLen, d.Event)
            self.rx_clean = (slot + 1) & self._mask(self.rings.rx_log2)
            if buf.mapped:
                self._post(buf, doorbell=False)
                repost = True
            else:
                self.parked.append(buf)
                log.info("nic rx: buffer %d stays unmapped: parked, not re-posted", buf.index)
        if repost:
            self.regs.write32(Reg.RX_TAIL, self.rx_tail)
        self.frames.extend(out)
        return out

    def unfilled(self) -> list[tuple[int, RxBuffer]]:
        """Posted buffers the device has not written back yet, in the order it fills them."""
        out = []
        slot = self.rx_clean
        while slot != self.rx_tail:
            d = RX_DESC.decode(self.mem.read(self._rx_desc_addr(slot), DESC_SIZE))
            if d.Status == DescStatus.POSTED:
                out.append((slot, self.posted[slot]))
            slot = (slot + 1) & self._mask(self.rings.rx_log2)
        return out

    def repost_parked(self) -> list[tuple[int, RxBuffer]]:
        out = []
        for buf in [b for b in self.parked if b.mapped]:
            self.parked.remove(buf)
            out.append((self._post(buf, doorbell=False), buf))
        if out:
            self.regs.write32(Reg.RX_TAIL, self.rx_tail)
        return out

    # ------------------------------------------------------------ TX
    def tx_in_flight(self) -> int:
        return sum(1 for j in self.tx_jobs.values() if not j.done)

    def send(self, frame: bytes, doorbell: bool = True) -> TxJob:
        r = self.rings
        if r is None:
            raise AgentError(errno.ENETDOWN, "NIC not up ('dm nic up')")
        if not MIN_FRAME <= len(frame) <= MAX_FRAME:
            raise AgentError(errno.EINVAL, f"frame length {len(frame)} outside {MIN_FRAME}..{MAX_FRAME}")
        if self.tx_in_flight() >= (1 << r.tx_log2) - 1:
            raise AgentError(errno.EBUSY, "TX ring full")
        slot = self.tx_tail
        buf = r.tx_bufs + slot * TX_BUF_SIZE
        self.mem.write(buf, frame)
        self.mem.write(r.tx_ring + slot * DESC_SIZE, TX_DESC.encode(Addr=buf, Length=len(frame)))
        job = self.tx_jobs[slot] = TxJob(slot, len(frame))
        self.tx_tail = (slot + 1) & self._mask(r.tx_log2)
        if doorbell:
            self.ring_tx()
        log.info("nic tx: slot %d len %d", slot, len(frame))
        return job

    def ring_tx(self) -> None:
        self.regs.write32(Reg.TX_TAIL, self.tx_tail)

    def reap_tx(self) -> list[TxJob]:
        if self.rings is None:
            return []
        done = []
        for job in self.tx_jobs.values():
            if job.done:
                continue
            d = TX_DESC.decode(self.mem.read(self.rings.tx_ring + job.slot * DESC_SIZE, DESC_SIZE))
            if d.Status != DescStatus.POSTED:
                job.status, job.event = d.Status, d.Event
                done.append(job)
                log.info("nic tx: slot %d %s event=%d", job.slot, desc_status_name(d.Status), d.Event)
        return done


def frame_fields(frame: bytes) -> dict[str, object]:
    """How a frame is printed: hex when short, always its sha256."""
    out: dict[str, object] = {"sha256": sha256(frame).hexdigest()}
    if len(frame) <= SHORT_FRAME:
        out["hex"] = frame.hex() or "-"
    return out

