"""Fixtures replaying the kernel selftest fixtures through the byte-level ioctl.

``Raw`` mirrors iommufd_utils.h: every call builds the real struct bytes and goes through
``IommufdContext.ioctl`` with the real request number; ``err`` is ``EXPECT_ERRNO``.
"""

from __future__ import annotations

import struct

import pytest

from devmodel.iommufd import IommufdContext, uapi
from devmodel.iommufd.uapi import new, pack, unpack
from devmodel.memory import ByteMemory

#: The "user memory" of the test process: a buffer at a fixed virtual address.
USER_BASE = 0x7F00_0000_0000
USER_SIZE = 1 << 20


class Raw:
    """Byte-level calls plus a bump allocator in user memory for pointed-to data."""

    def __init__(self, ctx: IommufdContext, mem: ByteMemory) -> None:
        self.ctx = ctx
        self.mem = mem
        self._next = USER_BASE

    def put(self, data: bytes) -> int:
        """Copy ``data`` into user memory; return its user address."""
        addr = self._next
        self.mem.write(addr, data)
        self._next += (len(data) + 15) & ~15 or 16
        return addr

    def call(self, request: int, struct_name: str, size: int | None = None, **fields):
        obj = new(struct_name, **fields)
        if size is not None:
            obj.size = size
        buf = bytearray(pack(obj))
        self.last_buf = buf
        self.ctx.ioctl(request, buf)
        return unpack(struct_name, buf)

    def err(self, errno_: int, request: int, struct_name: str, **fields) -> None:
        with pytest.raises(OSError) as info:
            self.call(request, struct_name, **fields)
        assert info.value.errno == errno_, info.value

    def test(self, op: int, obj_id: int = 0, **payload):
        """IOMMU_TEST_CMD with one union member: ``payload={'member': {field: value}}``."""
        cmd = new("iommu_test_cmd", op=op, id=obj_id)
        for member, values in payload.items():
            for k, v in values.items():
                setattr(getattr(cmd, member), k, v)
        buf = bytearray(pack(cmd))
        self.ctx.ioctl(uapi.IOMMU_TEST_CMD, buf)
        return unpack("iommu_test_cmd", buf)

    def test_err(self, errno_: int, op: int, obj_id: int = 0, **payload) -> None:
        with pytest.raises(OSError) as info:
            self.test(op, obj_id, **payload)
        assert info.value.errno == errno_, info.value

    # iommufd_utils.h helpers ------------------------------------------------------
    def ioas_alloc(self) -> int:
        return self.call(uapi.IOMMU_IOAS_ALLOC, "iommu_ioas_alloc").out_ioas_id

    def mock_domain(self, ioas_id: int, dev_flags: int = 0) -> tuple[int, int, int]:
        op = uapi.TestOp.MOCK_DOMAIN_FLAGS if dev_flags else uapi.TestOp.MOCK_DOMAIN
        out = self.test(op, ioas_id, mock_domain_flags={"dev_flags": dev_flags})
        return out.mock_domain.out_stdev_id, out.mock_domain.out_hwpt_id, out.mock_domain.out_idev_id

    def replace(self, stdev_id: int, pt_id: int) -> int:
        return self.test(uapi.TestOp.MOCK_DOMAIN_REPLACE, stdev_id,
                         mock_domain_replace={"pt_id": pt_id}).mock_domain_replace.pt_id

    def hwpt_alloc(self, dev_id: int, pt_id: int, flags: int = 0, data_type: int = 0,
                   data: bytes = b"", fault_id: int = 0, data_len: int | None = None,
                   data_uptr: int | None = None) -> int:
        return self.call(
            uapi.IOMMU_HWPT_ALLOC, "iommu_hwpt_alloc", flags=flags, dev_id=dev_id, pt_id=pt_id,
            data_type=data_type, data_len=len(data) if data_len is None else data_len,
            data_uptr=(self.put(data) if data else 0) if data_uptr is None else data_uptr,
            fault_id=fault_id).out_hwpt_id

    def destroy(self, obj_id: int) -> None:
        self.call(uapi.IOMMU_DESTROY, "iommu_destroy", id=obj_id)

    def fault_alloc(self) -> tuple[int, int]:
        out = self.call(uapi.IOMMU_FAULT_QUEUE_ALLOC, "iommu_fault_alloc")
        assert out.out_fault_id and out.out_fault_fd
        return out.out_fault_id, out.out_fault_fd

    def viommu_alloc(self, dev_id: int, hwpt_id: int, vtype: int = uapi.IOMMU_VIOMMU_TYPE_SELFTEST) -> int:
        return self.call(uapi.IOMMU_VIOMMU_ALLOC, "iommu_viommu_alloc", type=vtype,
                         dev_id=dev_id, hwpt_id=hwpt_id).out_viommu_id

    def vdevice_alloc(self, viommu_id: int, dev_id: int, virt_id: int) -> int:
        return self.call(uapi.IOMMU_VDEVICE_ALLOC, "iommu_vdevice_alloc", viommu_id=viommu_id,
                         dev_id=dev_id, virt_id=virt_id).out_vdevice_id

    def veventq_alloc(self, viommu_id: int, qtype: int = uapi.IOMMU_VEVENTQ_TYPE_SELFTEST,
                      depth: int = 2) -> tuple[int, int]:
        out = self.call(uapi.IOMMU_VEVENTQ_ALLOC, "iommu_veventq_alloc", viommu_id=viommu_id,
                        type=qtype, veventq_depth=depth)
        return out.out_veventq_id, out.out_veventq_fd

    def invalidate(self, hwpt_id: int, data_type: int, entries: bytes, entry_len: int,
                   entry_num: int, uptr: int | None = None) -> tuple[int, int]:
        """(errno or 0, entry_num out) — the out value is checked on success and failure."""
        ptr = (self.put(entries) if entries else 0) if uptr is None else uptr
        obj = new("iommu_hwpt_invalidate", hwpt_id=hwpt_id, data_uptr=ptr, data_type=data_type,
                  entry_len=entry_len, entry_num=entry_num)
        buf = bytearray(pack(obj))
        try:
            self.ctx.ioctl(uapi.IOMMU_HWPT_INVALIDATE, buf)
            rc = 0
        except OSError as exc:
            rc = exc.errno
        return rc, unpack("iommu_hwpt_invalidate", buf).entry_num

    def trigger_iopf(self, dev_id: int, pasid: int = 0, grpid: int = 2,
                     perm: int = uapi.IOMMU_PGFAULT_PERM_READ | uapi.IOMMU_PGFAULT_PERM_WRITE,
                     addr: int = 0xDEADBEAF) -> None:
        self.test(uapi.TestOp.TRIGGER_IOPF, trigger_iopf={
            "dev_id": dev_id, "pasid": pasid, "grpid": grpid, "perm": perm, "addr": addr})

    def trigger_iopf_roundtrip(self, dev_id: int, fault_fd: int, pasid: int = 0):
        """``_test_cmd_trigger_iopf``: trigger, read 40 bytes, answer SUCCESS by cookie."""
        self.trigger_iopf(dev_id, pasid)
        rec = self.ctx.read(fault_fd, uapi.PGFAULT_SIZE)
        assert len(rec) > 0
        fault = unpack("iommu_hwpt_pgfault", rec)
        assert self.ctx.write(fault_fd, struct.pack("<II", fault.cookie,
                                                    uapi.IOMMUFD_PAGE_RESP_SUCCESS)) > 0
        return fault

    def trigger_vevents(self, dev_id: int, n: int) -> None:
        for _ in range(n):
            self.test(uapi.TestOp.TRIGGER_VEVENT, trigger_vevent={"dev_id": dev_id})


@pytest.fixture
def ctx():
    mem = ByteMemory(USER_SIZE, base=USER_BASE)
    c = IommufdContext(mem)
    c.test_mem = mem  # type: ignore[attr-defined]
    yield c
    c.close()


@pytest.fixture
def raw(ctx) -> Raw:
    return Raw(ctx, ctx.test_mem)


@pytest.fixture
def mock_ioas(raw):
    """FIXTURE(iommufd_ioas) with one mock domain: (ioas_id, stdev_id, hwpt_id, device_id)."""
    ioas = raw.ioas_alloc()
    stdev, hwpt, idev = raw.mock_domain(ioas)
    return ioas, stdev, hwpt, idev


@pytest.fixture
def viommu_fx(raw):
    """FIXTURE(iommufd_viommu) variant mock_viommu: ioas, mock device, nest parent, vIOMMU,
    and a nested HWPT on the vIOMMU."""
    ioas = raw.ioas_alloc()
    stdev, _hwpt, idev = raw.mock_domain(ioas)
    parent = raw.hwpt_alloc(idev, ioas, uapi.IOMMU_HWPT_ALLOC_NEST_PARENT)
    viommu = raw.viommu_alloc(idev, parent)
    nested = raw.hwpt_alloc(idev, viommu, 0, uapi.IOMMU_HWPT_DATA_SELFTEST,
                            struct.pack("<I", uapi.IOMMU_TEST_IOTLB_DEFAULT))
    return {"ioas": ioas, "stdev": stdev, "dev": idev, "parent": parent, "viommu": viommu,
            "nested": nested}
