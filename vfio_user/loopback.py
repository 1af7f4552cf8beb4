"""An in-process :class:`~vfio_user.device.DeviceContext`: run a device model with no client.

For unit tests of device models (and for driving one from Python): the model gets the same
interface a backend gives it, with DMA on a local :class:`~devmodel.memory.Memory`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from devmodel.memory import Memory
from vfio_user.device import MODEL_LOCK


class LoopbackContext:
    """A DeviceContext backed by local memory and real eventfds.

    DMA goes to the given Memory, interrupts to eventfds the caller installs, and
    ``call_soon`` work waits until :meth:`run_pending` (the caller plays the worker).
    """

    def __init__(self, memory: Memory) -> None:
        self.dma = memory
        self._fds: dict[tuple[int, int], int] = {}
        self.masked: set[tuple[int, int]] = set()
        self._queue: list[Callable[[], None]] = []
        self.readers: dict[int, Callable[[], None]] = {}

    # --- DeviceContext ------------------------------------------------------------------
    def trigger_irq(self, index: int, subindex: int = 0) -> bool:
        fd = self._fds.get((index, subindex))
        if fd is None or (index, subindex) in self.masked:
            return False
        os.eventfd_write(fd, 1)
        return True

    def call_soon(self, fn: Callable[[], None]) -> None:
        self._queue.append(fn)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    # --- test side ------------------------------------------------------------------------
    def install_eventfd(self, index: int, subindex: int = 0) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._fds[(index, subindex)] = fd
        return fd

    def fired(self, index: int, subindex: int = 0) -> int:
        """How many times the vector was signalled since the last call (eventfd counter)."""
        fd = self._fds.get((index, subindex))
        if fd is None:
            return 0
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return 0

    @property
    def pending(self) -> int:
        """Work queued by call_soon and not run yet."""
        return len(self._queue)

    def run_pending(self) -> int:
        """Run queued work in order, with MODEL_LOCK held like a backend's worker."""
        ran = 0
        while self._queue:
            fn = self._queue.pop(0)
            with MODEL_LOCK:
                fn()
            ran += 1
        return ran

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
