"""HWPT objects (``hw_pagetable.c``): paging (stage 2 / normal) and nested (user stage 1),
IOMMU_HWPT_ALLOC and IOMMU_HWPT_INVALIDATE."""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

from devmodel.iommufd.driver import IommuDriver, UserArray, UserData
from devmodel.iommufd.objects import IommufdObject, ObjType, fail
from devmodel.iommufd.uapi import (
    IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
    IOMMU_HWPT_ALLOC_NEST_PARENT,
    IOMMU_HWPT_ALLOC_PASID,
    IOMMU_HWPT_DATA_NONE,
    IOMMU_HWPT_FAULT_ID_VALID,
)

if TYPE_CHECKING:
    from devmodel.iommufd.eventq import Fault
    from devmodel.iommufd.ioas import Ioas
    from devmodel.iommufd.main import IommufdContext
    from devmodel.iommufd.viommu import Viommu

log = logging.getLogger(__name__)

PAGING_FLAGS = (IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_DIRTY_TRACKING
                | IOMMU_HWPT_FAULT_ID_VALID | IOMMU_HWPT_ALLOC_PASID)
NESTED_FLAGS = IOMMU_HWPT_FAULT_ID_VALID | IOMMU_HWPT_ALLOC_PASID


class Hwpt(IommufdObject):
    """Common HWPT state: driver, optional FAULT, PASID compatibility, driver private."""

    def __init__(self, driver: IommuDriver, flags: int) -> None:
        super().__init__()
        self.driver = driver
        self.flags = flags
        self.pasid_compat = bool(flags & IOMMU_HWPT_ALLOC_PASID)
        self.fault: "Fault | None" = None
        self.priv: dict = {}

    def set_fault(self, fault: "Fault") -> None:
        self.fault = fault
        fault.users += 1

    def destroy(self, ctx: "IommufdContext") -> None:
        self.driver.hwpt_destroy(self)
        if self.fault is not None:
            self.fault.users -= 1
            self.fault = None


class HwptPaging(Hwpt):
    """A paging domain on an IOAS (stage 2 when ``nest_parent``)."""

    obj_type = ObjType.HWPT_PAGING

    def __init__(self, ioas: "Ioas", driver: IommuDriver, flags: int, auto_domain: bool) -> None:
        super().__init__(driver, flags)
        self.ioas = ioas
        self.auto_domain = auto_domain
        self.nest_parent = bool(flags & IOMMU_HWPT_ALLOC_NEST_PARENT)
        ioas.users += 1
        ioas.hwpts.append(self)

    def destroy(self, ctx: "IommufdContext") -> None:
        super().destroy(ctx)
        self.ioas.users -= 1
        self.ioas.hwpts.remove(self)


class HwptNested(Hwpt):
    """A user-managed stage 1 on a nest parent (``parent``) or on a vIOMMU (``viommu``)."""

    obj_type = ObjType.HWPT_NESTED

    def __init__(self, driver: IommuDriver, flags: int, parent: HwptPaging | None,
                 viommu: "Viommu | None") -> None:
        super().__init__(driver, flags)
        self.parent = parent if parent is not None else viommu.hwpt  # type: ignore[union-attr]
        self.viommu = viommu
        self.holder: IommufdObject = viommu if viommu is not None else parent  # type: ignore[assignment]
        self.holder.users += 1

    def destroy(self, ctx: "IommufdContext") -> None:
        super().destroy(ctx)
        self.holder.users -= 1


def paging_alloc(ctx: "IommufdContext", ioas: "Ioas", driver: IommuDriver, flags: int,
                 auto_domain: bool) -> HwptPaging:
    """``iommufd_hwpt_paging_alloc`` (flag checks, then the driver)."""
    if flags & ~PAGING_FLAGS:
        raise fail(errno.EOPNOTSUPP, f"paging flags {flags:#x}")
    if flags & IOMMU_HWPT_ALLOC_DIRTY_TRACKING and not driver.supports_dirty:
        raise fail(errno.EOPNOTSUPP, "no dirty tracking")
    if flags & IOMMU_HWPT_FAULT_ID_VALID and flags & IOMMU_HWPT_ALLOC_NEST_PARENT:
        raise fail(errno.EOPNOTSUPP, "a nesting parent cannot take faults")
    hwpt = HwptPaging(ioas, driver, flags, auto_domain)
    ctx.table.alloc(hwpt)
    try:
        driver.alloc_paging(hwpt)
    except OSError:
        ctx.abort(hwpt)
        raise
    return hwpt


def hwpt_alloc(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    """IOMMU_HWPT_ALLOC in the kernel's validation order (section 1.5.2)."""
    if cmd.__reserved:
        raise fail(errno.EOPNOTSUPP, "__reserved")
    if (cmd.data_type == IOMMU_HWPT_DATA_NONE) != (cmd.data_len == 0):
        raise fail(errno.EINVAL, "data_type/data_len mismatch")
    idev = ctx.table.lookup(cmd.dev_id, ObjType.DEVICE)
    try:
        pt = ctx.table.lookup(cmd.pt_id)
    except OSError:
        raise fail(errno.EINVAL, f"pt_id {cmd.pt_id}") from None
    data = UserData(ctx, cmd.data_type, cmd.data_len, cmd.data_uptr)
    flags = cmd.flags
    if pt.obj_type is ObjType.IOAS:
        if cmd.data_len:
            raise fail(errno.EOPNOTSUPP, "paging domains take no driver data")
        hwpt: Hwpt = paging_alloc(ctx, pt, idev.driver, flags, auto_domain=False)
    elif pt.obj_type is ObjType.HWPT_PAGING:
        hwpt = _nested_from_parent(ctx, idev, pt, flags, data)
    elif pt.obj_type is ObjType.VIOMMU:
        hwpt = _nested_from_viommu(ctx, idev, pt, flags, data)
    else:
        raise fail(errno.EINVAL, f"pt_id {cmd.pt_id} is a {pt.obj_type.value}")
    if flags & IOMMU_HWPT_FAULT_ID_VALID:
        try:
            fault = ctx.table.lookup(cmd.fault_id, ObjType.FAULT)
        except OSError:
            ctx.abort(hwpt)
            raise
        hwpt.set_fault(fault)
    ctx.table.finalize(hwpt)
    cmd.out_hwpt_id = hwpt.id
    log.info("hwpt %d allocated (%s, flags %#x) on pt %d", hwpt.id, hwpt.obj_type.value, flags,
             cmd.pt_id)


def _nested_from_parent(ctx: "IommufdContext", idev, parent: HwptPaging, flags: int,  # noqa: ANN001
                        data: UserData) -> HwptNested:
    driver = idev.driver
    if flags & ~NESTED_FLAGS or not data.len or not driver.has_nested:
        raise fail(errno.EOPNOTSUPP, "nested flags/data/driver")
    if parent.auto_domain or not parent.nest_parent or parent.driver is not driver:
        raise fail(errno.EINVAL, "parent is not a nesting parent of this driver")
    hwpt = HwptNested(driver, flags, parent, None)
    ctx.table.alloc(hwpt)
    try:
        driver.alloc_nested(hwpt, data)
    except OSError:
        ctx.abort(hwpt)
        raise
    return hwpt


def _nested_from_viommu(ctx: "IommufdContext", idev, viommu: "Viommu", flags: int,  # noqa: ANN001
                        data: UserData) -> HwptNested:
    if idev.driver is not viommu.driver:
        raise fail(errno.EINVAL, "device is behind another IOMMU")
    if flags & ~NESTED_FLAGS:
        raise fail(errno.EOPNOTSUPP, f"nested flags {flags:#x}")
    hwpt = HwptNested(viommu.driver, flags, None, viommu)
    ctx.table.alloc(hwpt)
    try:
        viommu.driver.viommu_alloc_nested(hwpt, data)
    except OSError:
        ctx.abort(hwpt)
        raise
    return hwpt


def hwpt_invalidate(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    """IOMMU_HWPT_INVALIDATE (section 4.1): ``entry_num`` is written back even on error."""
    if cmd.__reserved:
        raise fail(errno.EOPNOTSUPP, "__reserved")
    array = UserArray(ctx, cmd.data_type, cmd.data_uptr, cmd.entry_len, cmd.entry_num)
    try:
        if cmd.entry_num and (not cmd.data_uptr or not cmd.entry_len):
            raise fail(errno.EINVAL, "entries without array or entry_len")
        target = ctx.table.lookup(cmd.hwpt_id)
        if target.obj_type is ObjType.HWPT_NESTED:
            target.driver.nested_invalidate(target, array)
        elif target.obj_type is ObjType.VIOMMU:
            target.driver.viommu_invalidate(target, array)
        else:
            raise fail(errno.EINVAL, f"cannot invalidate a {target.obj_type.value}")
    except OSError as exc:
        cmd.entry_num = array.done
        exc.copy_back = True  # type: ignore[attr-defined]
        log.info("invalidate on %d: %s after %d entries", cmd.hwpt_id, exc.strerror, array.done)
        raise
    cmd.entry_num = array.done
