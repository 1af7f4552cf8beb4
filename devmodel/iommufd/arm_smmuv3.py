"""The SMMUv3 driver's iommufd side (``arm-smmu-v3-iommufd.c``): vSMMU, nested STEs,
vIOMMU invalidation (guest CMDQ commands -> host commands) and vEVENT forwarding.

The host glue (devmodel/host) plugs its hardware access in through callbacks:
``on_commands(viommu, [(cmd0, cmd1), ...])`` issues converted commands to the physical
CMDQ (followed by a sync), ``on_attach``/``on_detach`` install or clear the physical STE.
"""

from __future__ import annotations

import errno
import logging
import struct
from typing import TYPE_CHECKING, Callable

from devmodel.iommufd.driver import IommuDriver, UserArray, UserData
from devmodel.iommufd.eventq import viommu_report_event
from devmodel.iommufd.objects import fail
from devmodel.iommufd.uapi import (
    IOMMU_HWPT_DATA_ARM_SMMUV3,
    IOMMU_VEVENTQ_TYPE_ARM_SMMUV3,
    IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
    IOMMU_VIOMMU_TYPE_ARM_SMMUV3,
    new,
    pack,
)

if TYPE_CHECKING:
    from devmodel.iommufd.device import Device
    from devmodel.iommufd.hw_pagetable import HwptNested
    from devmodel.iommufd.viommu import Viommu

log = logging.getLogger(__name__)

IOMMU_HW_INFO_TYPE_ARM_SMMUV3 = 2

# CMDQ opcodes (cmd[0] bits [7:0]) a guest may pass through.
CMDQ_OP_CFGI_CD = 0x05
CMDQ_OP_CFGI_CD_ALL = 0x06
CMDQ_OP_TLBI_NH_ALL = 0x10
CMDQ_OP_TLBI_NH_ASID = 0x11
CMDQ_OP_TLBI_NH_VA = 0x12
CMDQ_OP_TLBI_NH_VAA = 0x13
CMDQ_OP_TLBI_NSNH_ALL = 0x30
CMDQ_OP_ATC_INV = 0x40
CMD0_OPCODE_MASK = 0xFF
CMD0_VMID_SHIFT, CMD0_VMID_MASK = 32, 0xFFFF  # TLBI_NH_*: VMID at [47:32]
CMD0_SID_SHIFT, CMD0_SID_MASK = 32, 0xFFFFFFFF  # CFGI_CD*, ATC_INV: StreamID at [63:32]
VMID_OPS = {CMDQ_OP_TLBI_NH_ALL, CMDQ_OP_TLBI_NH_ASID, CMDQ_OP_TLBI_NH_VA, CMDQ_OP_TLBI_NH_VAA}
SID_OPS = {CMDQ_OP_CFGI_CD, CMDQ_OP_CFGI_CD_ALL, CMDQ_OP_ATC_INV}

# STE fields a nested (guest) STE may set.
STE0_V = 1 << 0
STE0_CFG_SHIFT, STE0_CFG_MASK = 1, 0x7
STE0_CFG_ABORT, STE0_CFG_BYPASS, STE0_CFG_S1_TRANS = 0b000, 0b100, 0b101
STE0_NESTING_ALLOWED = (STE0_V | (0x7 << 1) | (0x3 << 4) | (((1 << 46) - 1) << 6)
                        | (0x1F << 59))  # V, Config, S1Fmt, S1ContextPtr, S1CDMax
STE1_EATS_SHIFT, STE1_EATS_MASK = 28, 0x3
STE1_EATS_ABT, STE1_EATS_TRANS = 0, 1
STE1_NESTING_ALLOWED = (0x3 | (0x3 << 2) | (0x3 << 4) | (0x3 << 6) | (1 << 27)
                        | (STE1_EATS_MASK << STE1_EATS_SHIFT))  # S1DSS,CIR,COR,CSH,S1STALLD,EATS

# Event IDs forwarded to a vEVENTQ (section 3.7).
FORWARDED_EVENTS = {0x04: "C_BAD_STE", 0x06: "F_STREAM_DISABLED", 0x08: "C_BAD_SUBSTREAMID",
                    0x0A: "C_BAD_CD", 0x10: "F_TRANSLATION", 0x11: "F_ADDR_SIZE",
                    0x12: "F_ACCESS", 0x13: "F_PERMISSION"}
EVT0_ID_MASK = 0xFF
EVT0_SID_SHIFT = 32
EVT1_S2 = 1 << 39  # record bit 103: the fault was in stage 2 (the host's, not forwarded)

CommandSink = Callable[["Viommu", list[tuple[int, int]]], None]
AttachHook = Callable[["Device", int, object], None]


def validate_vste(ste0: int, ste1: int) -> tuple[int, int]:
    """``arm_smmu_validate_vste``: a non-valid STE becomes abort; disallowed bits, configs
    other than abort/bypass/S1, or EATS other than ABT/TRANS -> EIO. EATS is cleared."""
    if not ste0 & STE0_V:
        return 0, 0
    if ste0 & ~STE0_NESTING_ALLOWED or ste1 & ~STE1_NESTING_ALLOWED:
        raise fail(errno.EIO, "STE sets fields a guest may not")
    cfg = (ste0 >> STE0_CFG_SHIFT) & STE0_CFG_MASK
    if cfg not in (STE0_CFG_ABORT, STE0_CFG_BYPASS, STE0_CFG_S1_TRANS):
        raise fail(errno.EIO, f"STE config {cfg:#b}")
    eats = (ste1 >> STE1_EATS_SHIFT) & STE1_EATS_MASK
    if eats not in (STE1_EATS_ABT, STE1_EATS_TRANS):
        raise fail(errno.EIO, f"STE EATS {eats}")
    return ste0, ste1 & ~(STE1_EATS_MASK << STE1_EATS_SHIFT)


class Smmuv3Driver(IommuDriver):
    """One physical SMMUv3 instance as the iommufd core sees it."""

    name = "arm-smmu-v3"
    user_pasid_table = True
    viommu_types = frozenset({IOMMU_VIOMMU_TYPE_ARM_SMMUV3})
    hw_info_type = IOMMU_HW_INFO_TYPE_ARM_SMMUV3

    def __init__(self, idr: tuple[int, ...] = (0,) * 6, iidr: int = 0, aidr: int = 0,
                 on_commands: CommandSink | None = None, on_attach: AttachHook | None = None,
                 on_detach: AttachHook | None = None) -> None:
        self.idr = tuple(idr)
        self.iidr = iidr
        self.aidr = aidr
        self.on_commands = on_commands
        self.on_attach = on_attach
        self.on_detach = on_detach
        self._next_vmid = 1

    def viommu_init(self, viommu: "Viommu", data: UserData | None) -> None:
        viommu.priv["vmid"] = self._next_vmid
        self._next_vmid += 1

    def viommu_alloc_nested(self, hwpt: "HwptNested", data: UserData) -> None:
        arg = data.copy_struct(IOMMU_HWPT_DATA_ARM_SMMUV3, "iommu_hwpt_arm_smmuv3", "ste")
        hwpt.priv["ste"] = validate_vste(arg.ste[0], arg.ste[1])
        log.info("nested STE for hwpt %d: %#018x %#018x", hwpt.id, *hwpt.priv["ste"])

    def convert(self, viommu: "Viommu", cmd0: int, cmd1: int) -> tuple[int, int]:
        """One guest command in host terms (VMID forced, vSID -> SID), or EIO."""
        op = cmd0 & CMD0_OPCODE_MASK
        if op in VMID_OPS:
            cmd0 &= ~(CMD0_VMID_MASK << CMD0_VMID_SHIFT)
            return cmd0 | viommu.priv["vmid"] << CMD0_VMID_SHIFT, cmd1
        if op == CMDQ_OP_TLBI_NSNH_ALL:
            return CMDQ_OP_TLBI_NH_ALL | viommu.priv["vmid"] << CMD0_VMID_SHIFT, 0
        if op in SID_OPS:
            vdev = viommu.vdevs.get(cmd0 >> CMD0_SID_SHIFT)
            if vdev is None:
                raise fail(errno.EIO, f"vSID {cmd0 >> CMD0_SID_SHIFT:#x} has no vDEVICE")
            return (cmd0 & CMD0_SID_MASK) | vdev.device.sid << CMD0_SID_SHIFT, cmd1
        raise fail(errno.EIO, f"opcode {op:#x} not allowed")

    def viommu_invalidate(self, viommu: "Viommu", array: UserArray) -> None:
        if array.entry_num == 0 and array.type == IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3:
            return  # documented probe (the kernel's SMMUv3 path says EINVAL: section 4.1)
        cmds = array.copy_all(IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
                              "iommu_viommu_arm_smmuv3_invalidate")
        out: list[tuple[int, int]] = []
        try:
            for i, c in enumerate(cmds):
                array.done = i
                out.append(self.convert(viommu, c.cmd[0], c.cmd[1]))
            array.done = len(cmds)
        finally:
            if out and self.on_commands is not None:
                log.info("viommu %d: issuing %d commands", viommu.id, len(out))
                self.on_commands(viommu, out)

    def attach_dev(self, device: "Device", pasid: int, hwpt) -> None:  # noqa: ANN001
        if self.on_attach is not None:
            self.on_attach(device, pasid, hwpt)

    def detach_dev(self, device: "Device", pasid: int, hwpt) -> None:  # noqa: ANN001
        if self.on_detach is not None:
            self.on_detach(device, pasid, hwpt)

    def hw_info(self, device: "Device") -> bytes:
        info = new("iommu_hw_info_arm_smmuv3", iidr=self.iidr, aidr=self.aidr)
        for i, v in enumerate(self.idr[:6]):
            info.idr[i] = v
        return pack(info)


def report_event(device: "Device", evt: bytes) -> int:
    """Forward one 32-byte physical event of ``device`` to its vSMMU's vEVENTQ with the
    virtual SID swapped in (section 3.7). 0 / negative errno like the kernel: -EOPNOTSUPP
    when the event ID is not forwarded or the device is not a nested master."""
    dw = list(struct.unpack("<4Q", evt))
    event_id = dw[0] & EVT0_ID_MASK
    if event_id not in FORWARDED_EVENTS or dw[1] & EVT1_S2:
        return -errno.EOPNOTSUPP
    vm = device.nested_viommu()
    if vm is None:
        return -errno.EOPNOTSUPP
    viommu, virt_id = vm
    dw[0] = (dw[0] & ((1 << EVT0_SID_SHIFT) - 1)) | (virt_id & 0xFFFFFFFF) << EVT0_SID_SHIFT
    log.info("event %s of sid %#x forwarded as vsid %#x", FORWARDED_EVENTS[event_id],
             device.sid, virt_id)
    return viommu_report_event(viommu, IOMMU_VEVENTQ_TYPE_ARM_SMMUV3, struct.pack("<4Q", *dw))
