"""PCI framework benchmark: the cost the model adds to each trapped access.

Calls the :class:`~vfio_user.device.VfioUserDevice` methods of ``testdev`` directly (no
socket), so the numbers are the model's own share of a vfio-user round trip (about 25 µs
through QEMU per the project's reference notes). Metrics, each for about one second:

- ``pci-config-read-4b``: 4-byte config reads;
- ``pci-config-write-command``: Command register writes (masks + side-effect checks);
- ``pci-bar0-register-read``: testdev ID register through the BAR dispatch;
- ``pci-msix-notify``: MSI-X sends that signal a real eventfd.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from devmodel.devices.testdev import Reg, TestDevice
from devmodel.memory import ByteMemory
from devmodel.pci import regs
from vfio_user.device import PciIrq, PciRegion

DURATION = 1.0


class _Ctx:
    """Minimal context: one MSI-X eventfd, drained as the benchmark goes."""

    def __init__(self) -> None:
        self.dma = ByteMemory(0x1000)
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def trigger_irq(self, index: int, subindex: int = 0) -> bool:
        os.eventfd_write(self.fd, 1)
        return True

    def call_soon(self, fn: Callable[[], None]) -> None:
        fn()

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        pass

    def remove_reader(self, fd: int) -> None:
        pass


def rate(fn: Callable[[], object]) -> float:
    """Calls per second of ``fn`` over about :data:`DURATION` seconds."""
    n, start = 0, time.perf_counter()
    deadline = start + DURATION
    while True:
        for _ in range(1000):
            fn()
        n += 1000
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def main() -> None:
    dev = TestDevice()
    ctx = _Ctx()
    dev.attach(ctx)
    cmd = (regs.Command.MEMORY | regs.Command.MASTER).to_bytes(2, "little")
    dev.region_write(PciRegion.CONFIG, regs.PCI_COMMAND, cmd)
    dev.region_write(PciRegion.CONFIG, dev.msix.offset + regs.PCI_MSIX_FLAGS,
                     regs.PCI_MSIX_FLAGS_ENABLE.to_bytes(2, "little"))
    print(f"pci-config-read-4b: {rate(lambda: dev.region_read(PciRegion.CONFIG, 0, 4)):.0f} ops/s")
    print(f"pci-config-write-command: {rate(lambda: dev.region_write(PciRegion.CONFIG, regs.PCI_COMMAND, cmd)):.0f} ops/s")
    print(f"pci-bar0-register-read: {rate(lambda: dev.region_read(PciRegion.BAR0, Reg.ID, 4)):.0f} ops/s")
    msix = rate(lambda: dev.msix.notify(0))
    os.eventfd_read(ctx.fd)
    print(f"pci-msix-notify: {msix:.0f} ops/s")
    assert dev.irq_info(PciIrq.MSIX).count > 0
    os.close(ctx.fd)
    dev.close()


if __name__ == "__main__":
    main()
