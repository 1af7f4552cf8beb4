"""The selftest mock driver and IOMMU_TEST_CMD (``selftest.c``), so that the kernel's
``tools/testing/selftests/iommu`` sequences replay against the model byte for byte."""

from __future__ import annotations

import errno
import logging
import struct
from typing import TYPE_CHECKING

from devmodel.iommufd import device as devmod
from devmodel.iommufd.driver import IommuDriver, UserArray, UserData
from devmodel.iommufd.eventq import viommu_report_event
from devmodel.iommufd.iopf import PageRequest, report_device_fault
from devmodel.iommufd.objects import IommufdObject, ObjType, fail
from devmodel.iommufd.uapi import (
    IOMMU_HWPT_DATA_SELFTEST,
    IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
    IOMMU_NO_PASID,
    IOMMU_PGFAULT_FLAGS_LAST_PAGE,
    IOMMU_PGFAULT_FLAGS_PASID_VALID,
    IOMMU_TEST_DEV_CACHE_DEFAULT,
    IOMMU_TEST_INVALIDATE_FLAG_ALL,
    IOMMU_VEVENTQ_TYPE_SELFTEST,
    IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST,
    IOMMU_VIOMMU_TYPE_SELFTEST,
    MOCK_DEV_CACHE_ID_MAX,
    MOCK_DEV_CACHE_NUM,
    MOCK_FLAGS_DEVICE_PASID,
    MOCK_NESTED_DOMAIN_IOTLB_ID_MAX,
    MOCK_NESTED_DOMAIN_IOTLB_NUM,
    MOCK_PASID_WIDTH,
    TestOp,
)

if TYPE_CHECKING:
    from devmodel.iommufd.device import Device
    from devmodel.iommufd.hw_pagetable import HwptNested
    from devmodel.iommufd.main import IommufdContext
    from devmodel.iommufd.viommu import Viommu

log = logging.getLogger(__name__)


class MockDriver(IommuDriver):
    """The mock IOMMU: nested IOTLB of 4 entries, per-device cache of 4 entries."""

    name = "mock"
    user_pasid_table = True
    supports_dirty = True
    has_nested = True
    viommu_types = frozenset({IOMMU_VIOMMU_TYPE_SELFTEST})

    def _nested(self, hwpt: "HwptNested", data: UserData) -> None:
        if data.type != IOMMU_HWPT_DATA_SELFTEST:
            raise fail(errno.EOPNOTSUPP, f"data type {data.type:#x}")
        req = data.copy_struct(IOMMU_HWPT_DATA_SELFTEST, "iommu_hwpt_selftest", "iotlb")
        hwpt.priv["iotlb"] = [req.iotlb] * MOCK_NESTED_DOMAIN_IOTLB_NUM

    alloc_nested = _nested
    viommu_alloc_nested = _nested

    def nested_invalidate(self, hwpt: "HwptNested", array: UserArray) -> None:
        if array.type != IOMMU_HWPT_INVALIDATE_DATA_SELFTEST:
            raise fail(errno.EINVAL, f"array type {array.type:#x}")
        iotlb = hwpt.priv["iotlb"]
        for i in range(array.entry_num):
            inv = array.copy_entry(i, IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
                                   "iommu_hwpt_invalidate_selftest", "iotlb_id")
            if inv.flags & ~IOMMU_TEST_INVALIDATE_FLAG_ALL:
                raise fail(errno.EOPNOTSUPP, "invalidate flags")
            if inv.iotlb_id > MOCK_NESTED_DOMAIN_IOTLB_ID_MAX:
                raise fail(errno.EINVAL, f"iotlb_id {inv.iotlb_id}")
            if inv.flags & IOMMU_TEST_INVALIDATE_FLAG_ALL:
                iotlb[:] = [0] * MOCK_NESTED_DOMAIN_IOTLB_NUM
            else:
                iotlb[inv.iotlb_id] = 0
            array.done = i + 1

    def viommu_init(self, viommu: "Viommu", data: UserData | None) -> None:
        if data is not None:
            req = data.copy_struct(IOMMU_VIOMMU_TYPE_SELFTEST, "iommu_viommu_selftest", "out_data")
            req.out_data = req.in_data  # the loopback the selftest checks
            data.copy_back(req)

    def viommu_invalidate(self, viommu: "Viommu", array: UserArray) -> None:
        if array.entry_num == 0 and array.type == IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST:
            return
        cmds = array.copy_all(IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST, "iommu_viommu_invalidate_selftest")
        for i, inv in enumerate(cmds):
            if inv.flags & ~IOMMU_TEST_INVALIDATE_FLAG_ALL:
                raise fail(errno.EOPNOTSUPP, "invalidate flags")
            if inv.cache_id > MOCK_DEV_CACHE_ID_MAX:
                raise fail(errno.EINVAL, f"cache_id {inv.cache_id}")
            vdev = viommu.vdevs.get(inv.vdev_id)
            if vdev is None:
                raise fail(errno.EINVAL, f"no vdevice {inv.vdev_id:#x}")
            cache = vdev.device.priv["cache"]
            if inv.flags & IOMMU_TEST_INVALIDATE_FLAG_ALL:
                cache[:] = [0] * MOCK_DEV_CACHE_NUM
            else:
                cache[inv.cache_id] = 0
            array.done = i + 1


class SelftestDevice(IommufdObject):
    """The ``stdev`` object: owns a mock device's binding; destroying it unbinds."""

    obj_type = ObjType.SELFTEST

    def __init__(self, idev: "Device") -> None:
        super().__init__()
        self.idev = idev

    def destroy(self, ctx: "IommufdContext") -> None:
        devmod.unbind(ctx, self.idev)


def _mock_domain(ctx: "IommufdContext", cmd, dev_flags: int) -> None:  # noqa: ANN001
    """MOCK_DOMAIN(_FLAGS): stdev, then idev, then the attach (kernel ID order)."""
    stdev = SelftestDevice(None)  # type: ignore[arg-type]
    ctx.table.alloc(stdev)
    pasid_bits = MOCK_PASID_WIDTH if dev_flags & MOCK_FLAGS_DEVICE_PASID else 0
    try:
        idev = ctx.bind_device(ctx.mock_driver, name=f"mock{stdev.id}", max_pasid_log2=pasid_bits)
    except OSError:
        ctx.abort(stdev)
        raise
    idev.priv["cache"] = [IOMMU_TEST_DEV_CACHE_DEFAULT] * MOCK_DEV_CACHE_NUM
    stdev.idev = idev
    try:
        hwpt_id = devmod.change_pt(ctx, idev, IOMMU_NO_PASID, cmd.id, replace=False)
    except OSError:
        devmod.unbind(ctx, idev)
        ctx.abort(stdev)
        raise
    ctx.table.finalize(stdev)
    cmd.mock_domain.out_stdev_id = stdev.id
    cmd.mock_domain.out_hwpt_id = hwpt_id
    cmd.mock_domain.out_idev_id = idev.id


def _stdev(ctx: "IommufdContext", stdev_id: int) -> "Device":
    return ctx.table.lookup(stdev_id, ObjType.SELFTEST).idev


def _trigger_iopf(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    t = cmd.trigger_iopf
    idev = ctx.table.lookup(t.dev_id, ObjType.DEVICE)
    flags = IOMMU_PGFAULT_FLAGS_LAST_PAGE | (IOMMU_PGFAULT_FLAGS_PASID_VALID if t.pasid else 0)
    report_device_fault(idev, PageRequest(flags, t.pasid, t.grpid, t.perm, t.addr))


def _trigger_vevent(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    idev = ctx.table.lookup(cmd.trigger_vevent.dev_id, ObjType.DEVICE)
    vm = idev.nested_viommu()
    if vm is None or vm[1] == 0:
        raise fail(errno.ENOENT, "device not on a mock vIOMMU with a vDEVICE")
    viommu, virt_id = vm
    rc = viommu_report_event(viommu, IOMMU_VEVENTQ_TYPE_SELFTEST, struct.pack("<I", virt_id))
    if rc:
        raise fail(-rc, "report_event")


def _check_iotlb(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    hwpt = ctx.table.lookup(cmd.id, ObjType.HWPT_NESTED)
    c = cmd.check_iotlb
    if c.id > MOCK_NESTED_DOMAIN_IOTLB_ID_MAX or hwpt.priv["iotlb"][c.id] != c.iotlb:
        raise fail(errno.EINVAL, "iotlb mismatch")


def _check_cache(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    idev = ctx.table.lookup(cmd.id, ObjType.DEVICE)
    c = cmd.check_dev_cache
    if c.id > MOCK_DEV_CACHE_ID_MAX or idev.priv["cache"][c.id] != c.cache:
        raise fail(errno.EINVAL, "cache mismatch")


def _pasid_check(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    idev = _stdev(ctx, cmd.id)
    handle = idev.attach.get(cmd.pasid_check.pasid)
    want = cmd.pasid_check.hwpt_id
    if (handle.hwpt.id if handle else 0) != want:
        raise fail(errno.EINVAL, "pasid attached elsewhere")


def test_cmd(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    """IOMMU_TEST_CMD dispatch on ``op``; unmodelled ops give EOPNOTSUPP."""
    op = cmd.op
    log.debug("test op %d id %d", op, cmd.id)
    if op == TestOp.MOCK_DOMAIN:
        _mock_domain(ctx, cmd, 0)
    elif op == TestOp.MOCK_DOMAIN_FLAGS:
        _mock_domain(ctx, cmd, cmd.mock_domain_flags.dev_flags)
    elif op == TestOp.MOCK_DOMAIN_REPLACE:
        idev = _stdev(ctx, cmd.id)
        cmd.mock_domain_replace.pt_id = devmod.change_pt(
            ctx, idev, IOMMU_NO_PASID, cmd.mock_domain_replace.pt_id, replace=True)
    elif op == TestOp.MD_CHECK_IOTLB:
        _check_iotlb(ctx, cmd)
    elif op == TestOp.DEV_CHECK_CACHE:
        _check_cache(ctx, cmd)
    elif op == TestOp.TRIGGER_IOPF:
        _trigger_iopf(ctx, cmd)
    elif op == TestOp.TRIGGER_VEVENT:
        _trigger_vevent(ctx, cmd)
    elif op in (TestOp.PASID_ATTACH, TestOp.PASID_REPLACE):
        a = cmd.pasid_attach
        idev = _stdev(ctx, cmd.id)
        devmod.change_pt(ctx, idev, a.pasid, a.pt_id, replace=op == TestOp.PASID_REPLACE)
    elif op == TestOp.PASID_DETACH:
        devmod.detach(ctx, _stdev(ctx, cmd.id), cmd.pasid_detach.pasid)
    elif op == TestOp.PASID_CHECK_HWPT:
        _pasid_check(ctx, cmd)
    else:
        raise fail(errno.EOPNOTSUPP, f"test op {op}")
