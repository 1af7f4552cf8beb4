"""The BAR layout the DMA engine and the NIC share, and their 64-bit register accesses.

BAR0 is 4 KiB of 32-bit registers; a 64-bit register is two of them, low half first.
BAR2 holds the MSI-X table (offset 0) and PBA (offset 0x800). An 8-byte BAR0 access is
served as two 4-byte ones, except for the registers a model takes whole (a ring or queue
base must never be seen half-written): :meth:`SplitRegisters._write64` says which.
"""

from __future__ import annotations

REGS_BAR = 0
REGS_SIZE = 0x1000
MSIX_BAR = 2
MSIX_BAR_SIZE = 0x1000
MSIX_TABLE_OFFSET = 0x000
MSIX_PBA_OFFSET = 0x800
REG_WIDTH = 4
DWORD = 0xFFFFFFFF


class SplitRegisters:
    """BAR0 read/write handlers over a model's ``_read32``/``_write32``."""

    def _read32(self, offset: int) -> int:
        raise NotImplementedError

    def _write32(self, offset: int, value: int) -> None:
        raise NotImplementedError

    def _write64(self, offset: int, value: int) -> bool:
        """Take an 8-byte write at ``offset`` whole; False to split it (the default)."""
        return False

    def _reg_read(self, offset: int, size: int) -> int:
        if size == 8:
            return self._read32(offset) | self._read32(offset + REG_WIDTH) << 32
        return self._read32(offset)

    def _reg_write(self, offset: int, size: int, value: int) -> None:
        if size == 8 and self._write64(offset, value):
            return
        if size == 8:
            self._write32(offset, value & DWORD)
            self._write32(offset + REG_WIDTH, value >> 32)
        else:
            self._write32(offset, value)
