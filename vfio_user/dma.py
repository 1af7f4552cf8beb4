"""The client's DMA map as the server sees it (DMA_MAP / DMA_UNMAP).

Each window is either mmapped from the fd the client passed (direct access, MAP_SHARED so
the guest sees the device's writes) or fd-less, reached only through DMA_READ/DMA_WRITE
messages. :class:`DmaMap` keeps the windows sorted and answers "which windows cover
``[addr, addr+size)``", which is what a bus master needs; gaps are bus errors.
"""

from __future__ import annotations

import bisect
import errno
import logging
import mmap
import os
import stat
import threading
from dataclasses import dataclass, field

from vfio_user.protocol import DMA_FLAG_READ, DMA_FLAG_WRITE, ProtocolError

log = logging.getLogger(__name__)

PAGE_SIZE = mmap.PAGESIZE


@dataclass
class DmaWindow:
    """One DMA_MAP'ed range of client memory."""

    addr: int
    size: int
    flags: int
    fd_offset: int = 0
    mm: mmap.mmap | None = None
    #: Offset of ``addr`` inside ``mm`` (non-zero when the fd offset was not page aligned).
    mm_skew: int = 0
    view: memoryview | None = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.addr + self.size

    @property
    def direct(self) -> bool:
        """True when the server can touch this memory itself."""
        return self.view is not None

    def close(self) -> None:
        if self.view is not None:
            self.view.release()
            self.view = None
        if self.mm is not None:
            self.mm.close()
            self.mm = None


def _map_fd(fd: int, offset: int, size: int, flags: int) -> tuple[mmap.mmap, int]:
    """mmap ``size`` bytes of ``fd`` at ``offset`` MAP_SHARED.

    A mapping past the end of a regular file would SIGBUS the server on first touch, so
    the file must be big enough; that is checked here rather than trusted.
    """
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and offset + size > st.st_size:
        raise ProtocolError(errno.EINVAL, f"fd too small: {st.st_size:#x} < {offset + size:#x}")
    skew = offset % mmap.ALLOCATIONGRANULARITY
    prot = 0
    if flags & DMA_FLAG_READ:
        prot |= mmap.PROT_READ
    if flags & DMA_FLAG_WRITE:
        prot |= mmap.PROT_WRITE | mmap.PROT_READ
    try:
        mm = mmap.mmap(fd, size + skew, flags=mmap.MAP_SHARED, prot=prot, offset=offset - skew)
    except (OSError, ValueError) as exc:
        err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
        raise ProtocolError(err, f"mmap failed: {exc}") from None
    return mm, skew


class DmaMap:
    """The set of windows of one connection; thread-safe (workers DMA, the loop maps)."""

    def __init__(self, max_maps: int) -> None:
        self.max_maps = max_maps
        self._windows: list[DmaWindow] = []
        self._starts: list[int] = []
        #: Held while copying to/from a window so DMA_UNMAP waits for in-flight DMA.
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._windows)

    def windows(self) -> list[DmaWindow]:
        return list(self._windows)

    def add(self, addr: int, size: int, flags: int, fd: int | None, fd_offset: int) -> bool:
        """Map a window; returns False for an identical re-map (kept as is).

        Overlap with a different window is EINVAL (the reference library's choice; the
        spec text says EEXIST).
        """
        if size == 0 or addr + size > 1 << 64 or fd_offset + size > 1 << 64:
            raise ProtocolError(errno.EINVAL, f"bad DMA range {addr:#x}+{size:#x}")
        with self.lock:
            for w in self._windows:
                if w.addr == addr and w.size == size:
                    log.debug("DMA_MAP %#x+%#x identical to an existing map", addr, size)
                    return False
                if addr < w.end and w.addr < addr + size:
                    raise ProtocolError(errno.EINVAL, f"DMA map {addr:#x}+{size:#x} overlaps "
                                                      f"{w.addr:#x}+{w.size:#x}")
            if len(self._windows) >= self.max_maps:
                raise ProtocolError(errno.ENOSPC, "too many DMA maps")
        win = DmaWindow(addr, size, flags, fd_offset)
        if fd is not None:
            win.mm, win.mm_skew = _map_fd(fd, fd_offset, size, flags)
            win.view = memoryview(win.mm)[win.mm_skew:win.mm_skew + size]
        with self.lock:
            i = bisect.bisect_left(self._starts, addr)
            self._windows.insert(i, win)
            self._starts.insert(i, addr)
        return True

    def remove(self, addr: int, size: int) -> None:
        """Unmap the window that is exactly ``[addr, addr+size)``, else ENOENT."""
        with self.lock:
            i = bisect.bisect_left(self._starts, addr)
            if i >= len(self._windows) or self._windows[i].addr != addr or self._windows[i].size != size:
                raise ProtocolError(errno.ENOENT, f"no DMA map {addr:#x}+{size:#x}")
            win = self._windows.pop(i)
            self._starts.pop(i)
            win.close()

    def clear(self) -> None:
        """Unmap everything (DMA_UNMAP all, or the client went away)."""
        with self.lock:
            for w in self._windows:
                w.close()
            self._windows.clear()
            self._starts.clear()

    def cover(self, addr: int, size: int) -> list[tuple[DmaWindow, int, int]] | None:
        """Split ``[addr, addr+size)`` into (window, offset in window, length) pieces.

        None when any byte is not mapped. Call with :attr:`lock` held.
        """
        if addr < 0 or size < 0:
            return None
        pieces: list[tuple[DmaWindow, int, int]] = []
        i = bisect.bisect_right(self._starts, addr) - 1
        cur, end = addr, addr + size
        if size == 0:
            return pieces if i >= 0 and self._windows[i].addr <= addr <= self._windows[i].end else None
        while cur < end:
            if i < 0 or i >= len(self._windows):
                return None
            w = self._windows[i]
            if not w.addr <= cur < w.end:
                return None
            n = min(end, w.end) - cur
            pieces.append((w, cur - w.addr, n))
            cur += n
            i += 1
        return pieces


class DmaPort:
    """The :class:`devmodel.memory.Memory` face of a backend's client memory: subclasses
    implement ``_access(addr, size, data)`` (data None for a read) and return the bytes read."""

    def _access(self, addr: int, size: int, data: bytes | None) -> bytes:
        raise NotImplementedError

    def read(self, addr: int, size: int) -> bytes:
        return self._access(addr, size, None)

    def write(self, addr: int, data: bytes) -> None:
        self._access(addr, len(data), bytes(data))

    def read64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def write64(self, addr: int, value: int) -> None:
        self.write(addr, value.to_bytes(8, "little"))
