"""SMMUv3 register map: offsets, field positions and the ID-register profile (reference §1).

Page 0 is at +0x00000, Page 1 at +0x10000. EVENTQ/PRIQ PROD/CONS live in Page 1
(pitfall 1); their Page 0 aliases are RAZ/WI in this model.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

PAGE1 = 0x10000
MMIO_SIZE = 0x20000

# ---------------------------------------------------------------- Page 0 offsets
IDR0 = 0x000
IDR1 = 0x004
IDR2 = 0x008
IDR3 = 0x00C
IDR4 = 0x010
IDR5 = 0x014
IIDR = 0x018
AIDR = 0x01C
CR0 = 0x020
CR0ACK = 0x024
CR1 = 0x028
CR2 = 0x02C
STATUSR = 0x040
GBPA = 0x044
AGBPA = 0x048
IRQ_CTRL = 0x050
IRQ_CTRLACK = 0x054
GERROR = 0x060
GERRORN = 0x064
GERROR_IRQ_CFG0 = 0x068
GERROR_IRQ_CFG1 = 0x070
GERROR_IRQ_CFG2 = 0x074
STRTAB_BASE = 0x080
STRTAB_BASE_CFG = 0x088
CMDQ_BASE = 0x090
CMDQ_PROD = 0x098
CMDQ_CONS = 0x09C
EVENTQ_BASE = 0x0A0
EVENTQ_IRQ_CFG0 = 0x0B0
EVENTQ_IRQ_CFG1 = 0x0B8
EVENTQ_IRQ_CFG2 = 0x0BC
PRIQ_BASE = 0x0C0
PRIQ_IRQ_CFG0 = 0x0D0
PRIQ_IRQ_CFG1 = 0x0D8
PRIQ_IRQ_CFG2 = 0x0DC

# ---------------------------------------------------------------- Page 1 offsets
EVENTQ_PROD = PAGE1 + 0x0A8
EVENTQ_CONS = PAGE1 + 0x0AC
PRIQ_PROD = PAGE1 + 0x0C8
PRIQ_CONS = PAGE1 + 0x0CC

#: Registers 64 bits wide (accessible as one 8-byte access or two 4-byte halves).
REGS64 = frozenset({GERROR_IRQ_CFG0, STRTAB_BASE, CMDQ_BASE, EVENTQ_BASE, EVENTQ_IRQ_CFG0,
                    PRIQ_BASE, PRIQ_IRQ_CFG0})


class Cr0(enum.IntFlag):
    """CR0 / CR0ACK fields (§1.5)."""

    SMMUEN = 1 << 0
    PRIQEN = 1 << 1
    EVENTQEN = 1 << 2
    CMDQEN = 1 << 3
    ATSCHK = 1 << 4


CR0_VMW_MASK = 0b111 << 6
CR0_MASK = int(Cr0.SMMUEN | Cr0.PRIQEN | Cr0.EVENTQEN | Cr0.CMDQEN | Cr0.ATSCHK)

# CR1: attributes only. CR2 fields.
CR1_MASK = 0xFFF
CR2_E2H = 1 << 0
CR2_RECINVSID = 1 << 1
CR2_PTM = 1 << 2
CR2_REC_CFG_ATS = 1 << 3
CR2_MASK = 0xF

# GBPA
GBPA_UPDATE = 1 << 31
GBPA_ABORT = 1 << 20
GBPA_FIELDS_MASK = (1 << 20) | (0b11 << 18) | (0b11 << 16) | (0b11 << 12) | (0xF << 8) | (1 << 4) | 0xF
GBPA_RESET = 0x00001000  # SHCFG = use incoming, ABORT = 0 (QEMU's value)


class IrqCtrl(enum.IntFlag):
    """IRQ_CTRL / IRQ_CTRLACK (§1.6)."""

    GERROR_IRQEN = 1 << 0
    PRIQ_IRQEN = 1 << 1
    EVENTQ_IRQEN = 1 << 2


class Gerror(enum.IntFlag):
    """GERROR / GERRORN bits (§1.6). Active means GERROR[x] != GERRORN[x]."""

    CMDQ_ERR = 1 << 0
    EVENTQ_ABT_ERR = 1 << 2
    PRIQ_ABT_ERR = 1 << 3
    MSI_CMDQ_ABT_ERR = 1 << 4
    MSI_EVENTQ_ABT_ERR = 1 << 5
    MSI_PRIQ_ABT_ERR = 1 << 6
    MSI_GERROR_ABT_ERR = 1 << 7
    SFM_ERR = 1 << 8


GERROR_MASK = 0x1FD


class CmdqError(enum.IntEnum):
    """CMDQ_CONS.ERR codes (§1.9)."""

    CERROR_NONE = 0x00
    CERROR_ILL = 0x01
    CERROR_ABT = 0x02
    CERROR_ATC_INV_SYNC = 0x03


# Queue register fields (§1.9, §2)
Q_BASE_ADDR_MASK = ((1 << 56) - 1) & ~0x1F
Q_BASE_LOG2SIZE_MASK = 0x1F
Q_BASE_HINT = 1 << 62
Q_BASE_MASK = Q_BASE_HINT | Q_BASE_ADDR_MASK | Q_BASE_LOG2SIZE_MASK
Q_IDX_MASK = (1 << 20) - 1  # WR / RD
Q_OVFLG = 1 << 31  # PROD.OVFLG / CONS.OVACKFLG
CMDQ_CONS_ERR_SHIFT = 24
CMDQ_CONS_ERR_MASK = 0x7F << CMDQ_CONS_ERR_SHIFT

# Stream table base (§1.8)
STRTAB_BASE_ADDR_MASK = ((1 << 56) - 1) & ~0x3F
STRTAB_BASE_MASK = Q_BASE_HINT | STRTAB_BASE_ADDR_MASK
STRTAB_CFG_LOG2SIZE_MASK = 0x3F
STRTAB_CFG_SPLIT_SHIFT = 6
STRTAB_CFG_SPLIT_MASK = 0x1F
STRTAB_CFG_FMT_SHIFT = 16
STRTAB_CFG_FMT_MASK = 0x3
STRTAB_CFG_MASK = 0x3_07FF
STRTAB_FMT_LINEAR = 0
STRTAB_FMT_2LEVEL = 1

# IRQ_CFGn (§1.7)
IRQ_CFG0_ADDR_MASK = ((1 << 56) - 1) & ~0x3
IRQ_CFG2_MASK = 0x3F
PRIQ_IRQ_CFG2_LO = 1 << 31


@dataclass(frozen=True)
class SmmuProfile:
    """What this SMMU implements; the ID registers are derived from it.

    Defaults follow the reference's "sensible model profile" plus PRI/ATS, 2-level
    stream tables and CDs, MSI and SEV. ``term_model=False`` keeps CD.A=0 (RAZ/WI) usable.
    """

    s1p: bool = True
    s2p: bool = True
    ats: bool = True
    pri: bool = True
    msi: bool = True
    sev: bool = True
    cd2l: bool = True
    st_level_2: bool = True
    term_model: bool = False
    hyp: bool = False
    pps: bool = False
    ril: bool = True
    sid_bits: int = 16
    ssid_bits: int = 20
    cmdqs: int = 19
    eventqs: int = 19
    priqs: int = 19
    oas: int = 5  # 48-bit
    stall_model: int = 1  # terminate only: no stalls, CMD_RESUME/STALL_TERM illegal
    arch_minor: int = 2  # SMMUv3.2: guarded writes IGNORED, RIL mandatory

    @property
    def oas_bits(self) -> int:
        from devmodel.iommu.records import PA_BITS
        return PA_BITS[self.oas]

    def idr0(self) -> int:
        v = int(self.s2p) | int(self.s1p) << 1 | 0b10 << 2 | 1 << 4  # TTF=AArch64, COHACC
        v |= int(self.hyp) << 9 | int(self.ats) << 10
        v |= 1 << 12 | int(self.msi) << 13 | int(self.sev) << 14 | int(self.pri) << 16
        v |= 1 << 18 | int(self.cd2l) << 19 | 0b10 << 21  # VMID16, TTENDIAN=LE
        v |= (self.stall_model & 3) << 24 | int(self.term_model) << 26
        v |= int(self.st_level_2) << 27
        # NS1ATS=1 always: split-stage ATS is not implemented (EATS=0b10 is ILLEGAL).
        v |= 1 << 11
        return v

    def idr1(self) -> int:
        return (self.sid_bits | self.ssid_bits << 6 | (self.priqs if self.pri else 0) << 11
                | self.eventqs << 16 | self.cmdqs << 21 | 1 << 26 | 1 << 27)  # ATTR_*_OVR

    def idr3(self) -> int:
        return int(self.pps) << 5 | int(self.ril) << 10

    def idr5(self) -> int:
        return self.oas | 1 << 4  # GRAN4K only

    def id_registers(self) -> dict[int, int]:
        return {IDR0: self.idr0(), IDR1: self.idr1(), IDR2: 0, IDR3: self.idr3(), IDR4: 0,
                IDR5: self.idr5(), IIDR: 0x43B, AIDR: self.arch_minor}


# IDR field positions other layers decode.
IDR0_S2P = 1 << 0
IDR0_S1P = 1 << 1
IDR0_ATS = 1 << 10
IDR0_MSI = 1 << 13
IDR0_SEV = 1 << 14
IDR0_PRI = 1 << 16
IDR0_CD2L = 1 << 19
IDR0_ST_LEVEL_SHIFT = 27
IDR1_SIDSIZE_MASK = 0x3F
IDR1_SSIDSIZE_SHIFT = 6
IDR1_PRIQS_SHIFT = 11
IDR1_EVENTQS_SHIFT = 16
IDR1_CMDQS_SHIFT = 21
