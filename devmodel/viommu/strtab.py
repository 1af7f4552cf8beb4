"""The guest's stream table: find a vSID's STE in guest RAM and judge it like an SMMUv3.

Lookup (smmuv3-pcie.md section 6.1): linear or 2-level per STRTAB_BASE_CFG.FMT; a vSID
beyond the table is C_BAD_STREAMID (recorded when CR2.RECINVSID=1); a fetch that guest
memory does not answer is F_STE_FETCH. Judgement (section 6.3, for this vIOMMU's
profile: S1P=1, S2P=0, ATS=1, no Hyp, STALL_MODEL=1, SSIDSIZE=20, OAS=48): V=0 or
ILLEGAL is C_BAD_STE; Config 0b0xx aborts silently; 0b100 bypasses; 0b101 is a guest
stage 1, handed to the host as the 16 bytes of ``struct iommu_hwpt_arm_smmuv3`` masked to
the fields a nested STE may carry (what QEMU's accelerated vSMMU passes; the kernel's
``arm_smmu_validate_vste`` refuses anything else with EIO).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from devmodel.iommu import registers as R
from devmodel.iommu.records import (EATS_DPT, EATS_SPLIT, L1STD, L1STD_SIZE, PA_BITS, STE,
                                    STE_SIZE, EventId, SteConfig)
from devmodel.memory import BusError, Memory
from devmodel.viommu.registers import VIOMMU_PROFILE

log = logging.getLogger(__name__)

#: STE fields a nested STE carries to the host (the rest of DW0/DW1 is masked off).
NESTED_STE_FIELDS = ("V", "Config", "S1Fmt", "S1ContextPtr", "S1CDMax", "S1DSS", "S1CIR",
                     "S1COR", "S1CSH", "S1STALLD", "EATS")
NESTED_STE_MASK = sum(STE.fields[n].mask << STE.fields[n].lsb for n in NESTED_STE_FIELDS)
NESTED_STE_BYTES = 16
SPAN_MAX = 11
SPLITS = (6, 8, 10)
DEFAULT_SPLIT = 6


class SteKind(enum.Enum):
    """What the guest configured for one vSID."""

    ABORT = "abort"            # silent abort (Config 0b0xx)
    BYPASS = "bypass"          # Config 0b100
    S1 = "s1"                  # Config 0b101: nested HWPT from the guest STE
    BAD_STE = "bad_ste"        # V=0 or ILLEGAL: abort + C_BAD_STE
    BAD_STREAMID = "bad_sid"   # outside the table: abort + C_BAD_STREAMID
    FETCH_ABORT = "fetch"      # guest memory did not answer: abort + F_STE_FETCH


@dataclass(frozen=True)
class SteDecision:
    kind: SteKind
    reason: str = ""
    nested: bytes = b""        # S1 only: the masked 16-byte vSTE for IOMMU_HWPT_ALLOC
    fetch_addr: int = 0

    @property
    def event(self) -> EventId | None:
        """The configuration error an access through this STE records, if any."""
        return {SteKind.BAD_STE: EventId.C_BAD_STE, SteKind.BAD_STREAMID: EventId.C_BAD_STREAMID,
                SteKind.FETCH_ABORT: EventId.F_STE_FETCH}.get(self.kind)


class GuestStreamTable:
    """STRTAB_BASE / STRTAB_BASE_CFG interpretation over guest memory."""

    def __init__(self, base_reg: int, cfg_reg: int) -> None:
        cfg = cfg_reg
        self.log2size = min(cfg & R.STRTAB_CFG_LOG2SIZE_MASK, VIOMMU_PROFILE.sid_bits)
        self.two_level = (cfg >> R.STRTAB_CFG_FMT_SHIFT) & R.STRTAB_CFG_FMT_MASK == R.STRTAB_FMT_2LEVEL
        split = (cfg >> R.STRTAB_CFG_SPLIT_SHIFT) & R.STRTAB_CFG_SPLIT_MASK
        self.split = split if split in SPLITS else DEFAULT_SPLIT
        addr = base_reg & R.STRTAB_BASE_ADDR_MASK
        if self.two_level:
            low = max(5, self.log2size - self.split - 1 + 3)
        else:
            low = self.log2size + 5
        self.base = addr & ~((1 << (low + 1)) - 1)

    def ste_addr(self, mem: Memory, vsid: int) -> int | SteDecision:
        """The guest physical address of ``vsid``'s STE, or the error decision."""
        if vsid >> self.log2size:
            return SteDecision(SteKind.BAD_STREAMID, f"vSID {vsid:#x} >= 2^{self.log2size}")
        if not self.two_level:
            return self.base + vsid * STE_SIZE
        l1_addr = self.base + (vsid >> self.split) * L1STD_SIZE
        try:
            l1 = L1STD.decode(mem.read(l1_addr, L1STD_SIZE))
        except BusError as e:
            return SteDecision(SteKind.FETCH_ABORT, f"L1STD fetch: {e}", fetch_addr=l1_addr)
        span = l1.Span
        low = vsid & ((1 << self.split) - 1)
        if span == 0 or span > SPAN_MAX or span > self.split + 1 or low >= 1 << (span - 1):
            return SteDecision(SteKind.BAD_STREAMID, f"L1STD Span={span} does not cover vSID {vsid:#x}")
        l2 = l1.L2Ptr & ~((1 << (5 + span)) - 1) if span > 1 else l1.L2Ptr
        return l2 + low * STE_SIZE

    def lookup(self, mem: Memory, vsid: int) -> SteDecision:
        """Fetch and judge the STE of ``vsid``."""
        addr = self.ste_addr(mem, vsid)
        if isinstance(addr, SteDecision):
            return addr
        try:
            raw = mem.read(addr, STE_SIZE)
        except BusError as e:
            return SteDecision(SteKind.FETCH_ABORT, f"STE fetch: {e}", fetch_addr=addr)
        return judge_ste(raw)


def judge_ste(raw: bytes) -> SteDecision:
    """SMMUv3 section 5.2 for this vIOMMU's profile (smmuv3-pcie.md section 6.3)."""
    ste = STE.decode(raw)
    if not ste.V:
        return SteDecision(SteKind.BAD_STE, "V=0")
    if not ste.Config & 0b100:
        return SteDecision(SteKind.ABORT, f"Config={ste.Config:#05b}")
    if ste.Config == SteConfig.BYPASS:
        return SteDecision(SteKind.BYPASS)
    bad = illegal_reason(ste)
    if bad:
        return SteDecision(SteKind.BAD_STE, bad)
    head = int.from_bytes(raw[:NESTED_STE_BYTES], "little") & NESTED_STE_MASK
    return SteDecision(SteKind.S1, nested=head.to_bytes(NESTED_STE_BYTES, "little"))


def illegal_reason(ste) -> str | None:  # noqa: ANN001 - decoded Fields
    """The first ILLEGAL rule a Config=0b1x1/0b11x STE breaks here, else None."""
    p = VIOMMU_PROFILE
    if ste.Config & 0b010 and not p.s2p:
        return f"Config={ste.Config:#05b} needs stage 2 (S2P=0)"
    if ste.EATS == EATS_SPLIT:
        return "EATS=0b10 (split-stage) needs Config=0b111"
    if ste.EATS == EATS_DPT:
        return "EATS=0b11 needs DPT, not implemented"
    if ste.S1STALLD and p.stall_model != 0:
        return "S1STALLD=1 with STALL_MODEL!=0b00"
    if ste.S1CDMax > p.ssid_bits:
        return f"S1CDMax={ste.S1CDMax} > SSIDSIZE={p.ssid_bits}"
    if ste.S1ContextPtr >> PA_BITS[p.oas]:
        return f"S1ContextPtr {ste.S1ContextPtr:#x} beyond the OAS"
    return None
