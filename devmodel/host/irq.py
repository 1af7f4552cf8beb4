"""The host's interrupt side: an MSI doorbell the SMMU writes, and handler dispatch.

With IDR0.MSI=1 the driver programs each source's IRQ_CFG0/1/2 with the doorbell address
and a vector number, so an interrupt is an ordinary 32-bit memory write by the SMMU
(reference smmuv3-pcie.md section 1.7), exactly what a GIC ITS doorbell sees. Without MSI
the SMMU's wired outputs call :meth:`IrqDispatcher.raise_irq` directly.

Two modes: *immediate* runs the handler inside the write (deterministic, for tests and
simple loops); *threaded* only marks the vector pending and raises an eventfd, and the
owner's event loop calls :meth:`IrqDispatcher.service` (Linux's threaded IRQ handlers).
A vector raised while its handler runs is re-run once the handler returns.
"""

from __future__ import annotations

import enum
import logging
import os
from typing import Callable

from devmodel.memory import BusError

log = logging.getLogger(__name__)

MSI_DATA_SIZE = 4
DOORBELL_SIZE = 0x1000


class Vector(enum.IntEnum):
    """MSI data values the host gives each SMMU interrupt source."""

    EVTQ = 0
    PRIQ = 1
    GERROR = 2


class IrqDispatcher:
    """Vectors -> handlers, immediate or deferred to :meth:`service`."""

    def __init__(self, threaded: bool = False) -> None:
        self.threaded = threaded
        self.handlers: dict[int, Callable[[], None]] = {}
        self.pending: set[int] = set()
        self.running: set[int] = set()
        self.counts: dict[int, int] = {}
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if threaded else -1

    def raise_irq(self, vector: int) -> None:
        """One interrupt message for ``vector``."""
        self.counts[vector] = self.counts.get(vector, 0) + 1
        if vector not in self.handlers:
            log.warning("irq: spurious vector %d", vector)
            return
        if self.threaded or vector in self.running:
            if not self.pending and self.fd >= 0:
                os.eventfd_write(self.fd, 1)
            self.pending.add(vector)
            log.debug("irq: vector %s pending", _name(vector))
            return
        self._run(vector)

    def _run(self, vector: int) -> None:
        self.running.add(vector)
        try:
            self.handlers[vector]()
            while vector in self.pending and not self.threaded:
                self.pending.discard(vector)
                self.handlers[vector]()
        finally:
            self.running.discard(vector)

    def service(self) -> int:
        """Run every pending handler (the threaded half); returns how many ran."""
        if self.fd >= 0:
            try:
                os.eventfd_read(self.fd)
            except BlockingIOError:
                pass
        ran = 0
        while self.pending:
            vector = min(self.pending)
            self.pending.discard(vector)
            log.debug("irq: servicing vector %s", _name(vector))
            self.running.add(vector)
            try:
                self.handlers[vector]()
            finally:
                self.running.discard(vector)
            ran += 1
        return ran

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _name(vector: int) -> str:
    try:
        return Vector(vector).name
    except ValueError:
        return str(vector)


class MsiDoorbell:
    """The doorbell page: a 4-byte write at its base delivers the written vector."""

    def __init__(self, base: int, deliver: Callable[[int], None]) -> None:
        self.base = base
        self.deliver = deliver

    def read(self, addr: int, size: int) -> bytes:
        if not self.base <= addr <= self.base + DOORBELL_SIZE - size:
            raise BusError(addr, size, False, "outside the doorbell")
        return bytes(size)

    def write(self, addr: int, data: bytes) -> None:
        if addr != self.base or len(data) != MSI_DATA_SIZE:
            raise BusError(addr, len(data), True, "MSI doorbell takes one 32-bit write at its base")
        self.deliver(int.from_bytes(data, "little"))
