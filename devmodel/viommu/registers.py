"""The vIOMMU's register file: the SMMUv3 map of devmodel.iommu.registers in BAR0.

ID registers come from :data:`VIOMMU_PROFILE` (interfaces: S1P=1, S2P=0, TTF=AArch64,
COHACC, ATS, PRI, SIDSIZE=16, SSIDSIZE=20, 4 KiB granule, OAS 48, queue maxima 2^8).
IDR0.MSI=0 and IDR0.SEV=0: interrupts are the function's MSI-X vectors (deliberate
deviation: the *_IRQ_CFG registers and CMD_SYNC's MSI fields are stored but never used
for a memory write). STALL_MODEL=1 (terminate only), no Hyp.

Three IMPLEMENTATION DEFINED read-only counters live in the 0xE00 page-0 window (which the
architecture leaves to implementations) so a guest can see exact losses, something the
SMMUv3 overflow flag alone cannot say: :data:`VIOMMU_EVTQ_LOST`, :data:`VIOMMU_PRIQ_LOST`,
:data:`VIOMMU_VEVENTQ_LOST` (32 bits, wrapping).
"""

from __future__ import annotations

from devmodel.iommu import registers as R
from devmodel.iommu.registers import SmmuProfile

QUEUE_LOG2_MAX = 8

VIOMMU_PROFILE = SmmuProfile(s1p=True, s2p=False, ats=True, pri=True, msi=False, sev=False,
                             cd2l=True, st_level_2=True, term_model=False, hyp=False,
                             sid_bits=16, ssid_bits=20, cmdqs=QUEUE_LOG2_MAX,
                             eventqs=QUEUE_LOG2_MAX, priqs=QUEUE_LOG2_MAX, oas=5,
                             stall_model=1)

#: IMPLEMENTATION DEFINED counters (page 0, 0xE00-0xEFF).
VIOMMU_EVTQ_LOST = 0xE00     # events that never reached the guest EVTQ (all causes)
VIOMMU_PRIQ_LOST = 0xE04     # page requests discarded (guest PRIQ overflow / disabled)
VIOMMU_VEVENTQ_LOST = 0xE08  # the part of EVTQ_LOST lost by the host before the VMM
IMPDEF_COUNTERS = (VIOMMU_EVTQ_LOST, VIOMMU_PRIQ_LOST, VIOMMU_VEVENTQ_LOST)

#: Page-0 aliases of the page-1 queue pointers: RAZ/WI in this model (spec: optional).
PAGE0_ALIASES = frozenset({0x0A8, 0x0AC, 0x0C8, 0x0CC})

IRQ_CFG_REGS = {R.GERROR_IRQ_CFG0: 8, R.GERROR_IRQ_CFG1: 4, R.GERROR_IRQ_CFG2: 4,
                R.EVENTQ_IRQ_CFG0: 8, R.EVENTQ_IRQ_CFG1: 4, R.EVENTQ_IRQ_CFG2: 4,
                R.PRIQ_IRQ_CFG0: 8, R.PRIQ_IRQ_CFG1: 4, R.PRIQ_IRQ_CFG2: 4}
#: Which IRQ_CTRL enable guards each IRQ_CFG register (writes ignored while it is set).
IRQ_CFG_GUARD = {R.GERROR_IRQ_CFG0: R.IrqCtrl.GERROR_IRQEN, R.GERROR_IRQ_CFG1: R.IrqCtrl.GERROR_IRQEN,
                 R.GERROR_IRQ_CFG2: R.IrqCtrl.GERROR_IRQEN, R.EVENTQ_IRQ_CFG0: R.IrqCtrl.EVENTQ_IRQEN,
                 R.EVENTQ_IRQ_CFG1: R.IrqCtrl.EVENTQ_IRQEN, R.EVENTQ_IRQ_CFG2: R.IrqCtrl.EVENTQ_IRQEN,
                 R.PRIQ_IRQ_CFG0: R.IrqCtrl.PRIQ_IRQEN, R.PRIQ_IRQ_CFG1: R.IrqCtrl.PRIQ_IRQEN,
                 R.PRIQ_IRQ_CFG2: R.IrqCtrl.PRIQ_IRQEN}
IRQ_CTRL_MASK = int(R.IrqCtrl.GERROR_IRQEN | R.IrqCtrl.PRIQ_IRQEN | R.IrqCtrl.EVENTQ_IRQEN)
U32 = 0xFFFFFFFF


class MsixVector:
    """The function's MSI-X vectors (interfaces: 0 EVENTQ, 1 PRIQ, 2 GERROR, 3 CMD_SYNC)."""

    EVENTQ = 0
    PRIQ = 1
    GERROR = 2
    CMD_SYNC = 3
    COUNT = 4


class ControlRegisters:
    """CR0/CR1/CR2, GBPA, IRQ_CTRL, GERROR/GERRORN, IRQ_CFGn and the stream table base.

    Plain state plus the architectural write rules (ACK mirrors, guards, GBPA Update,
    GERROR toggles); side effects on queues and endpoints are the function's job.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.cr0 = 0
        self.cr1 = 0
        self.cr2 = 0
        self.gbpa = R.GBPA_RESET
        self.irq_ctrl = 0
        self.gerror = 0
        self.gerrorn = 0
        self.strtab_base = 0
        self.strtab_cfg = 0
        self.irq_cfg = {off: 0 for off in IRQ_CFG_REGS}

    @property
    def smmuen(self) -> bool:
        return bool(self.cr0 & R.Cr0.SMMUEN)

    def enabled(self, bit: R.Cr0) -> bool:
        return bool(self.cr0 & bit)

    def gerror_active(self, bit: R.Gerror) -> bool:
        return bool((self.gerror ^ self.gerrorn) & bit)

    def toggle_gerror(self, bit: R.Gerror) -> bool:
        """Activate ``bit`` unless already active (never toggle an active error)."""
        if self.gerror_active(bit):
            return False
        self.gerror ^= int(bit)
        return True

    def write_gbpa(self, value: int) -> bool:
        """GBPA is written only with Update=1 (v3.2); the model completes at once."""
        if not value & R.GBPA_UPDATE:
            return False
        self.gbpa = value & R.GBPA_FIELDS_MASK
        return True

    def write_irq_cfg(self, offset: int, value: int) -> bool:
        if self.irq_ctrl & IRQ_CFG_GUARD[offset]:
            return False
        self.irq_cfg[offset] = value
        return True
