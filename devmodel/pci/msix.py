"""MSI-X (capability ID 0x11; PCI 3.0 §6.8.2; reference §8.2).

The capability keeps the vector table and the Pending Bit Array in a BAR and applies the
sending rule: a vector's message is sent only while MSI-X Enable=1, Function Mask=0, the
vector is unmasked and Bus Master Enable=1; otherwise its pending bit is set and the
message goes out when the obstacle is lifted (unmask, function unmask, enable, BME).

Two kinds of client
-------------------
* A client that drives the table itself (a test, a plain vfio-user client) writes the
  table through REGION_WRITE: the per-vector Mask bits are authoritative here.
* QEMU emulates the table in the VMM and never forwards table accesses; it installs an
  eventfd (SET_IRQS) for a vector when the guest unmasks it, and only PBA reads reach
  the server. Until the client has written the table at least once, this model
  therefore ignores its own (reset = masked) per-vector bits and lets the eventfd
  decide: ``ctx.trigger_irq`` returning False (no eventfd / masked by SET_IRQS) marks the
  vector pending, and a later SET_IRQS (``irqs_changed``) re-sends pending vectors.

Python API: ``notify(vector) -> bool`` (True when the message was signalled),
``enabled``, ``function_masked``, ``vectors``, ``vector_masked(v)``, ``pending(v)``,
``message(v) -> (address, data)``, ``flush_pending()``.
"""

from __future__ import annotations

import logging

from devmodel.pci import regs
from devmodel.pci.capability import Capability
from vfio_user.device import PciIrq

log = logging.getLogger(__name__)

#: Table Size is an 11-bit N-1 field.
MAX_VECTORS = 2048
PBA_QWORD_BITS = 64


class MsixCapability(Capability):
    """MSI-X with its table and PBA inside the function's BARs."""

    cap_id = regs.CapId.MSIX
    size = regs.PCI_CAP_MSIX_SIZEOF

    def __init__(self, vectors: int, table_bar: int, table_offset: int, pba_bar: int,
                 pba_offset: int) -> None:
        super().__init__()
        if not 1 <= vectors <= MAX_VECTORS:
            raise ValueError(f"MSI-X supports 1..{MAX_VECTORS} vectors")
        if table_offset % 8 or pba_offset % 8:
            raise ValueError("MSI-X table and PBA offsets must be QWORD-aligned")
        self.vectors = vectors
        self.table_bar = table_bar
        self.table_offset = table_offset
        self.pba_bar = pba_bar
        self.pba_offset = pba_offset
        self.table = bytearray(self.table_size)
        self._pending = 0
        #: True once a client wrote the table (it is then authoritative for masks).
        self.table_written = False
        self._reset_table()

    @property
    def table_size(self) -> int:
        return self.vectors * regs.PCI_MSIX_ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return (self.vectors + PBA_QWORD_BITS - 1) // PBA_QWORD_BITS * 8

    def install(self) -> None:
        assert self.function is not None
        self.set(regs.PCI_MSIX_FLAGS, 2, self.vectors - 1)
        self.set_masks(regs.PCI_MSIX_FLAGS, 2, wmask=regs.PCI_MSIX_FLAGS_MASKALL | regs.PCI_MSIX_FLAGS_ENABLE)
        self.set(regs.PCI_MSIX_TABLE, 4, self.table_offset | self.table_bar)
        self.set(regs.PCI_MSIX_PBA, 4, self.pba_offset | self.pba_bar)
        table_bar = self.function.bars[self.table_bar]
        pba_bar = self.function.bars[self.pba_bar]
        if table_bar is None or pba_bar is None or table_bar.is_io or pba_bar.is_io:
            raise ValueError("MSI-X table and PBA need memory BARs declared before the capability")
        table_bar.add_mmio(self.table_offset, self.table_size, self._table_read, self._table_write,
                           name="msix-table")
        pba_bar.add_mmio(self.pba_offset, self.pba_size, self._pba_read, self._pba_write, name="msix-pba")
        self.function.msix = self

    # --- state -----------------------------------------------------------------------------
    @property
    def control(self) -> int:
        return self.get(regs.PCI_MSIX_FLAGS, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & regs.PCI_MSIX_FLAGS_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.control & regs.PCI_MSIX_FLAGS_MASKALL)

    def _entry(self, vector: int, field: int) -> int:
        base = vector * regs.PCI_MSIX_ENTRY_SIZE + field
        return int.from_bytes(self.table[base:base + 4], "little")

    def vector_masked(self, vector: int) -> bool:
        """The per-vector Mask bit as the table holds it."""
        return bool(self._entry(vector, regs.PCI_MSIX_ENTRY_VECTOR_CTRL) & regs.PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def message(self, vector: int) -> tuple[int, int]:
        """(Message Address, Message Data) of ``vector``."""
        addr = (self._entry(vector, regs.PCI_MSIX_ENTRY_UPPER_ADDR) << 32) | self._entry(
            vector, regs.PCI_MSIX_ENTRY_LOWER_ADDR)
        return addr, self._entry(vector, regs.PCI_MSIX_ENTRY_DATA)

    def pending(self, vector: int) -> bool:
        return bool(self._pending >> vector & 1)

    def _blocked(self, vector: int) -> str | None:
        """Why ``vector`` cannot be sent now (None when it can)."""
        assert self.function is not None
        if self.function_masked:
            return "function masked"
        if self.table_written and self.vector_masked(vector):
            return "vector masked"
        if not self.function.bus_master:
            return "bus master disabled"
        return None

    # --- sending ---------------------------------------------------------------------------
    def notify(self, vector: int) -> bool:
        """Request interrupt ``vector``: send it now or mark it pending (reference §8.2)."""
        assert self.function is not None
        if not 0 <= vector < self.vectors:
            log.error("%s: MSI-X vector %d out of range (%d vectors)", self.function.name, vector, self.vectors)
            return False
        if not self.enabled:
            log.debug("%s: MSI-X vector %d dropped: MSI-X disabled", self.function.name, vector)
            return False
        reason = self._blocked(vector)
        if reason is None and self.function.trigger(PciIrq.MSIX, vector):
            log.debug("%s: MSI-X vector %d sent", self.function.name, vector)
            self._pending &= ~(1 << vector)
            return True
        self._pending |= 1 << vector
        log.debug("%s: MSI-X vector %d pending (%s)", self.function.name, vector, reason or "client masked")
        return False

    def flush_pending(self) -> None:
        """Send every pending vector that may now be sent (after an unmask or new eventfd)."""
        if not self.enabled or not self._pending:
            return
        for vector in range(self.vectors):
            if self.pending(vector) and self._blocked(vector) is None:
                assert self.function is not None
                if self.function.trigger(PciIrq.MSIX, vector):
                    self._pending &= ~(1 << vector)
                    log.debug("%s: pending MSI-X vector %d sent", self.function.name, vector)

    # --- config / BAR accesses -------------------------------------------------------------
    def config_written(self, old: bytes) -> None:
        old_ctrl = self.old_value(old, regs.PCI_MSIX_FLAGS, 2)
        if old_ctrl != self.control:
            assert self.function is not None
            log.info("%s: MSI-X control %#06x -> %#06x", self.function.name, old_ctrl, self.control)
            self.flush_pending()

    def _table_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.table[offset:offset + size], "little")

    def _table_write(self, offset: int, size: int, value: int) -> None:
        vector = offset // regs.PCI_MSIX_ENTRY_SIZE
        was_masked = self.vector_masked(vector)
        self.table[offset:offset + size] = value.to_bytes(size, "little")
        self.table_written = True
        if was_masked and not self.vector_masked(vector):
            self.flush_pending()

    def _pba_read(self, offset: int, size: int) -> int:
        return (self._pending >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def _pba_write(self, offset: int, size: int, value: int) -> None:
        assert self.function is not None
        log.warning("guest error: %s write to read-only MSI-X PBA at %#x", self.function.name, offset)

    def _reset_table(self) -> None:
        """Every entry zero with Vector Control.Mask set, its reset value (PCI 3.0 §6.8.2.9)."""
        self.table[:] = bytes(self.table_size)
        for vector in range(self.vectors):
            base = vector * regs.PCI_MSIX_ENTRY_SIZE + regs.PCI_MSIX_ENTRY_VECTOR_CTRL
            self.table[base:base + 4] = regs.PCI_MSIX_ENTRY_CTRL_MASKBIT.to_bytes(4, "little")

    def reset(self) -> None:
        self._reset_table()
        self._pending = 0
        self.table_written = False
