"""IOAS objects (``ioas.c``/``io_pagetable.c``): IOVA -> user memory mappings.

The IOAS is stage 2 for nested translation: the host glue asks :meth:`Ioas.translate`
for the user (VMM) address behind an IOVA (= guest physical address). Mapping checks that
the user range is backed (the kernel would fail pinning with EFAULT); only the first and
last byte are probed, which is enough for the linear memories the project uses.
"""

from __future__ import annotations

import bisect
import errno
import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from devmodel.iommufd.objects import IommufdObject, ObjType, fail
from devmodel.iommufd.uapi import (
    IOMMU_IOAS_MAP_FIXED_IOVA,
    IOMMU_IOAS_MAP_READABLE,
    IOMMU_IOAS_MAP_WRITEABLE,
    U64_MAX,
)

if TYPE_CHECKING:
    from devmodel.iommufd.hw_pagetable import HwptPaging
    from devmodel.iommufd.main import IommufdContext

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
MAP_FLAGS = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE


@dataclass(order=True)
class Area:
    """One mapping: ``[iova, iova+length)`` -> ``user_va``, with READABLE/WRITEABLE."""

    iova: int
    length: int
    user_va: int
    prot: int

    @property
    def last(self) -> int:
        return self.iova + self.length - 1


class Ioas(IommufdObject):
    obj_type = ObjType.IOAS

    def __init__(self) -> None:
        super().__init__()
        self.areas: list[Area] = []
        self.hwpts: list["HwptPaging"] = []

    def _overlaps(self, iova: int, length: int) -> bool:
        return any(a.iova <= iova + length - 1 and iova <= a.last for a in self.areas)

    def _find_free(self, length: int) -> int:
        iova = PAGE_SIZE  # keep IOVA 0 unused, like a fresh io_pagetable's allocator
        for a in self.areas:
            if iova + length <= a.iova:
                return iova
            iova = max(iova, (a.last + PAGE_SIZE) & ~(PAGE_SIZE - 1))
        if iova + length - 1 > U64_MAX:
            raise fail(errno.ENOSPC, "no free IOVA")
        return iova

    def map(self, user_va: int, length: int, iova: int | None, prot: int) -> int:
        if iova is None:
            iova = self._find_free(length)
        elif self._overlaps(iova, length):
            raise fail(errno.EEXIST, f"iova {iova:#x} already mapped")
        bisect.insort(self.areas, Area(iova, length, user_va, prot))
        log.info("ioas %d: map iova %#x+%#x -> va %#x prot %#x", self.id, iova, length, user_va, prot)
        return iova

    def unmap(self, iova: int, length: int) -> int:
        if iova == 0 and length == U64_MAX:
            gone, self.areas = self.areas, []
        else:
            last = iova + length - 1
            gone = [a for a in self.areas if a.iova <= last and iova <= a.last]
            if any(a.iova < iova or a.last > last for a in gone):
                raise fail(errno.EINVAL, "unmap would split a mapping")
            if not gone:
                raise fail(errno.ENOENT, f"nothing mapped at {iova:#x}")
            self.areas = [a for a in self.areas if a not in gone]
        total = sum(a.length for a in gone)
        log.info("ioas %d: unmapped %#x bytes at %#x", self.id, total, iova)
        return total

    def translate(self, iova: int) -> tuple[int, int] | None:
        """(user_va, prot) for ``iova`` or None when unmapped (a stage-2 fault)."""
        i = bisect.bisect_right(self.areas, Area(iova, U64_MAX, U64_MAX, U64_MAX)) - 1
        if i >= 0 and self.areas[i].iova <= iova <= self.areas[i].last:
            a = self.areas[i]
            return a.user_va + (iova - a.iova), a.prot
        return None


def ioas_alloc(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    if cmd.flags:
        raise fail(errno.EOPNOTSUPP, "ioas flags")
    ioas = Ioas()
    ctx.table.alloc(ioas)
    ctx.table.finalize(ioas)
    cmd.out_ioas_id = ioas.id
    log.info("ioas %d allocated", ioas.id)


def ioas_map(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    if cmd.flags & ~MAP_FLAGS or cmd.__reserved:
        raise fail(errno.EOPNOTSUPP, "map flags")
    ioas = ctx.table.lookup(cmd.ioas_id, ObjType.IOAS)
    if not cmd.length or cmd.length % PAGE_SIZE or cmd.user_va % PAGE_SIZE:
        raise fail(errno.EINVAL, "length/alignment")
    fixed = bool(cmd.flags & IOMMU_IOAS_MAP_FIXED_IOVA)
    if fixed and cmd.iova % PAGE_SIZE:
        raise fail(errno.EINVAL, "iova alignment")
    if cmd.user_va + cmd.length - 1 > U64_MAX or (fixed and cmd.iova + cmd.length - 1 > U64_MAX):
        raise fail(errno.EOVERFLOW, "range wraps")
    ctx.read_user(cmd.user_va, 1)  # pinning: both ends must be backed
    ctx.read_user(cmd.user_va + cmd.length - 1, 1)
    cmd.iova = ioas.map(cmd.user_va, cmd.length, cmd.iova if fixed else None,
                        cmd.flags & (IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE))


def ioas_unmap(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    ioas = ctx.table.lookup(cmd.ioas_id, ObjType.IOAS)
    if cmd.length != U64_MAX and cmd.iova + cmd.length - 1 > U64_MAX:
        raise fail(errno.EOVERFLOW, "range wraps")
    if not cmd.length:
        raise fail(errno.EINVAL, "length 0")
    iova, length = cmd.iova, cmd.length
    cmd.length = ioas.unmap(iova, length)
    notify_unmap(ioas, iova, length)


def notify_unmap(ioas: Ioas, iova: int, length: int) -> None:
    """Tell every driver with a domain on ``ioas`` that ``[iova, +length)`` is gone, as
    ``iopt_unmap_iova`` unmaps each domain and the driver flushes its IOTLB before the
    ioctl returns (a stale stage-2 translation must not outlive the unmap)."""
    drivers = []
    for hwpt in ioas.hwpts:
        if hwpt.driver not in drivers:
            drivers.append(hwpt.driver)
    for driver in drivers:
        driver.ioas_unmapped(ioas, iova, length)


def ioas_iova_ranges(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    """One usable range, the whole 64-bit space (no reserved regions are modelled)."""
    ioas = ctx.table.lookup(cmd.ioas_id, ObjType.IOAS)
    del ioas
    ranges = [(0, U64_MAX)]
    if cmd.num_iovas >= len(ranges):
        ctx.write_user(cmd.allowed_iovas, b"".join(struct.pack("<QQ", s, e) for s, e in ranges))
    too_small = cmd.num_iovas < len(ranges)
    cmd.num_iovas = len(ranges)
    cmd.out_iova_alignment = PAGE_SIZE
    if too_small:
        exc = fail(errno.EMSGSIZE, "allowed_iovas too small")
        exc.copy_back = True  # type: ignore[attr-defined]
        raise exc


def ioas_lookup_only(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    """Commands the model does not implement past the IOAS lookup (ALLOW_IOVAS, COPY...)."""
    ioas_id = getattr(cmd, "ioas_id", None)
    if ioas_id is None:
        ioas_id = getattr(cmd, "dst_ioas_id", 0)
    ctx.table.lookup(ioas_id, ObjType.IOAS)
    raise fail(errno.EOPNOTSUPP, "not modelled")
