"""IOTLB and configuration caches (reference §6.7).

The model caches aggressively on purpose so missing invalidations are *visible*: a
stale STE, CD or translation keeps being used until the matching CMD_CFGI_* / CMD_TLBI_*
is consumed. Failed fetches and invalid/ILLEGAL structures are never cached, nor are
leaf descriptors that fault on AF or address size.

Stage 1 and stage 2 are cached separately (a split TLB is architecturally fine): stage-1
entries map VA -> IPA/PA per (VMID, ASID) with their size (4K page, 2M or 1G block);
stage-2 entries map IPA page -> PA page per VMID with the accesses already granted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

GLOBAL = -1  # ASID key of entries with nG=0 (match every ASID)
PAGE_SIZES = (1 << 12, 1 << 21, 1 << 30)


@dataclass(slots=True)
class S1Entry:
    """A cached stage-1 leaf: output base, size and effective permissions."""

    oa: int
    size: int
    ap: int  # AP[2:1] with APTable applied
    uxn: bool
    pxn: bool
    level: int


class Iotlb:
    """Stage-1 and stage-2 translation caches with spec-shaped invalidation."""

    def __init__(self, capacity: int = 8192) -> None:
        self.capacity = capacity
        self.s1: dict[tuple[int, int, int], S1Entry] = {}
        self.s2: dict[tuple[int, int], tuple[int, int]] = {}  # (vmid, ipa page) -> (pa page, granted mask)
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------ stage 1
    def lookup_s1(self, vmid: int, asid: int, va: int) -> S1Entry | None:
        s1 = self.s1
        for size in PAGE_SIZES:
            base = va & ~(size - 1)
            e = s1.get((vmid, asid, base)) or s1.get((vmid, GLOBAL, base))
            if e is not None and e.size == size:
                self.hits += 1
                return e
        self.misses += 1
        return None

    def insert_s1(self, vmid: int, asid: int, va: int, entry: S1Entry, global_: bool) -> None:
        if len(self.s1) >= self.capacity:
            self.s1.pop(next(iter(self.s1)))
        self.s1[(vmid, GLOBAL if global_ else asid, va & ~(entry.size - 1))] = entry

    # ------------------------------------------------------------ stage 2
    def lookup_s2(self, vmid: int, ipa: int, access_bit: int) -> int | None:
        e = self.s2.get((vmid, ipa >> 12))
        if e is not None and e[1] & access_bit:
            return e[0]
        return None

    def insert_s2(self, vmid: int, ipa: int, pa_page: int, access_bit: int) -> None:
        key = (vmid, ipa >> 12)
        old = self.s2.get(key)
        granted = access_bit | (old[1] if old is not None and old[0] == pa_page else 0)
        if old is None and len(self.s2) >= self.capacity:
            self.s2.pop(next(iter(self.s2)))
        self.s2[key] = (pa_page, granted)

    # ------------------------------------------------------------ invalidation
    def _drop_s1(self, pred: Any) -> int:
        doomed = [k for k, e in self.s1.items() if pred(k, e)]
        for k in doomed:
            del self.s1[k]
        return len(doomed)

    def inv_all(self) -> int:
        n = len(self.s1) + len(self.s2)
        self.s1.clear()
        self.s2.clear()
        return n

    def inv_vmid_s1(self, vmid: int) -> int:
        return self._drop_s1(lambda k, e: k[0] == vmid)

    def inv_asid(self, vmid: int, asid: int) -> int:
        """Non-global entries of one ASID (TLBI_NH_ASID)."""
        return self._drop_s1(lambda k, e: k[0] == vmid and k[1] == asid)

    def inv_va(self, vmid: int, asid: int | None, start: int, length: int) -> int:
        """Entries overlapping [start, start+length); asid None = all ASIDs (VAA).

        Global entries match any ASID, as TLBI VA{L}E1 requires.
        """
        end = start + length

        def hit(k: tuple[int, int, int], e: S1Entry) -> bool:
            return (k[0] == vmid and (asid is None or k[1] in (asid, GLOBAL))
                    and k[2] < end and start < k[2] + e.size)
        return self._drop_s1(hit)

    def inv_vmid_s2(self, vmid: int) -> int:
        doomed = [k for k in self.s2 if k[0] == vmid]
        for k in doomed:
            del self.s2[k]
        return len(doomed)

    def inv_ipa(self, vmid: int, start: int, length: int) -> int:
        first, last = start >> 12, (start + max(length, 1) - 1) >> 12
        doomed = [k for k in self.s2 if k[0] == vmid and first <= k[1] <= last]
        for k in doomed:
            del self.s2[k]
        return len(doomed)


class ConfigCache:
    """Cached STEs (per StreamID), L1STDs (per L1 index), CDs and L1CDs (per SID, SSID)."""

    def __init__(self) -> None:
        self.ste: dict[int, Any] = {}
        self.l1std: dict[int, int] = {}
        self.cd: dict[tuple[int, int], Any] = {}
        self.l1cd: dict[tuple[int, int], int] = {}

    def inv_all(self) -> None:
        self.ste.clear()
        self.l1std.clear()
        self.cd.clear()
        self.l1cd.clear()

    def inv_ste(self, sid: int, leaf: bool, split: int) -> None:
        """CFGI_STE: the STE and every CD/L1CD cached through it; Leaf=0 also the L1STD."""
        self.ste.pop(sid, None)
        self.inv_cd_all(sid)
        if not leaf:
            self.l1std.pop(sid >> split, None)

    def inv_ste_range(self, sid: int, rng: int) -> None:
        """CFGI_STE_RANGE: 2^(Range+1) StreamIDs aligned on ``sid`` (L1STDs too)."""
        span = 1 << (rng + 1)
        lo = sid & ~(span - 1)
        for s in [s for s in self.ste if lo <= s < lo + span]:
            del self.ste[s]
        for key in [k for k in self.cd if lo <= k[0] < lo + span]:
            del self.cd[key]
        for key in [k for k in self.l1cd if lo <= k[0] < lo + span]:
            del self.l1cd[key]
        self.l1std.clear()

    def inv_cd(self, sid: int, ssid: int, leaf: bool) -> None:
        self.cd.pop((sid, ssid), None)
        if not leaf:
            for key in [k for k in self.l1cd if k[0] == sid]:
                del self.l1cd[key]

    def inv_cd_all(self, sid: int) -> None:
        for key in [k for k in self.cd if k[0] == sid]:
            del self.cd[key]
        for key in [k for k in self.l1cd if k[0] == sid]:
            del self.l1cd[key]
