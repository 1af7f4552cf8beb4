"""vIOMMU and vDEVICE objects (``viommu.c``): IOMMU_VIOMMU_ALLOC, IOMMU_VDEVICE_ALLOC,
IOMMU_HW_QUEUE_ALLOC (not modelled: EOPNOTSUPP after the generic checks)."""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

from devmodel.iommufd.driver import UserData
from devmodel.iommufd.objects import IommufdObject, ObjType, fail
from devmodel.iommufd.uapi import IOMMU_VIOMMU_TYPE_DEFAULT, U64_MAX

if TYPE_CHECKING:
    from devmodel.iommufd.device import Device
    from devmodel.iommufd.eventq import Veventq
    from devmodel.iommufd.hw_pagetable import HwptPaging
    from devmodel.iommufd.main import IommufdContext

log = logging.getLogger(__name__)


class Viommu(IommufdObject):
    """One guest-visible IOMMU on one physical instance, over a nest-parent HWPT."""

    obj_type = ObjType.VIOMMU

    def __init__(self, driver, vtype: int, hwpt: "HwptPaging") -> None:  # noqa: ANN001
        super().__init__()
        self.driver = driver
        self.type = vtype
        self.hwpt = hwpt
        self.vdevs: dict[int, Vdevice] = {}  # virt_id -> vDEVICE
        self.veventqs: dict[int, "Veventq"] = {}  # type -> queue
        self.priv: dict = {}
        hwpt.users += 1

    def destroy(self, ctx: "IommufdContext") -> None:
        self.driver.viommu_destroy(self)
        self.hwpt.users -= 1


class Vdevice(IommufdObject):
    """A device's guest-visible ID (``virt_id``: the vSID on SMMUv3) on a vIOMMU."""

    obj_type = ObjType.VDEVICE

    def __init__(self, viommu: Viommu, device: "Device", virt_id: int) -> None:
        super().__init__()
        self.viommu = viommu
        self.device = device
        self.virt_id = virt_id
        viommu.users += 1
        device.users += 1
        viommu.vdevs[virt_id] = self
        device.vdev = self

    def destroy(self, ctx: "IommufdContext") -> None:
        self.viommu.vdevs.pop(self.virt_id, None)
        self.viommu.users -= 1
        self.device.vdev = None
        self.device.users -= 1


def viommu_alloc(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    """IOMMU_VIOMMU_ALLOC in the order ``viommu_negative_tests`` checks (section 1.5.4)."""
    if cmd.flags or cmd.type == IOMMU_VIOMMU_TYPE_DEFAULT:
        raise fail(errno.EOPNOTSUPP, "viommu flags/type")
    idev = ctx.table.lookup(cmd.dev_id, ObjType.DEVICE)
    driver = idev.driver
    if cmd.type not in driver.viommu_types:
        raise fail(errno.EOPNOTSUPP, f"viommu type {cmd.type:#x}")
    hwpt = ctx.table.lookup(cmd.hwpt_id, ObjType.HWPT_PAGING)
    if not hwpt.nest_parent or hwpt.driver is not driver:
        raise fail(errno.EINVAL, "hwpt is not a nesting parent")
    viommu = Viommu(driver, cmd.type, hwpt)
    ctx.table.alloc(viommu)
    data = UserData(ctx, cmd.type, cmd.data_len, cmd.data_uptr) if cmd.data_len else None
    try:
        driver.viommu_init(viommu, data)
    except OSError:
        ctx.abort(viommu)
        raise
    ctx.table.finalize(viommu)
    cmd.out_viommu_id = viommu.id
    log.info("viommu %d (type %#x) on hwpt %d", viommu.id, viommu.type, hwpt.id)


def vdevice_alloc(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    """IOMMU_VDEVICE_ALLOC (section 1.5.5)."""
    if cmd.virt_id > U64_MAX:
        raise fail(errno.EINVAL, "virt_id")
    viommu = ctx.table.lookup(cmd.viommu_id, ObjType.VIOMMU)
    idev = ctx.table.lookup(cmd.dev_id, ObjType.DEVICE)
    if idev.driver is not viommu.driver:
        raise fail(errno.EINVAL, "device is behind another IOMMU")
    if idev.unbinding:
        raise fail(errno.ENOENT, "device is going away")
    if idev.vdev is not None:
        raise fail(errno.EEXIST, "device already has a vDEVICE")
    if cmd.virt_id in viommu.vdevs:
        raise fail(errno.EEXIST, f"virt_id {cmd.virt_id:#x} in use")
    vdev = Vdevice(viommu, idev, cmd.virt_id)
    ctx.table.alloc(vdev)
    ctx.table.finalize(vdev)
    cmd.out_vdevice_id = vdev.id
    log.info("vdevice %d: dev %d as virt_id %#x on viommu %d", vdev.id, idev.id, vdev.virt_id,
             viommu.id)


def hw_queue_alloc(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    """IOMMU_HW_QUEUE_ALLOC: no modelled driver has guest-owned hardware queues."""
    if cmd.flags or cmd.type == 0:
        raise fail(errno.EOPNOTSUPP, "hw queue flags/type")
    ctx.table.lookup(cmd.viommu_id, ObjType.VIOMMU)
    raise fail(errno.EOPNOTSUPP, "no hardware queues")
