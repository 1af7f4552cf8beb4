"""Generic ioctl rules: reference section 1.2, 1.3 and selftests cmd_fail / cmd_length /
cmd_ex_fail (section 5.3)."""

from __future__ import annotations

import errno

import pytest

from devmodel.iommufd import IommufdContext, uapi
from devmodel.iommufd.main import OPS
from devmodel.iommufd.uapi import new, pack
from devmodel.memory import ByteMemory


def _ioctl_err(ctx, request: int, buf) -> int:
    with pytest.raises(OSError) as info:
        ctx.ioctl(request, buf)
    return info.value.errno


def test_cmd_fail(ctx, raw):
    """cmd_fail: DESTROY(0) ENOENT, NULL argument EFAULT, _IO(';', 0x7f) ENOTTY."""
    raw.err(errno.ENOENT, uapi.IOMMU_DESTROY, "iommu_destroy", id=0)
    assert _ioctl_err(ctx, uapi.IOMMU_DESTROY, None) == errno.EFAULT
    assert _ioctl_err(ctx, uapi._IO(uapi.IOMMUFD_TYPE, 0x80 - 1), bytearray(8)) == errno.ENOTTY
    # Direction/size bits make it a different request: still ENOTTY (section 1.2 step 1).
    assert _ioctl_err(ctx, 0xC0083B80, bytearray(pack(new("iommu_destroy")))) == errno.ENOTTY


def test_request_numbers_are_plain_io():
    """Section 1.1: request = 0x3B00 | nr."""
    assert uapi.IOMMU_DESTROY == 0x3B80
    assert uapi.IOMMU_VEVENTQ_ALLOC == 0x3B93
    assert uapi.IOMMU_TEST_CMD == 0x3BA0


@pytest.mark.parametrize("nr", sorted(OPS), ids=lambda nr: uapi.Cmd(nr).name)
def test_cmd_length(ctx, nr):
    """cmd_length: min-1 EINVAL; sizeof+1 with 0xFF E2BIG; with 0x00 same result as sizeof."""
    op = OPS[nr]
    request = uapi._IO(uapi.IOMMUFD_TYPE, nr)
    ksize = uapi.sizeof(op.struct)

    short = bytearray(ksize)
    short[0:4] = (op.min_size - 1).to_bytes(4, "little")
    assert _ioctl_err(ctx, request, short) == errno.EINVAL

    big = bytearray(ksize + 1)
    big[0:4] = (ksize + 1).to_bytes(4, "little")
    big[ksize] = 0xFF
    assert _ioctl_err(ctx, request, big) == errno.E2BIG

    def result(extra: int) -> int:
        fresh = IommufdContext(ByteMemory(4096))  # both calls start from the same state
        buf = bytearray(ksize + extra)
        buf[0:4] = (ksize + extra).to_bytes(4, "little")
        try:
            fresh.ioctl(request, buf)
            return 0
        except OSError as exc:
            return exc.errno
        finally:
            fresh.close()

    assert result(1) == result(0)


def test_cmd_ex_fail(ctx):
    """cmd_ex_fail: DESTROY with 8 bytes of future area."""
    def destroy(size: int, future: int) -> int:
        buf = bytearray(16)
        buf[0:4] = size.to_bytes(4, "little")
        buf[8:16] = future.to_bytes(8, "little")
        return _ioctl_err(ctx, uapi.IOMMU_DESTROY, buf)

    assert destroy(16, 0) == errno.ENOENT
    assert destroy(16, 1) == errno.E2BIG
    assert destroy(8, 0) == errno.ENOENT
    assert destroy(7, 0) == errno.EINVAL


def test_bad_user_pointer_is_efault(ctx):
    """A struct larger than the caller's buffer reads past the mapping: EFAULT (1.2 step 2)."""
    buf = bytearray(pack(new("iommu_ioas_alloc")))[:8]
    buf[0:4] = (12).to_bytes(4, "little")
    assert _ioctl_err(ctx, uapi.IOMMU_IOAS_ALLOC, buf) == errno.EFAULT


def test_ids_lowest_free_from_one(raw):
    """Section 1.3: IDs start at 1, are lowest-free, and are reused after DESTROY."""
    ids = [raw.ioas_alloc() for _ in range(4)]
    assert ids == [1, 2, 3, 4]
    raw.destroy(2)
    raw.destroy(1)
    assert raw.ioas_alloc() == 1
    assert raw.ioas_alloc() == 2
    assert raw.ioas_alloc() == 5


def test_output_copied_back_only_up_to_user_size(ctx):
    """Section 1.2 step 5: min(user size, sizeof) bytes are written back."""
    buf = bytearray(pack(new("iommu_ioas_alloc")))
    ctx.ioctl(uapi.IOMMU_IOAS_ALLOC, buf)
    assert int.from_bytes(buf[8:12], "little") == 1
    assert ctx.ioas_alloc() == 2


def test_mock_domain_id_order(raw, mock_ioas):
    """MOCK_DOMAIN allocates stdev, idev, then the auto-domain HWPT (selftest.c order)."""
    ioas, stdev, hwpt, idev = mock_ioas
    assert (ioas, stdev, idev, hwpt) == (1, 2, 3, 4)
    raw.err(errno.EBUSY, uapi.IOMMU_DESTROY, "iommu_destroy", id=ioas)  # auto-domain uses it
    raw.err(errno.EBUSY, uapi.IOMMU_DESTROY, "iommu_destroy", id=hwpt)  # device attached
    raw.err(errno.EBUSY, uapi.IOMMU_DESTROY, "iommu_destroy", id=idev)  # pinned by binder
    raw.destroy(stdev)  # unbinds: the auto-domain goes with the last device
    raw.err(errno.ENOENT, uapi.IOMMU_DESTROY, "iommu_destroy", id=hwpt)
    raw.destroy(ioas)


def test_ioas_map_unmap_translate(ctx, raw):
    """IOAS_MAP of user memory (EFAULT when unbacked), translate for stage 2, UNMAP."""
    ioas = raw.ioas_alloc()
    base = raw.mem.base
    flags = uapi.IOMMU_IOAS_MAP_FIXED_IOVA | uapi.IOMMU_IOAS_MAP_READABLE
    raw.err(errno.EFAULT, uapi.IOMMU_IOAS_MAP, "iommu_ioas_map", flags=flags, ioas_id=ioas,
            user_va=0x1000, length=0x1000, iova=0x10000)
    out = raw.call(uapi.IOMMU_IOAS_MAP, "iommu_ioas_map", flags=flags, ioas_id=ioas,
                   user_va=base + 0x2000, length=0x2000, iova=0x10000)
    assert out.iova == 0x10000
    raw.err(errno.EEXIST, uapi.IOMMU_IOAS_MAP, "iommu_ioas_map", flags=flags, ioas_id=ioas,
            user_va=base, length=0x1000, iova=0x11000)
    area = ctx.table.lookup(ioas)
    assert area.translate(0x11234) == (base + 0x3234, uapi.IOMMU_IOAS_MAP_READABLE)
    assert area.translate(0x12000) is None
    auto = ctx.ioas_map(ioas, base, 0x1000)
    assert auto != 0x10000 and area.translate(auto) is not None
    out = raw.call(uapi.IOMMU_IOAS_UNMAP, "iommu_ioas_unmap", ioas_id=ioas, iova=0x10000,
                   length=0x2000)
    assert out.length == 0x2000
    raw.err(errno.ENOENT, uapi.IOMMU_IOAS_UNMAP, "iommu_ioas_unmap", ioas_id=ioas,
            iova=0x10000, length=0x2000)
