"""The NIC as a PCIe function: :class:`NicFunction` around the :class:`~devmodel.devices.nic.Nic` core.

Identity
--------
Vendor 0x1af4, device 0x10f3 (subsystem the same), class 0x020000 (Ethernet controller),
revision 1. No INTx: interrupts are MSI-X only.

Capabilities (as the DMA engine's): PCI Express v2 Endpoint (FLR, End-End TLP prefix),
MSI-X (3 vectors: 0 RX, 1 TX, 2 ERROR + LINK), and from 0x100 ATS, PASID (20 bits) and
PRI (capacity 32, PRG Response PASID Required).

BAR0: 32-bit memory, 4 KiB, trapped registers (``nic_records.Reg``)
-------------------------------------------------------------------
32-bit registers; RX_BASE / TX_BASE also as one 8-byte access (other 8-byte accesses act
as two 32-bit ones). Narrower writes merge with the current value. Unlisted offsets read
0 and ignore writes (logged as guest errors).

====== =========== ====== ================================================================
Offset Name        Access Meaning
====== =========== ====== ================================================================
0x00   ID          RO     NIC_ID ("NIC0")
0x04   MAC_LO      RO     MAC bytes 0..3 (byte 0 in bits 7:0)
0x08   MAC_HI      RO     MAC bytes 4..5 in bits 15:0
0x0C   STATUS      RO     StatusBit: LINK_UP, RX/TX_ENABLED, RX/TX_HALTED, RX_WAIT_PRG
0x10   CTRL        RW     CtrlBit: RX_ENABLE, TX_ENABLE (clearing stops a ring; 0 then 1
                          restarts a halted ring at HEAD)
0x14   IRQ_STATUS  RW1C   IrqCause latched when a cause fires its vector
0x20   RX_BASE     RW     64-bit IOVA of the RX ring (16-byte aligned)
0x28   RX_CFG      RW     LOG2SIZE[4:0] (n <= 12), PASID[27:8], PASID_EN[31]
0x2C   RX_TAIL     RW     first slot NOT posted (the device owns HEAD..TAIL-1)
0x30   RX_HEAD     RO     next slot the device fills
0x40   TX_BASE     RW     64-bit IOVA of the TX ring
0x48   TX_CFG      RW     as RX_CFG
0x4C   TX_TAIL     RW     doorbell: frames HEAD..TAIL-1 are sent
0x50   TX_HEAD     RO     next slot the device sends
0x80   COUNTERS    RO     one 32-bit counter per NicCounter (0x80 + 4 * counter)
====== =========== ====== ================================================================

*_BASE and *_CFG are writable while that ring's CTRL enable is 0 (writes while enabled are
ignored and logged); a write resets the ring's HEAD and TAIL to 0.

BAR2: 32-bit memory, 4 KiB: MSI-X table at 0x000, PBA at 0x800.

Behaviour
---------
* Register accesses never DMA: doorbells and CTRL schedule the core with the attached
  client's ``DeviceContext.call_soon`` (work rung without a client runs when one attaches).
* The packet backend's fd is watched with ``DeviceContext.add_reader``: the callback runs
  in the event loop with MODEL_LOCK held and only moves frames into the device FIFO (no
  DMA); the core asks to stop watching while a frame waits for a PRG or the FIFO is full,
  and to watch again when it can take frames. :meth:`NicFunction.set_backend` swaps the
  wire (link up/down, IrqCause.LINK); a reconnecting client gets the fd registered again.
* Bus Master Enable gates every memory request (ATS Translation Requests included);
  clearing it stops and resets the rings, as do a function reset (DEVICE_RESET) and FLR.
* PRI is the PCI capability's state (credits, RF latch, UPRGI, Stopped, Reset), as for
  the DMA engine; disabling ATS flushes the ATC.
* Deliberate deviation (as the DMA engine): PASID Control.Enable is not enforced.
"""

from __future__ import annotations

import logging
from typing import Callable

from devmodel.devices.dma_engine_pci import CapabilityPri
from devmodel.devices.nic import Nic, Ring
from devmodel.devices.nic_records import DEFAULT_MAC, MSIX_VECTORS, NIC_ID, NicCounter, Reg
from devmodel.devices.packet_backend import PacketBackend
from devmodel.devices.endpoint_bars import (DWORD, MSIX_BAR, MSIX_BAR_SIZE, MSIX_PBA_OFFSET,
                                            MSIX_TABLE_OFFSET, REG_WIDTH, REGS_BAR, REGS_SIZE,
                                            SplitRegisters)
from devmodel.memory import Memory
from devmodel.pci import (AtsCapability, Bar, MsixCapability, PasidCapability, PciExpressCapability,
                          PciFunction, PriCapability, regs)
from vfio_user.device import MODEL_LOCK

log = logging.getLogger(__name__)

NIC_VENDOR_ID = 0x1AF4
NIC_DEVICE_ID = 0x10F3
NIC_CLASS = 0x020000
PRI_CAPACITY = 32

RX_BASE_HI = Reg.RX_BASE + REG_WIDTH
TX_BASE_HI = Reg.TX_BASE + REG_WIDTH
COUNTERS_END = Reg.COUNTERS + REG_WIDTH * len(NicCounter)


class NicFunction(SplitRegisters, PciFunction):
    """The NIC endpoint; see the module docstring for its register map."""

    vendor_id = NIC_VENDOR_ID
    device_id = NIC_DEVICE_ID
    class_code = NIC_CLASS
    revision = 1
    subsystem_vendor_id = NIC_VENDOR_ID
    subsystem_id = NIC_DEVICE_ID
    interrupt_pin = 0

    def __init__(self, smmu, sid: int, dma: Memory, *, backend: PacketBackend | None = None,
                 mac: bytes = DEFAULT_MAC) -> None:
        """``smmu``: an SMMUv3 (translate / ats_translate / page_request / register_endpoint);
        ``sid``: this function's StreamID there; ``dma``: post-translation physical memory;
        ``backend``: the wire (None: link down until :meth:`set_backend`)."""
        self.smmu = smmu
        self.sid = sid
        self.phys = dma
        self.mac = bytes(mac)
        self._kick_pending = False
        self._reader_fd: int | None = None
        self.nic: Nic | None = None
        super().__init__()
        if backend is not None:
            self.nic.set_backend(backend, notify=False)

    # --- construction ------------------------------------------------------------------------
    def realize(self) -> None:
        regs_bar = self.add_bar(REGS_BAR, Bar.mem32(REGS_SIZE, name="nic-regs"))
        regs_bar.add_mmio(0, REGS_SIZE, self._reg_read, self._reg_write, name="regs", min_access=4,
                          max_access=8)
        self.add_bar(MSIX_BAR, Bar.mem32(MSIX_BAR_SIZE, name="nic-msix"))
        self.express = self.add_capability(PciExpressCapability(flr=True, ee_prefix=True))
        self.add_capability(MsixCapability(MSIX_VECTORS, MSIX_BAR, MSIX_TABLE_OFFSET, MSIX_BAR, MSIX_PBA_OFFSET))
        self.ats = self.add_ext_capability(AtsCapability())
        self.pasid = self.add_ext_capability(PasidCapability(exec_supported=True, priv_supported=True))
        self.pri = self.add_ext_capability(PriCapability(capacity=PRI_CAPACITY, pasid_required=True))
        self.nic = Nic(self.smmu, self.sid, self.phys, pri=CapabilityPri(self.pri), ats=self.ats,
                       interrupt=self._interrupt, schedule=self._schedule, may_master=lambda: self.bus_master,
                       watch=self._sync_reader, mac=self.mac)
        self.ats.add_listener(self._ats_changed)
        self.pri.add_discard_listener(lambda _pri: self.nic.pri_reset())

    # --- public API -----------------------------------------------------------------------------
    def set_backend(self, backend: PacketBackend | None) -> None:
        """Attach (link up) or detach (link down) the wire; IrqCause.LINK when the state changes.

        The fd of the old backend stops being watched; the old backend is not closed.
        """
        with MODEL_LOCK:
            self._drop_reader()
            self.nic.set_backend(backend)
            self._sync_reader()

    @property
    def backend(self) -> PacketBackend | None:
        return self.nic.backend

    def counters(self) -> dict[str, int]:
        """Every NicCounter by lower-case name (the machine's ``stats``), and the
        ``pri_outstanding`` gauge as the engine has it."""
        return {**self.nic.counter_dict(), "pri_outstanding": self.nic.port.outstanding}

    # --- core plumbing --------------------------------------------------------------------------
    def _schedule(self, fn: Callable[[], None]) -> None:
        """Core work runs on the client's worker, never inside a register access."""
        if self.ctx is None:
            log.info("%s: no client attached: NIC work deferred until one attaches", self.name)
            self._kick_pending = True
            return
        self.ctx.call_soon(fn)

    def _interrupt(self, vector: int) -> None:
        log.debug("%s: MSI-X vector %d", self.name, vector)
        self.raise_irq(vector)

    def _ats_changed(self, _cap) -> None:
        if not self.ats.enabled:
            self.nic.flush_atc()

    def _backend_readable(self) -> None:
        """Event-loop callback of the backend fd (no DMA here: frames go to the FIFO)."""
        with MODEL_LOCK:
            self.nic.backend_readable()

    def _sync_reader(self) -> None:
        """Watch the backend fd exactly when the core wants frames and a client is attached."""
        nic = self.nic
        if nic is None:
            return
        want = None
        if self.ctx is not None and nic.watching and nic.backend is not None:
            want = nic.backend.fileno()
        if self._reader_fd == want:
            return
        self._drop_reader()
        if want is not None:
            try:
                self.ctx.add_reader(want, self._backend_readable)
            except RuntimeError as e:  # the client went away under us; attach() registers again
                log.info("%s: backend fd %d not watched: %s", self.name, want, e)
                return
            self._reader_fd = want
            log.debug("%s: watching backend fd %d", self.name, want)

    def _drop_reader(self) -> None:
        if self._reader_fd is not None:
            if self.ctx is not None:
                self.ctx.remove_reader(self._reader_fd)
            log.debug("%s: backend fd %d no longer watched", self.name, self._reader_fd)
            self._reader_fd = None

    def attach(self, ctx) -> None:
        super().attach(ctx)
        self._reader_fd = None  # a new client's loop watches nothing of ours yet
        self._sync_reader()
        if self._kick_pending:
            self._kick_pending = False
            ctx.call_soon(self.nic.run)

    def detach(self) -> None:
        self._drop_reader()
        super().detach()

    def device_reset(self) -> None:
        """Function reset / FLR: the rings stop and return to their power-on state."""
        log.info("%s: NIC reset", self.name)
        self.nic.reset()

    def command_changed(self, old: int, new: int) -> None:
        """Bus Master Enable 1->0 stops and resets the rings (no DMA may be in flight)."""
        if old & regs.Command.MASTER and not new & regs.Command.MASTER:
            log.info("%s: bus master disabled: rings stopped and reset", self.name)
            self.nic.reset()

    def close(self) -> None:
        self._drop_reader()
        super().close()

    # --- BAR0 ---------------------------------------------------------------------------------
    def _write64(self, offset: int, value: int) -> bool:
        if offset not in (Reg.RX_BASE, Reg.TX_BASE):
            return False
        self._write_base(self._ring_at(offset), value)
        return True

    def _ring_at(self, offset: int) -> Ring:
        return self.nic.rx if offset < Reg.TX_BASE else self.nic.tx

    def _read32(self, offset: int) -> int:
        nic = self.nic
        if Reg.COUNTERS <= offset < COUNTERS_END and offset % REG_WIDTH == 0:
            return nic.count(NicCounter((offset - Reg.COUNTERS) // REG_WIDTH))
        values = {
            Reg.ID: lambda: NIC_ID,
            Reg.MAC_LO: lambda: int.from_bytes(nic.mac[:4], "little"),
            Reg.MAC_HI: lambda: int.from_bytes(nic.mac[4:], "little"),
            Reg.STATUS: nic.status,
            Reg.CTRL: nic.ctrl,
            Reg.IRQ_STATUS: lambda: nic.irq_status,
            Reg.RX_BASE: lambda: nic.rx.base & DWORD,
            RX_BASE_HI: lambda: nic.rx.base >> 32,
            Reg.RX_CFG: lambda: nic.rx.cfg,
            Reg.RX_TAIL: lambda: nic.rx.tail,
            Reg.RX_HEAD: lambda: nic.rx.head,
            Reg.TX_BASE: lambda: nic.tx.base & DWORD,
            TX_BASE_HI: lambda: nic.tx.base >> 32,
            Reg.TX_CFG: lambda: nic.tx.cfg,
            Reg.TX_TAIL: lambda: nic.tx.tail,
            Reg.TX_HEAD: lambda: nic.tx.head,
        }
        fn = values.get(offset)
        return int(fn()) if fn is not None else 0

    def _write32(self, offset: int, value: int) -> None:
        nic = self.nic
        if offset == Reg.CTRL:
            nic.set_ctrl(value)
        elif offset == Reg.IRQ_STATUS:
            nic.ack_irq(value)
        elif offset in (Reg.RX_BASE, Reg.TX_BASE):
            ring = self._ring_at(offset)
            self._write_base(ring, (ring.base & ~DWORD) | value)
        elif offset in (RX_BASE_HI, TX_BASE_HI):
            ring = self._ring_at(offset)
            self._write_base(ring, (ring.base & DWORD) | value << 32)
        elif offset in (Reg.RX_CFG, Reg.TX_CFG):
            nic.configure(self._ring_at(offset), cfg=value)
        elif offset in (Reg.RX_TAIL, Reg.TX_TAIL):
            nic.doorbell(self._ring_at(offset), value)
        else:
            log.warning("guest error: %s write %#x to read-only/unimplemented BAR0 offset %#x", self.name, value,
                        offset)

    def _write_base(self, ring: Ring, value: int) -> None:
        self.nic.configure(ring, base=value)
