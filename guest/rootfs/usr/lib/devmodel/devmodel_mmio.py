"""Register access to a PCI BAR from guest userspace, through sysfs ``resourceN`` mmap.

Works whether or not a driver is bound (devmodel_uirq deliberately does not claim BARs,
so IO_STRICT_DEVMEM still allows the mapping). 32-bit accesses go through a memoryview
cast so each is one load or store, as device registers need.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

PCI_DEVICES = Path("/sys/bus/pci/devices")


class Bar:
    """One memory BAR of ``bdf`` mapped read/write."""

    def __init__(self, bdf: str, index: int = 0) -> None:
        path = PCI_DEVICES / bdf / f"resource{index}"
        self.size = path.stat().st_size
        fd = os.open(path, os.O_RDWR | os.O_SYNC)
        try:
            self._map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._u32 = memoryview(self._map).cast("I")

    def read32(self, offset: int) -> int:
        return self._u32[self._index(offset)]

    def write32(self, offset: int, value: int) -> None:
        self._u32[self._index(offset)] = value & 0xFFFF_FFFF

    def _index(self, offset: int) -> int:
        if offset % 4 or not 0 <= offset < self.size:
            raise ValueError(f"bad 32-bit register offset {offset:#x} (BAR size {self.size:#x})")
        return offset // 4

    def close(self) -> None:
        self._u32.release()
        self._map.close()

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
