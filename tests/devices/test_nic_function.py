"""NIC PCI function: identity, registers, RX/TX through a real SMMUv3 and a real socket-pair
backend, faults without PRI, the three PRI outcomes, ring halts, Bus Master gating, resets
and link state.

The function is driven only through its vfio-user entry points (config space, BAR0), as a
backend would; the backend fd is served by calling the reader the NIC registered on the
:class:`~vfio_user.loopback.LoopbackContext` when the fd is readable (select), and
``call_soon`` work runs in :meth:`NicRig.pump`. SMMU world, tables and queues: the shared
``devmodel.iommu.builder`` (playing the host driver), as in the DMA engine tests.

Spec rules cited per test: the NIC contract (module docstrings of devmodel.devices.nic and
nic_pci; nic_records), reference smmuv3-pcie.md §3 (event records), §8.1-§8.5 (PCIe
capabilities), §8.6 (PRG response codes); PCI 3.0 §6.2.2 (Bus Master Enable); PCIe §6.6.2 (FLR).
"""

from __future__ import annotations

import select
from collections.abc import Iterator

import pytest

from devmodel.devices.nic_pci import NicFunction
from devmodel.devices.nic_records import (CFG_PASID_EN, CFG_PASID_SHIFT, DEFAULT_MAC, DESC_SIZE, MSIX_VECTOR_ERROR,
                                          MSIX_VECTOR_RX, MSIX_VECTOR_TX, NIC_ID, RX_DESC, TX_DESC, CtrlBit,
                                          DescStatus, IrqCause, NicCounter, Reg, StatusBit)
from devmodel.devices.packet_backend import SocketPairBackend
from devmodel.iommu import records as rec
from devmodel.iommu.builder import make_s1_stream, make_world
from devmodel.iommu.records import EventId, Opcode
from devmodel.pci import regs
from vfio_user.device import PciIrq
from vfio_user.loopback import LoopbackContext

from .conftest import RegionAccess

SID = 0x108  # the NIC's host StreamID in the machine (the NIC model docstring (devmodel/devices/nic.py))
PASID = 5
RX_RING, TX_RING = 0x100000, 0x110000
RX_BUF, TX_BUF = 0x300000, 0x400000  # one page per buffer: RX_BUF + i * PAGE
PAGE = 0x1000
DATA_PA = 0x800000
RING_LOG2 = 4
MSIX = PciIrq.MSIX


def frame(i: int, size: int = 64) -> bytes:
    """An Ethernet frame (no FCS) whose payload identifies it."""
    head = DEFAULT_MAC + bytes.fromhex("020000000002") + b"\x88\xb5"
    body = bytes((i + k) & 0xFF for k in range(size - len(head)))
    return head + body


class NicRig(RegionAccess):
    """SMMU world + NIC function + socket-pair wire; the test plays host driver, guest driver and network."""

    def __init__(self, pasid: int | None = PASID) -> None:
        self.mem, self.alloc, self.smmu, self.sw = make_world(sid_bits=9)
        self.sw.enable()
        self.stream = make_s1_stream(self.sw, SID, ssids=(PASID,), s1cdmax=3, eats=rec.EATS_FULL)
        self.pasid = pasid
        self.pt = self.stream.tables[pasid or 0]
        self.next_pa = DATA_PA
        self.wire = SocketPairBackend()
        self.dev = NicFunction(self.smmu, SID, self.mem, backend=self.wire)
        self.regions = self.dev
        self.ctx = LoopbackContext(self.mem)
        for vector in range(3):
            self.ctx.install_eventfd(MSIX, vector)
        self.dev.attach(self.ctx)
        self.rx_slot = 0
        self.tx_slot = 0
        self.map(RX_RING)
        self.map(TX_RING)

    def close(self) -> None:
        self.ctx.close()
        self.dev.close()
        self.wire.close()

    # --- config space / BAR access ------------------------------------------------------
    def counter(self, which: NicCounter) -> int:
        return self.reg(Reg.COUNTERS + 4 * which)

    def status(self) -> StatusBit:
        return StatusBit(self.reg(Reg.STATUS))

    # --- guest driver --------------------------------------------------------------------
    def bring_up(self, *, master: bool = True, ats: bool = False, pri: bool = False, allocation: int = 32,
                 rx: bool = True, tx: bool = True) -> None:
        """Memory (+ Bus Master), MSI-X, optional ATS/PRI, both rings programmed and enabled."""
        cmd = regs.Command.MEMORY | (regs.Command.MASTER if master else 0)
        self.set_cfg(regs.PCI_COMMAND, 2, cmd)
        self.set_cfg(self.dev.msix.offset + regs.PCI_MSIX_FLAGS, 2, regs.PCI_MSIX_FLAGS_ENABLE)
        if ats:
            self.set_cfg(self.dev.ats.offset + regs.PCI_ATS_CTRL, 2, regs.PCI_ATS_CTRL_ENABLE)
        if pri:
            o = self.dev.pri.offset
            self.set_cfg(o + regs.PCI_PRI_ALLOC_REQ, 4, allocation)
            self.set_cfg(o + regs.PCI_PRI_CTRL, 2, regs.PCI_PRI_CTRL_ENABLE)
        ring_cfg = RING_LOG2 | ((self.pasid << CFG_PASID_SHIFT | CFG_PASID_EN) if self.pasid is not None else 0)
        self.set_reg(Reg.RX_BASE, RX_RING, 8)
        self.set_reg(Reg.RX_CFG, ring_cfg)
        self.set_reg(Reg.TX_BASE, TX_RING, 8)
        self.set_reg(Reg.TX_CFG, ring_cfg)
        self.set_reg(Reg.CTRL, (CtrlBit.RX_ENABLE if rx else 0) | (CtrlBit.TX_ENABLE if tx else 0))

    def map(self, va: int, write: bool = True) -> int:
        pa = self.next_pa
        self.next_pa += PAGE
        self.pt.map(va, pa, write=write)
        return pa

    def pa_of(self, va: int) -> int:
        r = self.smmu.translate(SID, self.pasid, va)
        assert r.ok, r.fault
        return r.pa

    def post_rx(self, count: int, *, mapped: bool = True, buflen: int = 2048) -> list[int]:
        """Post ``count`` RX buffers (one page each, mapped or not); returns their slots."""
        slots = []
        for _ in range(count):
            slot = self.rx_slot
            buf = RX_BUF + slot * PAGE
            if mapped:
                self.map(buf)
            desc = RX_DESC.encode(Addr=buf, BufLen=buflen)
            self.mem.write(self.pa_of(RX_RING + slot * DESC_SIZE), desc)
            slots.append(slot)
            self.rx_slot += 1
        self.set_reg(Reg.RX_TAIL, self.rx_slot)
        return slots

    def rx_desc(self, slot: int):
        return RX_DESC.decode(self.mem.read(self.pa_of(RX_RING + slot * DESC_SIZE), DESC_SIZE))

    def rx_bytes(self, slot: int, n: int) -> bytes:
        return self.mem.read(self.pa_of(RX_BUF + slot * PAGE), n)

    def send(self, *frames: bytes, mapped: bool = True, length: int | None = None) -> list[int]:
        """Queue frames on the TX ring (buffers mapped or not), ring the doorbell, let the NIC run."""
        slots = []
        for f in frames:
            slot = self.tx_slot
            buf = TX_BUF + slot * PAGE
            if mapped:
                self.mem.write(self.map(buf), f)
            desc = TX_DESC.encode(Addr=buf, Length=len(f) if length is None else length)
            self.mem.write(self.pa_of(TX_RING + slot * DESC_SIZE), desc)
            slots.append(slot)
            self.tx_slot += 1
        self.set_reg(Reg.TX_TAIL, self.tx_slot)
        self.pump()
        return slots

    def tx_desc(self, slot: int):
        return TX_DESC.decode(self.mem.read(self.pa_of(TX_RING + slot * DESC_SIZE), DESC_SIZE))

    # --- the network and the event loop --------------------------------------------------
    def inject(self, *frames: bytes) -> None:
        for f in frames:
            assert self.wire.inject(f)
        self.pump()

    def watched(self) -> bool:
        return self.wire.fileno() in self.ctx.readers

    def pump(self) -> None:
        """Play event loop + worker: fire the backend reader while its fd is readable, run queued work."""
        for _ in range(10_000):
            ran = self.ctx.run_pending()
            cb = self.ctx.readers.get(self.wire.fileno())
            if cb is not None and select.select([self.wire.fileno()], [], [], 0)[0]:
                cb()
                continue
            if not ran:
                return
        raise AssertionError("NIC never went idle")

    # --- host driver ---------------------------------------------------------------------
    def respond(self, req, code: int) -> None:
        self.sw.cmd(Opcode.CMD_PRI_RESP, StreamID=SID, SSV=req.SSV, SubstreamID=req.SubstreamID,
                    PRGIndex=req.PRGIndex, Resp=code)
        self.pump()


@pytest.fixture
def nic() -> Iterator[NicRig]:
    r = NicRig()
    yield r
    r.close()


@pytest.fixture(params=[None, PASID], ids=["no-pasid", "pasid"])
def any_nic(request) -> Iterator[NicRig]:
    r = NicRig(pasid=request.param)
    yield r
    r.close()


# ------------------------------------------------------------------ identity and registers
def test_identity_and_capabilities(nic):
    """§8.1 / the NIC model docstring (devmodel/devices/nic.py): 1af4:10f3 class 0x020000, PCIe v2 endpoint (FLR, EE prefix), MSI-X with 3
    vectors in BAR2 (table 0x000, PBA 0x800), ATS at 0x100, PASID width 20, PRI capacity 32 Stopped=1."""
    assert nic.cfg(regs.PCI_VENDOR_ID, 2) == 0x1AF4 and nic.cfg(regs.PCI_DEVICE_ID, 2) == 0x10F3
    assert nic.cfg(regs.PCI_CLASS_PROG, 3) == 0x020000
    assert nic.cfg(regs.PCI_STATUS, 2) & regs.Status.CAP_LIST
    exp = nic.dev.express.offset
    assert nic.cfg(exp + regs.PCI_EXP_DEVCAP, 4) & regs.PCI_EXP_DEVCAP_FLR
    assert nic.cfg(exp + regs.PCI_EXP_DEVCAP2, 4) & regs.PCI_EXP_DEVCAP2_EE_PREFIX
    msix = nic.dev.msix.offset
    assert nic.cfg(msix + regs.PCI_MSIX_FLAGS, 2) & 0x7FF == 2  # table size N-1
    assert nic.cfg(msix + regs.PCI_MSIX_TABLE, 4) == 2 and nic.cfg(msix + regs.PCI_MSIX_PBA, 4) == 0x800 | 2
    assert nic.cfg(regs.PCI_EXT_CAP_START, 4) & 0xFFFF == regs.ExtCapId.ATS
    pasid_cap = nic.cfg(nic.dev.pasid.offset + regs.PCI_PASID_CAP, 2)
    assert (pasid_cap & regs.PCI_PASID_CAP_WIDTH_MASK) >> regs.PCI_PASID_CAP_WIDTH_SHIFT == 20
    assert nic.cfg(nic.dev.pri.offset + regs.PCI_PRI_STATUS, 2) & regs.PCI_PRI_STATUS_STOPPED
    assert nic.cfg(nic.dev.pri.offset + regs.PCI_PRI_MAX_REQ, 4) == 32
    assert nic.dev.irq_info(PciIrq.INTX).count == 0 and nic.dev.irq_info(MSIX).count == 3


def test_bar0_register_map(nic):
    """nic_records.Reg: ID, MAC halves, *_BASE as one 8-byte access or two halves, CFG masking, ring
    registers locked while enabled, RO registers and unimplemented offsets ignore writes, counters block."""
    nic.set_cfg(regs.PCI_COMMAND, 2, regs.Command.MEMORY | regs.Command.MASTER)
    assert nic.reg(Reg.ID) == NIC_ID
    assert (nic.reg(Reg.MAC_LO).to_bytes(4, "little") + nic.reg(Reg.MAC_HI).to_bytes(2, "little")) == DEFAULT_MAC
    assert nic.reg(Reg.MAC_HI) >> 16 == 0
    nic.set_reg(Reg.RX_BASE, 0x1234_5678_9ABC_DE08, 8)
    assert nic.reg(Reg.RX_BASE, 8) == 0x1234_5678_9ABC_DE00  # 16-byte aligned: low bits ignored
    nic.set_reg(Reg.TX_BASE + 4, 0x1)
    nic.set_reg(Reg.TX_BASE, TX_RING)
    assert nic.reg(Reg.TX_BASE, 8) == 1 << 32 | TX_RING
    nic.set_reg(Reg.RX_CFG, 0xFFFF_FFFF)
    assert nic.reg(Reg.RX_CFG) == 0x8FFF_FF1F  # LOG2SIZE[4:0] PASID[27:8] PASID_EN[31]
    nic.set_reg(Reg.RX_BASE, RX_RING, 8)
    nic.set_reg(Reg.RX_CFG, RING_LOG2)
    nic.set_reg(Reg.CTRL, CtrlBit.RX_ENABLE)
    assert nic.reg(Reg.CTRL) == CtrlBit.RX_ENABLE
    assert nic.status() == StatusBit.LINK_UP | StatusBit.RX_ENABLED
    nic.set_reg(Reg.RX_BASE, 0x5000)  # ignored while enabled
    assert nic.reg(Reg.RX_BASE, 8) == RX_RING
    nic.set_reg(Reg.RX_TAIL, 0x13)  # masked to the ring size
    assert nic.reg(Reg.RX_TAIL) == 3
    nic.set_reg(Reg.RX_HEAD, 7)
    nic.set_reg(Reg.STATUS, 0xFF)
    nic.set_reg(Reg.ID, 0)
    assert nic.reg(Reg.RX_HEAD) == 0 and nic.status() == StatusBit.LINK_UP | StatusBit.RX_ENABLED
    assert nic.reg(Reg.ID) == NIC_ID
    nic.set_reg(0x800, 0xDEAD)
    assert nic.reg(0x800) == 0
    assert all(nic.counter(c) == 0 for c in NicCounter)


# ------------------------------------------------------------------ receive / transmit
def test_rx_frames_into_mapped_buffers(any_nic):
    """RX: frames from the wire land in the posted buffers (bytes), FrameLen + Status=DONE written back,
    HEAD advances, RX_PACKETS/RX_BYTES count, IRQ_STATUS.RX latched and MSI-X vector 0 sent."""
    nic = any_nic
    nic.bring_up()
    nic.post_rx(4)
    frames = [frame(1, 60), frame(2, 1514), frame(3, 64)]
    nic.inject(*frames)
    for slot, f in enumerate(frames):
        d = nic.rx_desc(slot)
        assert (d.Status, d.FrameLen, d.Event, d.BufLen) == (DescStatus.DONE, len(f), 0, 2048)
        assert nic.rx_bytes(slot, len(f)) == f
    assert nic.rx_desc(3).Status == DescStatus.POSTED
    assert nic.reg(Reg.RX_HEAD) == 3
    assert nic.counter(NicCounter.RX_PACKETS) == 3 and nic.counter(NicCounter.RX_BYTES) == sum(map(len, frames))
    assert nic.counter(NicCounter.RX_DROPS) == 0
    assert nic.reg(Reg.IRQ_STATUS) == IrqCause.RX
    assert nic.ctx.fired(MSIX, MSIX_VECTOR_RX) >= 1 and nic.ctx.fired(MSIX, MSIX_VECTOR_ERROR) == 0
    nic.set_reg(Reg.IRQ_STATUS, IrqCause.RX)  # RW1C
    assert nic.reg(Reg.IRQ_STATUS) == 0
    assert nic.sw.events() == []
    assert nic.dev.counters()["rx_packets"] == 3


def test_tx_frames_to_the_wire(any_nic):
    """TX: the doorbell sends HEAD..TAIL-1; the wire gets the exact bytes in order, Status=DONE is written
    back, TX_PACKETS/TX_BYTES count and MSI-X vector 1 is sent."""
    nic = any_nic
    nic.bring_up()
    frames = [frame(7, 14), frame(8, 1514), frame(9, 100)]
    slots = nic.send(*frames)
    assert nic.wire.collect() == frames
    assert [nic.tx_desc(s).Status for s in slots] == [DescStatus.DONE] * 3
    assert nic.reg(Reg.TX_HEAD) == 3
    assert nic.counter(NicCounter.TX_PACKETS) == 3 and nic.counter(NicCounter.TX_BYTES) == sum(map(len, frames))
    assert nic.ctx.fired(MSIX, MSIX_VECTOR_TX) >= 1 and nic.reg(Reg.IRQ_STATUS) == IrqCause.TX


def test_tx_bad_length_and_rx_too_big(nic):
    """nic_records.DescStatus.TOO_BIG: TX Length outside 14..1514, RX frame longer than BufLen; both dropped."""
    nic.bring_up()
    (slot,) = nic.send(frame(1, 64), length=13)
    assert nic.tx_desc(slot).Status == DescStatus.TOO_BIG and nic.wire.collect() == []
    nic.post_rx(1, buflen=100)
    nic.post_rx(1)
    nic.inject(frame(2, 200), frame(3, 64))
    assert nic.rx_desc(0).Status == DescStatus.TOO_BIG and nic.rx_desc(1).Status == DescStatus.DONE
    assert nic.counter(NicCounter.TX_DROPS) == 1 and nic.counter(NicCounter.RX_DROPS) == 1


# ------------------------------------------------------------------ faults without PRI
def test_rx_into_unmapped_buffer_faults_and_goes_on(any_nic):
    """Contract RX fault: the buffer write faults in the SMMU (F_TRANSLATION in the EVTQ, §3), the descriptor
    is written back DMA_FAULT with Event=F_TRANSLATION, RX_DMA_FAULTS + RX_DROPS count, RX is raised, and
    the next frame goes to the next descriptor."""
    nic = any_nic
    nic.bring_up()
    nic.post_rx(1, mapped=False)
    nic.post_rx(1)
    nic.inject(frame(1), frame(2))
    d0 = nic.rx_desc(0)
    assert (d0.Status, d0.Event, d0.FrameLen) == (DescStatus.DMA_FAULT, EventId.F_TRANSLATION, 0)
    assert nic.rx_desc(1).Status == DescStatus.DONE and nic.rx_bytes(1, 64) == frame(2)
    (ev,) = nic.sw.events()
    assert ev.EventID == EventId.F_TRANSLATION and ev.StreamID == SID and ev.InputAddr == RX_BUF
    assert ev.SSV == (nic.pasid is not None) and ev.RnW == 0
    if nic.pasid is not None:
        assert ev.SubstreamID == PASID
    assert nic.counter(NicCounter.RX_DMA_FAULTS) == 1 and nic.counter(NicCounter.RX_DROPS) == 1
    assert nic.counter(NicCounter.RX_PACKETS) == 1 and nic.reg(Reg.RX_HEAD) == 2
    assert not nic.status() & StatusBit.RX_HALTED and nic.ctx.fired(MSIX, MSIX_VECTOR_RX) >= 1


def test_no_posted_buffer_drops_with_rx_no_buffer(nic):
    """Contract: HEAD == TAIL, or RX disabled, drops the frame (RX_NO_BUFFER + RX_DROPS); memory untouched."""
    nic.bring_up(rx=False)
    nic.inject(frame(1))  # RX disabled: the wire is still drained
    nic.set_reg(Reg.CTRL, CtrlBit.RX_ENABLE | CtrlBit.TX_ENABLE)
    nic.inject(frame(2), frame(3))  # enabled, nothing posted
    assert nic.counter(NicCounter.RX_NO_BUFFER) == 3 and nic.counter(NicCounter.RX_DROPS) == 3
    nic.post_rx(1)
    nic.inject(frame(4))
    assert nic.rx_desc(0).Status == DescStatus.DONE and nic.rx_bytes(0, 64) == frame(4)
    assert nic.counter(NicCounter.RX_NO_BUFFER) == 3 and nic.watched()


def test_burst_into_unmapped_buffers_gives_exactly_n_faults(nic):
    """A burst of N frames into N unmapped buffers: exactly N F_TRANSLATION events, N DMA_FAULT
    descriptors, N drops; nothing halts."""
    n = 8
    nic.bring_up()
    nic.post_rx(n, mapped=False)
    nic.inject(*(frame(i) for i in range(n)))
    events = nic.sw.events()
    assert len(events) == n and all(e.EventID == EventId.F_TRANSLATION for e in events)
    assert sorted(e.InputAddr for e in events) == [RX_BUF + i * PAGE for i in range(n)]
    assert [nic.rx_desc(i).Status for i in range(n)] == [DescStatus.DMA_FAULT] * n
    assert nic.counter(NicCounter.RX_DMA_FAULTS) == n and nic.counter(NicCounter.RX_DROPS) == n
    assert nic.counter(NicCounter.RX_NO_BUFFER) == 0 and not nic.status() & StatusBit.RX_HALTED


def test_tx_read_fault_drops_frame(nic):
    """Contract TX: a frame read that faults gives DMA_FAULT (+Event), TX_DMA_FAULTS + TX_DROPS, nothing sent."""
    nic.bring_up()
    (slot,) = nic.send(frame(1), mapped=False)
    d = nic.tx_desc(slot)
    assert (d.Status, d.Event) == (DescStatus.DMA_FAULT, EventId.F_TRANSLATION)
    (ev,) = nic.sw.events()
    assert ev.RnW == 1 and ev.InputAddr == TX_BUF  # §3: RnW=1 for a read
    assert nic.wire.collect() == []
    assert nic.counter(NicCounter.TX_DMA_FAULTS) == 1 and nic.counter(NicCounter.TX_DROPS) == 1


def test_descriptor_fetch_fault_halts_the_ring(nic):
    """Contract: a descriptor fetch fault halts the ring (STATUS.*_HALTED, ERROR irq on vector 2); the frame
    is dropped; CTRL enable 0 -> 1 restarts it at HEAD."""
    nic.bring_up()
    nic.pt.unmap(RX_RING)
    nic.sw.cmd(Opcode.CMD_TLBI_NH_ALL)  # the host driver drops the stale IOTLB entry
    nic.set_reg(Reg.RX_TAIL, 1)
    nic.inject(frame(1))
    assert nic.status() & StatusBit.RX_HALTED and nic.reg(Reg.IRQ_STATUS) & IrqCause.ERROR
    assert nic.ctx.fired(MSIX, MSIX_VECTOR_ERROR) == 1
    (ev,) = nic.sw.events()
    assert ev.InputAddr == RX_RING and ev.RnW == 1
    assert nic.counter(NicCounter.RX_DMA_FAULTS) == 1 and nic.counter(NicCounter.RX_DROPS) == 1
    nic.inject(frame(2))  # halted: no buffer
    assert nic.counter(NicCounter.RX_NO_BUFFER) == 1
    nic.map(RX_RING)
    nic.set_reg(Reg.CTRL, CtrlBit.TX_ENABLE)
    nic.set_reg(Reg.CTRL, CtrlBit.RX_ENABLE | CtrlBit.TX_ENABLE)
    assert not nic.status() & StatusBit.RX_HALTED and nic.reg(Reg.RX_HEAD) == 0
    # TX: fetch fault of an unmapped ring halts TX the same way
    nic.pt.unmap(TX_RING)
    nic.sw.cmd(Opcode.CMD_TLBI_NH_ALL)
    nic.set_reg(Reg.TX_TAIL, 1)
    nic.pump()
    assert nic.status() & StatusBit.TX_HALTED and nic.counter(NicCounter.TX_DMA_FAULTS) == 1


# ------------------------------------------------------------------ PRI
def test_pri_success_delivers_after_response_with_backpressure(nic):
    """§8.6 Success: with ATS + PRI the buffer fault sends a page request (W=1, L=1, the buffer page, the
    ring PASID) and holds the frame: STATUS.RX_WAIT_PRG, the wire is no longer read. After the mapping and
    the Success response the frame is delivered DONE, then the next frame follows."""
    nic.bring_up(ats=True, pri=True)
    nic.post_rx(2, mapped=False)
    nic.inject(frame(1))
    (req,) = nic.sw.page_requests()
    assert (req.StreamID, req.SSV, req.SubstreamID, req.PageAddr, req.W, req.L) == (SID, 1, PASID, RX_BUF, 1, 1)
    assert nic.status() & StatusBit.RX_WAIT_PRG and nic.rx_desc(0).Status == DescStatus.POSTED
    assert nic.sw.events() == []  # ATS no-access is recoverable: no event record
    assert nic.dev.counters()["pri_outstanding"] == 1  # the stats gauge
    nic.inject(frame(2))
    assert not nic.watched() and select.select([nic.wire.fileno()], [], [], 0)[0]  # backpressure
    nic.map(RX_BUF)
    nic.respond(req, rec.PriResp.SUCCESS)
    d = nic.rx_desc(0)
    assert (d.Status, d.FrameLen) == (DescStatus.DONE, 64) and nic.rx_bytes(0, 64) == frame(1)
    assert nic.counter(NicCounter.PRG_SUCCESS) == 1
    (req2,) = nic.sw.page_requests()  # reading resumed: frame 2 meets the second unmapped buffer
    assert req2.PageAddr == RX_BUF + PAGE and req2.PRGIndex != req.PRGIndex
    assert nic.status() & StatusBit.RX_WAIT_PRG and not nic.watched()
    nic.map(RX_BUF + PAGE)
    nic.respond(req2, rec.PriResp.SUCCESS)
    assert nic.rx_desc(1).Status == DescStatus.DONE and nic.rx_bytes(1, 64) == frame(2)
    assert not nic.status() & StatusBit.RX_WAIT_PRG and nic.watched()
    assert nic.counter(NicCounter.PAGE_REQUESTS) == 2
    assert nic.counter(NicCounter.RX_PACKETS) == 2 and nic.counter(NicCounter.RX_DROPS) == 0
    assert nic.dev.pri.outstanding == 0 and nic.dev.counters()["pri_outstanding"] == 0


def test_pri_groups_both_pages_of_a_straddling_buffer(nic):
    """§8.5/§8.6: a frame whose buffer crosses a page boundary asks for both pages in one PRG (Last on the
    second), within the Allocation; one Success delivers it."""
    nic.bring_up(ats=True, pri=True)
    buf = RX_BUF + PAGE - 100
    nic.mem.write(nic.pa_of(RX_RING), RX_DESC.encode(Addr=buf, BufLen=2048))
    nic.set_reg(Reg.RX_TAIL, 1)
    f = frame(5, 1000)
    nic.inject(f)
    reqs = nic.sw.page_requests()
    assert [(q.PageAddr, q.L) for q in reqs] == [(RX_BUF, 0), (RX_BUF + PAGE, 1)]
    assert len({q.PRGIndex for q in reqs}) == 1 and nic.dev.pri.outstanding == 2
    nic.map(RX_BUF)
    nic.map(RX_BUF + PAGE)
    nic.respond(reqs[-1], rec.PriResp.SUCCESS)
    assert nic.rx_desc(0).Status == DescStatus.DONE
    assert nic.mem.read(nic.pa_of(buf), 100) + nic.mem.read(nic.pa_of(RX_BUF + PAGE), 900) == f


def test_pri_invalid_request_drops_frame(nic):
    """§8.6 Invalid Request: the held frame is dropped with DMA_FAULT (RX_DMA_FAULTS + RX_DROPS), PRI stays
    enabled, the ring goes on with the next frame."""
    nic.bring_up(ats=True, pri=True)
    nic.post_rx(1, mapped=False)
    nic.post_rx(1)
    nic.inject(frame(1), frame(2))
    (req,) = nic.sw.page_requests()
    nic.respond(req, rec.PriResp.INVALID_REQUEST)
    assert nic.rx_desc(0).Status == DescStatus.DMA_FAULT
    assert nic.rx_desc(1).Status == DescStatus.DONE and nic.rx_bytes(1, 64) == frame(2)
    assert nic.counter(NicCounter.PRG_INVALID) == 1 and nic.counter(NicCounter.RX_DMA_FAULTS) == 1
    assert nic.counter(NicCounter.RX_DROPS) == 1
    assert nic.dev.pri.enabled and not nic.cfg(nic.dev.pri.offset + regs.PCI_PRI_STATUS, 2) & regs.PCI_PRI_STATUS_RF
    assert not nic.status() & (StatusBit.RX_HALTED | StatusBit.RX_WAIT_PRG)


def test_pri_response_failure_halts_rx(nic):
    """§8.6 Response Failure: PRI Status.RF set, Status=PRI_FAILURE written back, RX halts with the ERROR
    vector; later frames are dropped as RX_NO_BUFFER until CTRL restarts the ring."""
    nic.bring_up(ats=True, pri=True)
    nic.post_rx(2, mapped=False)
    nic.inject(frame(1))
    (req,) = nic.sw.page_requests()
    nic.respond(req, rec.PriResp.RESPONSE_FAILURE)
    assert nic.rx_desc(0).Status == DescStatus.PRI_FAILURE and nic.reg(Reg.RX_HEAD) == 1
    assert nic.status() & StatusBit.RX_HALTED and nic.reg(Reg.IRQ_STATUS) & IrqCause.ERROR
    assert nic.ctx.fired(MSIX, MSIX_VECTOR_ERROR) == 1
    assert nic.cfg(nic.dev.pri.offset + regs.PCI_PRI_STATUS, 2) & regs.PCI_PRI_STATUS_RF
    assert nic.counter(NicCounter.PRG_FAILURE) == 1
    nic.inject(frame(2))
    assert nic.counter(NicCounter.RX_NO_BUFFER) == 1 and nic.sw.page_requests() == []


# ------------------------------------------------------------------ bus master, resets, link
def test_bus_master_off_refuses_dma(nic):
    """PCI 3.0 §6.2.2: with Bus Master Enable clear no memory request leaves the NIC: no buffer is written,
    no frame is sent, the SMMU sees nothing; the rings halt. Clearing BME later stops and resets the rings."""
    nic.bring_up(master=False)
    nic.post_rx(1)
    before = nic.rx_bytes(0, 64)
    nic.inject(frame(1))
    nic.send(frame(2))
    assert nic.rx_bytes(0, 64) == before and nic.rx_desc(0).Status == DescStatus.POSTED
    assert nic.wire.collect() == [] and nic.sw.events() == []
    assert nic.status() & StatusBit.RX_HALTED and nic.status() & StatusBit.TX_HALTED
    assert nic.ctx.fired(MSIX, MSIX_VECTOR_ERROR) == 0  # MSI-X is a memory write too: held pending
    nic.set_cfg(regs.PCI_COMMAND, 2, regs.Command.MEMORY | regs.Command.MASTER)
    nic.set_cfg(regs.PCI_COMMAND, 2, regs.Command.MEMORY)
    assert nic.reg(Reg.CTRL) == 0 and nic.reg(Reg.RX_BASE) == 0 and nic.status() == StatusBit.LINK_UP


def test_flr_and_device_reset_stop_rings(nic):
    """PCIe §6.6.2 FLR and DEVICE_RESET: rings disabled and unprogrammed, counters zero; a frame after the
    reset is not delivered (RX_NO_BUFFER); the link stays up and the wire stays watched."""
    nic.bring_up()
    nic.post_rx(2)
    nic.inject(frame(1))
    assert nic.counter(NicCounter.RX_PACKETS) == 1
    exp = nic.dev.express.offset
    nic.set_cfg(exp + regs.PCI_EXP_DEVCTL, 2, nic.cfg(exp + regs.PCI_EXP_DEVCTL, 2) | regs.PCI_EXP_DEVCTL_BCR_FLR)
    assert nic.cfg(regs.PCI_COMMAND, 2) == 0  # config back to defaults: decode it again to read BAR0
    nic.set_cfg(regs.PCI_COMMAND, 2, regs.Command.MEMORY)
    assert nic.reg(Reg.CTRL) == 0 and nic.reg(Reg.RX_BASE, 8) == 0 and nic.reg(Reg.RX_HEAD) == 0
    assert nic.counter(NicCounter.RX_PACKETS) == 0 and nic.status() == StatusBit.LINK_UP
    nic.inject(frame(2))
    assert nic.rx_desc(1).Status == DescStatus.POSTED and nic.counter(NicCounter.RX_NO_BUFFER) == 1
    nic.bring_up()
    nic.set_reg(Reg.TX_TAIL, 1)
    nic.dev.reset()  # DEVICE_RESET with TX work queued: it must not run into the new state
    nic.set_cfg(regs.PCI_COMMAND, 2, regs.Command.MEMORY | regs.Command.MASTER)
    nic.pump()
    assert nic.reg(Reg.TX_HEAD) == 0 and nic.wire.collect() == [] and nic.reg(Reg.CTRL) == 0
    assert nic.watched()


def test_link_state_follows_set_backend(nic):
    """Contract: set_backend(None) is link down (STATUS.LINK_UP clear, IrqCause.LINK on vector 2, fd no longer
    watched; TX gives LINK_DOWN + TX_DROPS); a new backend is link up and its fd is watched; a reconnecting
    client gets the fd registered again."""
    nic.bring_up()
    assert nic.status() & StatusBit.LINK_UP and nic.watched()
    old = nic.wire
    nic.dev.set_backend(None)
    assert not nic.status() & StatusBit.LINK_UP and nic.reg(Reg.IRQ_STATUS) == IrqCause.LINK
    assert nic.ctx.fired(MSIX, MSIX_VECTOR_ERROR) == 1 and nic.ctx.readers == {}
    (slot,) = nic.send(frame(1))
    assert nic.tx_desc(slot).Status == DescStatus.LINK_DOWN and nic.counter(NicCounter.TX_DROPS) == 1
    new = SocketPairBackend()
    try:
        nic.wire = new
        nic.dev.set_backend(new)
        assert nic.status() & StatusBit.LINK_UP and list(nic.ctx.readers) == [new.fileno()]
        assert nic.ctx.fired(MSIX, MSIX_VECTOR_ERROR) == 1
        nic.dev.detach()
        assert nic.ctx.readers == {}
        nic.dev.attach(nic.ctx)
        assert list(nic.ctx.readers) == [new.fileno()]
        nic.post_rx(1)
        nic.inject(frame(3))
        assert nic.rx_desc(0).Status == DescStatus.DONE and nic.rx_bytes(0, 64) == frame(3)
    finally:
        nic.wire = old
        new.close()
