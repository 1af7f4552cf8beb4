"""Context descriptors: substream selection, CD/L1CD fetch, CD decode and ILLEGAL rules.

Reference §6.4-§6.6. Priority (§3.3): C_BAD_SUBSTREAMID, F_STREAM_DISABLED, stage-2
faults on the CD fetch (raised by the fetch callable), F_CD_FETCH, C_BAD_CD. Valid CDs
are cached per (StreamID, CD index) until CMD_CFGI_CD* or CMD_CFGI_STE*.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from devmodel.iommu import records as rec
from devmodel.iommu import registers as R
from devmodel.iommu.bitfield import Fields
from devmodel.iommu.faults import SmmuFault
from devmodel.iommu.records import EventId
from devmodel.iommu.strtab import StreamConfig
from devmodel.iommu.tlb import ConfigCache

log = logging.getLogger(__name__)

TXSZ_MIN, TXSZ_MAX = 16, 39  # 4 KiB granule, no IDR3.STT, 48-bit VA

#: fetch(addr, size, what) -> bytes; raises SmmuFault (stage-2 CLASS=CD or F_CD_FETCH)
Fetcher = Callable[[int, int, str], bytes]


@dataclass(slots=True)
class ContextConfig:
    """A decoded, validated CD plus the values the walker needs."""

    cd: Fields
    index: int
    ips_bits: int
    addr: int

    @property
    def asid(self) -> int:
        return self.cd.ASID


class ContextTable:
    """Selects and fetches the CD for (STE, SSID)."""

    def __init__(self, profile: R.SmmuProfile, cache: ConfigCache) -> None:
        self.profile = profile
        self.cache = cache

    def cd_index(self, sc: StreamConfig, ssid: int | None) -> int | None:
        """Which CD applies: an index, or None for stage-1 bypass (S1DSS=0b01)."""
        ste = sc.ste
        p = self.profile
        if ssid is not None:
            if not sc.s1:
                raise SmmuFault(EventId.C_BAD_SUBSTREAMID, "SSID given but stage 1 is off",
                                SubstreamID=ssid)
            if p.ssid_bits == 0 or ste.S1CDMax == 0:
                raise SmmuFault(EventId.C_BAD_SUBSTREAMID, "substreams disabled (S1CDMax=0)",
                                SubstreamID=ssid)
            if ssid >> ste.S1CDMax:
                raise SmmuFault(EventId.C_BAD_SUBSTREAMID, f"SSID {ssid:#x} >= 2^S1CDMax={ste.S1CDMax}",
                                SubstreamID=ssid)
            if ssid == 0 and ste.S1DSS == rec.S1DSS_SSID0:
                raise SmmuFault(EventId.F_STREAM_DISABLED, "SSID 0 reserved by S1DSS=0b10")
            return ssid
        if ste.S1CDMax == 0 or p.ssid_bits == 0:
            return 0
        if ste.S1DSS == rec.S1DSS_BYPASS:
            return None
        if ste.S1DSS == rec.S1DSS_SSID0:
            return 0
        raise SmmuFault(EventId.F_STREAM_DISABLED, f"no SSID and S1DSS={ste.S1DSS:#04b}")

    def cd_address(self, sc: StreamConfig, index: int, fetch: Fetcher) -> int:
        """PA/IPA of CD ``index``: single CD, linear table, or via an L1CD (§6.4)."""
        ste = sc.ste
        ptr = ste.S1ContextPtr
        if ste.S1CDMax == 0 or self.profile.ssid_bits == 0:
            return ptr
        fmt = ste.S1Fmt if ste.S1Fmt in (rec.S1FMT_64_4K, rec.S1FMT_64_64K) else rec.S1FMT_LINEAR
        if fmt == rec.S1FMT_LINEAR:
            return (ptr & ~((1 << (ste.S1CDMax + 6)) - 1)) + index * rec.CD_SIZE
        leaf_bits = 6 if fmt == rec.S1FMT_64_4K else 10
        l1_index = index >> leaf_bits
        key = (sc.sid, l1_index)
        l1 = self.cache.l1cd.get(key)
        if l1 is None:
            l1_addr = ptr + l1_index * rec.L1CD_SIZE
            l1 = int.from_bytes(fetch(l1_addr, rec.L1CD_SIZE, "L1CD"), "little")
            log.debug("cd: sid %#x L1CD[%d] at %#x = %#x", sc.sid, l1_index, l1_addr, l1)
            if not rec.L1CD.get(l1, "V"):
                raise SmmuFault(EventId.C_BAD_SUBSTREAMID, f"L1CD[{l1_index}] V=0",
                                SubstreamID=index)
            if rec.L1CD.get(l1, "L2Ptr") >> self.profile.oas_bits:
                raise SmmuFault(EventId.C_BAD_SUBSTREAMID, f"L1CD[{l1_index}] L2Ptr out of range",
                                SubstreamID=index)
            self.cache.l1cd[key] = l1
        return rec.L1CD.get(l1, "L2Ptr") + (index & ((1 << leaf_bits) - 1)) * rec.CD_SIZE

    def lookup(self, sc: StreamConfig, index: int, fetch: Fetcher) -> ContextConfig:
        key = (sc.sid, index)
        cc = self.cache.cd.get(key)
        if cc is not None:
            return cc
        addr = self.cd_address(sc, index, fetch)
        cd = rec.CD.decode(fetch(addr, rec.CD_SIZE, "CD"))
        log.debug("cd: sid %#x CD[%d] at %#x: V=%d T0SZ=%d TTB0=%#x ASID=%d", sc.sid, index, addr,
                  cd.V, cd.T0SZ, cd.TTB0, cd.ASID)
        bad = self.illegal_reason(sc, cd)
        if bad:
            raise SmmuFault(EventId.C_BAD_CD, f"CD[{index}] at {addr:#x}: {bad}")
        ips = rec.PA_BITS[min(cd.IPS, self.profile.oas)]
        cc = ContextConfig(cd=cd, index=index, ips_bits=ips, addr=addr)
        self.cache.cd[key] = cc
        return cc

    def illegal_reason(self, sc: StreamConfig, cd: Fields) -> str | None:
        """The first §6.6 rule a CD breaks, else None."""
        p = self.profile
        if not cd.V:
            return "V=0"
        if sc.ste.S1STALLD and cd.S:
            return "S=1 with STE.S1STALLD=1"
        if p.term_model and not cd.A:
            return "A=0 with TERM_MODEL=1"
        if p.stall_model == 0b01 and cd.S:
            return "S=1 with STALL_MODEL=terminate"
        if p.stall_model == 0b10 and not cd.S:
            return "S=0 with STALL_MODEL=forced"
        if cd.ENDI and not (cd.EPD0 and cd.EPD1):
            return "ENDI=1 (big-endian) contradicts TTENDIAN=LE"
        if not cd.AA64:
            return "AA64=0 (AArch32 tables unsupported)"
        if cd.HA or cd.HD:
            return "HA/HD without HTTU"
        ips = rec.PA_BITS[min(cd.IPS, p.oas)]
        for n, (tsz, tg, want_tg, epd, ttb) in enumerate(
                ((cd.T0SZ, cd.TG0, rec.TG0_4K, cd.EPD0, cd.TTB0),
                 (cd.T1SZ, cd.TG1, rec.TG1_4K, cd.EPD1, cd.TTB1))):
            if epd:
                continue  # EPDx=1: TTBx fields are not validity-checked (pitfall 8)
            if not TXSZ_MIN <= tsz <= TXSZ_MAX:
                return f"T{n}SZ={tsz} out of range {TXSZ_MIN}..{TXSZ_MAX}"
            if tg != want_tg:
                return f"TG{n}={tg:#04b} unsupported (4 KiB only)"
            if ttb >> min(ips, 48):
                return f"TTB{n}={ttb:#x} beyond the effective IPS"
        return None
