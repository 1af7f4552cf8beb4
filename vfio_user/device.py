"""The contract between the vfio-user server (any backend) and a device model.

A backend (the pure-Python server, or libvfio-user through ctypes) owns the socket, the
protocol, DMA mappings and interrupt eventfds. A device model only implements
:class:`VfioUserDevice` and uses the :class:`DeviceContext` it is handed while a client is
attached. That keeps every device model runnable, unchanged, on either backend.

Concurrency, the one rule that matters
--------------------------------------
All device callbacks run with the process-wide :data:`MODEL_LOCK` held (think of QEMU's
big lock): region accesses and resets in a serving thread (the client's reader thread on
the Python server, the event-loop thread on libvfio-user), fd callbacks in the loop
thread, scheduled work in the device's worker thread. Region accesses are answered at
once, so a reply is never stuck behind device work. Work that does DMA must be scheduled
with :meth:`DeviceContext.call_soon`: a DMA served by messages (guest RAM without an fd)
blocks the worker until the client answers and releases :data:`MODEL_LOCK` while it waits,
so requests keep being served. DMA from a serving thread raises
:class:`DmaFromHandlerError` instead of deadlocking QEMU.
"""

from __future__ import annotations

import enum
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Protocol

from devmodel.memory import Memory

#: The process-wide model lock. Re-entrant so a callback may call helpers that take it.
MODEL_LOCK = threading.RLock()


class PciRegion(enum.IntEnum):
    """VFIO PCI region indexes (linux/vfio.h VFIO_PCI_*_REGION_INDEX)."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


NUM_PCI_REGIONS = 9


class PciIrq(enum.IntEnum):
    """VFIO PCI IRQ indexes (linux/vfio.h VFIO_PCI_*_IRQ_INDEX)."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


NUM_PCI_IRQS = 5

# linux/vfio.h flag values, shared by every backend.
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1

VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3

VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3


@dataclass
class RegionInfo:
    """What DEVICE_GET_REGION_INFO reports for one region.

    ``mmap_fd`` (with ``mmap_offset``) is the file the client may map; ``sparse`` lists
    the (offset, size) areas of the region that are mappable. An empty ``sparse`` with an
    fd means the whole region is mappable. Accesses outside the mapped areas arrive as
    REGION_READ/WRITE.
    """

    size: int = 0
    flags: int = 0
    mmap_fd: int | None = None
    mmap_offset: int = 0
    sparse: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class IrqInfo:
    """What DEVICE_GET_IRQ_INFO reports for one IRQ index."""

    count: int = 0
    flags: int = VFIO_IRQ_INFO_EVENTFD


class DmaError(OSError):
    """A DMA the client could not serve (errno from the client or ENOENT when unmapped)."""


class DmaFromHandlerError(RuntimeError):
    """DMA attempted from a request handler, where a message DMA would deadlock QEMU."""


class DeviceContext(Protocol):
    """What the backend offers an attached device model."""

    #: DMA to the client's memory (guest physical addresses), blocking; see module doc.
    dma: Memory

    def trigger_irq(self, index: int, subindex: int = 0) -> bool:
        """Signal vector ``subindex`` of IRQ ``index``; False when no eventfd is set or it is masked."""
        ...

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the device's worker, after any reply being built is sent."""
        ...

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Watch ``fd`` in the event loop; ``callback`` runs in the loop thread (no DMA there)."""
        ...

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd``."""
        ...


class VfioUserDevice(ABC):
    """A device a vfio-user backend can serve. Errors are raised as ``OSError(errno)``."""

    #: Device flags reported by DEVICE_GET_INFO (RESET must be set or QEMU never resets).
    device_flags: int = VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET
    num_regions: int = NUM_PCI_REGIONS
    num_irqs: int = NUM_PCI_IRQS

    @abstractmethod
    def region_info(self, index: int) -> RegionInfo:
        """Describe region ``index`` (0 <= index < num_regions)."""

    @abstractmethod
    def irq_info(self, index: int) -> IrqInfo:
        """Describe IRQ ``index`` (0 <= index < num_irqs)."""

    @abstractmethod
    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Read ``count`` bytes; the backend has already range-checked the access."""

    @abstractmethod
    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Write ``data``; the backend has already range-checked the access."""

    def reset(self) -> None:
        """DEVICE_RESET: return to the power-on state (the PCI framework does a function reset)."""

    def attach(self, ctx: DeviceContext) -> None:
        """A client connected and negotiated VERSION; keep ``ctx`` until :meth:`detach`."""

    def detach(self) -> None:
        """The client went away: drop ``ctx``; device state is kept for the next client."""

    def irqs_changed(self, index: int) -> None:
        """SET_IRQS changed eventfds or masks of IRQ ``index`` (for models that care)."""

    def dma_changed(self) -> None:
        """DMA_MAP/UNMAP changed the client's memory map (e.g. to drop cached translations)."""
