"""Fixtures for the PCI framework tests.

The framework is driven through its :class:`~vfio_user.device.VfioUserDevice` methods,
as a backend would. :class:`LoopbackContext` is a small but real
:class:`~vfio_user.device.DeviceContext`: DMA goes to a :class:`~devmodel.memory.ByteMemory`,
interrupts are real eventfds (one per vector, installed like SET_IRQS does), and
``call_soon`` work runs when the test calls :meth:`LoopbackContext.run_pending`, with
:data:`~vfio_user.device.MODEL_LOCK` held like a device worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from devmodel.memory import ByteMemory
from vfio_user.device import MODEL_LOCK

GUEST_RAM_BASE = 0x4000_0000
GUEST_RAM_SIZE = 0x10000


class LoopbackContext:
    """A DeviceContext backed by local memory and real eventfds."""

    def __init__(self, memory: ByteMemory) -> None:
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

    def run_pending(self) -> int:
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


@pytest.fixture
def guest_ram() -> ByteMemory:
    return ByteMemory(GUEST_RAM_SIZE, base=GUEST_RAM_BASE)


@pytest.fixture
def ctx(guest_ram: ByteMemory) -> Iterator[LoopbackContext]:
    context = LoopbackContext(guest_ram)
    yield context
    context.close()
