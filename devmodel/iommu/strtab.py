"""Stream table (linear and 2-level) and STE decode with the ILLEGAL rules (§6.1-§6.3).

Lookup order follows the priority of §3.3: C_BAD_STREAMID, then F_STE_FETCH, then
C_BAD_STE. Valid, legal STEs are cached per StreamID until CMD_CFGI_STE* (so a missing
CFGI is visible); aborts and invalid STEs are never cached.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from devmodel.iommu import records as rec
from devmodel.iommu import registers as R
from devmodel.iommu.bitfield import Fields
from devmodel.iommu.faults import SmmuFault
from devmodel.iommu.records import EventId, SteConfig
from devmodel.iommu.tlb import ConfigCache
from devmodel.memory import BusError, Memory

log = logging.getLogger(__name__)

S2T0SZ_MIN, S2T0SZ_MAX = 16, 39


@dataclass(slots=True)
class StreamConfig:
    """A decoded, validated STE: what the translation pipeline needs."""

    sid: int
    ste: Fields
    config: SteConfig
    s1: bool
    s2: bool
    vmid: int
    addr: int  # PA of the STE (for logs)

    @property
    def ppar(self) -> bool:
        return bool(self.ste.PPAR)


class StreamTable:
    """STRTAB_BASE / STRTAB_BASE_CFG and STE fetch + validation."""

    def __init__(self, memory: Memory, profile: R.SmmuProfile, cache: ConfigCache) -> None:
        self.memory = memory
        self.profile = profile
        self.cache = cache
        self.base_reg = 0
        self.cfg = 0

    def reset(self) -> None:
        self.base_reg = 0
        self.cfg = 0

    # ------------------------------------------------------------ geometry
    @property
    def log2size(self) -> int:
        return min(self.cfg & R.STRTAB_CFG_LOG2SIZE_MASK, self.profile.sid_bits)

    @property
    def split(self) -> int:
        s = (self.cfg >> R.STRTAB_CFG_SPLIT_SHIFT) & R.STRTAB_CFG_SPLIT_MASK
        return s if s in (6, 8, 10) else 6

    @property
    def two_level(self) -> bool:
        fmt = (self.cfg >> R.STRTAB_CFG_FMT_SHIFT) & R.STRTAB_CFG_FMT_MASK
        return fmt == R.STRTAB_FMT_2LEVEL and self.profile.st_level_2

    def base(self) -> int:
        """Effective base: linear aligned to its size; 2-level per §1.8."""
        addr = self.base_reg & R.STRTAB_BASE_ADDR_MASK
        if self.two_level:
            low = max(5, self.log2size - self.split - 1 + 3)
        else:
            low = self.log2size + 5
        return addr & ~((1 << (low + 1)) - 1)

    # ------------------------------------------------------------ fetch
    def _read(self, addr: int, size: int, sid: int, what: str) -> bytes:
        if addr >> self.profile.oas_bits:
            raise SmmuFault(EventId.F_STE_FETCH, f"{what} address {addr:#x} beyond OAS",
                            FetchAddr=addr & ~7)
        try:
            return self.memory.read(addr, size)
        except BusError as e:
            raise SmmuFault(EventId.F_STE_FETCH, f"{what} fetch abort: {e}", FetchAddr=addr & ~7) from None

    def ste_address(self, sid: int, record_bad_sid: bool) -> int:
        """Return the STE PA for ``sid`` or raise C_BAD_STREAMID / F_STE_FETCH."""
        if sid >> self.log2size:
            raise SmmuFault(EventId.C_BAD_STREAMID, f"sid {sid:#x} >= 2^{self.log2size}",
                            record=record_bad_sid)
        if not self.two_level:
            return self.base() + sid * rec.STE_SIZE
        split = self.split
        l1_index = sid >> split
        l1 = self.cache.l1std.get(l1_index)
        if l1 is None:
            l1_addr = self.base() + l1_index * rec.L1STD_SIZE
            l1 = int.from_bytes(self._read(l1_addr, rec.L1STD_SIZE, sid, "L1STD"), "little")
            log.debug("strtab: sid %#x L1STD[%d] at %#x = %#x", sid, l1_index, l1_addr, l1)
        span = rec.L1STD.get(l1, "Span")
        low = sid & ((1 << split) - 1)
        # Span 0 or reserved, Span > SPLIT+1, or SID beyond the span: C_BAD_STREAMID (pitfall 9).
        if span == 0 or span > 11 or span > split + 1 or low >= (1 << (span - 1)):
            raise SmmuFault(EventId.C_BAD_STREAMID,
                            f"sid {sid:#x}: L1STD[{l1_index}] Span={span} does not cover it",
                            record=record_bad_sid)
        self.cache.l1std[l1_index] = l1
        l2ptr = rec.L1STD.get(l1, "L2Ptr") & ~((1 << (5 + span)) - 1) if span > 1 else rec.L1STD.get(l1, "L2Ptr")
        return l2ptr + low * rec.STE_SIZE

    def lookup(self, sid: int, record_bad_sid: bool) -> StreamConfig:
        """The StreamConfig for ``sid`` (cached), or raise the configuration fault."""
        cfg = self.cache.ste.get(sid)
        if cfg is not None:
            return cfg
        addr = self.ste_address(sid, record_bad_sid)
        raw = self._read(addr, rec.STE_SIZE, sid, "STE")
        ste = rec.STE.decode(raw)
        log.debug("strtab: sid %#x STE at %#x: V=%d Config=%#x", sid, addr, ste.V, ste.Config)
        cfg = self.validate(sid, ste, addr)
        self.cache.ste[sid] = cfg
        return cfg

    # ------------------------------------------------------------ ILLEGAL rules (§6.3)
    def validate(self, sid: int, ste: Fields, addr: int) -> StreamConfig:
        if not ste.V:
            raise SmmuFault(EventId.C_BAD_STE, f"STE at {addr:#x} has V=0")
        config = ste.Config
        if not config & 0b100:
            # 0b000 and the reserved 0b0xx abort silently.
            raise SmmuFault(None, f"STE Config={config:#05b}: abort", record=False)
        bad = self.illegal_reason(ste)
        if bad:
            raise SmmuFault(EventId.C_BAD_STE, f"STE at {addr:#x} ILLEGAL: {bad}")
        s1 = bool(config & 0b001)
        s2 = bool(config & 0b010)
        return StreamConfig(sid=sid, ste=ste, config=SteConfig(config), s1=s1, s2=s2,
                            vmid=ste.S2VMID if s2 else 0, addr=addr)

    def illegal_reason(self, ste: Fields) -> str | None:
        """The first ILLEGAL rule an STE breaks (Config already 0b1xx), else None."""
        p = self.profile
        config = ste.Config
        s1 = bool(config & 0b001)
        s2 = bool(config & 0b010)
        if s1 and not p.s1p:
            return "stage 1 requested but IDR0.S1P=0"
        if s2 and not p.s2p:
            return "stage 2 requested but IDR0.S2P=0"
        if p.ats and config != SteConfig.BYPASS:
            if ste.EATS == rec.EATS_SPLIT:
                return "EATS=0b10 (split-stage ATS) not supported (NS1ATS=1)"
            if ste.EATS == rec.EATS_DPT:
                return "EATS=0b11 needs DPT"
            if ste.EATS == rec.EATS_FULL and ste.S2S and s2:
                return "EATS=0b01 with S2S=1"
        if p.hyp and s1 and not s2 and ste.STRW & 1:
            return f"STRW={ste.STRW:#04b} reserved"
        if s1:
            if ste.S1STALLD and p.stall_model != 0:
                return "S1STALLD=1 without the stall model"
            if p.ssid_bits and ste.S1CDMax > p.ssid_bits:
                return f"S1CDMax={ste.S1CDMax} > SSIDSIZE={p.ssid_bits}"
            if ste.S1CDMax and ste.S1Fmt in (rec.S1FMT_64_4K, rec.S1FMT_64_64K) and not p.cd2l:
                return "2-level CD table without IDR0.CD2L"
            if ste.S1ContextPtr >> p.oas_bits:
                return f"S1ContextPtr {ste.S1ContextPtr:#x} out of range"
        if s2:
            if ste.S2S and p.stall_model == 0b01:
                return "S2S=1 with STALL_MODEL=terminate"
            if ste.S2S == 0 and p.stall_model == 0b10:
                return "S2S=0 with STALL_MODEL=forced"
            if not ste.S2AA64:
                return "S2AA64=0 (AArch32 stage 2 unsupported)"
            if ste.S2HA or ste.S2HD:
                return "S2HA/S2HD without HTTU"
            if ste.S2TG != 0:
                return f"S2TG={ste.S2TG} unsupported (4 KiB only)"
            if not S2T0SZ_MIN <= ste.S2T0SZ <= S2T0SZ_MAX:
                return f"S2T0SZ={ste.S2T0SZ} out of range"
            if ste.S2SL0 == 0b11 or not _s2_start_ok(ste.S2T0SZ, ste.S2SL0):
                return f"S2SL0={ste.S2SL0} inconsistent with S2T0SZ={ste.S2T0SZ}"
            if ste.S2ENDI:
                return "S2ENDI=1 contradicts TTENDIAN (LE only)"
            s2ps = rec.PA_BITS[min(ste.S2PS, p.oas)]
            if ste.S2TTB >> s2ps:
                return f"S2TTB {ste.S2TTB:#x} beyond S2PS"
        return None


def _s2_start_ok(t0sz: int, sl0: int) -> bool:
    """4 KiB stage 2: SL0 0/1/2 = start level 2/1/0; up to 16 concatenated tables below L0."""
    start = 2 - sl0
    ia = 64 - t0sz
    max_ia = 12 + 9 * (4 - start) + (4 if start > 0 else 0)
    min_ia = 12 + 9 * (3 - start) + 1
    return min_ia <= ia <= max_ia
