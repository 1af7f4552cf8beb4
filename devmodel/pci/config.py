"""Configuration space storage with per-byte write and write-1-to-clear masks.

Every register in config space is described by three parallel byte arrays, the way QEMU
and real hardware describe them:

* ``data``: the current value (what a read returns);
* ``wmask``: bits software may write (RW); a 0 bit is read-only to software;
* ``w1cmask``: bits cleared by writing 1 (RW1C), e.g. Status error bits;
* ``preserve``: bits a function reset keeps (sticky / link bits, PCIe §6.6.2).

A guest write stores ``(old & ~wmask) | (new & wmask)`` and then clears
``new & w1cmask``. The device model itself sets any bit with :meth:`set` (hardware
writes are not masked). :meth:`snapshot_defaults` records the power-on image after
realize; :meth:`restore_defaults` is the function-reset step.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class ConfigSpace:
    """A 256-byte (PCI) or 4 KiB (PCIe) configuration space."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)
        self.preserve = bytearray(size)
        self._defaults = bytes(size)

    # --- model-side access (unmasked) ---------------------------------------------------
    def get(self, offset: int, size: int) -> int:
        """Little-endian value of ``size`` bytes at ``offset``."""
        return int.from_bytes(self.data[offset:offset + size], "little")

    def set(self, offset: int, size: int, value: int) -> None:
        """Hardware update of a register (not subject to write masks)."""
        self.data[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def get8(self, offset: int) -> int:
        return self.data[offset]

    def get16(self, offset: int) -> int:
        return self.get(offset, 2)

    def get32(self, offset: int) -> int:
        return self.get(offset, 4)

    def set8(self, offset: int, value: int) -> None:
        self.set(offset, 1, value)

    def set16(self, offset: int, value: int) -> None:
        self.set(offset, 2, value)

    def set32(self, offset: int, value: int) -> None:
        self.set(offset, 4, value)

    def set_bits(self, offset: int, size: int, bits: int, on: bool = True) -> None:
        """Set (or clear) ``bits`` of a register, leaving the others."""
        value = self.get(offset, size)
        self.set(offset, size, (value | bits) if on else (value & ~bits))

    def set_masks(self, offset: int, size: int, wmask: int = 0, w1c: int = 0,
                  preserve: int = 0) -> None:
        """Declare which bits of a register are RW, RW1C and kept across function reset."""
        mask = (1 << (8 * size)) - 1
        self.wmask[offset:offset + size] = (wmask & mask).to_bytes(size, "little")
        self.w1cmask[offset:offset + size] = (w1c & mask).to_bytes(size, "little")
        self.preserve[offset:offset + size] = (preserve & mask).to_bytes(size, "little")

    # --- guest-side access --------------------------------------------------------------
    def read(self, offset: int, count: int) -> bytes:
        """Bytes as a guest reads them; out-of-range bytes read as all-ones."""
        if offset < 0 or count < 0:
            return b""
        inside = bytes(self.data[offset:offset + count])
        return inside + b"\xff" * (count - len(inside))

    def guest_write(self, offset: int, data: bytes) -> None:
        """Apply a guest write byte by byte through the write and W1C masks."""
        end = min(offset + len(data), self.size)
        for i in range(max(offset, 0), end):
            new = data[i - offset]
            wm = self.wmask[i]
            cur = (self.data[i] & ~wm) | (new & wm)
            cur &= ~(new & self.w1cmask[i])
            self.data[i] = cur & 0xFF

    # --- reset --------------------------------------------------------------------------
    def snapshot_defaults(self) -> None:
        """Remember the current image as the reset value of every register."""
        self._defaults = bytes(self.data)

    def restore_defaults(self) -> None:
        """Function reset: every bit back to its default except the preserved ones."""
        for i in range(self.size):
            keep = self.preserve[i]
            self.data[i] = (self._defaults[i] & ~keep) | (self.data[i] & keep)
        log.debug("config space restored to defaults")

    def default(self, offset: int, size: int) -> int:
        """Reset value of a register."""
        return int.from_bytes(self._defaults[offset:offset + size], "little")
