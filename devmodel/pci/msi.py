"""MSI (capability ID 0x05; PCI 3.0 §6.8.1), 64-bit with per-vector masking.

Optional for endpoints here (QEMU prefers MSI-X when both exist); kept small. Message
Control: Enable[0] RW, Multiple Message Capable[3:1] RO, Multiple Message Enable[6:4]
RW, 64-bit[7] RO, Per-vector Masking[8] RO. Mask Bits RW, Pending Bits RO.

Sending rule: vector ``v`` is sent only while Enable=1, ``v`` < the enabled vector count,
its Mask bit is 0 and Bus Master Enable is set; otherwise its Pending bit is set and it is
sent on :meth:`MsiCapability.flush_pending` (called on unmask and BME set).

Python API: ``notify(vector) -> bool``, ``enabled``, ``vectors`` (capable),
``enabled_vectors``, ``pending(v)``, ``message(v) -> (address, data)``.
"""

from __future__ import annotations

import logging

from devmodel.pci import regs
from devmodel.pci.capability import Capability
from vfio_user.device import PciIrq

log = logging.getLogger(__name__)

MAX_LOG2_VECTORS = 5  # 32 vectors


class MsiCapability(Capability):
    """64-bit MSI with per-vector masking."""

    cap_id = regs.CapId.MSI
    size = regs.PCI_CAP_MSI_SIZEOF_64_MASK

    def __init__(self, vectors: int = 1) -> None:
        super().__init__()
        if vectors not in (1, 2, 4, 8, 16, 32):
            raise ValueError("MSI vector count must be a power of two up to 32")
        self.vectors = vectors
        self._log2 = vectors.bit_length() - 1

    def install(self) -> None:
        assert self.function is not None
        flags = (self._log2 << 1) | regs.PCI_MSI_FLAGS_64BIT | regs.PCI_MSI_FLAGS_MASKBIT
        self.set(regs.PCI_MSI_FLAGS, 2, flags)
        self.set_masks(regs.PCI_MSI_FLAGS, 2, wmask=regs.PCI_MSI_FLAGS_ENABLE | regs.PCI_MSI_FLAGS_QSIZE)
        self.set_masks(regs.PCI_MSI_ADDRESS_LO, 4, wmask=0xFFFFFFFC)
        self.set_masks(regs.PCI_MSI_ADDRESS_HI, 4, wmask=0xFFFFFFFF)
        self.set_masks(regs.PCI_MSI_DATA_64, 2, wmask=0xFFFF)
        self.set_masks(regs.PCI_MSI_MASK_64, 4, wmask=(1 << self.vectors) - 1)
        self.function.msi = self

    @property
    def control(self) -> int:
        return self.get(regs.PCI_MSI_FLAGS, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & regs.PCI_MSI_FLAGS_ENABLE)

    @property
    def enabled_vectors(self) -> int:
        """Multiple Message Enable, clamped to what the function is capable of."""
        log2 = (self.control & regs.PCI_MSI_FLAGS_QSIZE) >> regs.PCI_MSI_FLAGS_QSIZE_SHIFT
        return 1 << min(log2, self._log2)

    def message(self, vector: int) -> tuple[int, int]:
        addr = self.get(regs.PCI_MSI_ADDRESS_LO, 4) | (self.get(regs.PCI_MSI_ADDRESS_HI, 4) << 32)
        data = self.get(regs.PCI_MSI_DATA_64, 2)
        return addr, (data & ~(self.enabled_vectors - 1)) | vector

    def masked(self, vector: int) -> bool:
        return bool(self.get(regs.PCI_MSI_MASK_64, 4) >> vector & 1)

    def pending(self, vector: int) -> bool:
        return bool(self.get(regs.PCI_MSI_PENDING_64, 4) >> vector & 1)

    def _set_pending(self, vector: int, on: bool) -> None:
        self.config.set_bits(self.offset + regs.PCI_MSI_PENDING_64, 4, 1 << vector, on)

    def notify(self, vector: int) -> bool:
        """Send MSI ``vector`` or mark it pending (PCI 3.0 §6.8.3.4).

        When software enabled fewer vectors than the function asked for (Multiple Message
        Enable < Capable; x86 without interrupt remapping grants one), the function may
        only use the low ``enabled_vectors`` data values (§6.8.1.3): a vector beyond them
        folds onto ``vector % enabled_vectors`` rather than being lost, so every cause
        still interrupts (the driver then reads the device's status to tell them apart).
        """
        assert self.function is not None
        if not self.enabled or not 0 <= vector < self.vectors:
            log.debug("%s: MSI vector %d dropped (disabled or not a vector of the function)",
                      self.function.name, vector)
            return False
        vector %= self.enabled_vectors
        if not self.masked(vector) and self.function.bus_master and self.function.trigger(PciIrq.MSI, vector):
            self._set_pending(vector, False)
            return True
        self._set_pending(vector, True)
        return False

    def flush_pending(self) -> None:
        assert self.function is not None
        if not self.enabled or not self.function.bus_master:
            return
        for vector in range(self.enabled_vectors):
            if self.pending(vector) and not self.masked(vector) and self.function.trigger(PciIrq.MSI, vector):
                self._set_pending(vector, False)

    def config_written(self, old: bytes) -> None:
        if self.old_value(old, regs.PCI_MSI_MASK_64, 4) != self.get(regs.PCI_MSI_MASK_64, 4) or \
                self.old_value(old, regs.PCI_MSI_FLAGS, 2) != self.control:
            self.flush_pending()
