"""Interrupt outputs (IRQ_CTRL, *_IRQ_CFG0/1/2) and global errors (GERROR/GERRORN), §1.6-§1.7.

Interrupts are edge-like pulses. When IDR0.MSI=1 and a source's IRQ_CFG0.ADDR is
non-zero the SMMU writes CFG1.DATA (32 bits) to ADDR through its memory; otherwise the
wired output callback for that source pulses. A failed MSI write raises the matching
MSI_*_ABT_ERR in GERROR (which, for MSI_GERROR_ABT_ERR, raises no interrupt).
"""

from __future__ import annotations

import enum
import logging
from typing import Callable

from devmodel.iommu import registers as R
from devmodel.memory import BusError, Memory

log = logging.getLogger(__name__)


class IrqSource(enum.Enum):
    """The SMMU's interrupt sources (wired outputs)."""

    EVENTQ = "eventq"
    PRIQ = "priq"
    GERROR = "gerror"
    CMD_SYNC = "cmd_sync"


_ENABLE = {IrqSource.EVENTQ: R.IrqCtrl.EVENTQ_IRQEN, IrqSource.PRIQ: R.IrqCtrl.PRIQ_IRQEN,
           IrqSource.GERROR: R.IrqCtrl.GERROR_IRQEN}
_MSI_ABT = {IrqSource.EVENTQ: R.Gerror.MSI_EVENTQ_ABT_ERR, IrqSource.PRIQ: R.Gerror.MSI_PRIQ_ABT_ERR,
            IrqSource.GERROR: R.Gerror.MSI_GERROR_ABT_ERR, IrqSource.CMD_SYNC: R.Gerror.MSI_CMDQ_ABT_ERR}


class MsiConfig:
    """IRQ_CFG0 (ADDR[55:2]), IRQ_CFG1 (DATA), IRQ_CFG2 (MemAttr, SH, PRIQ LO) of one source."""

    def __init__(self) -> None:
        self.addr = 0
        self.data = 0
        self.cfg2 = 0


class Interrupts:
    """IRQ_CTRL/ACK, MSI configuration, wired outputs and GERROR/GERRORN."""

    def __init__(self, memory: Memory, msi_supported: bool) -> None:
        self.memory = memory
        self.msi_supported = msi_supported
        self.irq_ctrl = 0
        self.msi = {s: MsiConfig() for s in (IrqSource.EVENTQ, IrqSource.PRIQ, IrqSource.GERROR)}
        self.wired: dict[IrqSource, Callable[[], None]] = {}
        self.gerror = 0
        self.gerrorn = 0
        self.counts = {s: 0 for s in IrqSource}

    def reset(self) -> None:
        self.irq_ctrl = 0
        for cfg in self.msi.values():
            cfg.__init__()
        self.gerror = 0
        self.gerrorn = 0

    # ------------------------------------------------------------ interrupts
    def enabled(self, source: IrqSource) -> bool:
        return bool(self.irq_ctrl & _ENABLE[source])

    def cfg_writable(self, source: IrqSource) -> bool:
        """IRQ_CFGn of a source is writable only while its enable (ACK) is 0 (§1.6)."""
        return not self.enabled(source)

    def signal(self, source: IrqSource) -> None:
        """Raise ``source``'s interrupt if enabled: an MSI write, else the wired pulse."""
        if not self.enabled(source):
            log.debug("irq %s: disabled in IRQ_CTRL, not signalled", source.value)
            return
        cfg = self.msi[source]
        if self.msi_supported and cfg.addr:
            self.msi_write(source, cfg.addr, cfg.data)
        else:
            self.pulse(source)

    def pulse(self, source: IrqSource) -> None:
        """Pulse a wired output (no-op when nothing is connected)."""
        self.counts[source] += 1
        cb = self.wired.get(source)
        log.debug("irq %s: wired pulse%s", source.value, "" if cb else " (unconnected)")
        if cb is not None:
            cb()

    def msi_write(self, source: IrqSource, addr: int, data: int) -> bool:
        """Write a 32-bit MSI; a bus error raises MSI_*_ABT_ERR (§1.6)."""
        self.counts[source] += 1
        try:
            self.memory.write(addr, (data & 0xFFFFFFFF).to_bytes(4, "little"))
        except BusError as e:
            log.warning("irq %s: MSI write to %#x aborted: %s", source.value, addr, e)
            self.raise_gerror(_MSI_ABT[source])
            return False
        log.debug("irq %s: MSI %#x <- %#x", source.value, addr, data)
        return True

    # ------------------------------------------------------------ GERROR
    def active(self, bit: int) -> bool:
        """Error ``bit`` is active while GERROR[bit] != GERRORN[bit]."""
        return bool((self.gerror ^ self.gerrorn) & bit)

    def raise_gerror(self, bit: int) -> bool:
        """Toggle GERROR[bit] unless already active; interrupt unless MSI_GERROR_ABT_ERR."""
        if self.active(bit):
            log.info("gerror %s already active: not logged again", R.Gerror(bit).name)
            return False
        self.gerror ^= bit
        log.warning("gerror %s activated (GERROR=%#x GERRORN=%#x)", R.Gerror(bit).name,
                    self.gerror, self.gerrorn)
        if bit != R.Gerror.MSI_GERROR_ABT_ERR:
            self.signal(IrqSource.GERROR)
        return True

    def write_gerrorn(self, value: int) -> int:
        """Store GERRORN; return the bits whose error became inactive (acknowledged)."""
        before = (self.gerror ^ self.gerrorn) & R.GERROR_MASK
        self.gerrorn = value & R.GERROR_MASK
        after = (self.gerror ^ self.gerrorn) & R.GERROR_MASK
        if after & ~before:
            log.warning("GERRORN write %#x toggles inactive errors %#x (CONSTRAINED UNPREDICTABLE)",
                        value, after & ~before)
        return before & ~after
