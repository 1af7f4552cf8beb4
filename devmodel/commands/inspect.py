"""``devmodel inspect SOCKET``: connect to a vfio-user server and describe the device.

Prints what ``lspci -vv`` would show for the function (ids, class, BARs with sizes, the
standard and extended capability lists), then the vfio-user view: regions with flags and
sparse-mmap areas, and IRQ indexes. Everything is read through the protocol, so it also
checks a server from the outside.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
from typing import TextIO

from vfio_user.client import Client, VfioUserError
from vfio_user.device import (
    VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_INFO_NORESIZE,
    VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
    PciIrq,
    PciRegion,
)

# PCI config space offsets (PCI Local Bus spec, type 0 header).
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_PIN = 0x3D
PCI_STATUS_CAP_LIST = 0x10
PCI_CFG_SPACE_SIZE = 0x100
PCI_CFG_SPACE_EXP_SIZE = 0x1000

CAP_NAMES = {
    0x01: "Power Management", 0x05: "MSI", 0x09: "Vendor Specific", 0x10: "Express",
    0x11: "MSI-X", 0x12: "SATA", 0x13: "Advanced Features",
}
EXT_CAP_NAMES = {
    0x0001: "Advanced Error Reporting", 0x0002: "Virtual Channel", 0x0003: "Device Serial Number",
    0x000B: "Vendor Specific", 0x000D: "Access Control Services",
    0x000E: "Alternative Routing-ID Interpretation", 0x000F: "Address Translation Service (ATS)",
    0x0010: "Single Root I/O Virtualization (SR-IOV)", 0x0013: "Page Request Interface (PRI)",
    0x0015: "Resizable BAR", 0x0017: "TPH Requester", 0x0018: "Latency Tolerance Reporting",
    0x0019: "Secondary PCI Express", 0x001B: "Process Address Space ID (PASID)",
    0x001E: "L1 PM Substates", 0x0023: "Designated Vendor-Specific",
}
EXPRESS_TYPES = {0: "Endpoint", 1: "Legacy Endpoint", 4: "Root Port", 5: "Upstream Port",
                 6: "Downstream Port", 9: "Root Complex Integrated Endpoint",
                 10: "Root Complex Event Collector"}


def _u8(c: bytes, off: int) -> int:
    return c[off] if off < len(c) else 0


def _u16(c: bytes, off: int) -> int:
    return struct.unpack_from("<H", c, off)[0] if off + 2 <= len(c) else 0


def _u32(c: bytes, off: int) -> int:
    return struct.unpack_from("<I", c, off)[0] if off + 4 <= len(c) else 0


def _size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _flags(value: int, names: dict[int, str]) -> str:
    return ",".join(name for bit, name in names.items() if value & bit) or "-"


def describe_caps(cfg: bytes, out: TextIO) -> None:
    """Walk the standard list from 0x34 and the extended list from 0x100 (loop-safe)."""
    if _u16(cfg, PCI_STATUS) & PCI_STATUS_CAP_LIST:
        seen: set[int] = set()
        ptr = _u8(cfg, PCI_CAPABILITY_LIST) & ~3
        while ptr and ptr not in seen and ptr + 2 <= min(len(cfg), PCI_CFG_SPACE_SIZE):
            seen.add(ptr)
            cap_id = _u8(cfg, ptr)
            extra = ""
            if cap_id == 0x10:
                ptype = (_u16(cfg, ptr + 2) >> 4) & 0xF
                extra = f" {EXPRESS_TYPES.get(ptype, f'type {ptype}')}"
            elif cap_id == 0x11:
                ctl = _u16(cfg, ptr + 2)
                table, pba = _u32(cfg, ptr + 4), _u32(cfg, ptr + 8)
                extra = (f" Enable{'+' if ctl & 0x8000 else '-'} Count={(ctl & 0x7FF) + 1} "
                         f"Masked{'+' if ctl & 0x4000 else '-'}\n"
                         f"\t\tVector table: BAR={table & 7} offset={table & ~7:08x}\n"
                         f"\t\tPBA: BAR={pba & 7} offset={pba & ~7:08x}")
            elif cap_id == 0x05:
                ctl = _u16(cfg, ptr + 2)
                extra = f" Enable{'+' if ctl & 1 else '-'} Count={1 << ((ctl >> 4) & 7)}/{1 << ((ctl >> 1) & 7)}"
            out.write(f"\tCapabilities: [{ptr:x}] {CAP_NAMES.get(cap_id, f'#{cap_id:02x}')}{extra}\n")
            ptr = _u8(cfg, ptr + 1) & ~3
    if len(cfg) >= PCI_CFG_SPACE_EXP_SIZE:
        seen = set()
        ptr = PCI_CFG_SPACE_SIZE
        while ptr and ptr not in seen and PCI_CFG_SPACE_SIZE <= ptr <= len(cfg) - 4:
            seen.add(ptr)
            hdr = _u32(cfg, ptr)
            if hdr in (0, 0xFFFFFFFF):
                break
            cap_id, ver = hdr & 0xFFFF, (hdr >> 16) & 0xF
            out.write(f"\tCapabilities: [{ptr:x} v{ver}] {EXT_CAP_NAMES.get(cap_id, f'Extended #{cap_id:04x}')}\n")
            ptr = (hdr >> 20) & 0xFFC


def describe(client: Client, out: TextIO) -> None:
    """Print the lspci-like view and the vfio-user regions and IRQs."""
    info = client.device_info()
    regions = {i: client.region_info(i) for i in range(info.num_regions)}
    cfg_size = min(regions.get(PciRegion.CONFIG).size if PciRegion.CONFIG in regions else 0,
                   PCI_CFG_SPACE_EXP_SIZE)
    cfg = client.region_read(PciRegion.CONFIG, 0, cfg_size) if cfg_size else b""
    cls = _u32(cfg, PCI_CLASS_PROG - 1) >> 8 if cfg else 0
    out.write(f"{client.path}: vendor {_u16(cfg, PCI_VENDOR_ID):04x} device {_u16(cfg, PCI_DEVICE_ID):04x} "
              f"class {cls:06x} (rev {_u8(cfg, PCI_REVISION_ID):02x})\n")
    out.write(f"\tSubsystem: {_u16(cfg, PCI_SUBSYSTEM_VENDOR_ID):04x}:{_u16(cfg, PCI_SUBSYSTEM_ID):04x}\n")
    out.write(f"\tControl: {_u16(cfg, PCI_COMMAND):04x} Status: {_u16(cfg, PCI_STATUS):04x}\n")
    pin = _u8(cfg, PCI_INTERRUPT_PIN)
    out.write(f"\tInterrupt: pin {'ABCD'[pin - 1] if 1 <= pin <= 4 else '-'}\n")
    for bar in range(6):
        r = regions.get(bar)
        if r is None or r.size == 0:
            continue
        raw = _u32(cfg, PCI_BASE_ADDRESS_0 + 4 * bar)
        kind = "I/O ports" if raw & 1 else f"Memory ({'64' if (raw >> 1) & 3 == 2 else '32'}-bit, " \
                                          f"{'' if raw & 8 else 'non-'}prefetchable)"
        out.write(f"\tRegion {bar}: {kind} [size={_size(r.size)}]\n")
    describe_caps(cfg, out)
    out.write(f"\tvfio-user: flags={info.flags:#x} regions={info.num_regions} irqs={info.num_irqs}\n")
    rflags = {VFIO_REGION_INFO_FLAG_READ: "read", VFIO_REGION_INFO_FLAG_WRITE: "write",
              VFIO_REGION_INFO_FLAG_MMAP: "mmap", VFIO_REGION_INFO_FLAG_CAPS: "caps"}
    for i, r in regions.items():
        for fd in r.fds:
            os.close(fd)
        if r.size == 0:
            continue
        name = PciRegion(i).name if i < len(PciRegion) else f"region{i}"
        out.write(f"\tRegion {name}: size={r.size:#x} flags={_flags(r.flags, rflags)} offset={r.offset:#x}\n")
        for off, size in r.sparse:
            out.write(f"\t\tsparse mmap: [{off:#x}, {off + size:#x})\n")
    iflags = {VFIO_IRQ_INFO_EVENTFD: "eventfd", VFIO_IRQ_INFO_MASKABLE: "maskable",
              VFIO_IRQ_INFO_AUTOMASKED: "automasked", VFIO_IRQ_INFO_NORESIZE: "noresize"}
    for i in range(info.num_irqs):
        irq = client.irq_info(i)
        name = PciIrq(i).name if i < len(PciIrq) else f"irq{i}"
        out.write(f"\tIRQ {name}: count={irq.count} flags={_flags(irq.flags, iflags)}\n")


def run(args: argparse.Namespace) -> int:
    try:
        with Client(args.socket, timeout=args.timeout) as client:
            client.negotiate()
            describe(client, sys.stdout)
    except (OSError, TimeoutError, ConnectionError) as exc:
        if isinstance(exc, VfioUserError):
            print(f"inspect: server error: {exc}", file=sys.stderr)
        else:
            print(f"inspect: {args.socket}: {exc}", file=sys.stderr)
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="describe a vfio-user device (like lspci -vv)")
    p.add_argument("socket", help="the device's vfio-user UNIX socket")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each reply")
    p.set_defaults(func=run)
