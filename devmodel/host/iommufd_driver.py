"""The SMMUv3 IommuDriver iommufd calls into, wired to the physical SMMU.

:class:`HostSmmuv3Driver` is the iommufd SMMUv3 driver (vSMMU, nested STE validation,
guest command conversion, vEVENT forwarding all come from
:class:`devmodel.iommufd.arm_smmuv3.Smmuv3Driver`) with its hardware hooks implemented by
:class:`devmodel.host.arm_smmu_v3.ArmSmmuV3`:

* paging HWPTs and vIOMMUs get a VMID whose stage 2 is their IOAS;
* attach installs the physical STE (stage 2 for a paging HWPT, nested for a nested HWPT
  with the guest's stage-1 fields); detach installs the blocked STE;
* converted guest invalidations (vSID -> SID, VMID forced) go to the physical CMDQ in
  batches ending with CMD_SYNC (iommufd.md section 4.3).
"""

from __future__ import annotations

import errno
import logging

from devmodel.host.arm_smmu_v3 import ArmSmmuV3
from devmodel.iommufd.arm_smmuv3 import Smmuv3Driver
from devmodel.iommufd.device import Device
from devmodel.iommufd.driver import UserData
from devmodel.iommufd.hw_pagetable import Hwpt, HwptNested, HwptPaging
from devmodel.iommufd.objects import fail
from devmodel.iommufd.uapi import IOMMU_NO_PASID
from devmodel.iommufd.viommu import Viommu

log = logging.getLogger(__name__)


class HostSmmuv3Driver(Smmuv3Driver):
    """iommufd's view of the physical SMMUv3 instance driven by ``hw``."""

    def __init__(self, hw: ArmSmmuV3) -> None:
        super().__init__(idr=hw.idr, iidr=hw.iidr, aidr=hw.aidr,
                         on_commands=lambda viommu, cmds: hw.issue_user_commands(cmds))
        self.hw = hw

    # --- domains ------------------------------------------------------------------
    def alloc_paging(self, hwpt: HwptPaging) -> None:
        hwpt.priv["vmid"] = self.hw.alloc_vmid(hwpt.ioas)

    def ioas_unmapped(self, ioas, iova: int, length: int) -> None:  # noqa: ANN001
        """IOMMU_IOAS_UNMAP: every VMID whose stage 2 is this IOAS (paging HWPTs and
        vSMMUs on a parent over it) drops its cached translations of both stages, as
        Linux flushes a nesting parent's S2 range and the nested S1 entries built on it."""
        n = self.hw.flush_ioas(ioas)
        log.info("ioas %d: unmap %#x+%#x flushed %d VMIDs", ioas.id, iova, length, n)

    def hwpt_destroy(self, hwpt: Hwpt) -> None:
        vmid = hwpt.priv.pop("vmid", None)
        if vmid is not None:
            self.hw.free_vmid(vmid)

    # --- vIOMMU -------------------------------------------------------------------
    def viommu_init(self, viommu: Viommu, data: UserData | None) -> None:
        """The vSMMU's VMID names its stage 2 (the parent's IOAS); guest TLBIs are forced
        to it by the command conversion, so it must be the S2VMID of nested STEs."""
        viommu.priv["vmid"] = self.hw.alloc_vmid(viommu.hwpt.ioas)

    def viommu_destroy(self, viommu: Viommu) -> None:
        vmid = viommu.priv.pop("vmid", None)
        if vmid is not None:
            self.hw.free_vmid(vmid)

    # --- devices ------------------------------------------------------------------
    def attach_dev(self, device: Device, pasid: int, hwpt) -> None:  # noqa: ANN001
        if pasid != IOMMU_NO_PASID:
            # PASIDs of a nested master live in the guest's CD table (user_pasid_table);
            # host-owned stage-1 CD tables are not modelled.
            raise fail(errno.EOPNOTSUPP, "PASID attach on SMMUv3 is not modelled")
        master = self.hw.add_master(device.sid)
        if isinstance(hwpt, HwptNested):
            ste0, ste1 = hwpt.priv["ste"]
            vmid = hwpt.viommu.priv["vmid"] if hwpt.viommu is not None else hwpt.parent.priv["vmid"]
            self.hw.install_nested(device.sid, ste0, ste1, vmid,
                                   enable_ats=hwpt.priv.get("enable_ats", False))
        elif isinstance(hwpt, HwptPaging):
            self.hw.install_s2(device.sid, hwpt.priv["vmid"])
        else:
            raise fail(errno.EINVAL, f"cannot attach to {hwpt!r}")
        master.device = device
        log.info("dev %d (sid %#x) attached to hwpt %d", device.id, device.sid, hwpt.id)

    def detach_dev(self, device: Device, pasid: int, hwpt) -> None:  # noqa: ANN001
        if pasid != IOMMU_NO_PASID:
            return
        self.hw.block(device.sid)
        log.info("dev %d (sid %#x) detached from hwpt %d: blocked", device.id, device.sid, hwpt.id)
