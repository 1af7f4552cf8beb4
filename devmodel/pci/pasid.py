"""PASID extended capability (ID 0x001B; PCIe §7.8.8; reference §8.4).

Registers: PASID Capability (RO: Execute Permission Supported[1], Privileged Mode
Supported[2], Max PASID Width[12:8] ≤ 20) and PASID Control (RW: PASID Enable[0],
Execute Permission Enable[1], Privileged Mode Enable[2]). The Execute/Privileged enable
bits are writable only when the matching "Supported" bit is set (hardwired 0 otherwise).

Python API for endpoint models::

    pasid.enabled            # the function may emit PASID TLP prefixes
    pasid.exec_permission    # may set Execute Requested in the prefix
    pasid.privileged_mode    # may set Privileged Mode Requested in the prefix
    pasid.max_width          # Max PASID Width (bits)
    pasid.max_pasid          # largest PASID value the function may use
    pasid.accepts(p)         # enabled and p within the width
    pasid.add_listener(fn)
"""

from __future__ import annotations

import logging

from devmodel.pci import regs
from devmodel.pci.capability import ExtendedCapability

log = logging.getLogger(__name__)


class PasidCapability(ExtendedCapability):
    """PASID extended capability."""

    cap_id = regs.ExtCapId.PASID
    version = 1
    size = regs.PCI_EXT_CAP_PASID_SIZEOF

    def __init__(self, max_width: int = regs.PASID_MAX_WIDTH, exec_supported: bool = False,
                 priv_supported: bool = False) -> None:
        super().__init__()
        if not 1 <= max_width <= regs.PASID_MAX_WIDTH:
            raise ValueError(f"PASID width must be 1..{regs.PASID_MAX_WIDTH}")
        self.max_width = max_width
        self.exec_supported = exec_supported
        self.priv_supported = priv_supported

    def install(self) -> None:
        cap = self.max_width << regs.PCI_PASID_CAP_WIDTH_SHIFT
        wmask = regs.PCI_PASID_CTRL_ENABLE
        if self.exec_supported:
            cap |= regs.PCI_PASID_CAP_EXEC
            wmask |= regs.PCI_PASID_CTRL_EXEC
        if self.priv_supported:
            cap |= regs.PCI_PASID_CAP_PRIV
            wmask |= regs.PCI_PASID_CTRL_PRIV
        self.set(regs.PCI_PASID_CAP, 2, cap)
        self.set_masks(regs.PCI_PASID_CTRL, 2, wmask=wmask)

    @property
    def control(self) -> int:
        return self.get(regs.PCI_PASID_CTRL, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & regs.PCI_PASID_CTRL_ENABLE)

    @property
    def exec_permission(self) -> bool:
        return bool(self.control & regs.PCI_PASID_CTRL_EXEC)

    @property
    def privileged_mode(self) -> bool:
        return bool(self.control & regs.PCI_PASID_CTRL_PRIV)

    @property
    def max_pasid(self) -> int:
        return (1 << self.max_width) - 1

    def accepts(self, pasid: int) -> bool:
        """True when the function may tag a request with ``pasid`` now."""
        return self.enabled and 0 <= pasid <= self.max_pasid

    def config_written(self, old: bytes) -> None:
        old_ctrl = self.old_value(old, regs.PCI_PASID_CTRL, 2)
        if old_ctrl != self.control:
            log.info("PASID control %#06x -> %#06x (enabled=%s exec=%s priv=%s)", old_ctrl, self.control,
                     self.enabled, self.exec_permission, self.privileged_mode)
