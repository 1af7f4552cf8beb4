"""Guest glue: find the functions in sysfs, map BARs and reserved RAM, bind devmodel_uirq.

Facts this relies on (reference guest.md): BARs mmap through
``/sys/bus/pci/devices/<BDF>/resourceN`` with or without a driver; the Command register
is writable through the sysfs ``config`` file at offset 4; ``/dev/mem`` maps the
``memmap=``-reserved range (STRICT_DEVMEM only blocks System RAM); MSI-X reaches
userspace only through our devmodel_uirq module.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

from devmodel_agent.agent import Backends
from devmodel_agent.hw import AgentError, Endpoint, Regs64Split

PCI_DEVICES = Path("/sys/bus/pci/devices")
VENDOR = 0x1AF4
VIOMMU_ID, VIOMMU_CLASS = 0x10F1, 0x080600
ENGINE_ID, ENGINE_CLASS = 0x10F2, 0x088000
NIC_ID, NIC_CLASS = 0x10F3, 0x020000
ENDPOINT_IDS = {"engine": (ENGINE_ID, ENGINE_CLASS), "nic": (NIC_ID, NIC_CLASS)}
PCI_RESCAN = Path("/sys/bus/pci/rescan")
_OPENED: list = []  # close functions of every endpoint opened (idempotent)
RESERVED_BASE = 0x2000_0000
RESERVED_SIZE = 16 << 20


def find_function(device: int, cls: int, vendor: int = VENDOR) -> str | None:
    """The first function with this vendor/device/class, as a sysfs BDF name."""
    for dev in sorted(PCI_DEVICES.iterdir()) if PCI_DEVICES.is_dir() else []:
        try:
            v = int((dev / "vendor").read_text(), 16)
            d = int((dev / "device").read_text(), 16)
            c = int((dev / "class").read_text(), 16)
        except (OSError, ValueError):
            continue
        if (v, d, c) == (vendor, device, cls):
            return dev.name
    return None


def stream_id(bdf: str) -> int:
    """Guest StreamID of a function = its BDF (bus << 8 | dev << 3 | fn)."""
    _, bus, rest = bdf.split(":")
    dev, fn = rest.split(".")
    return int(bus, 16) << 8 | int(dev, 16) << 3 | int(fn, 16)


class SysfsConfig:
    """Config space through ``/sys/bus/pci/devices/<BDF>/config`` (pread/pwrite)."""

    def __init__(self, bdf: str) -> None:
        self.fd = os.open(PCI_DEVICES / bdf / "config", os.O_RDWR)

    def read(self, offset: int, size: int) -> int:
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            return (1 << (8 * size)) - 1  # beyond what sysfs exposes: all-ones like a master abort
        return int.from_bytes(data, "little")

    def write(self, offset: int, value: int, size: int) -> None:
        os.pwrite(self.fd, value.to_bytes(size, "little"), offset)

    def close(self) -> None:
        os.close(self.fd)


class BarRegs(Regs64Split):
    """Registers of one memory BAR (32-bit accesses; 64-bit ones split, low half first)."""

    def __init__(self, bdf: str, index: int = 0) -> None:
        from devmodel_mmio import Bar  # guest helper on sys.path through a .pth file
        self.bar = Bar(bdf, index)

    def read32(self, offset: int) -> int:
        return self.bar.read32(offset)

    def write32(self, offset: int, value: int) -> None:
        self.bar.write32(offset, value)

    def close(self) -> None:
        self.bar.close()


class DevMem:
    """The reserved RAM window through ``/dev/mem`` (bounds checked: EFAULT outside)."""

    def __init__(self, base: int = RESERVED_BASE, size: int = RESERVED_SIZE) -> None:
        fd = os.open("/dev/mem", os.O_RDWR | os.O_SYNC)
        try:
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
        finally:
            os.close(fd)
        self.base = base
        self.size = size

    def _off(self, addr: int, n: int) -> int:
        off = addr - self.base
        if n < 0 or off < 0 or off + n > self.size:
            raise AgentError(errno.EFAULT, f"{addr:#x}+{n:#x} outside reserved RAM")
        return off

    def read(self, addr: int, size: int) -> bytes:
        off = self._off(addr, size)
        return self.map[off:off + size]

    def write(self, addr: int, data: bytes) -> None:
        off = self._off(addr, len(data))
        self.map[off:off + len(data)] = data

    def close(self) -> None:
        self.map.close()


class UirqLine:
    """Per-vector MSI-X (or MSI) counts of a function bound to devmodel_uirq.

    MSI is accepted for the hot-pluggable DMA engine variant; x86 without interrupt
    remapping grants it one vector, which then carries every cause (handlers reap all)."""

    def __init__(self, bdf: str) -> None:
        import devmodel_uirq  # guest helper on sys.path through a .pth file
        self.uirq = devmodel_uirq.bind(bdf)
        self.nvec = self.uirq.nvec
        if self.uirq.mode not in ("msix", "msi"):
            raise AgentError(errno.ENOTSUP, f"{bdf}: devmodel_uirq gave {self.uirq.mode}, MSI-X or MSI needed")

    def wait(self, timeout: float | None) -> list[int] | None:
        return self.uirq.wait(timeout)

    def close(self) -> None:
        self.uirq.close()


def _node_id(bdf: str) -> int | None:
    """Identity of the function's sysfs node (a function re-added at the same BDF is new)."""
    try:
        return os.stat(PCI_DEVICES / bdf).st_ino
    except OSError:
        return None


def open_endpoint(kind: str, bdf: str) -> Endpoint:
    """Bind ``bdf`` to devmodel_uirq, map BAR0, open its config space.

    ``present`` compares the sysfs node's inode with the one seen here: the kernel revokes
    BAR mappings of a removed function (SIGBUS on access), and a rescan that brings the
    function back at the same BDF makes a new node the old mapping does not belong to.
    """
    node = _node_id(bdf)
    if node is None:
        raise AgentError(errno.ENODEV, f"no PCI function {bdf}")
    closers = []

    def close() -> None:
        while closers:  # idempotent: a closed fd number may already belong to someone else
            try:
                closers.pop()()
            except (OSError, ValueError):
                pass
    _OPENED.append(close)
    try:
        irq = UirqLine(bdf)  # binding enables the function and allocates MSI-X
        closers.append(irq.close)
        regs = BarRegs(bdf, 0)
        closers.append(regs.close)
        cfg = SysfsConfig(bdf)
        closers.append(cfg.close)
    except BaseException:
        close()
        raise
    return Endpoint(kind, bdf, stream_id(bdf), regs, irq, cfg, present=lambda: _node_id(bdf) == node, close=close)


def discover(kind: str, bdf: str | None = None) -> Endpoint | None:
    """Find and open the endpoint of ``kind`` (engine | nic); None when it is not on the bus."""
    device, cls = ENDPOINT_IDS[kind]
    bdf = bdf or find_function(device, cls)
    return open_endpoint(kind, bdf) if bdf is not None else None


def rescan_bus() -> None:
    """Ask the kernel to enumerate every PCI bus again (brings back sysfs-removed functions)."""
    PCI_RESCAN.write_text("1")


def build_backends(smmu_bdf: str | None = None, engine_bdf: str | None = None,
                   nic_bdf: str | None = None) -> Backends:
    """Find, bind and map the vIOMMU and the endpoints (the DMA engine and NIC are optional)."""
    smmu_bdf = smmu_bdf or find_function(VIOMMU_ID, VIOMMU_CLASS)
    if smmu_bdf is None:
        raise AgentError(errno.ENODEV, f"no vIOMMU ({VENDOR:04x}:{VIOMMU_ID:04x} class {VIOMMU_CLASS:06x})")
    closers = []
    try:
        smmu_irq = UirqLine(smmu_bdf)  # binding enables the function and allocates MSI-X
        closers.append(smmu_irq.close)
        smmu_regs = BarRegs(smmu_bdf, 0)
        closers.append(smmu_regs.close)
        mem = DevMem()
        closers.append(mem.close)
        b = Backends(smmu_regs=smmu_regs, smmu_irq=smmu_irq, mem=mem, reserved_base=RESERVED_BASE,
                     reserved_size=RESERVED_SIZE, smmu_cfg=SysfsConfig(smmu_bdf), discover=discover,
                     rescan_bus=rescan_bus)
        b.engine = discover("engine", engine_bdf)
        b.nic = discover("nic", nic_bdf)
    except BaseException:
        for fn in reversed(closers):
            fn()
        raise

    def close() -> None:
        for ep_close in _OPENED:  # every endpoint ever opened, found again after a rescan too
            ep_close()
        for fn in reversed(closers):
            try:
                fn()
            except OSError:
                pass
    b.close = close
    return b
