"""The interfaces the driver logic is written against, and the reserved-RAM allocator.

Why: the same SMMUv3 / DMA-engine driver code runs in the guest (registers through a
sysfs BAR mmap, memory through ``/dev/mem``, interrupts from devmodel_uirq) and on the
host in tests (registers of the emulated SMMUv3, a ByteMemory, wired interrupt
callbacks). Only these small protocols cross that boundary.
"""

from __future__ import annotations

import bisect
import errno
import threading
from dataclasses import dataclass
from typing import Callable, Protocol


class AgentError(Exception):
    """A request the agent refuses or cannot complete; carries an errno name for clients."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def name(self) -> str:
        return errno.errorcode.get(self.code, str(self.code))


class Regs(Protocol):
    """A device's register BAR. 64-bit accesses may be split into two 32-bit halves."""

    def read32(self, offset: int) -> int: ...

    def write32(self, offset: int, value: int) -> None: ...

    def read64(self, offset: int) -> int: ...

    def write64(self, offset: int, value: int) -> None: ...


class Memory(Protocol):
    """Physical memory the agent owns (guest: the reserved range through /dev/mem)."""

    def read(self, addr: int, size: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


class PciConfig(Protocol):
    """A function's configuration space (guest: sysfs ``config``)."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, value: int, size: int) -> None: ...


class IrqLine(Protocol):
    """Per-vector interrupt counts of one function (guest: devmodel_uirq)."""

    nvec: int

    def wait(self, timeout: float | None) -> list[int] | None:
        """Block until a count changed; the counts, or None on timeout."""
        ...

    def close(self) -> None: ...


class Regs64Split:
    """Mixin: 64-bit register accesses as two 32-bit halves, low half first (SMMUv3 §6.2)."""

    def read32(self, offset: int) -> int:  # pragma: no cover - provided by the concrete class
        raise NotImplementedError

    def write32(self, offset: int, value: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def read64(self, offset: int) -> int:
        return self.read32(offset) | self.read32(offset + 4) << 32

    def write64(self, offset: int, value: int) -> None:
        self.write32(offset, value & 0xFFFF_FFFF)
        self.write32(offset + 4, (value >> 32) & 0xFFFF_FFFF)


class DeviceGone(AgentError):
    """The endpoint was hot-removed: its BAR mapping must not be touched again (SIGBUS)."""

    def __init__(self, what: str) -> None:
        super().__init__(errno.ENODEV, f"{what} is gone (hot-removed); 'dm rescan' once it is back")


class GuardedRegs(Regs64Split):
    """Registers of a hot-removable endpoint: every access first checks the device is there.

    Why: a sysfs BAR mapping of a removed function is revoked by the kernel, and touching
    it raises SIGBUS, which kills the daemon. ``alive`` (the interrupt thread's gone flag
    and the sysfs node's identity) is checked before each 32-bit access instead.
    """

    def __init__(self, regs: Regs, alive: Callable[[], bool], what: str) -> None:
        self.regs = regs
        self.alive = alive
        self.what = what

    def read32(self, offset: int) -> int:
        if not self.alive():
            raise DeviceGone(self.what)
        return self.regs.read32(offset)

    def write32(self, offset: int, value: int) -> None:
        if not self.alive():
            raise DeviceGone(self.what)
        self.regs.write32(offset, value)


class GuardedConfig:
    """Config space of a hot-removable endpoint (a removed function's sysfs file errors)."""

    def __init__(self, cfg: PciConfig, alive: Callable[[], bool], what: str) -> None:
        self.cfg = cfg
        self.alive = alive
        self.what = what

    def read(self, offset: int, size: int) -> int:
        if not self.alive():
            raise DeviceGone(self.what)
        try:
            return self.cfg.read(offset, size)
        except OSError as e:
            raise DeviceGone(self.what) from e

    def write(self, offset: int, value: int, size: int) -> None:
        if not self.alive():
            raise DeviceGone(self.what)
        try:
            self.cfg.write(offset, value, size)
        except OSError as e:
            raise DeviceGone(self.what) from e


@dataclass
class Endpoint:
    """One endpoint function as found on the bus: where it is and how to reach it.

    ``present`` says whether the very function that was bound still exists (guest: the
    sysfs node with the same inode; a re-added function at the same BDF is a new one).
    """

    kind: str
    bdf: str
    vsid: int
    regs: Regs
    irq: IrqLine | None
    cfg: PciConfig | None
    present: Callable[[], bool] = lambda: True
    close: Callable[[], None] = lambda: None


def read64(mem: Memory, addr: int) -> int:
    """Little-endian 64-bit load (every SMMUv3 structure is little-endian)."""
    return int.from_bytes(mem.read(addr, 8), "little")


def write64(mem: Memory, addr: int, value: int) -> None:
    mem.write(addr, value.to_bytes(8, "little"))


PAGE = 4096


class Allocator:
    """First-fit, page-granular allocator over the reserved window.

    Queues and tables live as long as the agent; NIC rings and buffers come and go with
    ``nic up``/``nic down``, so freed extents are merged with their neighbours and reused
    (a bump allocator would run the 16 MiB window dry after a dozen up/down cycles).
    Every allocation is zeroed: hardware must never see stale descriptors.
    """

    def __init__(self, mem: Memory, base: int, size: int) -> None:
        self.mem = mem
        self.base = base
        self.end = base + size
        #: Free extents (address, bytes), sorted by address, never adjacent.
        self.holes: list[tuple[int, int]] = [(base, size)]
        #: Live allocations: address -> bytes (page-rounded).
        self.blocks: dict[int, int] = {}
        self.lock = threading.Lock()

    def alloc(self, size: int, align: int = PAGE) -> int:
        """``size`` zeroed bytes aligned to ``align`` (at least one page); ENOMEM when exhausted."""
        size = (max(size, 1) + PAGE - 1) & ~(PAGE - 1)
        align = max(align, PAGE)
        with self.lock:
            for i, (hole, length) in enumerate(self.holes):
                addr = (hole + align - 1) & ~(align - 1)
                if addr + size <= hole + length:
                    rest = [(hole, addr - hole)] if addr > hole else []
                    if addr + size < hole + length:
                        rest.append((addr + size, hole + length - addr - size))
                    self.holes[i:i + 1] = rest
                    self.blocks[addr] = size
                    break
            else:
                raise AgentError(errno.ENOMEM, f"reserved memory exhausted ({size:#x} bytes wanted)")
        self.mem.write(addr, bytes(size))
        return addr

    def free(self, addr: int) -> None:
        """Give back what :meth:`alloc` returned at ``addr``; EINVAL for anything else."""
        with self.lock:
            size = self.blocks.pop(addr, None)
            if size is None:
                raise AgentError(errno.EINVAL, f"{addr:#x} is not an allocation of the reserved window")
            i = bisect.bisect(self.holes, (addr, 0))
            if i < len(self.holes) and self.holes[i][0] == addr + size:  # merge the next hole
                size += self.holes.pop(i)[1]
            if i and sum(self.holes[i - 1]) == addr:  # merge into the previous one
                prev, length = self.holes[i - 1]
                self.holes[i - 1] = (prev, length + size)
            else:
                self.holes.insert(i, (addr, size))

    @property
    def used(self) -> int:
        return sum(self.blocks.values())
