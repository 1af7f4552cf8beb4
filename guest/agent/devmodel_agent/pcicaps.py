"""PCIe extended capabilities of an endpoint, through its config space: ATS, PASID, PRI.

Sequences follow Linux (reference smmuv3-pcie.md §8.3-§8.5): ATS Control = Enable | STU;
PASID enabled only while disabled; PRI enabled only with Enable=0 and Stopped=1, after
writing Allocation = min(Capacity, wanted); disabling PRI clears Enable and, optionally,
sets Reset to discard outstanding page-request state.
"""

from __future__ import annotations

import errno
import logging

from devmodel.pci import regs as P

from devmodel_agent.hw import AgentError, PciConfig

log = logging.getLogger(__name__)

EXT_CAP_MAX_WALK = 64
STU_4K = 0  # Smallest Translation Unit = 2^(0+12) bytes


def find_ext_cap(cfg: PciConfig, cap_id: int) -> int | None:
    """Offset of extended capability ``cap_id`` (walk from 0x100), or None."""
    offset = P.PCI_EXT_CAP_START
    for _ in range(EXT_CAP_MAX_WALK):
        header = cfg.read(offset, 4)
        if header in (0, 0xFFFF_FFFF):
            return None
        if header & 0xFFFF == cap_id:
            return offset
        offset = (header >> 20) & 0xFFC
        if offset < P.PCI_EXT_CAP_START:
            return None
    return None


def enable_memory_and_master(cfg: PciConfig) -> int:
    """Command |= Memory Space | Bus Master (what a driver's pci_enable_device + set_master do)."""
    cmd = cfg.read(P.PCI_COMMAND, 2)
    new = cmd | P.Command.MEMORY | P.Command.MASTER
    if new != cmd:
        cfg.write(P.PCI_COMMAND, new, 2)
    return cfg.read(P.PCI_COMMAND, 2)


class EndpointCaps:
    """ATS / PASID / PRI control of one function."""

    def __init__(self, cfg: PciConfig) -> None:
        self.cfg = cfg
        self.ats = find_ext_cap(cfg, P.ExtCapId.ATS)
        self.pasid = find_ext_cap(cfg, P.ExtCapId.PASID)
        self.pri = find_ext_cap(cfg, P.ExtCapId.PRI)

    def _need(self, offset: int | None, what: str) -> int:
        if offset is None:
            raise AgentError(errno.ENODEV, f"endpoint has no {what} capability")
        return offset

    def set_ats(self, on: bool) -> None:
        off = self._need(self.ats, "ATS")
        self.cfg.write(off + P.PCI_ATS_CTRL, (P.PCI_ATS_CTRL_ENABLE | STU_4K) if on else 0, 2)
        log.info("ATS %s", "enabled" if on else "disabled")

    def ats_enabled(self) -> bool:
        return self.ats is not None and bool(self.cfg.read(self.ats + P.PCI_ATS_CTRL, 2) & P.PCI_ATS_CTRL_ENABLE)

    def set_pasid(self, on: bool) -> None:
        off = self._need(self.pasid, "PASID")
        ctrl = self.cfg.read(off + P.PCI_PASID_CTRL, 2)
        if on and ctrl & P.PCI_PASID_CTRL_ENABLE:
            return  # Linux enables PASID only while it is disabled
        self.cfg.write(off + P.PCI_PASID_CTRL, P.PCI_PASID_CTRL_ENABLE if on else 0, 2)
        log.info("PASID %s", "enabled" if on else "disabled")

    def pasid_enabled(self) -> bool:
        return self.pasid is not None and bool(self.cfg.read(self.pasid + P.PCI_PASID_CTRL, 2)
                                               & P.PCI_PASID_CTRL_ENABLE)

    def pri_status(self) -> dict[str, int]:
        off = self._need(self.pri, "PRI")
        ctrl = self.cfg.read(off + P.PCI_PRI_CTRL, 2)
        status = self.cfg.read(off + P.PCI_PRI_STATUS, 2)
        return dict(enabled=int(bool(ctrl & P.PCI_PRI_CTRL_ENABLE)),
                    rf=int(bool(status & P.PCI_PRI_STATUS_RF)), uprgi=int(bool(status & P.PCI_PRI_STATUS_UPRGI)),
                    stopped=int(bool(status & P.PCI_PRI_STATUS_STOPPED)),
                    pasid_required=int(bool(status & P.PCI_PRI_STATUS_PASID)),
                    capacity=self.cfg.read(off + P.PCI_PRI_MAX_REQ, 4),
                    allocation=self.cfg.read(off + P.PCI_PRI_ALLOC_REQ, 4))

    def enable_pri(self, wanted: int = 32) -> dict[str, int]:
        """Linux's pci_enable_pri: needs Enable=0 and Stopped=1; clears RF/UPRGI on the way."""
        off = self._need(self.pri, "PRI")
        st = self.pri_status()
        if st["enabled"]:
            return st
        if not st["stopped"]:
            raise AgentError(errno.EBUSY, "PRI not Stopped: page requests still outstanding (try pri reset)")
        self.cfg.write(off + P.PCI_PRI_ALLOC_REQ, min(st["capacity"], wanted), 4)
        self.cfg.write(off + P.PCI_PRI_CTRL, P.PCI_PRI_CTRL_ENABLE, 2)
        log.info("PRI enabled: allocation %d of capacity %d", min(st["capacity"], wanted), st["capacity"])
        return self.pri_status()

    def disable_pri(self, reset: bool = False) -> dict[str, int]:
        off = self._need(self.pri, "PRI")
        self.cfg.write(off + P.PCI_PRI_CTRL, 0, 2)
        if reset:
            self.cfg.write(off + P.PCI_PRI_CTRL, P.PCI_PRI_CTRL_RESET, 2)
        log.info("PRI disabled%s", " and reset" if reset else "")
        return self.pri_status()
