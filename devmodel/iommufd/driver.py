"""What the iommufd core asks of an IOMMU driver, and the user-data copy helpers.

A driver object stands for one physical IOMMU instance (``struct iommu_device``) plus its
``iommu_ops``/``iommufd_viommu_ops``. The core never interprets driver data: it hands the
driver a :class:`UserData` or :class:`UserArray` and the driver copies with the kernel's
exact rules (reference section 1.5.2 "driver data helper" and section 4.2).
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

from devmodel.iommufd.objects import fail
from devmodel.iommufd.uapi import end_of, ffi, sizeof, unpack

if TYPE_CHECKING:
    from devmodel.iommufd.device import Device
    from devmodel.iommufd.hw_pagetable import HwptNested, HwptPaging
    from devmodel.iommufd.main import IommufdContext
    from devmodel.iommufd.viommu import Viommu

log = logging.getLogger(__name__)


class UserData:
    """``struct iommu_user_data``: a typed driver blob at a user pointer."""

    def __init__(self, ctx: "IommufdContext", dtype: int, length: int, uptr: int) -> None:
        self.ctx = ctx
        self.type = dtype
        self.len = length
        self.uptr = uptr

    def copy_struct(self, dtype: int, struct: str, min_field: str):
        """``iommu_copy_struct_from_user``: EINVAL type/len, EFAULT pointer; zero-extends."""
        if self.type != dtype:
            raise fail(errno.EINVAL, f"data type {self.type:#x}")
        if self.len < end_of(struct, min_field) or self.len > sizeof(struct):
            raise fail(errno.EINVAL, f"data_len {self.len} for {struct}")
        return unpack(struct, self.ctx.read_user(self.uptr, self.len))

    def copy_back(self, obj, length: int | None = None) -> None:  # noqa: ANN001
        """Write driver output into the user blob (min of user length and struct size)."""
        raw = bytes(ffi.buffer(obj))
        self.ctx.write_user(self.uptr, raw[: min(self.len, len(raw)) if length is None else length])


class UserArray:
    """``struct iommu_user_data_array``: an invalidation request array; ``done`` is the
    number of entries fully handled (written back to ``entry_num``)."""

    def __init__(self, ctx: "IommufdContext", dtype: int, uptr: int, entry_len: int,
                 entry_num: int) -> None:
        self.ctx = ctx
        self.type = dtype
        self.uptr = uptr
        self.entry_len = entry_len
        self.entry_num = entry_num
        self.done = 0

    def copy_entry(self, index: int, dtype: int, struct: str, min_field: str):
        """Per-entry helper: EINVAL for type, short or over-long entry; zero-extends."""
        if self.type != dtype:
            raise fail(errno.EINVAL, f"array type {self.type:#x}")
        if self.entry_len < end_of(struct, min_field) or self.entry_len > sizeof(struct):
            raise fail(errno.EINVAL, f"entry_len {self.entry_len} for {struct}")
        raw = self.ctx.read_user(self.uptr + index * self.entry_len, self.entry_len)
        return unpack(struct, raw)

    def copy_all(self, dtype: int, struct: str) -> list:
        """Full-array helper: EINVAL type/empty; longer entries need a zero tail (E2BIG)."""
        if self.type != dtype:
            raise fail(errno.EINVAL, f"array type {self.type:#x}")
        if self.entry_num == 0:
            raise fail(errno.EINVAL, "empty array")
        size = sizeof(struct)
        out = []
        for i in range(self.entry_num):
            raw = self.ctx.read_user(self.uptr + i * self.entry_len, self.entry_len)
            if len(raw) > size and any(raw[size:]):
                raise fail(errno.E2BIG, f"entry {i} has a non-zero tail")
            out.append(unpack(struct, raw))
        return out


class IommuDriver:
    """Base driver: paging domains only. Subclasses add nesting, vIOMMU and invalidation.

    Attributes the core reads:
    ``user_pasid_table`` (PASID faults fall back to the nested RID domain),
    ``supports_dirty``, ``viommu_types`` (accepted IOMMU_VIOMMU_ALLOC types),
    ``has_nested`` (``domain_alloc_nested`` present), ``hw_info_type``.
    """

    name = "generic"
    user_pasid_table = False
    supports_dirty = False
    has_nested = False
    viommu_types: frozenset[int] = frozenset()
    hw_info_type = 0

    # --- domains ------------------------------------------------------------------
    def alloc_paging(self, hwpt: "HwptPaging") -> None:
        """A stage-2 / paging domain was created."""

    def alloc_nested(self, hwpt: "HwptNested", data: UserData) -> None:
        """Validate and take the user stage-1 data of a nested domain (parent path)."""
        raise fail(errno.EOPNOTSUPP, "no nested domains")

    def nested_invalidate(self, hwpt: "HwptNested", array: UserArray) -> None:
        """``cache_invalidate_user`` of a nested domain; set ``array.done``, raise on error."""
        raise fail(errno.EOPNOTSUPP, "no user invalidation")

    def hwpt_destroy(self, hwpt: "HwptPaging | HwptNested") -> None:
        """A domain is going away."""

    def ioas_unmapped(self, ioas, iova: int, length: int) -> None:  # noqa: ANN001
        """``[iova, +length)`` was unmapped from ``ioas``, which backs at least one of this
        driver's paging domains: invalidate every cached translation of it (the kernel's
        ``iommu_unmap`` + IOTLB sync). ``length`` may be U64_MAX for "everything"."""

    # --- vIOMMU -------------------------------------------------------------------
    def viommu_init(self, viommu: "Viommu", data: UserData | None) -> None:
        """A vIOMMU of a supported type is being created on this instance."""

    def viommu_alloc_nested(self, hwpt: "HwptNested", data: UserData) -> None:
        raise fail(errno.EOPNOTSUPP, "no vIOMMU nested domains")

    def viommu_invalidate(self, viommu: "Viommu", array: UserArray) -> None:
        raise fail(errno.EOPNOTSUPP, "no vIOMMU invalidation")

    def viommu_destroy(self, viommu: "Viommu") -> None:
        """The vIOMMU is going away."""

    # --- devices ------------------------------------------------------------------
    def attach_dev(self, device: "Device", pasid: int, hwpt: "HwptPaging | HwptNested") -> None:
        """Program the hardware for ``device``/``pasid`` to translate through ``hwpt``
        (raise OSError to refuse)."""

    def detach_dev(self, device: "Device", pasid: int, hwpt: "HwptPaging | HwptNested") -> None:
        """``device``/``pasid`` no longer translates through ``hwpt`` (blocked)."""

    def hw_info(self, device: "Device") -> bytes:
        """IOMMU_GET_HW_INFO payload (e.g. ``struct iommu_hw_info_arm_smmuv3``)."""
        return b""
