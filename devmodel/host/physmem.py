"""Host physical memory as the SMMU sees it: host-private RAM plus the user memory.

The emulated SMMU masters one :class:`~devmodel.memory.AddressSpace`. The host driver's
own structures (stream table, CMDQ, EVTQ, PRIQ) live in a host-private
:class:`~devmodel.memory.ByteMemory` window; the VMM's "user memory" (guest RAM, the
memory an IOAS maps) is mapped at its user virtual addresses. In other words the model
identifies host physical addresses with the VMM's virtual addresses: pinning a page in
the real kernel yields some PA; here that PA *is* the user VA. Stage 2 therefore maps
IPA (= IOVA of the IOAS) to user VA, and the SMMU reads and writes guest RAM there.
"""

from __future__ import annotations

import logging

from devmodel.memory import AddressSpace, ByteMemory, Memory

log = logging.getLogger(__name__)

#: Default window of host-private RAM (below any user VA a Linux VMM would use).
HOST_PRIV_BASE = 0x4000_0000
HOST_PRIV_SIZE = 8 << 20
PAGE_SIZE = 4096


class HostPhysicalMemory:
    """The SMMU's bus: host-private RAM, user memory windows, and MMIO doorbells."""

    def __init__(self, base: int = HOST_PRIV_BASE, size: int = HOST_PRIV_SIZE) -> None:
        self.space = AddressSpace()
        self.private = ByteMemory(size, base=base)
        self.space.map(base, size, self.private)
        self._next = base
        self._end = base + size

    def map_user(self, base: int, size: int, memory: Memory) -> None:
        """Make user memory (guest RAM) reachable by the SMMU at its user VA."""
        self.space.map(base, size, memory)
        log.info("host memory: user window %#x+%#x mapped", base, size)

    def map_mmio(self, base: int, size: int, target: Memory) -> None:
        """An MMIO window (e.g. the interrupt controller's MSI doorbell)."""
        self.space.map(base, size, target)

    def alloc(self, size: int, align: int = PAGE_SIZE) -> int:
        """Zeroed host-private memory (``dma_alloc_coherent``); never freed."""
        align = max(align, 8)
        addr = (self._next + align - 1) & ~(align - 1)
        if addr + size > self._end:
            raise MemoryError(f"host-private memory exhausted: {size:#x} bytes")
        self._next = addr + size
        self.private.write(addr, bytes(size))
        return addr

    # Little-endian helpers for the driver's own structures.
    def read(self, addr: int, size: int) -> bytes:
        return self.space.read(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        self.space.write(addr, data)
