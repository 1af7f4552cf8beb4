"""The DMA engine as a PCIe function: :class:`DmaEngineFunction` around the
:class:`~devmodel.devices.dma_engine.DmaEngine` core.

Identity
--------
Vendor 0x1af4, device 0x10f2 (subsystem the same), class 0x088000 (base system
peripheral / other), revision 1. No INTx: interrupts are MSI-X, or MSI in the
hot-pluggable variant (``irq="msi"``).

Why an MSI variant: QEMU 11.1's vfio-user-pci aborts on ``device_del`` of a function that
has an MSI-X capability (its MSI-X teardown deletes a PBA subregion that finalization
already removed), so the endpoint the machine hot-plugs (``machine-hotplug``) offers a
64-bit MSI capability with 2 vectors and no BAR2 instead. When the guest grants fewer
MSI vectors than the 2 requested (x86 without interrupt remapping grants 1), the error
interrupt shares vector 0 (the MSI capability folds vectors beyond the enabled count).

Capabilities: PCI Express v2 Endpoint (FLR, End-End TLP prefix), MSI-X (2 vectors),
and from 0x100 ATS, PASID (20 bits, exec + privileged supported) and PRI (capacity 32,
PRG Response PASID Required).

BAR0: 32-bit memory, 4 KiB, trapped registers (``dma_engine_records.Reg``)
----------------------------------------------------------------------------
Registers are 32 bits; QUEUE_BASE may also be accessed as one 8-byte access (other
8-byte accesses act as two 32-bit ones). Narrower writes merge with the current value.
Unlisted offsets read 0 and ignore writes (logged as guest errors).

====== =========== ====== ================================================================
Offset Name        Access Meaning
====== =========== ====== ================================================================
0x00   ID          RO     0x45414D44 ("DMAE" in little-endian bytes)
0x08   CTRL        RW     ENABLE[0]. 1: fetch and run descriptors from HEAD up to TAIL.
                          0: stop (the running descriptor is abandoned, the ATC dropped).
                          Writing 0 then 1 restarts a halted engine at HEAD.
0x0C   STATUS      RO     ENABLED[0], HALTED[1] (descriptor fetch fault, or a PRG Response
                          Failure), WAIT_PRG[2] (a Page Request Group is outstanding),
                          WAIT_CREDIT[3] (always 0: a descriptor that finds no PRI credit
                          completes with PAGE_FAULT instead of waiting)
0x10   QUEUE_BASE  RW     64-bit IOVA of the descriptor ring (64-byte aligned; low bits
                          ignored), fetched with the ring PASID of QUEUE_CFG
0x18   QUEUE_CFG   RW     LOG2SIZE[4:0] (ring of 2^n 64-byte descriptors, n ≤ 16),
                          PASID[27:8], PASID_EN[31]
0x20   QUEUE_TAIL  RW     doorbell: index of the next free slot (software-owned)
0x24   QUEUE_HEAD  RO     index of the next descriptor to run
0x40   FAULTS      RO     one 32-bit counter per ``FaultCounter`` (0x40 + 4 * counter)
====== =========== ====== ================================================================

QUEUE_BASE and QUEUE_CFG are writable while CTRL.ENABLE=0 only (writes while enabled are
ignored and logged); a write resets HEAD and TAIL to 0.

Descriptors (64 bytes) and completion records (32 bytes) are laid out in
``dma_engine_records``; every DMA goes through the SMMU with this function's StreamID
and the descriptor's PASID as SubstreamID (untranslated, or ATS + ATC when ATS Control
Enable is set). MSI-X vector 0 signals completions (descriptor flag RCI), vector 1 errors
(halt, PRG Response Failure, failed completion write).

BAR2 (MSI-X variant): 32-bit memory, 4 KiB: MSI-X table at 0x000, PBA at 0x800.

Behaviour
---------
* Register accesses never DMA: the doorbell and CTRL schedule the engine with the
  attached client's ``DeviceContext.call_soon`` (work rung without a client runs when
  one attaches).
* Bus Master Enable gates every memory request of the engine (ATS Translation Requests
  included): with BME clear an access fails with DMA_ABORT (counted as BUS_ERROR) before
  it reaches the SMMU. Clearing BME also stops and resets the engine, as do a function
  reset (DEVICE_RESET) and an FLR.
* PRI is the PCI capability's state: page requests only while PRI Enable=1, RF clear and
  within the Outstanding Page Request Allocation; a Response Failure sets PRI Status.RF
  and halts the engine; a response with an unknown PRG index sets UPRGI; Stopped follows
  the number of outstanding requests; PRI Reset (with Enable=0) discards the outstanding
  groups. Disabling ATS flushes the ATC.
* Deliberate deviation: PASID Control.Enable is not enforced (descriptors with a PASID
  run even while it is 0), because the VMM may hide the PASID capability from the guest
  that drives the engine.
"""

from __future__ import annotations

import logging
from typing import Callable

from devmodel.devices.dma_engine import DmaEngine
from devmodel.devices.dma_engine_records import (CTRL_ENABLE, ENGINE_ID, QCFG_LOG2SIZE_MASK, QCFG_PASID_EN,
                                                 QCFG_PASID_MASK, QCFG_PASID_SHIFT, STATUS_ENABLED,
                                                 STATUS_HALTED, STATUS_WAIT_PRG, FaultCounter, Reg)
from devmodel.devices.endpoint_bars import (DWORD, MSIX_BAR, MSIX_BAR_SIZE, MSIX_PBA_OFFSET,
                                            MSIX_TABLE_OFFSET, REG_WIDTH, REGS_BAR, REGS_SIZE,
                                            SplitRegisters)
from devmodel.memory import Memory
from devmodel.pci import (AtsCapability, Bar, MsiCapability, MsixCapability, PasidCapability,
                          PciExpressCapability, PciFunction, PriCapability, regs)

log = logging.getLogger(__name__)

DMAENG_VENDOR_ID = 0x1AF4
DMAENG_DEVICE_ID = 0x10F2
DMAENG_CLASS = 0x088000
MSIX_VECTORS = 2
PRI_CAPACITY = 32

QUEUE_BASE_HI = Reg.QUEUE_BASE + REG_WIDTH
FAULTS_END = Reg.FAULTS + REG_WIDTH * len(FaultCounter)


class CapabilityPri:
    """The engine's :class:`~devmodel.devices.dma_engine.PriPort` on the PCI PRI capability.

    ``response_failure`` is the capability's failure latch (cleared only by Enable 0->1,
    PCIe §10.5.2.3), not the RW1C RF bit, so software clearing RF alone does not re-arm
    page requests.
    """

    def __init__(self, cap: PriCapability) -> None:
        self.cap = cap

    @property
    def enabled(self) -> bool:
        return self.cap.enabled

    @property
    def allocation(self) -> int:
        return self.cap.allocation

    @property
    def response_failure(self) -> bool:
        return self.cap.failed

    def set_response_failure(self) -> None:
        self.cap.set_response_failure()

    def set_unexpected_prg_index(self) -> None:
        self.cap.set_uprgi()

    def note_outstanding(self, count: int) -> None:
        self.cap.note_outstanding(count)


class DmaEngineFunction(SplitRegisters, PciFunction):
    """The DMA engine endpoint; see the module docstring for its register map."""

    vendor_id = DMAENG_VENDOR_ID
    device_id = DMAENG_DEVICE_ID
    class_code = DMAENG_CLASS
    revision = 1
    subsystem_vendor_id = DMAENG_VENDOR_ID
    subsystem_id = DMAENG_DEVICE_ID
    interrupt_pin = 0

    def __init__(self, smmu, sid: int, dma: Memory, irq: str = "msix") -> None:
        """``smmu``: an SMMUv3 (translate / ats_translate / page_request / register_endpoint);
        ``sid``: this function's StreamID there; ``dma``: post-translation physical memory;
        ``irq``: "msix" (the default) or "msi" (the hot-pluggable variant)."""
        if irq not in ("msix", "msi"):
            raise ValueError(f"irq must be 'msix' or 'msi', not {irq!r}")
        self.smmu = smmu
        self.sid = sid
        self.phys = dma
        self.irq_kind = irq
        self._kick_pending = False
        super().__init__()

    # --- construction ------------------------------------------------------------------------
    def realize(self) -> None:
        regs_bar = self.add_bar(REGS_BAR, Bar.mem32(REGS_SIZE, name="dmaeng-regs"))
        regs_bar.add_mmio(0, REGS_SIZE, self._reg_read, self._reg_write, name="regs", min_access=4,
                          max_access=8)
        self.express = self.add_capability(PciExpressCapability(flr=True, ee_prefix=True))
        if self.irq_kind == "msi":
            self.add_capability(MsiCapability(MSIX_VECTORS))
        else:
            self.add_bar(MSIX_BAR, Bar.mem32(MSIX_BAR_SIZE, name="dmaeng-msix"))
            self.add_capability(MsixCapability(MSIX_VECTORS, MSIX_BAR, MSIX_TABLE_OFFSET, MSIX_BAR,
                                               MSIX_PBA_OFFSET))
        self.ats = self.add_ext_capability(AtsCapability())
        self.pasid = self.add_ext_capability(PasidCapability(exec_supported=True, priv_supported=True))
        self.pri = self.add_ext_capability(PriCapability(capacity=PRI_CAPACITY, pasid_required=True))
        self.engine = DmaEngine(self.smmu, self.sid, self.phys, pri=CapabilityPri(self.pri), ats=self.ats,
                                interrupt=self._interrupt, schedule=self._schedule,
                                may_master=lambda: self.bus_master)
        self.ats.add_listener(self._ats_changed)
        self.pri.add_discard_listener(lambda _pri: self.engine.pri_reset())
        self._clear_registers()

    def _clear_registers(self) -> None:
        self.queue_base = 0
        self.queue_cfg = 0

    # --- engine plumbing ----------------------------------------------------------------------
    def _schedule(self, fn: Callable[[], None]) -> None:
        """Engine work runs on the client's worker, never inside a register access."""
        if self.ctx is None:
            log.info("%s: no client attached: engine work deferred until one attaches", self.name)
            self._kick_pending = True
            return
        self.ctx.call_soon(fn)

    def _interrupt(self, vector: int) -> None:
        log.info("%s: %s vector %d", self.name, "MSI" if self.msi is not None else "MSI-X", vector)
        self.raise_irq(vector)

    def _ats_changed(self, _cap) -> None:
        if not self.ats.enabled:
            self.engine.flush_atc()

    def attach(self, ctx) -> None:
        super().attach(ctx)
        if self._kick_pending:
            self._kick_pending = False
            ctx.call_soon(self.engine.run)

    def device_reset(self) -> None:
        """Function reset / FLR: the engine stops and returns to its power-on state."""
        log.info("%s: engine reset", self.name)
        self.engine.reset()
        self._clear_registers()

    def command_changed(self, old: int, new: int) -> None:
        """Bus Master Enable 1->0 stops and resets the engine (no DMA may be in flight)."""
        if old & regs.Command.MASTER and not new & regs.Command.MASTER:
            log.info("%s: bus master disabled: engine stopped and reset", self.name)
            self.engine.reset()
            self._clear_registers()

    # --- BAR0 ---------------------------------------------------------------------------------
    def _write64(self, offset: int, value: int) -> bool:
        if offset != Reg.QUEUE_BASE:
            return False
        self._write_queue_base(value)
        return True

    def _read32(self, offset: int) -> int:
        eng = self.engine
        if Reg.FAULTS <= offset < FAULTS_END:
            return eng.count(FaultCounter((offset - Reg.FAULTS) // REG_WIDTH)) & DWORD
        values = {
            Reg.ID: lambda: ENGINE_ID,
            Reg.CTRL: lambda: CTRL_ENABLE if eng.enabled else 0,
            Reg.STATUS: self._status,
            Reg.QUEUE_BASE: lambda: self.queue_base & DWORD,
            QUEUE_BASE_HI: lambda: self.queue_base >> 32,
            Reg.QUEUE_CFG: lambda: self.queue_cfg,
            Reg.QUEUE_TAIL: lambda: eng.tail,
            Reg.QUEUE_HEAD: lambda: eng.head,
        }
        fn = values.get(offset)
        return fn() if fn is not None else 0

    def _status(self) -> int:
        eng = self.engine
        return ((STATUS_ENABLED if eng.enabled else 0) | (STATUS_HALTED if eng.halted else 0)
                | (STATUS_WAIT_PRG if eng.waiting_prg else 0))

    def _write32(self, offset: int, value: int) -> None:
        if offset == Reg.CTRL:
            self._write_ctrl(value)
        elif offset == Reg.QUEUE_BASE:
            self._write_queue_base((self.queue_base & ~DWORD) | value)
        elif offset == QUEUE_BASE_HI:
            self._write_queue_base((self.queue_base & DWORD) | value << 32)
        elif offset == Reg.QUEUE_CFG:
            self._write_queue_cfg(value)
        elif offset == Reg.QUEUE_TAIL:
            log.debug("%s: doorbell tail=%d", self.name, value)
            self.engine.doorbell(value)
        else:
            log.warning("guest error: %s write %#x to read-only/unimplemented BAR0 offset %#x", self.name, value,
                        offset)

    def _write_ctrl(self, value: int) -> None:
        on = bool(value & CTRL_ENABLE)
        if on != self.engine.enabled:
            log.info("%s: CTRL.ENABLE %d -> %d", self.name, self.engine.enabled, on)
        self.engine.set_enabled(on)

    def _ring_locked(self, what: str) -> bool:
        if self.engine.enabled:
            log.warning("guest error: %s write to %s ignored while CTRL.ENABLE=1", self.name, what)
            return True
        return False

    def _write_queue_base(self, value: int) -> None:
        if not self._ring_locked("QUEUE_BASE"):
            self.queue_base = value & ((1 << 64) - 1)
            self._configure()

    def _write_queue_cfg(self, value: int) -> None:
        if not self._ring_locked("QUEUE_CFG"):
            self.queue_cfg = value & (QCFG_LOG2SIZE_MASK | QCFG_PASID_MASK << QCFG_PASID_SHIFT | QCFG_PASID_EN)
            self._configure()

    def _configure(self) -> None:
        cfg = self.queue_cfg
        pasid = (cfg >> QCFG_PASID_SHIFT) & QCFG_PASID_MASK if cfg & QCFG_PASID_EN else None
        self.engine.configure(self.queue_base, cfg & QCFG_LOG2SIZE_MASK, pasid)
        log.info("%s: ring base=%#x log2size=%d pasid=%s", self.name, self.engine.queue_base,
                 self.engine.queue_log2, pasid)
