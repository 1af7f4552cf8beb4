"""Address Translation Services extended capability (ID 0x000F; PCIe §10.5.1; reference §8.3).

Registers: ATS Capability (RO: Invalidate Queue Depth, Page Aligned Request, Global
Invalidate Supported) and ATS Control (RW: Enable[15], STU[4:0]). Linux writes
``Enable | (page_shift - 12)``.

Python API for endpoint models (e.g. a DMA engine with an ATC)::

    ats.enabled                  # ATS Control.Enable: may send Translation Requests
    ats.stu                      # Smallest Translation Unit field
    ats.smallest_translation_unit   # STU in bytes, 2^(STU+12)
    ats.invalidate_queue_depth   # 1..32 (0 in the register means 32)
    ats.add_listener(fn)         # fn(ats) after each guest change / reset (e.g. flush ATC)

Disabling ATS (Enable 1 -> 0) means the function must drop its cached translations; the
capability only reports the change, the endpoint owns the ATC.
"""

from __future__ import annotations

import logging

from devmodel.pci import regs
from devmodel.pci.capability import ExtendedCapability

log = logging.getLogger(__name__)

PAGE_SHIFT_BASE = 12
#: Invalidate Queue Depth field value 0 stands for 32 (reference §8.3).
QDEP_ZERO_MEANS = 32


class AtsCapability(ExtendedCapability):
    """ATS extended capability."""

    cap_id = regs.ExtCapId.ATS
    version = 1
    size = regs.PCI_EXT_CAP_ATS_SIZEOF

    def __init__(self, invalidate_queue_depth: int = QDEP_ZERO_MEANS, page_aligned: bool = True,
                 global_invalidate: bool = False) -> None:
        super().__init__()
        if not 1 <= invalidate_queue_depth <= QDEP_ZERO_MEANS:
            raise ValueError("invalidate queue depth must be 1..32")
        self._qdep = invalidate_queue_depth
        self._page_aligned = page_aligned
        self._global_inv = global_invalidate

    def install(self) -> None:
        cap = self._qdep % QDEP_ZERO_MEANS
        if self._page_aligned:
            cap |= regs.PCI_ATS_CAP_PAGE_ALIGNED
        if self._global_inv:
            cap |= regs.PCI_ATS_CAP_GLOBAL_INV
        self.set(regs.PCI_ATS_CAP, 2, cap)
        self.set_masks(regs.PCI_ATS_CTRL, 2, wmask=regs.PCI_ATS_CTRL_ENABLE | regs.PCI_ATS_CTRL_STU_MASK)

    @property
    def control(self) -> int:
        return self.get(regs.PCI_ATS_CTRL, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & regs.PCI_ATS_CTRL_ENABLE)

    @property
    def stu(self) -> int:
        return self.control & regs.PCI_ATS_CTRL_STU_MASK

    @property
    def smallest_translation_unit(self) -> int:
        """Bytes: 2^(STU+12)."""
        return 1 << (self.stu + PAGE_SHIFT_BASE)

    @property
    def invalidate_queue_depth(self) -> int:
        return self._qdep

    @property
    def page_aligned_request(self) -> bool:
        return self._page_aligned

    @property
    def global_invalidate_supported(self) -> bool:
        return self._global_inv

    def config_written(self, old: bytes) -> None:
        old_ctrl = self.old_value(old, regs.PCI_ATS_CTRL, 2)
        if old_ctrl == self.control:
            return
        was = bool(old_ctrl & regs.PCI_ATS_CTRL_ENABLE)
        if was and self.enabled and (old_ctrl ^ self.control) & regs.PCI_ATS_CTRL_STU_MASK:
            log.warning("guest error: ATS STU changed while ATS is enabled (undefined, PCIe §10.5.1.3)")
        log.info("ATS control %#06x -> %#06x (enabled=%s, STU=%d)", old_ctrl, self.control, self.enabled, self.stu)
