"""AArch64 stage-1 translation with a 4 KiB granule (VMSAv8-64; reference §7).

:func:`walk` selects TTB0/TTB1 by VA[55], checks the TxSZ range and EPDx, walks from the
start level and returns the leaf as an :class:`S1Entry`, raising F_TRANSLATION,
F_ADDR_SIZE or F_ACCESS (stage 1, CLASS=IN) in the per-level order of §3.3.
:func:`permission_fault` applies the two-privilege Direct permission rules of §7.5.
Descriptor reads go through the ``read_desc`` callable, which turns aborts into
F_WALK_EABT and, for nested STEs, translates table addresses through stage 2.
"""

from __future__ import annotations

import logging
from typing import Callable

from devmodel.iommu.cd import ContextConfig
from devmodel.iommu.faults import Access, SmmuFault
from devmodel.iommu.records import EventClass, EventId
from devmodel.iommu.tlb import S1Entry

log = logging.getLogger(__name__)

# Descriptor bits (Arm ARM D8.3; reference §7.3)
DESC_VALID = 1 << 0
DESC_TABLE = 1 << 1  # with VALID: table (L0-L2) or page (L3); clear: block
DESC_AP_SHIFT = 6
DESC_AP_RO = 1 << 7  # AP[2]
DESC_AP_UNPRIV = 1 << 6  # AP[1]
DESC_AF = 1 << 10
DESC_NG = 1 << 11
DESC_PXN = 1 << 53
DESC_UXN = 1 << 54
TABLE_PXN = 1 << 59
TABLE_UXN = 1 << 60
TABLE_AP_NO_UNPRIV = 1 << 61  # APTable[0]
TABLE_AP_RO = 1 << 62  # APTable[1]
OA_MASK_48 = (1 << 48) - 1
GRANULE_SHIFT = 12
LEVEL_BITS = 9

#: read_desc(addr, level) -> 64-bit descriptor value
DescReader = Callable[[int, int], int]


def level_shift(level: int) -> int:
    """Lowest VA bit resolved at ``level`` (4 KiB granule): 39, 30, 21, 12."""
    return GRANULE_SHIFT + LEVEL_BITS * (3 - level)


def start_level(ia: int) -> int:
    """start = 3 - floor((IA - 13) / 9) (reference §7.2)."""
    return 3 - (ia - 13) // LEVEL_BITS


def _fault(event: EventId, reason: str, level: int | None) -> SmmuFault:
    return SmmuFault(event, reason, stage=1, level=level, CLASS=int(EventClass.IN))


def select_table(cc: ContextConfig, va: int) -> tuple[int, int, bool]:
    """Return (TTB, IA bits, HAD) for ``va`` after the range and EPD checks (§7.1)."""
    cd = cc.cd
    upper = (va >> 55) & 1
    tsz, epd, ttb, tbi, had = ((cd.T1SZ, cd.EPD1, cd.TTB1, cd.TBI1, cd.HAD1) if upper
                               else (cd.T0SZ, cd.EPD0, cd.TTB0, cd.TBI0, cd.HAD0))
    ia = 64 - tsz
    top = 55 if tbi else 63
    high = (va >> ia) & ((1 << (top - ia + 1)) - 1)
    want = (1 << (top - ia + 1)) - 1 if upper else 0
    if high != want:
        raise _fault(EventId.F_TRANSLATION, f"VA {va:#x} outside the TTB{upper} range (T{upper}SZ={tsz})", None)
    if epd:
        raise _fault(EventId.F_TRANSLATION, f"TTB{upper} disabled by EPD{upper}=1", None)
    return ttb, ia, bool(had)


def walk(cc: ContextConfig, va: int, read_desc: DescReader, tid: int = 0) -> tuple[S1Entry, bool]:
    """Walk the stage-1 tables for ``va``; return (leaf entry, global) or raise a fault."""
    ttb, ia, had = select_table(cc, va)
    level = start_level(ia)
    shift = level_shift(level)
    width = ia - shift
    table = ttb & ~((1 << (3 + width)) - 1)
    ap_table_ro = ap_table_nounpriv = pxn_table = uxn_table = False
    ips = cc.ips_bits
    while True:
        index = (va >> shift) & ((1 << width) - 1)
        addr = table + index * 8
        desc = read_desc(addr, level)
        log.debug("walk[t%d]: L%d index %d desc@%#x = %#018x", tid, level, index, addr, desc)
        if not desc & DESC_VALID:
            raise _fault(EventId.F_TRANSLATION, f"invalid descriptor at L{level} ({addr:#x})", level)
        if level < 3 and desc & DESC_TABLE:
            nlta = desc & OA_MASK_48 & ~((1 << GRANULE_SHIFT) - 1)
            if nlta >> ips:
                raise _fault(EventId.F_ADDR_SIZE, f"L{level} table address {nlta:#x} beyond IPS {ips}", level)
            if not had:
                ap_table_ro |= bool(desc & TABLE_AP_RO)
                ap_table_nounpriv |= bool(desc & TABLE_AP_NO_UNPRIV)
                pxn_table |= bool(desc & TABLE_PXN)
                uxn_table |= bool(desc & TABLE_UXN)
            table = nlta
            level += 1
            shift = level_shift(level)
            width = LEVEL_BITS
            continue
        if level == 3 and not desc & DESC_TABLE:
            raise _fault(EventId.F_TRANSLATION, f"reserved L3 descriptor at {addr:#x}", level)
        if level == 0:
            raise _fault(EventId.F_TRANSLATION, f"block descriptor at L0 ({addr:#x})", level)
        oa = desc & OA_MASK_48 & ~((1 << shift) - 1)
        if oa >> ips:
            raise _fault(EventId.F_ADDR_SIZE, f"output address {oa:#x} beyond IPS {ips}", level)
        if not desc & DESC_AF and not cc.cd.AFFD:
            raise _fault(EventId.F_ACCESS, f"AF=0 in L{level} leaf at {addr:#x}", level)
        ap = (desc >> DESC_AP_SHIFT) & 0b11
        if ap_table_ro:
            ap |= 0b10
        if ap_table_nounpriv:
            ap &= ~0b01
        entry = S1Entry(oa=oa, size=1 << shift, ap=ap, uxn=bool(desc & DESC_UXN) or uxn_table,
                        pxn=bool(desc & DESC_PXN) or pxn_table, level=level)
        return entry, not desc & DESC_NG


def permission_fault(entry: S1Entry, cc: ContextConfig, access: Access, priv: bool) -> str | None:
    """Why ``access`` is denied by ``entry`` (two-privilege regime, §7.5), or None."""
    cd = cc.cd
    ro = bool(entry.ap & 0b10)
    unpriv_ok = bool(entry.ap & 0b01)
    if access is Access.EXEC:
        writable = not ro and (priv or unpriv_ok)
        if cd.WXN and writable:
            return "WXN: page is writable"
        if priv:
            if entry.pxn:
                return "PXN/PXNTable set"
            if entry.ap == 0b01:
                return "privileged fetch from an unprivileged-writable page"
            return None
        return "UXN/UXNTable set" if entry.uxn else None
    if priv:
        if cd.PAN and unpriv_ok:
            return "PAN: privileged data access to an unprivileged page"
        if access is Access.WRITE and ro:
            return "write to a read-only page (AP[2]=1)"
        return None
    if not unpriv_ok:
        return "unprivileged access to a privileged-only page (AP[1]=0)"
    if access is Access.WRITE and ro:
        return "write to a read-only page (AP[2]=1)"
    return None
