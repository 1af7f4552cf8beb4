"""The SMMUv3 driver's iommufd side (``arm-smmu-v3-iommufd.c``): vSMMU, nested STEs,
vIOMMU invalidation (guest CMDQ commands -> host commands) and vEVENT forwarding.

The host glue (devmodel/host) plugs its hardware access in through callbacks:
``on_commands(viommu, [(cmd0, cmd1), ...])`` issues converted commands to the physical
CMDQ (followed by a sync), ``on_attach``/``on_detach`` install or clear the physical STE.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, Callable

from devmodel.iommu.bitfield import BitField
from devmodel.iommu.records import (
    COMMANDS,
    EATS_FULL,
    EATS_OFF,
    EVENT,
    STE,
    EventId,
    Opcode,
    SteConfig,
)
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

# Command, STE and event formats come from the one declaration every layer shares (as the
# kernel's iommufd code uses arm-smmu-v3.h); only the nesting policy is declared here.
_CMD_OPCODE = COMMANDS[Opcode.CMD_SYNC].fields["Opcode"]
_CMD_VMID = COMMANDS[Opcode.CMD_TLBI_NH_ALL].fields["VMID"]  # [47:32] of cmd[0]
_CMD_SID = COMMANDS[Opcode.CMD_CFGI_CD].fields["StreamID"]  # [63:32] of cmd[0]
#: Guest commands whose VMID the host forces, and those whose vSID it translates.
VMID_OPS = frozenset({Opcode.CMD_TLBI_NH_ALL, Opcode.CMD_TLBI_NH_ASID, Opcode.CMD_TLBI_NH_VA,
                      Opcode.CMD_TLBI_NH_VAA})
SID_OPS = frozenset({Opcode.CMD_CFGI_CD, Opcode.CMD_CFGI_CD_ALL, Opcode.CMD_ATC_INV})

#: STE fields a nested (guest) STE may set (arm_smmu_validate_vste).
_NESTING_FIELDS = ("V", "Config", "S1Fmt", "S1ContextPtr", "S1CDMax",
                   "S1DSS", "S1CIR", "S1COR", "S1CSH", "S1STALLD", "EATS")
_NESTING_ALLOWED = sum(STE.fields[n].mask << STE.fields[n].lsb for n in _NESTING_FIELDS)
_STE_EATS = STE.fields["EATS"]
_EATS_IN_STE1 = _STE_EATS.mask << (_STE_EATS.lsb - 64)

#: Event IDs forwarded to a vEVENTQ (section 3.7), by name for the logs.
FORWARDED_EVENTS = {e.value: e.name for e in (
    EventId.C_BAD_STE, EventId.F_STREAM_DISABLED, EventId.C_BAD_SUBSTREAMID, EventId.C_BAD_CD,
    EventId.F_TRANSLATION, EventId.F_ADDR_SIZE, EventId.F_ACCESS, EventId.F_PERMISSION)}


def _with_field(raw: int, field: BitField, value: int) -> int:
    """``raw`` with ``field`` replaced by ``value``."""
    return (raw & ~(field.mask << field.lsb)) | field.put(value)


CommandSink = Callable[["Viommu", list[tuple[int, int]]], None]
AttachHook = Callable[["Device", int, object], None]


def vste_enable_ats(ste1: int) -> bool:
    """Whether a guest STE asks for ATS (EATS=0b01): the kernel keeps this as the nested
    domain's ``enable_ats`` and the physical STE gets EATS=TRANS at attach only when the
    master supports ATS too. The guest's EATS bits themselves never reach the hardware."""
    return (ste1 & _EATS_IN_STE1) >> (_STE_EATS.lsb - 64) == EATS_FULL


def validate_vste(ste0: int, ste1: int) -> tuple[int, int]:
    """``arm_smmu_validate_vste``: a non-valid STE becomes abort; disallowed bits, configs
    other than abort/bypass/S1, or EATS other than ABT/TRANS -> EIO. EATS is cleared from
    the stored STE (its request is kept apart: :func:`vste_enable_ats`)."""
    raw = ste0 | ste1 << 64
    ste = STE.unpack(raw)
    if not ste.V:
        return 0, 0
    if raw & ~_NESTING_ALLOWED:
        raise fail(errno.EIO, "STE sets fields a guest may not")
    if ste.Config not in (SteConfig.ABORT, SteConfig.BYPASS, SteConfig.S1_TRANS):
        raise fail(errno.EIO, f"STE config {ste.Config:#b}")
    if ste.EATS not in (EATS_OFF, EATS_FULL):
        raise fail(errno.EIO, f"STE EATS {ste.EATS}")
    return ste0, ste1 & ~_EATS_IN_STE1


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
        hwpt.priv["enable_ats"] = hwpt.priv["ste"] != (0, 0) and vste_enable_ats(arg.ste[1])
        log.info("nested STE for hwpt %d: %#018x %#018x", hwpt.id, *hwpt.priv["ste"])

    def convert(self, viommu: "Viommu", cmd0: int, cmd1: int) -> tuple[int, int]:
        """One guest command in host terms (VMID forced, vSID -> SID), or EIO."""
        op = _CMD_OPCODE.get(cmd0)
        vmid = viommu.priv["vmid"]
        if op in VMID_OPS:
            return _with_field(cmd0, _CMD_VMID, vmid), cmd1
        if op == Opcode.CMD_TLBI_NSNH_ALL:
            return _with_field(Opcode.CMD_TLBI_NH_ALL, _CMD_VMID, vmid), 0
        if op in SID_OPS:
            vsid = _CMD_SID.get(cmd0)
            vdev = viommu.vdevs.get(vsid)
            if vdev is None:
                raise fail(errno.EIO, f"vSID {vsid:#x} has no vDEVICE")
            return _with_field(cmd0, _CMD_SID, vdev.device.sid), cmd1
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


def report_event(device: "Device", evt: bytes, trace: int = 0) -> int:
    """Forward one 32-byte physical event of ``device`` to its vSMMU's vEVENTQ with the
    virtual SID swapped in (section 3.7). 0 / negative errno like the kernel: -EOPNOTSUPP
    when the event ID is not forwarded or the device is not a nested master."""
    raw = int.from_bytes(evt, "little")
    event_id = EVENT.get(raw, "EventID")
    if event_id not in FORWARDED_EVENTS or EVENT.get(raw, "S2"):
        return -errno.EOPNOTSUPP
    vm = device.nested_viommu()
    if vm is None:
        return -errno.EOPNOTSUPP
    viommu, virt_id = vm
    raw = _with_field(raw, EVENT.fields["StreamID"], virt_id & 0xFFFFFFFF)
    log.info("event %s of sid %#x forwarded as vsid %#x", FORWARDED_EVENTS[event_id],
             device.sid, virt_id)
    return viommu_report_event(viommu, IOMMU_VEVENTQ_TYPE_ARM_SMMUV3, raw.to_bytes(len(evt), "little"),
                               trace)
