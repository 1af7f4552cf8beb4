"""The emulated SMMUv3: register interface, interrupt outputs and the device-facing API.

Software (the host driver) programs it only through :meth:`SMMUv3.read_reg` /
:meth:`SMMUv3.write_reg` (Page 0 at 0x0, Page 1 at 0x10000) and the tables and queues
it places in ``memory``. Endpoints use :meth:`translate`, :meth:`ats_translate`,
:meth:`translated_access` and :meth:`page_request`, and register per-StreamID callbacks
for ATC invalidations and PRG responses. All work is synchronous: a CMDQ_PROD write
consumes the queue before returning.

Fault traces (:data:`devmodel.trace.TRACER`): a faulting translation emits
``smmu.fault`` then ``smmu.evtq`` (linking ``("smmu.evtq", slot PA)``); a page request
emits ``smmu.priq`` (linking ``("smmu.priq", slot PA)``). The fault id is the one the
endpoint's ``TRACER.origin`` scope births on first use.
"""

from __future__ import annotations

import logging
from typing import Callable

from devmodel.iommu import registers as R
from devmodel.iommu.cd import ContextTable
from devmodel.iommu.cmdq import CommandQueue
from devmodel.iommu.eventq import EventQueue
from devmodel.iommu.faults import Access, AtsCompletion, FaultInfo, TranslationResult
from devmodel.iommu.irq import Interrupts, IrqSource
from devmodel.iommu.priq import PageRequest, PriQueue
from devmodel.iommu.records import EventId, PrgResponseCode, encode_event
from devmodel.iommu.strtab import StreamTable
from devmodel.iommu.tlb import ConfigCache, Iotlb
from devmodel.iommu.translation import Stage2Hook, Translator
from devmodel.iommu.faults import SmmuFault
from devmodel.memory import Memory
from devmodel.trace import TRACER

log = logging.getLogger(__name__)

#: prg_response(ssid or None, prg_index, PCIe response code)
PrgResponseCallback = Callable[["int | None", int, PrgResponseCode], None]
#: atc_invalidate(ssid or None, addr, length, global) -> completed (False = never completes)
AtcInvalidateCallback = Callable[["int | None", int, int, bool], "bool | None"]


class SMMUv3:
    """One SMMUv3 instance (Non-secure programming interface only)."""

    def __init__(self, memory: Memory, profile: R.SmmuProfile | None = None) -> None:
        self.memory = memory
        self.profile = profile or R.SmmuProfile()
        p = self.profile
        self.ids = p.id_registers()
        self.irqs = Interrupts(memory, p.msi)
        self.config_cache = ConfigCache()
        self.iotlb = Iotlb()
        self.strtab = StreamTable(memory, p, self.config_cache)
        self.cdtab = ContextTable(p, self.config_cache)
        self.cmdq = CommandQueue(memory, self.irqs, self, p.cmdqs)
        self.eventq = EventQueue(memory, self.irqs, p.eventqs)
        self.priq = PriQueue(memory, self.irqs, p.priqs, p.pps, self.deliver_prg_response, self._ste_ppar)
        self.translator = Translator(self)
        self.stage2_hooks: dict[int, Stage2Hook] = {}
        self.default_stage2: Stage2Hook | None = None
        self.prg_callbacks: dict[int, PrgResponseCallback] = {}
        self.atc_callbacks: dict[int, AtcInvalidateCallback] = {}
        self.on_sev: Callable[[], None] | None = None
        self.sev_count = 0
        self.reset()

    # ------------------------------------------------------------ state
    def reset(self) -> None:
        """Power-on state: everything disabled, GBPA at its reset value."""
        self.cr0 = 0
        self.cr1 = 0
        self.cr2 = 0
        self.gbpa = R.GBPA_RESET
        self.agbpa = 0
        self.irqs.reset()
        self.strtab.reset()
        for q in (self.cmdq, self.eventq, self.priq):
            q.reset()
        self.config_cache.inv_all()
        self.iotlb.inv_all()

    @property
    def smmuen(self) -> bool:
        return bool(self.cr0 & R.Cr0.SMMUEN)

    @property
    def record_bad_streamid(self) -> bool:
        return bool(self.cr2 & R.CR2_RECINVSID)

    def connect_irq(self, source: IrqSource, callback: Callable[[], None]) -> None:
        """Wire an interrupt output (EVENTQ, PRIQ, GERROR, CMD_SYNC) to ``callback``."""
        self.irqs.wired[source] = callback

    # ------------------------------------------------------------ endpoints
    def register_endpoint(self, sid: int, prg_response: PrgResponseCallback | None = None,
                          atc_invalidate: AtcInvalidateCallback | None = None) -> None:
        """Attach an endpoint's PRG-response and ATC-invalidate receivers for ``sid``."""
        if prg_response is not None:
            self.prg_callbacks[sid] = prg_response
        if atc_invalidate is not None:
            self.atc_callbacks[sid] = atc_invalidate

    def set_stage2(self, vmid: int, hook: Stage2Hook | None) -> None:
        """Install (or remove) the stage-2 translation for a VMID (the host's IOAS)."""
        if hook is None:
            self.stage2_hooks.pop(vmid, None)
        else:
            self.stage2_hooks[vmid] = hook

    def deliver_prg_response(self, sid: int, ssid: int | None, prg_index: int, code: PrgResponseCode) -> None:
        cb = self.prg_callbacks.get(sid)
        log.info("prg response -> sid=%#x ssid=%s prg=%d %s%s", sid, ssid, prg_index, code.name,
                 "" if cb else " (no endpoint registered: dropped)")
        if cb is not None:
            cb(ssid, prg_index, code)

    def deliver_atc_invalidate(self, sid: int, ssid: int | None, addr: int, length: int, global_: bool) -> bool:
        cb = self.atc_callbacks.get(sid)
        log.info("ATC invalidate -> sid=%#x ssid=%s addr=%#x len=%#x global=%d%s", sid, ssid, addr, length,
                 global_, "" if cb else " (no endpoint registered)")
        if cb is None:
            return True
        return cb(ssid, addr, length, global_) is not False

    def sev(self) -> None:
        self.sev_count += 1
        if self.on_sev is not None:
            self.on_sev()

    # ------------------------------------------------------------ device-facing API
    def translate(self, sid: int, ssid: int | None, iova: int, size: int = 1,
                  access: Access = Access.READ, privileged: bool = False) -> TranslationResult:
        """Translate one untranslated transaction; faults are already recorded on return."""
        return self.translator.translate(sid, ssid, iova, size, access, privileged)

    def ats_translate(self, sid: int, ssid: int | None, addr: int, privileged: bool = False,
                      write: bool = False, exec_: bool = False) -> AtsCompletion:
        """Answer an ATS Translation Request for the page containing ``addr``."""
        return self.translator.ats_translate(sid, ssid, addr, privileged, write, exec_)

    def translated_access(self, sid: int, addr: int, access: Access) -> bool:
        """May an ATS-Translated transaction proceed? (CR0.ATSCHK safe mode checks STE.EATS)."""
        write = access is Access.WRITE
        if self.smmuen and not self.cr0 & R.Cr0.ATSCHK:
            return True
        reason = "SMMUEN=0"
        if self.smmuen:
            try:
                sc = self.strtab.lookup(sid, self.record_bad_streamid)
                if sc.config != sc.config.BYPASS and sc.ste.EATS:
                    return True
                reason = "STE forbids ATS-Translated traffic"
            except SmmuFault as f:
                reason = f"STE unusable: {f.reason}"
        fid = TRACER.current()
        log.info("translated access sid=%#x addr=%#x: F_TRANSL_FORBIDDEN (%s) [f%d]", sid, addr, reason, fid)
        TRACER.hop(fid, "smmu.fault", event=int(EventId.F_TRANSL_FORBIDDEN), name=EventId.F_TRANSL_FORBIDDEN.name,
                   sid=sid, ssid=None, addr=addr, stage=0, access=access.name.lower(), outcome="abort", record=True)
        self.eventq.record(encode_event(EventId.F_TRANSL_FORBIDDEN, StreamID=sid, RnW=int(not write),
                                        InputAddr=addr), fid)
        return False

    def page_request(self, sid: int, ssid: int | None, addr: int, prg_index: int, last: bool,
                     read: bool = True, write: bool = False, exec_: bool = False, priv: bool = False,
                     trace_id: int = 0) -> bool:
        """Receive a PCIe Page Request Message; True when it was queued in the PRIQ.

        ``trace_id``: the PRG's fault id (0 = the endpoint's current page-request scope).
        """
        fid = trace_id or TRACER.current()
        req = PageRequest(sid, ssid, addr, prg_index & 0x1FF, last, read, write, exec_, priv)
        log.info("page request <- sid=%#x ssid=%s addr=%#x prg=%d L=%d R=%d W=%d [f%d]", sid, ssid, addr,
                 prg_index, last, read, write, fid)
        return self.priq.page_request(req, fid)

    def gbpa_result(self, sid: int, ssid: int | None, iova: int, size: int, access: Access) -> TranslationResult:
        """SMMUEN=0: bypass, or abort without an event when GBPA.ABORT=1."""
        if self.gbpa & R.GBPA_ABORT:
            fid = TRACER.current()
            log.info("translate sid=%#x iova=%#x: SMMUEN=0 and GBPA.ABORT=1 -> abort, no event [f%d]", sid, iova, fid)
            TRACER.hop(fid, "smmu.fault", event=None, name="ABORT", sid=sid, ssid=ssid, addr=iova, stage=0,
                       access=access.name.lower(), outcome="abort", record=False, reason="GBPA.ABORT")
            return TranslationResult(pa=None, fault=FaultInfo(event=None, reason="GBPA.ABORT", trace_id=fid))
        return TranslationResult(pa=iova, length=size or 1)

    def _ste_ppar(self, sid: int) -> bool | None:
        """STE.PPAR for PRI overflow auto-responses, or None if the STE cannot be checked."""
        if not self.smmuen:
            return None
        try:
            return self.strtab.lookup(sid, False).ppar
        except SmmuFault:
            return None

    # ------------------------------------------------------------ registers
    def read_reg(self, offset: int, size: int = 4) -> int:
        """MMIO read of 4 or 8 aligned bytes; anything else reads as zero (logged)."""
        if size not in (4, 8) or offset % size or not 0 <= offset < R.MMIO_SIZE:
            log.warning("smmu: unsupported read of %d bytes at %#x (RAZ)", size, offset)
            return 0
        if size == 8:
            return self._read32(offset) | self._read32(offset + 4) << 32
        return self._read32(offset)

    def write_reg(self, offset: int, value: int, size: int = 4) -> None:
        """MMIO write of 4 or 8 aligned bytes; anything else is ignored (logged)."""
        if size not in (4, 8) or offset % size or not 0 <= offset < R.MMIO_SIZE:
            log.warning("smmu: unsupported write of %d bytes at %#x (ignored)", size, offset)
            return
        if size == 8:
            self._write32(offset, value & 0xFFFFFFFF)
            self._write32(offset + 4, (value >> 32) & 0xFFFFFFFF)
        else:
            self._write32(offset, value & 0xFFFFFFFF)

    def _reg64(self) -> dict[int, tuple[Callable[[], int], Callable[[int], None]]]:
        irq = self.irqs
        st = self.strtab

        def cfg0(src: IrqSource) -> tuple[Callable[[], int], Callable[[int], None]]:
            def get() -> int:
                return irq.msi[src].addr

            def put(v: int) -> None:
                if irq.cfg_writable(src):
                    irq.msi[src].addr = v & R.IRQ_CFG0_ADDR_MASK
            return get, put

        def qbase(q, guard: Callable[[], bool]) -> tuple[Callable[[], int], Callable[[int], None]]:
            def put(v: int) -> None:
                if guard():
                    log.info("%s_BASE write ignored: queue enabled", q.name.upper())
                else:
                    q.base_reg = v & R.Q_BASE_MASK
            return (lambda: q.base_reg), put

        def strtab_put(v: int) -> None:
            if self.smmuen:
                log.info("STRTAB_BASE write ignored: SMMUEN=1")
            else:
                st.base_reg = v & R.STRTAB_BASE_MASK
        return {
            R.GERROR_IRQ_CFG0: cfg0(IrqSource.GERROR),
            R.EVENTQ_IRQ_CFG0: cfg0(IrqSource.EVENTQ),
            R.PRIQ_IRQ_CFG0: cfg0(IrqSource.PRIQ),
            R.STRTAB_BASE: ((lambda: st.base_reg), strtab_put),
            R.CMDQ_BASE: qbase(self.cmdq, lambda: self.cmdq.enabled),
            R.EVENTQ_BASE: qbase(self.eventq, lambda: self.eventq.enabled),
            R.PRIQ_BASE: qbase(self.priq, lambda: self.priq.guard),
        }

    def _read32(self, off: int) -> int:
        if off in self.ids:
            return self.ids[off]
        base = off & ~7
        if base in R.REGS64 and base not in self.ids:
            get, _ = self._reg64()[base]
            return (get() >> (32 if off & 4 else 0)) & 0xFFFFFFFF
        irq = self.irqs
        pri = self.profile.pri
        simple = {
            R.CR0: lambda: self.cr0, R.CR0ACK: lambda: self.cr0, R.CR1: lambda: self.cr1,
            R.CR2: lambda: self.cr2, R.STATUSR: lambda: 0, R.GBPA: lambda: self.gbpa,
            R.AGBPA: lambda: self.agbpa, R.IRQ_CTRL: lambda: irq.irq_ctrl,
            R.IRQ_CTRLACK: lambda: irq.irq_ctrl, R.GERROR: lambda: irq.gerror,
            R.GERRORN: lambda: irq.gerrorn,
            R.GERROR_IRQ_CFG1: lambda: irq.msi[IrqSource.GERROR].data,
            R.GERROR_IRQ_CFG2: lambda: irq.msi[IrqSource.GERROR].cfg2,
            R.STRTAB_BASE_CFG: lambda: self.strtab.cfg,
            R.CMDQ_PROD: lambda: self.cmdq.prod, R.CMDQ_CONS: self.cmdq.read_cons,
            R.EVENTQ_IRQ_CFG1: lambda: irq.msi[IrqSource.EVENTQ].data,
            R.EVENTQ_IRQ_CFG2: lambda: irq.msi[IrqSource.EVENTQ].cfg2,
            R.EVENTQ_PROD: self.eventq.read_prod, R.EVENTQ_CONS: self.eventq.read_cons,
        }
        if pri:
            simple.update({
                R.PRIQ_IRQ_CFG1: lambda: irq.msi[IrqSource.PRIQ].data,
                R.PRIQ_IRQ_CFG2: lambda: irq.msi[IrqSource.PRIQ].cfg2 | (R.PRIQ_IRQ_CFG2_LO if self.priq.irq_lo else 0),
                R.PRIQ_PROD: self.priq.read_prod, R.PRIQ_CONS: self.priq.read_cons,
            })
        fn = simple.get(off)
        return fn() & 0xFFFFFFFF if fn else 0

    def _write32(self, off: int, v: int) -> None:
        base = off & ~7
        if base in R.REGS64:
            if base in (R.PRIQ_BASE, R.PRIQ_IRQ_CFG0) and not self.profile.pri:
                return
            get, put = self._reg64()[base]
            old = get()
            new = (old & 0xFFFFFFFF) | v << 32 if off & 4 else (old & ~0xFFFFFFFF) | v
            put(new)
            return
        handler = {
            R.CR0: self._write_cr0, R.CR1: self._set("cr1", R.CR1_MASK), R.CR2: self._set("cr2", R.CR2_MASK),
            R.GBPA: self._write_gbpa, R.AGBPA: self._set("agbpa", 0xFFFFFFFF),
            R.IRQ_CTRL: self._write_irq_ctrl, R.GERRORN: self._write_gerrorn,
            R.GERROR_IRQ_CFG1: self._msi_field(IrqSource.GERROR, "data", 0xFFFFFFFF),
            R.GERROR_IRQ_CFG2: self._msi_field(IrqSource.GERROR, "cfg2", R.IRQ_CFG2_MASK),
            R.STRTAB_BASE_CFG: self._write_strtab_cfg,
            R.CMDQ_PROD: self.cmdq.write_prod, R.CMDQ_CONS: self.cmdq.write_cons,
            R.EVENTQ_IRQ_CFG1: self._msi_field(IrqSource.EVENTQ, "data", 0xFFFFFFFF),
            R.EVENTQ_IRQ_CFG2: self._msi_field(IrqSource.EVENTQ, "cfg2", R.IRQ_CFG2_MASK),
            R.EVENTQ_PROD: self.eventq.write_prod, R.EVENTQ_CONS: self.eventq.write_cons,
        }
        if self.profile.pri:
            handler.update({
                R.PRIQ_IRQ_CFG1: self._msi_field(IrqSource.PRIQ, "data", 0xFFFFFFFF),
                R.PRIQ_IRQ_CFG2: self._write_priq_cfg2,
                R.PRIQ_PROD: self.priq.write_prod, R.PRIQ_CONS: self.priq.write_cons,
            })
        fn = handler.get(off)
        if fn is None:
            log.debug("smmu: write %#x to RO/RES0 offset %#x ignored", v, off)
            return
        fn(v)

    def _set(self, attr: str, mask: int) -> Callable[[int], None]:
        def put(v: int) -> None:
            setattr(self, attr, v & mask)
        return put

    def _msi_field(self, src: IrqSource, attr: str, mask: int) -> Callable[[int], None]:
        def put(v: int) -> None:
            if self.irqs.cfg_writable(src):
                setattr(self.irqs.msi[src], attr, v & mask)
            else:
                log.info("%s IRQ_CFG write ignored: IRQ enabled", src.value)
        return put

    def _write_priq_cfg2(self, v: int) -> None:
        if self.irqs.cfg_writable(IrqSource.PRIQ):
            self.irqs.msi[IrqSource.PRIQ].cfg2 = v & R.IRQ_CFG2_MASK
            self.priq.irq_lo = bool(v & R.PRIQ_IRQ_CFG2_LO)

    def _write_strtab_cfg(self, v: int) -> None:
        if self.smmuen:
            log.info("STRTAB_BASE_CFG write ignored: SMMUEN=1")
        else:
            self.strtab.cfg = v & R.STRTAB_CFG_MASK

    def _write_gbpa(self, v: int) -> None:
        """GBPA takes effect only when written with Update=1; Update then reads 0 at once."""
        if not v & R.GBPA_UPDATE:
            log.info("GBPA write %#x without Update ignored", v)
            return
        self.gbpa = v & R.GBPA_FIELDS_MASK

    def _write_irq_ctrl(self, v: int) -> None:
        self.irqs.irq_ctrl = v & 0x7 if self.profile.pri else v & 0x5

    def _write_gerrorn(self, v: int) -> None:
        acked = self.irqs.write_gerrorn(v)
        if acked & R.Gerror.CMDQ_ERR:
            log.info("cmdq: CMDQ_ERR acknowledged, restarting at CONS=%#x", self.cmdq.cons)
            self.cmdq.err = 0
            self.cmdq.consume()

    def _write_cr0(self, v: int) -> None:
        """Apply CR0 and mirror it into CR0ACK at once (reserved bits are not mirrored)."""
        old = self.cr0
        new = v & (R.CR0_MASK | R.CR0_VMW_MASK) if self.profile.pri else v & (R.CR0_MASK & ~R.Cr0.PRIQEN)
        self.cr0 = new
        changed = old ^ new
        if changed:
            log.info("CR0 %#x -> %#x", old, new)
        self.eventq.enabled = bool(new & R.Cr0.EVENTQEN)
        self.priq.guard = bool(new & R.Cr0.PRIQEN)
        self.priq.enabled = bool(new & R.Cr0.PRIQEN and new & R.Cr0.SMMUEN)
        self.cmdq.enabled = bool(new & R.Cr0.CMDQEN)
        if changed & R.Cr0.SMMUEN and not new & R.Cr0.SMMUEN:
            pass  # caches stay: software must CFGI/TLBI after re-enabling with new tables
        if changed & R.Cr0.CMDQEN and self.cmdq.enabled:
            self.cmdq.consume()
