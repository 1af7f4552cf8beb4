"""Base Address Registers and what lives behind them.

A :class:`Bar` is declared with a kind (32/64-bit memory, optionally prefetchable, or
I/O) and a power-of-two size, then filled with subregions the way QEMU fills a
MemoryRegion container:

* :class:`MmioRegion`: register handlers ``read(offset, size) -> int`` and
  ``write(offset, size, value)``; every access arrives as REGION_READ/WRITE.
* :class:`RamRegion`: memory backed by a memfd the client may ``mmap`` (reported as a
  sparse mmap area with the fd in :class:`~vfio_user.device.RegionInfo`). The model
  reads and writes the same pages through :attr:`RamRegion.buf`; trapped accesses that
  reach such an area (a client that did not map it) are served from the same buffer.

Bytes of a BAR covered by no subregion read as zero and ignore writes (logged as guest
errors), like an unimplemented register of real hardware.

The BAR's memfd spans the whole BAR so a RAM area at BAR offset ``x`` is at file
offset ``x``; RAM areas must therefore be page-aligned and page-sized.
"""

from __future__ import annotations

import enum
import logging
import mmap
import os
from dataclasses import dataclass
from typing import Callable

from devmodel.pci import regs

log = logging.getLogger(__name__)

PAGE_SIZE = 4096

ReadHandler = Callable[[int, int], int]
WriteHandler = Callable[[int, int, int], None]


class BarKind(enum.Enum):
    """What kind of decoder a BAR is."""

    MEM32 = "mem32"
    MEM64 = "mem64"
    IO = "io"


@dataclass
class MmioRegion:
    """Registers served by callbacks, QEMU MemoryRegionOps-like.

    ``min_access``/``max_access`` are what the handlers implement: wider guest accesses
    are split, narrower ones are widened (reads extract bytes; writes merge with a read of
    the containing unit, so reads used that way must be free of side effects).
    """

    name: str
    size: int
    read: ReadHandler
    write: WriteHandler
    min_access: int = 1
    max_access: int = 8

    def access_read(self, offset: int, count: int) -> bytes:
        """Serve a read of ``count`` bytes at ``offset`` (inside the region)."""
        out = bytearray()
        for chunk_off, chunk_len in _chunks(offset, count, self.max_access):
            unit = max(self.min_access, chunk_len)
            base = chunk_off - chunk_off % unit
            value = self.read(base, unit) & ((1 << (8 * unit)) - 1)
            raw = value.to_bytes(unit, "little")
            out += raw[chunk_off - base:chunk_off - base + chunk_len]
        return bytes(out)

    def access_write(self, offset: int, data: bytes) -> None:
        """Serve a write of ``data`` at ``offset`` (inside the region)."""
        for chunk_off, chunk_len in _chunks(offset, len(data), self.max_access):
            piece = data[chunk_off - offset:chunk_off - offset + chunk_len]
            if chunk_len >= self.min_access:
                self.write(chunk_off, chunk_len, int.from_bytes(piece, "little"))
                continue
            unit = self.min_access
            base = chunk_off - chunk_off % unit
            cur = bytearray(self.read(base, unit).to_bytes(unit, "little"))
            cur[chunk_off - base:chunk_off - base + chunk_len] = piece
            self.write(base, unit, int.from_bytes(cur, "little"))


def _chunks(offset: int, count: int, max_access: int) -> list[tuple[int, int]]:
    """Split ``[offset, offset+count)`` into naturally aligned pieces of ≤ ``max_access``."""
    pieces = []
    pos, end = offset, offset + count
    while pos < end:
        size = max_access
        while size > 1 and (pos % size or pos + size > end):
            size //= 2
        pieces.append((pos, size))
        pos += size
    return pieces


class RamRegion:
    """A page-aligned, client-mappable RAM area of a BAR (memfd-backed)."""

    def __init__(self, name: str, size: int) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"RAM area {name!r} size {size:#x} is not a multiple of a page")
        self.name = name
        self.size = size
        #: The model's view of the area; set when the region is added to a BAR.
        self.buf: memoryview = memoryview(bytearray(size))

    def access_read(self, offset: int, count: int) -> bytes:
        return bytes(self.buf[offset:offset + count])

    def access_write(self, offset: int, data: bytes) -> None:
        self.buf[offset:offset + len(data)] = data


Region = MmioRegion | RamRegion


class Bar:
    """One BAR: its decoder kind, size and the subregions that answer accesses."""

    def __init__(self, kind: BarKind, size: int, prefetchable: bool = False, name: str = "") -> None:
        min_size = 4 if kind is BarKind.IO else 16
        if size < min_size or size & (size - 1):
            raise ValueError(f"BAR size {size:#x} must be a power of two >= {min_size}")
        if kind is BarKind.IO and size > 256:
            raise ValueError("I/O BARs are at most 256 bytes")
        if kind is BarKind.IO and prefetchable:
            raise ValueError("I/O BARs cannot be prefetchable")
        self.kind = kind
        self.size = size
        self.prefetchable = prefetchable
        self.name = name
        self.index = -1
        self._regions: list[tuple[int, Region]] = []
        self._memfd: int | None = None
        self._mmap: mmap.mmap | None = None

    # --- declaration helpers ---------------------------------------------------------------
    @classmethod
    def mem32(cls, size: int, prefetchable: bool = False, name: str = "") -> Bar:
        return cls(BarKind.MEM32, size, prefetchable, name)

    @classmethod
    def mem64(cls, size: int, prefetchable: bool = False, name: str = "") -> Bar:
        return cls(BarKind.MEM64, size, prefetchable, name)

    @classmethod
    def io(cls, size: int, name: str = "") -> Bar:
        return cls(BarKind.IO, size, False, name)

    @property
    def is_io(self) -> bool:
        return self.kind is BarKind.IO

    @property
    def is_64bit(self) -> bool:
        return self.kind is BarKind.MEM64

    def flag_bits(self) -> int:
        """The read-only low bits of the BAR register."""
        if self.is_io:
            return int(regs.BarFlag.SPACE_IO)
        bits = int(regs.BarFlag.MEM_TYPE_64) if self.is_64bit else 0
        if self.prefetchable:
            bits |= int(regs.BarFlag.PREFETCH)
        return bits

    def address_mask(self) -> int:
        """Writable address bits of the BAR (64 bits wide for a 64-bit BAR)."""
        width = 64 if self.is_64bit else 32
        return ((1 << width) - 1) & ~(self.size - 1)

    def add_mmio(self, offset: int, size: int, read: ReadHandler, write: WriteHandler,
                 name: str = "", min_access: int = 1, max_access: int = 8) -> MmioRegion:
        """Register handlers for ``[offset, offset+size)`` of the BAR."""
        region = MmioRegion(name or f"mmio@{offset:#x}", size, read, write, min_access, max_access)
        self._add(offset, region)
        return region

    def add_ram(self, offset: int, size: int, name: str = "") -> RamRegion:
        """Back ``[offset, offset+size)`` with client-mappable memfd pages."""
        if self.is_io:
            raise ValueError("I/O BARs cannot be mapped")
        if offset % PAGE_SIZE:
            raise ValueError(f"RAM area offset {offset:#x} is not page-aligned")
        region = RamRegion(name or f"ram@{offset:#x}", size)
        self._add(offset, region)
        self._ensure_memfd()
        assert self._mmap is not None
        region.buf = memoryview(self._mmap)[offset:offset + size]
        return region

    def _add(self, offset: int, region: Region) -> None:
        if offset < 0 or offset + region.size > self.size:
            raise ValueError(f"{region.name} [{offset:#x}+{region.size:#x}] outside BAR of {self.size:#x}")
        for other_off, other in self._regions:
            if offset < other_off + other.size and other_off < offset + region.size:
                raise ValueError(f"{region.name} overlaps {other.name}")
        self._regions.append((offset, region))
        self._regions.sort(key=lambda item: item[0])

    def _ensure_memfd(self) -> None:
        if self._memfd is not None:
            return
        label = f"devmodel-bar-{self.name or 'ram'}"
        fd = os.memfd_create(label, os.MFD_CLOEXEC)
        os.ftruncate(fd, self.size)
        self._memfd = fd
        self._mmap = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    # --- what the backend reports ----------------------------------------------------------
    @property
    def memfd(self) -> int | None:
        """The fd clients may map (None when the BAR has no RAM area)."""
        return self._memfd

    def sparse_areas(self) -> list[tuple[int, int]]:
        """(offset, size) of every mappable area."""
        return [(off, r.size) for off, r in self._regions if isinstance(r, RamRegion)]

    # --- accesses ---------------------------------------------------------------------------
    def read(self, offset: int, count: int) -> bytes:
        """Serve a trapped read, splitting it across subregions; holes read as zero."""
        out = bytearray()
        for off, length, region, base in self._pieces(offset, count):
            if region is None:
                log.warning("guest error: BAR%d read of unimplemented [%#x+%d]", self.index, off, length)
                out += bytes(length)
            else:
                out += region.access_read(off - base, length)
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """Serve a trapped write; bytes hitting no subregion are dropped."""
        for off, length, region, base in self._pieces(offset, len(data)):
            piece = data[off - offset:off - offset + length]
            if region is None:
                log.warning("guest error: BAR%d write to unimplemented [%#x+%d]", self.index, off, length)
            else:
                region.access_write(off - base, piece)

    def _pieces(self, offset: int, count: int) -> list[tuple[int, int, Region | None, int]]:
        """Cut an access into (offset, length, region or None, region base) pieces."""
        pieces = []
        pos, end = offset, offset + count
        while pos < end:
            hit = None
            next_start = end
            for base, region in self._regions:
                if base <= pos < base + region.size:
                    hit = (base, region)
                    break
                if pos < base < next_start:
                    next_start = base
            if hit is not None:
                base, region = hit
                stop = min(end, base + region.size)
                pieces.append((pos, stop - pos, region, base))
            else:
                stop = next_start
                pieces.append((pos, stop - pos, None, 0))
            pos = stop
        return pieces

    def close(self) -> None:
        """Release the memfd and mapping (the device is being destroyed)."""
        for _, region in self._regions:
            if isinstance(region, RamRegion):
                region.buf.release()
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                log.debug("BAR%d mapping still exported; left to the GC", self.index)
            self._mmap = None
        if self._memfd is not None:
            os.close(self._memfd)
            self._memfd = None
