"""The translation pipeline: STE -> CD -> stage 1 -> stage 2, and how faults are reported.

Walk steps are logged (DEBUG) with a per-transaction id ``[tN]``; a fault is logged and
traced with its process-wide fault id ``[fN]`` (:data:`devmodel.trace.TRACER`, born at
the endpoint's access), which :meth:`Translator.report` emits as the ``smmu.fault`` hop
before the event record is written. Fault outcome rules (reference §3.3):

* configuration errors and other non-Translation faults abort and record;
* stage-1 Translation-related faults follow CD.{A,R,S}: R records, A=0 means RAZ/WI;
* stage-2 Translation-related faults record when STE.S2R=1 and always abort;
* STE.Config=abort and GBPA.ABORT abort silently.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from devmodel.iommu import records as rec
from devmodel.iommu import stage1
from devmodel.iommu.cd import ContextConfig
from devmodel.iommu.faults import (Access, AtsCompletion, AtsStatus, FaultInfo, SmmuFault,
                                   TranslationResult)
from devmodel.iommu.records import TRANSLATION_RELATED, EventClass, EventId
from devmodel.iommu.strtab import StreamConfig
from devmodel.iommu.tlb import S1Entry
from devmodel.memory import BusError
from devmodel.trace import TRACER

if TYPE_CHECKING:
    from devmodel.iommu.smmu import SMMUv3

log = logging.getLogger(__name__)

_ACCESS_BIT = {Access.READ: 1, Access.WRITE: 2, Access.EXEC: 4}


@dataclass(slots=True)
class Stage2Fault:
    """What a stage-2 hook returns to refuse an access (recorded with S2=1 and the IPA)."""

    event: EventId = EventId.F_TRANSLATION
    reason: str = "not mapped in the IOAS"


#: hook(ipa, access) -> pa, or Stage2Fault / None (None = F_TRANSLATION)
Stage2Hook = Callable[[int, Access], "int | Stage2Fault | None"]


class Translator:
    """Stateless pipeline steps bound to one SMMU."""

    def __init__(self, smmu: "SMMUv3") -> None:
        self.smmu = smmu
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        return next(self._ids)

    # ------------------------------------------------------------ stage 2
    def s2(self, sc: StreamConfig, ipa: int, access: Access, cls: EventClass, tid: int) -> int:
        """Translate an IPA through the VMID's stage-2 hook (cached per page)."""
        smmu = self.smmu
        bit = _ACCESS_BIT[access]
        vmid = sc.vmid
        pa_page = smmu.iotlb.lookup_s2(vmid, ipa, bit)
        if pa_page is not None:
            return pa_page | (ipa & 0xFFF)
        extra = {"CLASS": int(cls), "S2": 1, "IPA": ipa & ~0xFFF}
        if cls == EventClass.TT:
            extra["TTRnW"] = 1
        if ipa >> (64 - sc.ste.S2T0SZ):
            raise SmmuFault(EventId.F_TRANSLATION, f"IPA {ipa:#x} beyond S2T0SZ={sc.ste.S2T0SZ}",
                            stage=2, **extra)
        hook = smmu.stage2_hooks.get(vmid, smmu.default_stage2)
        out = hook(ipa, access) if hook is not None else Stage2Fault(reason="no stage-2 hook for VMID")
        if out is None:
            out = Stage2Fault()
        if isinstance(out, Stage2Fault):
            log.debug("s2[t%d]: vmid %d IPA %#x %s: %s (%s)", tid, vmid, ipa, access.name,
                      out.event.name, out.reason)
            raise SmmuFault(out.event, f"stage 2: {out.reason}", stage=2, **extra)
        smmu.iotlb.insert_s2(vmid, ipa, out & ~0xFFF, bit)
        log.debug("s2[t%d]: vmid %d IPA %#x -> PA %#x", tid, vmid, ipa, out)
        return out

    # ------------------------------------------------------------ fetches
    def cd_fetcher(self, sc: StreamConfig, tid: int) -> Callable[[int, int, str], bytes]:
        """A fetch for CDs/L1CDs: through stage 2 (CLASS=CD) when nested; aborts -> F_CD_FETCH."""
        def fetch(addr: int, size: int, what: str) -> bytes:
            pa = self.s2(sc, addr, Access.READ, EventClass.CD, tid) if sc.s2 else addr
            try:
                return self.smmu.memory.read(pa, size)
            except BusError as e:
                raise SmmuFault(EventId.F_CD_FETCH, f"{what} fetch abort: {e}", FetchAddr=pa & ~7) from None
        return fetch

    def desc_reader(self, sc: StreamConfig, tid: int) -> stage1.DescReader:
        """A descriptor read: table IPAs through stage 2 (CLASS=TT); aborts -> F_WALK_EABT."""
        def read(addr: int, level: int) -> int:
            pa = self.s2(sc, addr, Access.READ, EventClass.TT, tid) if sc.s2 else addr
            try:
                return int.from_bytes(self.smmu.memory.read(pa, 8), "little")
            except BusError as e:
                raise SmmuFault(EventId.F_WALK_EABT, f"L{level} descriptor fetch abort: {e}",
                                level=level, FetchAddr=pa & ~7, CLASS=int(EventClass.TT)) from None
        return read

    # ------------------------------------------------------------ configuration
    def resolve(self, sid: int, ssid: int | None, tid: int) -> tuple[StreamConfig, ContextConfig | None]:
        """STE and CD for a transaction (None CD = stage-1 bypass)."""
        smmu = self.smmu
        sc = smmu.strtab.lookup(sid, smmu.record_bad_streamid)
        if not sc.s1:
            if ssid is not None:
                smmu.cdtab.cd_index(sc, ssid)  # raises C_BAD_SUBSTREAMID
            return sc, None
        index = smmu.cdtab.cd_index(sc, ssid)
        if index is None:
            return sc, None
        return sc, smmu.cdtab.lookup(sc, index, self.cd_fetcher(sc, tid))

    def s1_entry(self, sc: StreamConfig, cc: ContextConfig, va: int, tid: int) -> S1Entry:
        """The stage-1 leaf for ``va``: IOTLB hit or a walk (successful walks are cached)."""
        iotlb = self.smmu.iotlb
        e = iotlb.lookup_s1(sc.vmid, cc.cd.ASID, va)
        if e is not None:
            return e
        log.debug("walk[t%d]: sid %#x asid %d VA %#x: IOTLB miss", tid, sc.sid, cc.cd.ASID, va)
        e, glob = stage1.walk(cc, va, self.desc_reader(sc, tid), tid)
        iotlb.insert_s1(sc.vmid, cc.cd.ASID, va, e, glob)
        return e

    @staticmethod
    def attributes(sc: StreamConfig, access: Access, priv: bool) -> tuple[Access, bool]:
        """Apply STE.PRIVCFG / INSTCFG overrides (writes are always data)."""
        ste = sc.ste
        if ste.PRIVCFG == rec.PRIVCFG_FORCE_UNPRIV:
            priv = False
        elif ste.PRIVCFG == rec.PRIVCFG_FORCE_PRIV:
            priv = True
        if access is not Access.WRITE:
            if ste.INSTCFG == rec.INSTCFG_FORCE_DATA:
                access = Access.READ
            elif ste.INSTCFG == rec.INSTCFG_FORCE_INSTR:
                access = Access.EXEC
        return access, priv

    def bypass_check(self, sc: StreamConfig, addr: int) -> None:
        """Stage-1 bypass: the address must fit the IAS (stage 2 on) or the OAS (§7.5)."""
        limit = self.smmu.profile.oas_bits if not sc.s2 else max(self.smmu.profile.oas_bits, 40)
        if addr >> limit:
            raise SmmuFault(EventId.F_ADDR_SIZE, f"bypass address {addr:#x} beyond {limit} bits",
                            CLASS=int(EventClass.IN))

    # ------------------------------------------------------------ untranslated traffic
    def translate(self, sid: int, ssid: int | None, iova: int, size: int, access: Access,
                  priv: bool) -> TranslationResult:
        smmu = self.smmu
        if not smmu.smmuen:
            return smmu.gbpa_result(sid, ssid, iova, size, access)
        tid = self.next_id() if log.isEnabledFor(logging.DEBUG) else 0
        cc: ContextConfig | None = None
        eff_access, eff_priv = access, priv
        try:
            sc, cc = self.resolve(sid, ssid, tid)
            eff_access, eff_priv = self.attributes(sc, access, priv)
            if cc is not None:
                va = iova & ((1 << 56) - 1) if (cc.cd.TBI1 if (iova >> 55) & 1 else cc.cd.TBI0) else iova
                e = self.s1_entry(sc, cc, va, tid)
                why = stage1.permission_fault(e, cc, eff_access, eff_priv)
                if why:
                    raise SmmuFault(EventId.F_PERMISSION, why, stage=1, level=e.level,
                                    CLASS=int(EventClass.IN))
                offset = va & (e.size - 1)
                out = e.oa | offset
                length = e.size - offset
            else:
                self.bypass_check(sc, iova)
                out = iova
                length = 4096 - (iova & 0xFFF)
            if sc.s2:
                out = self.s2(sc, out, eff_access, EventClass.IN, tid)
                length = min(length, 4096 - (out & 0xFFF))
        except SmmuFault as f:
            return self.report(f, sid, ssid, iova, eff_access, eff_priv, cc, tid)
        return TranslationResult(pa=out, length=min(length, size) if size else length)

    def report(self, f: SmmuFault, sid: int, ssid: int | None, iova: int, access: Access, priv: bool,
               cc: ContextConfig | None, tid: int, record_allowed: bool = True) -> TranslationResult:
        """Decide record/abort for a fault, write the event, and build the endpoint's view."""
        configurable = f.event in TRANSLATION_RELATED and f.stage in (1, 2)
        if configurable and f.stage == 1 and cc is not None:
            cd = cc.cd
            record, abort = bool(cd.R or cd.S), bool(cd.A)
        elif configurable and f.stage == 2:
            sc = self.smmu.config_cache.ste.get(sid)
            record, abort = bool(sc is not None and sc.ste.S2R), True
        else:
            record, abort = f.record, True
        record = record and record_allowed
        fid = TRACER.current()
        info = FaultInfo(event=f.event, reason=f.reason, stage=f.stage, level=f.level, abort=abort,
                         trace_id=fid, fields=dict(f.fields))
        log.info("fault[f%d t%d]: sid=%#x ssid=%s iova=%#x %s: %s %s (stage %d%s) -> %s%s", fid, tid, sid, ssid,
                 iova, access.name, info.name, f.reason, f.stage,
                 f", L{f.level}" if f.level is not None else "",
                 "abort" if abort else "RAZ/WI", ", record" if record and f.event else ", no record")
        TRACER.hop(fid, "smmu.fault", event=int(f.event) if f.event is not None else None, name=info.name,
                   sid=sid, ssid=ssid, addr=iova, stage=f.stage, access=access.name.lower(),
                   outcome="abort" if abort else "raz_wi", record=bool(record and f.event is not None))
        if record and f.event is not None:
            fields = dict(StreamID=sid, SSV=int(ssid is not None), SubstreamID=ssid or 0,
                          InputAddr=iova & ((1 << 64) - 1), RnW=access.rnw,
                          InD=int(access is Access.EXEC), PnU=int(priv))
            fields.update(f.fields)
            if f.event == EventId.C_BAD_SUBSTREAMID:
                fields["SubstreamID"] = f.fields.get("SubstreamID", ssid or 0)
            info.recorded = self.smmu.eventq.record(rec.encode_event(f.event, **fields), fid)
        return TranslationResult(pa=None, fault=info, raz_wi=not abort)

    # ------------------------------------------------------------ ATS
    def ats_translate(self, sid: int, ssid: int | None, addr: int, priv: bool,
                      want_write: bool, want_exec: bool) -> AtsCompletion:
        """Answer an ATS Translation Request (permissions of the whole page)."""
        smmu = self.smmu
        if not smmu.smmuen:
            log.info("ats: sid=%#x addr=%#x: SMMUEN=0 -> UR", sid, addr)
            return AtsCompletion(AtsStatus.UR)
        tid = self.next_id() if log.isEnabledFor(logging.DEBUG) else 0
        cc = None
        try:
            sc, cc = self.resolve(sid, ssid, tid)
            if sc.config == rec.SteConfig.BYPASS or sc.ste.EATS == rec.EATS_OFF:
                raise SmmuFault(EventId.F_BAD_ATS_TREQ,
                                "ATS not allowed (EATS=0 or bypass STE)")
            _, eff_priv = self.attributes(sc, Access.READ, priv)
            perms = {}
            if cc is not None:
                va = addr & ~0xFFF
                e = self.s1_entry(sc, cc, va, tid)
                for acc in Access:
                    perms[acc] = stage1.permission_fault(e, cc, acc, eff_priv) is None
                out = e.oa | (va & (e.size - 1))
                size = e.size
            else:
                self.bypass_check(sc, addr)
                perms = {acc: True for acc in Access}
                out, size = addr & ~0xFFF, 4096
            if sc.s2:
                base = out & ~0xFFF
                granted = {}
                for acc in Access:
                    if perms[acc]:
                        try:
                            pa = self.s2(sc, base, acc, EventClass.IN, tid)
                            granted[acc] = True
                        except SmmuFault as f2:
                            if f2.event not in TRANSLATION_RELATED:
                                raise
                            granted[acc] = False
                    else:
                        granted[acc] = False
                if not any(granted.values()):
                    raise SmmuFault(EventId.F_TRANSLATION, "stage 2 grants nothing", stage=2)
                out = self.s2(sc, base, next(a for a in Access if granted[a]), EventClass.IN, tid)
                perms, size = granted, 4096
        except SmmuFault as f:
            if f.event in TRANSLATION_RELATED and f.stage in (1, 2):
                log.info("ats[t%d]: sid=%#x ssid=%s addr=%#x: %s (%s) -> Success with R=W=0, no event",
                         tid, sid, ssid, addr, f.event.name, f.reason)
                return AtsCompletion(AtsStatus.SUCCESS, fault=FaultInfo(
                    event=f.event, reason=f.reason, stage=f.stage, level=f.level, abort=False, trace_id=tid))
            status = AtsStatus.UR if f.event == EventId.F_BAD_ATS_TREQ else AtsStatus.CA
            silent = f.event == EventId.C_BAD_STE and "V=0" in f.reason
            acc = Access.WRITE if want_write else (Access.EXEC if want_exec else Access.READ)
            res = self.report(f, sid, ssid, addr, acc, priv, cc, tid, record_allowed=not silent)
            log.info("ats[t%d]: sid=%#x addr=%#x -> %s", tid, sid, addr, status.name)
            return AtsCompletion(status, fault=res.fault)
        log.debug("ats[t%d]: sid=%#x ssid=%s addr=%#x -> %#x size %#x R=%d W=%d X=%d", tid, sid, ssid, addr,
                  out, size, perms[Access.READ], perms[Access.WRITE], perms[Access.EXEC])
        return AtsCompletion(AtsStatus.SUCCESS, translated_addr=out & ~(size - 1), size=size,
                             r=perms[Access.READ], w=perms[Access.WRITE], x=perms[Access.EXEC],
                             priv=eff_priv)
