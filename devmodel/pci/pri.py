"""Page Request Interface extended capability (ID 0x0013; PCIe §10.5.2; reference §8.5).

Registers (offsets from the capability):

=========  =============================  =============================================
0x04       PRI Control (16)               Enable[0] RW, Reset[1] RW (reads 0)
0x06       PRI Status (16)                RF[0] RW1C, UPRGI[1] RW1C, Stopped[8] RO
                                          (reset 1), PRG Response PASID Required[15] RO
0x08       Outstanding Page Request       RO: how many requests the function can hold
           Capacity (32)
0x0C       Outstanding Page Request       RW: how many it may issue (software sets it)
           Allocation (32)
=========  =============================  =============================================

Rules the capability enforces (reference §8.5, PCIe §10.5.2.2-3):

* Enable 0→1 clears Stopped, RF and UPRGI and re-arms a function that had stopped on a
  Response Failure. Enabling while Stopped=0 is undefined: logged as a guest error.
* Enable 1→0: Stopped reads 1 once no request is outstanding (:meth:`note_outstanding`
  tracks that), 0 while some still are. While Enable=1, Stopped reads 0.
* Reset=1 with Enable=0 after the write discards all outstanding page-request state
  (listeners registered with :meth:`add_discard_listener` drop their PRG tables) and
  forces Stopped=1; it is ignored while Enable stays 1; it always reads back 0.

Python API for the endpoint that issues page requests::

    pri.enabled, pri.allocation, pri.capacity, pri.stopped, pri.pasid_required
    pri.response_failure, pri.uprgi            # status bits as software sees them
    pri.outstanding                            # what the endpoint last reported
    pri.may_issue(count=1) -> bool             # enabled, not failed, within Allocation
    pri.note_outstanding(n)                    # absolute count of requests in flight
    pri.set_response_failure()                 # PRG Response code 0xF received
    pri.set_uprgi()                            # response with an unknown PRG index
                                               # (alias: set_unexpected_prg_index)
    pri.add_discard_listener(fn)               # fn(pri) when Reset discards the state
    pri.add_listener(fn)                       # fn(pri) after guest changes / reset
"""

from __future__ import annotations

import logging
from typing import Callable

from devmodel.pci import regs
from devmodel.pci.capability import ExtendedCapability

log = logging.getLogger(__name__)

STATUS_W1C = regs.PCI_PRI_STATUS_RF | regs.PCI_PRI_STATUS_UPRGI
CTRL_WMASK = regs.PCI_PRI_CTRL_ENABLE | regs.PCI_PRI_CTRL_RESET
ALLOCATION_WMASK = 0xFFFFFFFF


class PriCapability(ExtendedCapability):
    """PRI extended capability with the function-side PRI state (credits, failure latch)."""

    cap_id = regs.ExtCapId.PRI
    version = 1
    size = regs.PCI_EXT_CAP_PRI_SIZEOF

    def __init__(self, capacity: int = 32, pasid_required: bool = True) -> None:
        super().__init__()
        if not 0 <= capacity <= 0xFFFFFFFF:
            raise ValueError("PRI capacity must fit 32 bits")
        self._capacity = capacity
        self._pasid_required = pasid_required
        self._outstanding = 0
        self._failed = False
        self._discard_listeners: list[Callable[[PriCapability], None]] = []

    def install(self) -> None:
        self.set_masks(regs.PCI_PRI_CTRL, 2, wmask=CTRL_WMASK)
        status = regs.PCI_PRI_STATUS_STOPPED
        if self._pasid_required:
            status |= regs.PCI_PRI_STATUS_PASID
        self.set(regs.PCI_PRI_STATUS, 2, status)
        self.set_masks(regs.PCI_PRI_STATUS, 2, w1c=STATUS_W1C)
        self.set(regs.PCI_PRI_MAX_REQ, 4, self._capacity)
        self.set_masks(regs.PCI_PRI_ALLOC_REQ, 4, wmask=ALLOCATION_WMASK)

    # --- register views ------------------------------------------------------------------
    @property
    def control(self) -> int:
        return self.get(regs.PCI_PRI_CTRL, 2)

    @property
    def status(self) -> int:
        return self.get(regs.PCI_PRI_STATUS, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & regs.PCI_PRI_CTRL_ENABLE)

    @property
    def stopped(self) -> bool:
        return bool(self.status & regs.PCI_PRI_STATUS_STOPPED)

    @property
    def response_failure(self) -> bool:
        return bool(self.status & regs.PCI_PRI_STATUS_RF)

    @property
    def uprgi(self) -> bool:
        return bool(self.status & regs.PCI_PRI_STATUS_UPRGI)

    @property
    def pasid_required(self) -> bool:
        return self._pasid_required

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def allocation(self) -> int:
        return self.get(regs.PCI_PRI_ALLOC_REQ, 4)

    @property
    def outstanding(self) -> int:
        return self._outstanding

    @property
    def failed(self) -> bool:
        """A Response Failure stopped the function until software re-enables PRI."""
        return self._failed

    # --- endpoint side ---------------------------------------------------------------------
    def may_issue(self, count: int = 1) -> bool:
        """May the function send ``count`` more page requests now (Enable, no RF, credits)?"""
        return self.enabled and not self._failed and self._outstanding + count <= self.allocation

    def note_outstanding(self, count: int) -> None:
        """The endpoint reports how many page requests are in flight (absolute count)."""
        if count < 0:
            raise ValueError("outstanding page requests cannot be negative")
        self._outstanding = count
        if count > self.allocation and self.enabled:
            log.error("PRI: %d requests outstanding exceeds Allocation %d", count, self.allocation)
        self._update_stopped()

    def set_response_failure(self) -> None:
        """A PRG Response with code Response Failure arrived (reference §8.6)."""
        log.warning("PRI: Response Failure received; page requests stop until PRI is re-enabled")
        self._failed = True
        self.config.set_bits(self.offset + regs.PCI_PRI_STATUS, 2, regs.PCI_PRI_STATUS_RF)

    def set_uprgi(self) -> None:
        """A PRG Response named no outstanding PRG (reference §8.6)."""
        log.warning("PRI: PRG response with an unexpected PRG index")
        self.config.set_bits(self.offset + regs.PCI_PRI_STATUS, 2, regs.PCI_PRI_STATUS_UPRGI)

    #: Long name used by the DMA engine's PriPort protocol.
    set_unexpected_prg_index = set_uprgi

    def add_discard_listener(self, callback: Callable[[PriCapability], None]) -> None:
        """Call ``callback(pri)`` when PRI Reset discards outstanding page-request state."""
        self._discard_listeners.append(callback)

    # --- guest side ----------------------------------------------------------------------------
    def config_written(self, old: bytes) -> None:
        old_ctrl = self.old_value(old, regs.PCI_PRI_CTRL, 2)
        old_status = self.old_value(old, regs.PCI_PRI_STATUS, 2)
        ctrl = self.control
        if ctrl & regs.PCI_PRI_CTRL_RESET:
            self.set(regs.PCI_PRI_CTRL, 2, ctrl & ~regs.PCI_PRI_CTRL_RESET)  # reads as 0
            if ctrl & regs.PCI_PRI_CTRL_ENABLE:
                log.info("PRI: Reset ignored while Enable=1")
            else:
                self._discard()
        was = bool(old_ctrl & regs.PCI_PRI_CTRL_ENABLE)
        if not was and self.enabled:
            if not old_status & regs.PCI_PRI_STATUS_STOPPED:
                log.warning("guest error: PRI enabled while not Stopped (undefined, PCIe §10.5.2.2)")
            self._failed = False
            self.config.set_bits(self.offset + regs.PCI_PRI_STATUS, 2,
                                 regs.PCI_PRI_STATUS_STOPPED | STATUS_W1C, False)
            log.info("PRI enabled, allocation %d of capacity %d", self.allocation, self._capacity)
        elif was and not self.enabled:
            log.info("PRI disabled with %d requests outstanding", self._outstanding)
            self._update_stopped()

    def _discard(self) -> None:
        log.info("PRI: Reset discards %d outstanding page requests", self._outstanding)
        self._outstanding = 0
        for callback in list(self._discard_listeners):
            callback(self)
        self._update_stopped()

    def _update_stopped(self) -> None:
        """Stopped is meaningful only while Enable=0: 1 once nothing is outstanding."""
        stopped = not self.enabled and self._outstanding == 0
        self.config.set_bits(self.offset + regs.PCI_PRI_STATUS, 2, regs.PCI_PRI_STATUS_STOPPED, stopped)

    def reset(self) -> None:
        self._outstanding = 0
        self._failed = False
