"""Bound devices (``device.c``): attach, replace and detach on the RID or a PASID.

Each attachment is an :class:`AttachHandle` ``{hwpt, device, pasid}``: the IOPF core routes
page requests by it and the FAULT queue auto-responds by it. Leaving a fault-capable HWPT
(detach or replace) answers INVALID every group of the *old* handle (reference section 1.6,
the fixed behaviour; upstream scanned the new HWPT's queue).
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

from devmodel.iommufd.driver import IommuDriver
from devmodel.iommufd.hw_pagetable import Hwpt, HwptNested, HwptPaging, paging_alloc
from devmodel.iommufd.iopf import IopfGroup, PageRequest, ResponseCallback
from devmodel.iommufd.objects import IommufdObject, ObjType, fail
from devmodel.iommufd.uapi import IOMMU_NO_PASID

if TYPE_CHECKING:
    from devmodel.iommufd.main import IommufdContext
    from devmodel.iommufd.viommu import Vdevice, Viommu

log = logging.getLogger(__name__)


class AttachHandle:
    """``struct iommufd_attach_handle``: one (hwpt, device, pasid) attachment."""

    def __init__(self, hwpt: Hwpt, device: "Device", pasid: int) -> None:
        self.hwpt = hwpt
        self.device = device
        self.pasid = pasid

    def __repr__(self) -> str:
        return f"<handle dev={self.device.id} pasid={self.pasid:#x} hwpt={self.hwpt.id}>"


class Device(IommufdObject):
    """``struct iommufd_device`` (idev): a device bound to the context.

    ``sid`` is the physical requester/stream ID the host driver programs; ``page_response``
    is the driver's ``page_response`` op (used when a report gives no per-request callback).
    The binder holds one ``users`` reference, so IOMMU_DESTROY on it is EBUSY.
    """

    obj_type = ObjType.DEVICE

    def __init__(self, driver: IommuDriver, name: str = "", sid: int = 0,
                 page_response: ResponseCallback | None = None, max_pasid_log2: int = 20) -> None:
        super().__init__()
        self.driver = driver
        self.name = name
        self.sid = sid
        self.page_response = page_response
        self.max_pasid_log2 = max_pasid_log2
        self.attach: dict[int, AttachHandle] = {}
        self.partial: list[PageRequest] = []
        self.pending: list[IopfGroup] = []
        self.vdev: "Vdevice | None" = None
        self.unbinding = False
        self.priv: dict = {}

    # --- IOPF routing (io-pgfault find_fault_handler) --------------------------------
    def find_fault_handler(self, req: PageRequest) -> AttachHandle | None:
        handle = None
        if req.pasid_valid:
            handle = self.attach.get(req.pasid)
            if handle is None and self.driver.user_pasid_table:
                rid = self.attach.get(IOMMU_NO_PASID)
                if rid is not None and isinstance(rid.hwpt, HwptNested):
                    handle = rid
        else:
            handle = self.attach.get(IOMMU_NO_PASID)
        if handle is None or handle.hwpt.fault is None:
            return None
        return handle

    def nested_viommu(self) -> "tuple[Viommu, int] | None":
        """(vIOMMU, virt_id) when the RID is attached to a vIOMMU-based nested HWPT with a
        vDEVICE (the SMMUv3 "vmaster"), else None: where vEVENTs for this device go."""
        handle = self.attach.get(IOMMU_NO_PASID)
        if handle is None or not isinstance(handle.hwpt, HwptNested) or handle.hwpt.viommu is None:
            return None
        if self.vdev is None or self.vdev.viommu is not handle.hwpt.viommu:
            return None
        return self.vdev.viommu, self.vdev.virt_id

    def destroy(self, ctx: "IommufdContext") -> None:
        for group in list(self.pending):
            group.respond(1)  # device removal: pending groups answered INVALID


def _resolve_pt(ctx: "IommufdContext", device: Device, pt_id: int) -> tuple[Hwpt, bool]:
    """The HWPT for ``pt_id`` (an IOAS gives a new or shared auto-domain); (hwpt, created)."""
    pt = ctx.table.lookup(pt_id)
    if pt.obj_type in (ObjType.HWPT_PAGING, ObjType.HWPT_NESTED):
        return pt, False
    if pt.obj_type is not ObjType.IOAS:
        raise fail(errno.EINVAL, f"cannot attach to a {pt.obj_type.value}")
    for hwpt in pt.hwpts:
        if hwpt.auto_domain and hwpt.driver is device.driver:
            return hwpt, False
    hwpt = paging_alloc(ctx, pt, device.driver, 0, auto_domain=True)
    ctx.table.finalize(hwpt)
    log.info("auto-domain hwpt %d on ioas %d", hwpt.id, pt.id)
    return hwpt, True


def _check_attachable(device: Device, pasid: int, hwpt: Hwpt) -> None:
    if hwpt.driver is not device.driver:
        raise fail(errno.EINVAL, "hwpt belongs to another IOMMU")
    if pasid != IOMMU_NO_PASID:
        if pasid >= (1 << device.max_pasid_log2) or not hwpt.pasid_compat:
            raise fail(errno.EINVAL, f"pasid {pasid:#x} / hwpt not PASID-capable")
    if isinstance(hwpt, HwptNested) and hwpt.viommu is not None:
        if device.vdev is None or device.vdev.viommu is not hwpt.viommu:
            raise fail(errno.ENOENT, "no vDEVICE for this device on the HWPT's vIOMMU")


def change_pt(ctx: "IommufdContext", device: Device, pasid: int, pt_id: int,
              replace: bool) -> int:
    """Attach (``replace=False``) or replace the domain of ``device``/``pasid``; new hwpt id."""
    old = device.attach.get(pasid)
    if replace and old is None:
        raise fail(errno.EINVAL, "replace of an unattached device/pasid")
    if not replace and old is not None:
        raise fail(errno.EBUSY, "already attached")
    hwpt, created = _resolve_pt(ctx, device, pt_id)
    if old is not None and old.hwpt is hwpt:
        return hwpt.id
    try:
        _check_attachable(device, pasid, hwpt)
        device.driver.attach_dev(device, pasid, hwpt)
    except OSError:
        if created:
            ctx.try_destroy(hwpt)
        raise
    handle = AttachHandle(hwpt, device, pasid)
    device.attach[pasid] = handle
    hwpt.users += 1
    log.info("dev %d pasid %#x %s hwpt %d", device.id, pasid, "replaced onto" if old else
             "attached to", hwpt.id)
    if old is not None:
        _release_handle(ctx, old)
    return hwpt.id


def detach(ctx: "IommufdContext", device: Device, pasid: int) -> None:
    """Detach ``device``/``pasid``; its groups on the old FAULT are answered INVALID."""
    handle = device.attach.pop(pasid, None)
    if handle is None:
        raise fail(errno.ENOENT, f"pasid {pasid:#x} not attached")
    device.driver.detach_dev(device, pasid, handle.hwpt)
    log.info("dev %d pasid %#x detached from hwpt %d", device.id, pasid, handle.hwpt.id)
    _release_handle(ctx, handle)


def _release_handle(ctx: "IommufdContext", handle: AttachHandle) -> None:
    hwpt = handle.hwpt
    hwpt.users -= 1
    if hwpt.fault is not None:
        hwpt.fault.auto_respond(handle)
    if isinstance(hwpt, HwptPaging) and hwpt.auto_domain:
        ctx.try_destroy(hwpt)


def unbind(ctx: "IommufdContext", device: Device) -> None:
    """VFIO unbind: detach everything, tombstone the vDEVICE, destroy the idev."""
    device.unbinding = True
    for pasid in sorted(device.attach, reverse=True):
        detach(ctx, device, pasid)
    if device.vdev is not None:
        vdev = device.vdev
        vdev.destroy(ctx)
        ctx.table.tombstone(vdev.id)
        log.info("vdevice %d tombstoned with dev %d", vdev.id, device.id)
    device.users -= 1  # the binder's reference
    ctx.remove(device)
