"""Physical memory seen by bus masters (the SMMU's table walker, endpoints' DMA).

Everything that reads or writes "memory" in the hardware layer does it through the
:class:`Memory` protocol so the same model runs on a plain byte buffer in unit tests, on
guest RAM mapped over vfio-user, or on a composition of both (host-private memory for the
host driver's queues plus guest RAM reached through stage 2).

Accesses that hit nothing raise :class:`BusError`; the SMMU turns it into the
architectural abort (F_WALK_EABT, fetch aborts, GERROR), never into a crash.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Protocol


class BusError(Exception):
    """An access to an address no memory answers (an external abort)."""

    def __init__(self, addr: int, size: int, write: bool, reason: str = "no memory") -> None:
        super().__init__(f"{'write' if write else 'read'} of {size} bytes at {addr:#x}: {reason}")
        self.addr = addr
        self.size = size
        self.write = write
        self.reason = reason


class Memory(Protocol):
    """A physical address space. Implementations must be safe for any ``addr``/``size``."""

    def read(self, addr: int, size: int) -> bytes:
        """Return ``size`` bytes at ``addr`` or raise :class:`BusError`."""
        ...

    def write(self, addr: int, data: bytes) -> None:
        """Store ``data`` at ``addr`` or raise :class:`BusError`; nothing is written then."""
        ...


class ByteMemory:
    """RAM backed by a ``bytearray`` (or any writable buffer) at a base address."""

    def __init__(self, size: int, base: int = 0, buffer: bytearray | memoryview | None = None) -> None:
        self.base = base
        self.buf = memoryview(buffer if buffer is not None else bytearray(size)).cast("B")
        self.size = len(self.buf)

    def contains(self, addr: int, size: int) -> bool:
        """True when ``[addr, addr+size)`` lies wholly inside this RAM."""
        return size >= 0 and self.base <= addr and addr + size <= self.base + self.size

    def read(self, addr: int, size: int) -> bytes:
        if not self.contains(addr, size):
            raise BusError(addr, size, False)
        off = addr - self.base
        return bytes(self.buf[off:off + size])

    def write(self, addr: int, data: bytes) -> None:
        if not self.contains(addr, len(data)):
            raise BusError(addr, len(data), True)
        off = addr - self.base
        self.buf[off:off + len(data)] = data

    # Little-endian helpers: every SMMU structure is little-endian.
    def read64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def write64(self, addr: int, value: int) -> None:
        self.write(addr, value.to_bytes(8, "little"))


@dataclass(order=True)
class _Window:
    base: int
    size: int
    target: Memory = field(compare=False)


class AddressSpace:
    """Several memories at fixed, non-overlapping windows of one address space.

    An access must fall inside one window; straddling two is a bus error, as it would be
    for a single PCIe transaction crossing into unclaimed space.
    """

    def __init__(self) -> None:
        self._windows: list[_Window] = []

    def map(self, base: int, size: int, target: Memory) -> None:
        """Claim ``[base, base+size)`` for ``target`` (addresses passed through unchanged)."""
        if size <= 0:
            raise ValueError("window size must be positive")
        for w in self._windows:
            if base < w.base + w.size and w.base < base + size:
                raise ValueError(f"window {base:#x}+{size:#x} overlaps {w.base:#x}+{w.size:#x}")
        bisect.insort(self._windows, _Window(base, size, target))

    def unmap(self, base: int) -> None:
        """Remove the window that starts at ``base``."""
        self._windows = [w for w in self._windows if w.base != base]

    def _find(self, addr: int, size: int, write: bool) -> Memory:
        i = bisect.bisect_right([w.base for w in self._windows], addr) - 1
        if i >= 0:
            w = self._windows[i]
            if addr + size <= w.base + w.size:
                return w.target
        raise BusError(addr, size, write)

    def read(self, addr: int, size: int) -> bytes:
        return self._find(addr, size, False).read(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        self._find(addr, len(data), True).write(addr, data)
