"""The guest-visible vIOMMU PCI function (the machine interface in devmodel/machine.py and README).

BAR0 (128 KiB, 64-bit, trapped) is the SMMUv3 register map; BAR2 holds the MSI-X table
and PBA (4 vectors: 0 EVENTQ, 1 PRIQ, 2 GERROR, 3 CMD_SYNC). The function fronts a set of
endpoints, each known by its guest StreamID (vSID = guest BDF) and the iommufd dev_id the
host bound it as, and talks to the host only through the iommufd uAPI:

* construction: NEST_PARENT HWPT on the given IOAS, an ARM_SMMUV3 vIOMMU, one vDEVICE per
  endpoint (virt_id = vSID), one vEVENTQ, one FAULT, and two shared nested HWPTs whose
  vSTEs say abort and bypass (what an SMMUEN=0/GBPA, Config=abort or Config=bypass STE
  becomes). Endpoints start attached per the reset GBPA (bypass);
* guest CFGI_STE / CFGI_STE_RANGE / CFGI_ALL (and SMMUEN changes): the guest STE is read
  from guest RAM and judged (:mod:`.strtab`); a guest stage 1 becomes a nested HWPT on
  the vIOMMU (fault_id = the FAULT, so PRI works) that replaces the endpoint's previous
  one. An invalid STE (V=0, ILLEGAL, or refused by the host with EIO), a vSID outside the
  table or an unreadable STE attaches the abort HWPT and records C_BAD_STE /
  C_BAD_STREAMID / F_STE_FETCH in the guest EVTQ. Deviation: the record is written when
  the guest makes that configuration live (the CFGI or the SMMUEN write), once per vSID,
  not once per transaction: the physical STE is a silent abort (the kernel's choice for
  such nested STEs), so the VMM never sees the endpoint's traffic;
* guest invalidations: see :mod:`.cmdq`; page responses and events: :mod:`.fault`,
  :mod:`.veventq`, :mod:`.eventq`, :mod:`.priq`.

Threading: register accesses and fd callbacks run in the event-loop thread where DMA is
forbidden, so they only update state and schedule :meth:`_work` with ``ctx.call_soon``;
all guest-memory reads and writes happen there (MODEL_LOCK held throughout).
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Callable

from devmodel.iommu import registers as R
from devmodel.iommu.bitfield import Fields
from devmodel.iommu.records import (EVENT_SIZE, Opcode, PriResp, STE, SteConfig, SyncCS,
                                    encode_command, encode_event)
from devmodel.iommufd import IommufdContext, uapi
from devmodel.pci import Bar, MsixCapability, PciExpressCapability, PciFunction
from devmodel.trace import TRACER
from devmodel.viommu.cmdq import CmdqError, GuestCommandQueue
from devmodel.viommu.counters import VIommuCounters
from devmodel.viommu.eventq import GuestEventQueue, Outcome
from devmodel.viommu.fault import (PRI_RESP_TO_FAULT_CODE, FaultReader, PageGroup,
                                   PendingResponses)
from devmodel.viommu.priq import GuestPriQueue, PriOutcome
from devmodel.viommu.registers import (IMPDEF_COUNTERS, IRQ_CFG_REGS, IRQ_CTRL_MASK,
                                       PAGE0_ALIASES, U32, VIOMMU_EVTQ_LOST, VIOMMU_PRIQ_LOST,
                                       VIOMMU_PROFILE, VIOMMU_VEVENTQ_LOST, ControlRegisters,
                                       MsixVector)
from devmodel.viommu.strtab import GuestStreamTable, SteDecision, SteKind
from devmodel.viommu.veventq import LostEvents, Vevent, VeventReader

log = logging.getLogger(__name__)

VENDOR_ID = 0x1AF4
DEVICE_ID = 0x10F1
CLASS_IOMMU = 0x080600
REGS_BAR = 0
MSIX_BAR = 2
MSIX_BAR_SIZE = 0x1000
MSIX_TABLE_OFFSET = 0x0
MSIX_PBA_OFFSET = 0x800
DEFAULT_VEVENTQ_DEPTH = 64
#: FAULT reads ask for this many 40-byte records (bigger than any PRG a device sends).
FAULT_READ_RECORDS = 512
CFGI_ALL_RANGE = 31
CR1_GUARD = R.Cr0.SMMUEN | R.Cr0.CMDQEN | R.Cr0.EVENTQEN | R.Cr0.PRIQEN


def _vste(config: SteConfig) -> bytes:
    """16-byte vSTE for the shared abort / bypass nested HWPTs."""
    return STE.encode(V=1, Config=config)[:16]


@dataclass
class Endpoint:
    """One fronted endpoint: where it is attached and what the guest configured."""

    vsid: int
    dev_id: int
    hwpt_id: int = 0
    owned: bool = False  # a per-STE nested HWPT this function must destroy when replaced
    kind: SteKind | None = None
    nested: bytes = b""


class VIommuFunction(PciFunction):
    """``VIommuFunction(iommufd, ioas_id, endpoints, veventq_depth=64)``.

    ``iommufd``: the VMM's iommufd context (``HostMachine.ctx``). ``ioas_id``: the IOAS
    that maps guest RAM at IOVA = GPA (stage 2). ``endpoints``: vSID -> iommufd dev_id of
    every endpoint this vIOMMU fronts (each already bound; at least one; all behind the
    same physical SMMU). The function registers its vEVENTQ and FAULT fds with the
    client's DeviceContext (``add_reader``) when a client attaches.
    """

    vendor_id = VENDOR_ID
    device_id = DEVICE_ID
    class_code = CLASS_IOMMU
    revision = 1
    subsystem_vendor_id = VENDOR_ID
    subsystem_id = DEVICE_ID
    interrupt_pin = 0

    def __init__(self, iommufd: IommufdContext, ioas_id: int, endpoints: dict[int, int],
                 veventq_depth: int = DEFAULT_VEVENTQ_DEPTH) -> None:
        if not endpoints:
            raise ValueError("a vIOMMU needs at least one endpoint (its dev_id picks the SMMU)")
        self.iommufd = iommufd
        self.ioas_id = ioas_id
        self.veventq_depth = veventq_depth
        self.endpoints = {vsid: Endpoint(vsid, dev) for vsid, dev in endpoints.items()}
        self.counters = VIommuCounters()
        self.regs = ControlRegisters()
        dma = lambda: self.dma  # noqa: E731 - late binding: the port exists after __init__
        self.cmdq = GuestCommandQueue(dma, self)
        self.evtq = GuestEventQueue(dma, self._evtq_writable, self._evtq_abort,
                                    lambda: self._irq(MsixVector.EVENTQ))
        self.priq = GuestPriQueue(dma, self._priq_writable, self._priq_last_only, self._priq_abort,
                                  lambda: self._irq(MsixVector.PRIQ))
        self.pending = PendingResponses()
        self._events: list[Vevent | LostEvents] = []
        self._groups: list[PageGroup] = []
        self._scheduled = False
        self.held = False  # fault injection: guest delivery on hold (see hold_delivery)
        self.fd_held = False  # fault injection: the VMM stops reading its fds
        self._reconfig = False
        super().__init__()
        self._setup_host()

    # ------------------------------------------------------------ PCI function
    def realize(self) -> None:
        bar0 = self.add_bar(REGS_BAR, Bar.mem64(R.MMIO_SIZE, name="viommu-regs"))
        bar0.add_mmio(0, R.MMIO_SIZE, self._mmio_read, self._mmio_write, name="smmuv3",
                      min_access=4, max_access=8)
        self.add_bar(MSIX_BAR, Bar.mem32(MSIX_BAR_SIZE, name="viommu-msix"))
        self.add_capability(PciExpressCapability(flr=True))
        self.add_capability(MsixCapability(MsixVector.COUNT, MSIX_BAR, MSIX_TABLE_OFFSET,
                                           MSIX_BAR, MSIX_PBA_OFFSET))

    def attach(self, ctx) -> None:  # noqa: ANN001 - DeviceContext
        super().attach(ctx)
        if not self.fd_held:
            ctx.add_reader(self.veventq_fd, self._veventq_readable)
            ctx.add_reader(self.fault_fd, self._fault_readable)

    def detach(self) -> None:
        if self.ctx is not None and not self.fd_held:
            self.ctx.remove_reader(self.veventq_fd)
            self.ctx.remove_reader(self.fault_fd)
        super().detach()

    def device_reset(self) -> None:
        """Power-on register state; endpoints back to the GBPA configuration (bypass);
        every page request the guest saw but never answered is answered INVALID."""
        self.regs.reset()
        for q in (self.cmdq, self.evtq, self.priq):
            q.reset()
        self._events.clear()
        self._groups.clear()
        self._abandon_pending()
        if hasattr(self, "viommu_id"):
            self._reconfigure_all()

    # ------------------------------------------------------------ host objects
    def _setup_host(self) -> None:
        ctx = self.iommufd
        first = next(iter(self.endpoints.values())).dev_id
        self.parent_id = ctx.hwpt_alloc(first, self.ioas_id, uapi.IOMMU_HWPT_ALLOC_NEST_PARENT)
        self.viommu_id = ctx.viommu_alloc(first, self.parent_id, uapi.IOMMU_VIOMMU_TYPE_ARM_SMMUV3)
        self.vdevice_ids = {ep.vsid: ctx.vdevice_alloc(self.viommu_id, ep.dev_id, ep.vsid)
                            for ep in self.endpoints.values()}
        self.veventq_id, self.veventq_fd = ctx.veventq_alloc(
            self.viommu_id, uapi.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3, self.veventq_depth)
        self.fault_id, self.fault_fd = ctx.fault_alloc()
        self.abort_hwpt = ctx.hwpt_alloc(first, self.viommu_id, 0, uapi.IOMMU_HWPT_DATA_ARM_SMMUV3,
                                         _vste(SteConfig.ABORT))
        self.bypass_hwpt = ctx.hwpt_alloc(first, self.viommu_id, 0, uapi.IOMMU_HWPT_DATA_ARM_SMMUV3,
                                          _vste(SteConfig.BYPASS))
        self.vevents = VeventReader(self.veventq_id)
        self.faults = FaultReader(self.fault_id, {ep.dev_id: ep.vsid for ep in self.endpoints.values()})
        log.info("viommu: parent hwpt %d, viommu %d, vdevices %s, veventq %d (fd %d), fault %d "
                 "(fd %d)", self.parent_id, self.viommu_id, self.vdevice_ids, self.veventq_id,
                 self.veventq_fd, self.fault_id, self.fault_fd)
        self._reconfigure_all()

    def _attach(self, ep: Endpoint, hwpt_id: int, owned: bool) -> None:
        """Attach or replace ``ep`` onto ``hwpt_id``; destroy the HWPT it leaves if owned."""
        if ep.hwpt_id == hwpt_id:
            return
        old, old_owned = ep.hwpt_id, ep.owned
        if old:
            self.iommufd.replace(ep.dev_id, hwpt_id)
        else:
            try:
                self.iommufd.attach(ep.dev_id, hwpt_id)
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                self.iommufd.replace(ep.dev_id, hwpt_id)
        ep.hwpt_id, ep.owned = hwpt_id, owned
        if old_owned:
            # Leaving a fault-capable HWPT: the kernel answered INVALID every group of
            # this endpoint (iommufd.md section 1.6); those cookies are dead.
            dropped = self.pending.drop_vsid(ep.vsid)
            before = len(self._groups)
            self._groups = [g for g in self._groups if g.vsid != ep.vsid]
            self.counters.groups_abandoned += dropped + before - len(self._groups)
            self.iommufd.destroy(old)

    def _install(self, ep: Endpoint, decision: SteDecision, report: bool = True) -> None:
        """Make ``decision`` the endpoint's configuration on the host; ``report``: record the
        event a bad STE raises (not on hot-plug, where no transaction looked the STE up)."""
        kind = decision.kind
        self.counters.ste_installs[kind.value] += 1
        if kind is SteKind.S1:
            if ep.kind is SteKind.S1 and ep.nested == decision.nested and ep.owned:
                # Same STE: no new domain (that would auto-answer its page requests), but
                # CFGI_STE also drops CDs cached through the STE: forward CFGI_CD_ALL.
                self.invalidate([encode_command(Opcode.CMD_CFGI_CD_ALL, StreamID=ep.vsid)])
                return
            try:
                hwpt = self.iommufd.hwpt_alloc(ep.dev_id, self.viommu_id, 0,
                                               uapi.IOMMU_HWPT_DATA_ARM_SMMUV3, decision.nested,
                                               fault_id=self.fault_id)
            except OSError as e:
                log.warning("viommu: vsid %#x: host refused the STE (%s): C_BAD_STE", ep.vsid, e)
                decision = SteDecision(SteKind.BAD_STE, f"host: {e.strerror}")
            else:
                self._attach(ep, hwpt, owned=True)
                ep.kind, ep.nested = kind, decision.nested
                log.info("viommu: vsid %#x: nested hwpt %d from STE %s", ep.vsid, hwpt,
                         decision.nested.hex())
                return
        target = self.bypass_hwpt if decision.kind is SteKind.BYPASS else self.abort_hwpt
        self._attach(ep, target, owned=False)
        ep.kind, ep.nested = decision.kind, b""
        log.info("viommu: vsid %#x: %s%s", ep.vsid, decision.kind.value,
                 f" ({decision.reason})" if decision.reason else "")
        event = decision.event
        if report and event is not None and (event != event.C_BAD_STREAMID or self.regs.cr2 & R.CR2_RECINVSID):
            self.counters.events_synthesized[event.name] += 1
            self.evtq.record(encode_event(event, StreamID=ep.vsid, FetchAddr=decision.fetch_addr))

    def _decide(self, vsid: int) -> SteDecision:
        if not self.regs.smmuen:
            abort = self.regs.gbpa & R.GBPA_ABORT
            return SteDecision(SteKind.ABORT if abort else SteKind.BYPASS, "SMMUEN=0: GBPA")
        table = GuestStreamTable(self.regs.strtab_base, self.regs.strtab_cfg)
        return table.lookup(self.dma, vsid)

    def _reconfigure(self, vsid: int) -> None:
        ep = self.endpoints.get(vsid)
        if ep is not None:
            self._install(ep, self._decide(vsid))

    def _reconfigure_all(self) -> None:
        for vsid in self.endpoints:
            self._reconfigure(vsid)

    # ------------------------------------------------------------ hot-plug (VMM side)
    def unplug(self, vsid: int) -> int:
        """The endpoint at ``vsid`` left the guest (QEMU ``device_del``): detach it from its
        HWPT, so the kernel answers INVALID for every page request group it still has
        (iommufd.md section 1.6), destroy its nested HWPT and vDEVICE, and forget the groups
        the guest saw or has yet to see: their cookies are dead. Returns how many of those
        groups were abandoned. KeyError if no endpoint is plugged at ``vsid``."""
        ep = self.endpoints.pop(vsid)
        abandoned = self.pending.drop_vsid(vsid)
        before = len(self._groups)
        self._groups = [g for g in self._groups if g.vsid != vsid]
        abandoned += before - len(self._groups)
        if ep.hwpt_id:
            self.iommufd.detach(ep.dev_id)
            if ep.owned:
                self.iommufd.destroy(ep.hwpt_id)
        self.iommufd.destroy(self.vdevice_ids.pop(vsid))
        self.faults.vsid_of.pop(ep.dev_id, None)
        self.counters.groups_abandoned += abandoned
        self.counters.unplugs += 1
        log.info("viommu: vsid %#x (dev %d) unplugged: detached, vdevice destroyed, %d groups "
                 "abandoned", vsid, ep.dev_id, abandoned)
        return abandoned

    def plug(self, vsid: int, dev_id: int) -> None:
        """A (re-)bound endpoint ``dev_id`` appeared at ``vsid``: create its vDEVICE and give
        it the configuration the guest's stream table holds now. Reads the guest STE, so
        it runs in the worker (never the loop thread). ValueError if ``vsid`` is taken."""
        if vsid in self.endpoints:
            raise ValueError(f"vsid {vsid:#x} already has endpoint dev {self.endpoints[vsid].dev_id}")
        ep = self.endpoints[vsid] = Endpoint(vsid, dev_id)
        self.vdevice_ids[vsid] = self.iommufd.vdevice_alloc(self.viommu_id, dev_id, vsid)
        self.faults.vsid_of[dev_id] = vsid
        self.counters.plugs += 1
        log.info("viommu: vsid %#x plugged as dev %d (vdevice %d)", vsid, dev_id, self.vdevice_ids[vsid])
        self._install(ep, self._decide(vsid), report=False)

    # ------------------------------------------------------------ work scheduling
    def _kick(self) -> None:
        if self._scheduled or self.ctx is None:
            return
        self._scheduled = True
        self.ctx.call_soon(self._work)

    def _work(self) -> None:
        """Everything that touches guest memory (runs in the worker, MODEL_LOCK held)."""
        self._scheduled = False
        if self._reconfig:
            self._reconfig = False
            self._reconfigure_all()
        self.cmdq.consume()
        if not self.held:
            self._flush_events()
            self._flush_groups()
        self.counters.evtq_overflows = self.evtq.overflow_signals
        self.counters.priq_overflows = self.priq.overflow_signals

    # ------------------------------------------------------------ fd readers (loop thread)
    def _veventq_readable(self) -> None:
        n = self._read_veventq()
        if n:
            self._kick()

    def _read_veventq(self) -> int:
        size = (self.veventq_depth + 1) * (uapi.VEVENT_HEADER_SIZE + EVENT_SIZE)
        total = 0
        while True:
            data = self.iommufd.read(self.veventq_fd, size)
            if not data:
                return total
            items = self.vevents.parse(data)
            for item in items:
                if isinstance(item, Vevent):
                    self.counters.events_read += 1
                    TRACER.hop(item.fault, "viommu.read", veventq=self.veventq_id, seq=item.sequence)
                else:
                    self.counters.events_lost_host += item.count
            self._events.extend(items)
            total += len(items)

    def _fault_readable(self) -> None:
        n = self._read_faults()
        if n:
            self._kick()

    def _read_faults(self) -> int:
        total = 0
        while True:
            data = self.iommufd.read(self.fault_fd, FAULT_READ_RECORDS * uapi.PGFAULT_SIZE)
            if not data:
                return total
            groups, orphans = self.faults.parse(data)
            for cookie in orphans:
                self._respond(cookie, uapi.IOMMUFD_PAGE_RESP_INVALID, "unknown device")
            for g in groups:
                self.counters.groups_read += 1
                self.counters.page_requests_read += len(g.records)
                TRACER.hop(g.fault, "viommu.read", fault_obj=self.fault_id, cookie=g.cookie,
                           vsid=g.vsid, prg=g.prg_index)
            self._groups.extend(groups)
            total += len(groups)

    # ------------------------------------------------------------ guest EVTQ / PRIQ
    def _flush_events(self) -> None:
        items, self._events = self._events, []
        for item in items:
            if isinstance(item, LostEvents):
                self._lost(item)
                continue
            outcome = self.evtq.record(item.data, item.fault)
            if outcome is Outcome.WRITTEN:
                self.counters.events_written += 1
            elif outcome is Outcome.FULL:
                self.counters.events_dropped_full += 1
            else:
                self.counters.events_dropped_disabled += 1

    def _lost(self, lost: LostEvents) -> None:
        """Host-side losses: the guest sees the overflow condition (OVFLG toggled unless
        one is already present) and the exact count at VIOMMU_EVTQ_LOST."""
        toggled = False
        if self.evtq.enabled and self._evtq_writable():
            toggled = self.evtq.signal_overflow()
        for fid in lost.faults:
            TRACER.hop(fid, "guest.overflow", queue="evtq", lost=lost.count, toggled=toggled)
        log.warning("viommu: %d events lost by the host: guest EVTQ overflow %s", lost.count,
                    "signalled" if toggled else "already present / queue off")

    def _flush_groups(self) -> None:
        groups, self._groups = self._groups, []
        for g in groups:
            outcome = PriOutcome.WRITTEN
            for rec, last in g.pri_records():
                outcome = self.priq.record(rec, last, g.fault)
                if outcome is PriOutcome.WRITTEN:
                    self.counters.pri_written += 1
                else:
                    self.counters.pri_dropped += 1
            if outcome is PriOutcome.WRITTEN:
                self.pending.add(g)
            elif outcome is PriOutcome.OVERFLOW:
                self.counters.pri_auto_responses["SUCCESS"] += 1
                self._respond(g.cookie, uapi.IOMMUFD_PAGE_RESP_SUCCESS, "PRIQ overflow auto-response")
            else:
                self.counters.pri_auto_responses["RESPONSE_FAILURE"] += 1
                self._respond(g.cookie, uapi.IOMMUFD_PAGE_RESP_INVALID,
                              "PRIQ disabled: Response Failure, written as INVALID")

    def _respond(self, cookie: int, code: int, why: str) -> bool:
        try:
            self.iommufd.page_response(self.fault_fd, cookie, code)
        except OSError as e:
            self.counters.pri_resp_stale += 1
            log.warning("viommu: response cookie %d code %d (%s) refused: %s", cookie, code, why, e)
            return False
        log.info("viommu: response cookie %d code %d (%s)", cookie, code, why)
        return True

    def _abandon_pending(self) -> None:
        for o in list(self.pending.by_prg.values()):
            self.counters.groups_abandoned += 1
            self._respond(o.cookie, uapi.IOMMUFD_PAGE_RESP_INVALID, "reset")
        self.pending.clear()

    def _evtq_writable(self) -> bool:
        return not self.regs.gerror_active(R.Gerror.EVENTQ_ABT_ERR)

    def _priq_writable(self) -> bool:
        return self.regs.smmuen and not self.regs.gerror_active(R.Gerror.PRIQ_ABT_ERR)

    def _priq_last_only(self) -> bool:
        return bool(self.regs.irq_cfg[R.PRIQ_IRQ_CFG2] & R.PRIQ_IRQ_CFG2_LO)

    def _evtq_abort(self) -> None:
        self._gerror(R.Gerror.EVENTQ_ABT_ERR)

    def _priq_abort(self) -> None:
        self._gerror(R.Gerror.PRIQ_ABT_ERR)

    # ------------------------------------------------------------ fault injection
    def hold_delivery(self, on: bool, stage: str = "guest") -> dict:
        """Hold (or release) delivery, for overflowing a queue on purpose.

        ``stage="guest"``: records keep being read from the fds but wait in the VMM; on
        release they are written at once, so a burst larger than the guest queue's free
        space overflows it. ``stage="fd"``: the VMM stops reading the vEVENTQ and FAULT
        fds, so the host's vEVENTQ fills and loses events (LOST_EVENTS) as the kernel's
        would when a VMM is slow. Release undoes both.
        """
        if stage == "fd":
            self.fd_held = on
            if self.ctx is not None:
                if on:
                    self.ctx.remove_reader(self.veventq_fd)
                    self.ctx.remove_reader(self.fault_fd)
                else:
                    self.ctx.add_reader(self.veventq_fd, self._veventq_readable)
                    self.ctx.add_reader(self.fault_fd, self._fault_readable)
                    self._read_veventq()
                    self._read_faults()
        else:
            self.held = on
        waiting = {"events": len(self._events), "groups": len(self._groups)}
        log.warning("viommu: %s delivery %s (%s waiting)", stage, "held" if on else "released", waiting)
        if not on:
            self._kick()
        return {"held": on, "stage": stage, **waiting}

    def inject_gerror(self, name: str) -> dict:
        """Toggle GERROR.<name> as the hardware would on that error (and raise the vector)."""
        bit = R.Gerror[name]
        was = self.regs.gerror_active(bit)
        self._gerror(bit)
        return {"bit": name, "was_active": was, "active": self.regs.gerror_active(bit)}

    # ------------------------------------------------------------ interrupts / errors
    _IRQ_ENABLE = {MsixVector.EVENTQ: R.IrqCtrl.EVENTQ_IRQEN, MsixVector.PRIQ: R.IrqCtrl.PRIQ_IRQEN,
                   MsixVector.GERROR: R.IrqCtrl.GERROR_IRQEN}

    def _irq(self, vector: int) -> None:
        enable = self._IRQ_ENABLE.get(vector)
        if enable is not None and not self.regs.irq_ctrl & enable:
            return
        self.raise_irq(vector)

    def _gerror(self, bit: R.Gerror) -> None:
        if self.regs.toggle_gerror(bit):
            log.warning("viommu: GERROR.%s activated", bit.name)
            self._irq(MsixVector.GERROR)

    # CommandSink -----------------------------------------------------------------------
    def cmdq_error_active(self) -> bool:
        return self.regs.gerror_active(R.Gerror.CMDQ_ERR)

    def cmdq_error(self, code: CmdqError, what: str) -> None:
        self.counters.cmdq_errors[CmdqError(code).name] += 1
        log.warning("guest cmdq: %s at CONS=%#x: %s", CmdqError(code).name, self.cmdq.cons, what)
        self._gerror(R.Gerror.CMDQ_ERR)

    def skip_invalidation(self, opcode: Opcode) -> bool:
        return opcode == Opcode.CMD_ATC_INV and not self.regs.smmuen

    def invalidate(self, cmds: list[bytes]) -> int | None:
        for raw in cmds:
            self.counters.commands[Opcode(raw[0]).name] += 1
        try:
            self.iommufd.hwpt_invalidate(self.viommu_id, uapi.IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
                                         cmds)
        except OSError as e:
            bad = getattr(e, "entry_num", 0)
            log.warning("viommu: host invalidation refused entry %d of %d: %s", bad, len(cmds), e)
            self.counters.invalidations += bad
            return min(bad, len(cmds) - 1)
        self.counters.invalidations += len(cmds)
        return None

    def execute(self, opcode: Opcode, cmd: Fields, raw: bytes) -> None:
        self.counters.commands[opcode.name] += 1
        if opcode == Opcode.CMD_CFGI_STE:
            if self.regs.smmuen:  # SMMUEN=0: the stream table is not read (section 1.5)
                self._reconfigure(cmd.StreamID)
        elif opcode == Opcode.CMD_CFGI_STE_RANGE:
            if self.regs.smmuen:
                self._cfgi_range(cmd.StreamID, cmd.Range)
        elif opcode == Opcode.CMD_SYNC:
            self._sync(cmd)
        elif opcode == Opcode.CMD_PRI_RESP:
            self._pri_resp(cmd)
        # CMD_PREFETCH_*: hints, no effect.

    def _cfgi_range(self, sid: int, rng: int) -> None:
        if rng == CFGI_ALL_RANGE:
            self._reconfigure_all()
            return
        span = 1 << (rng + 1)
        base = sid & ~(span - 1)
        for vsid in self.endpoints:
            if base <= vsid < base + span:
                self._reconfigure(vsid)

    def _sync(self, cmd: Fields) -> None:
        """Completion: events already reported by the host are made visible first (the
        SYNC guarantees records of terminated transactions are written or discarded)."""
        self._read_veventq()
        self._flush_events()
        if cmd.CS == SyncCS.SIG_IRQ:
            self.counters.sync_irqs += 1
            self.raise_irq(MsixVector.CMD_SYNC)

    def _pri_resp(self, cmd: Fields) -> None:
        if not self.regs.smmuen:
            return  # IGNORED while SMMUEN=0
        resp = PriResp(cmd.Resp)
        o = self.pending.take(cmd.StreamID, cmd.PRGIndex)
        if o is None:
            self.counters.pri_resp_unmatched += 1
            log.warning("guest CMD_PRI_RESP vsid=%#x prg=%d: no outstanding group (ignored)",
                        cmd.StreamID, cmd.PRGIndex)
            return
        self.counters.pri_responses[resp.name] += 1
        if resp is PriResp.RESPONSE_FAILURE:
            self.counters.pri_resp_failure_as_invalid += 1
        code = PRI_RESP_TO_FAULT_CODE[resp]
        TRACER.hop(o.fault, "guest.response", vsid=cmd.StreamID, prg=cmd.PRGIndex, resp=resp.name)
        self._respond(o.cookie, code, f"guest {resp.name}")

    # ------------------------------------------------------------ registers
    def _mmio_read(self, offset: int, size: int) -> int:
        if size == 8:
            if offset in R.REGS64:
                return self._read64(offset)
            return self._read32(offset) | self._read32(offset + 4) << 32
        if offset - 4 in R.REGS64:
            return self._read64(offset - 4) >> 32
        if offset in R.REGS64:
            return self._read64(offset) & U32
        return self._read32(offset)

    def _mmio_write(self, offset: int, size: int, value: int) -> None:
        if size == 8:
            if offset in R.REGS64:
                self._write64(offset, value)
            else:
                self._write32(offset, value & U32)
                self._write32(offset + 4, value >> 32)
        elif offset in R.REGS64:
            self._write64(offset, (self._read64(offset) & ~U32) | (value & U32))
        elif offset - 4 in R.REGS64:
            self._write64(offset - 4, (self._read64(offset - 4) & U32) | (value & U32) << 32)
        elif size == 4:
            self._write32(offset, value & U32)
        else:
            log.warning("guest error: viommu %d-byte write at %#x ignored", size, offset)

    def _read64(self, offset: int) -> int:
        r = self.regs
        return {R.STRTAB_BASE: r.strtab_base, R.CMDQ_BASE: self.cmdq.base_reg,
                R.EVENTQ_BASE: self.evtq.base_reg, R.PRIQ_BASE: self.priq.base_reg,
                }.get(offset, r.irq_cfg.get(offset, 0))

    def _write64(self, offset: int, value: int) -> None:
        r = self.regs
        if offset == R.STRTAB_BASE:
            if not r.smmuen:
                r.strtab_base = value & R.STRTAB_BASE_MASK
            return
        queues = {R.CMDQ_BASE: (self.cmdq, R.Cr0.CMDQEN), R.EVENTQ_BASE: (self.evtq, R.Cr0.EVENTQEN),
                  R.PRIQ_BASE: (self.priq, R.Cr0.PRIQEN)}
        if offset in queues:
            q, guard = queues[offset]
            if r.enabled(guard):
                log.info("guest: %s_BASE write ignored: queue enabled", q.name)
            else:
                q.base_reg = value & R.Q_BASE_MASK
            return
        if offset in IRQ_CFG_REGS:
            r.write_irq_cfg(offset, value & R.IRQ_CFG0_ADDR_MASK)

    def _read32(self, offset: int) -> int:
        r = self.regs
        ids = VIOMMU_PROFILE.id_registers()
        if offset in ids:
            return ids[offset]
        simple = {R.CR0: r.cr0, R.CR0ACK: r.cr0, R.CR1: r.cr1, R.CR2: r.cr2, R.GBPA: r.gbpa,
                  R.IRQ_CTRL: r.irq_ctrl, R.IRQ_CTRLACK: r.irq_ctrl, R.GERROR: r.gerror,
                  R.GERRORN: r.gerrorn, R.STRTAB_BASE_CFG: r.strtab_cfg,
                  R.CMDQ_PROD: self.cmdq.prod, R.CMDQ_CONS: self.cmdq.read_cons(),
                  R.EVENTQ_PROD: self.evtq.read_prod(), R.EVENTQ_CONS: self.evtq.read_cons(),
                  R.PRIQ_PROD: self.priq.read_prod(), R.PRIQ_CONS: self.priq.read_cons(),
                  VIOMMU_EVTQ_LOST: self.counters.evtq_lost & U32,
                  VIOMMU_PRIQ_LOST: self.counters.pri_dropped & U32,
                  VIOMMU_VEVENTQ_LOST: self.counters.events_lost_host & U32}
        if offset in simple:
            return simple[offset]
        if offset in IRQ_CFG_REGS:
            return r.irq_cfg[offset] & U32
        return 0  # RES0 / RAZ (page-0 aliases included)

    def _write32(self, offset: int, value: int) -> None:
        r = self.regs
        if offset == R.CR0:
            self._write_cr0(value)
        elif offset == R.CR1:
            if not r.cr0 & CR1_GUARD:
                r.cr1 = value & R.CR1_MASK
        elif offset == R.CR2:
            if not r.smmuen:
                r.cr2 = value & R.CR2_MASK
        elif offset == R.GBPA:
            old = r.gbpa
            if r.write_gbpa(value) and not r.smmuen and (old ^ r.gbpa) & R.GBPA_ABORT:
                self._schedule_reconfig()
        elif offset == R.IRQ_CTRL:
            r.irq_ctrl = value & IRQ_CTRL_MASK
        elif offset == R.GERRORN:
            self._write_gerrorn(value)
        elif offset == R.STRTAB_BASE_CFG:
            if not r.smmuen:
                r.strtab_cfg = value & R.STRTAB_CFG_MASK
        elif offset == R.CMDQ_PROD:
            self.cmdq.prod = value & R.Q_IDX_MASK
            self._kick()
        elif offset == R.CMDQ_CONS:
            self.cmdq.write_cons(value)
        elif offset == R.EVENTQ_PROD:
            self.evtq.write_prod(value)
        elif offset == R.EVENTQ_CONS:
            self.evtq.write_cons(value)
        elif offset == R.PRIQ_PROD:
            self.priq.write_prod(value)
        elif offset == R.PRIQ_CONS:
            self.priq.write_cons(value)
        elif offset in IRQ_CFG_REGS:
            r.write_irq_cfg(offset, value)
        elif offset in PAGE0_ALIASES or offset in IMPDEF_COUNTERS:
            pass  # RAZ/WI alias; read-only counters
        else:
            log.debug("viommu: write %#x to RO/RES0 offset %#x ignored", value, offset)

    def _write_cr0(self, value: int) -> None:
        r = self.regs
        old, new = r.cr0, value & R.CR0_MASK
        r.cr0 = new
        changed = old ^ new
        self.cmdq.enabled = bool(new & R.Cr0.CMDQEN)
        self.evtq.enabled = bool(new & R.Cr0.EVENTQEN)
        self.priq.enabled = bool(new & R.Cr0.PRIQEN)
        log.info("viommu: CR0 %#x -> %#x", old, new)
        if changed & R.Cr0.SMMUEN:
            self._schedule_reconfig()
        if changed & R.Cr0.CMDQEN and self.cmdq.enabled:
            self._kick()

    def _write_gerrorn(self, value: int) -> None:
        r = self.regs
        was = r.gerror_active(R.Gerror.CMDQ_ERR)
        r.gerrorn = value & R.GERROR_MASK
        if was and not r.gerror_active(R.Gerror.CMDQ_ERR):
            log.info("viommu: CMDQ_ERR acknowledged: command processing restarts at CONS=%#x",
                     self.cmdq.cons)
            self._kick()

    def _schedule_reconfig(self) -> None:
        self._reconfig = True
        self._kick()
