"""SMMUv3 driver side: nested STE validation, vSMMU invalidation (opcodes, VMID, vSID ->
SID, EIO with entry_num = index) and vEVENT forwarding (reference sections 1.5.2, 3.7, 4.3)."""

from __future__ import annotations

import errno
import struct

import pytest

from devmodel.iommufd import uapi
from devmodel.iommu.records import Opcode
from devmodel.iommufd.arm_smmuv3 import Smmuv3Driver, report_event

CMDQ_OP_ATC_INV = Opcode.CMD_ATC_INV
CMDQ_OP_CFGI_CD = Opcode.CMD_CFGI_CD
CMDQ_OP_TLBI_NH_ASID = Opcode.CMD_TLBI_NH_ASID
CMDQ_OP_TLBI_NSNH_ALL = Opcode.CMD_TLBI_NSNH_ALL

S1_STE0 = 1 | (0b101 << 1) | (0x4000 & ~0x3F)  # V, Config = S1 translate, S1ContextPtr
INV_T = uapi.IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3


@pytest.fixture
def vsmmu(ctx):
    issued: list = []
    attached: list = []
    drv = Smmuv3Driver(idr=(1, 2, 3, 4, 5, 6), iidr=0x43B, aidr=2,
                       on_commands=lambda v, cmds: issued.extend(cmds),
                       on_attach=lambda d, p, h: attached.append((d.sid, p, h.id)))
    dev = ctx.bind_device(drv, "ep0", sid=0x100)
    ioas = ctx.ioas_alloc()
    parent = ctx.hwpt_alloc(dev.id, ioas, uapi.IOMMU_HWPT_ALLOC_NEST_PARENT)
    viommu = ctx.viommu_alloc(dev.id, parent, uapi.IOMMU_VIOMMU_TYPE_ARM_SMMUV3)
    return {"ctx": ctx, "drv": drv, "dev": dev, "ioas": ioas, "parent": parent,
            "viommu": viommu, "issued": issued, "attached": attached}


def _ste(ste0: int, ste1: int = 0) -> bytes:
    return struct.pack("<QQ", ste0, ste1)


def test_nested_ste_validation_and_attach(vsmmu):
    ctx, dev, v = vsmmu["ctx"], vsmmu["dev"], vsmmu["viommu"]
    for bad in (_ste(1 | (0b110 << 1)), _ste(S1_STE0 | 1 << 58), _ste(S1_STE0, 2 << 28)):
        with pytest.raises(OSError) as e:
            ctx.hwpt_alloc(dev.id, v, 0, uapi.IOMMU_HWPT_DATA_ARM_SMMUV3, bad)
        assert e.value.errno == errno.EIO
    with pytest.raises(OSError) as e:  # wrong data type: the copy helper's EINVAL
        ctx.hwpt_alloc(dev.id, v, 0, uapi.IOMMU_HWPT_DATA_VTD_S1, _ste(S1_STE0))
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:  # SMMUv3 nests only through a vIOMMU
        ctx.hwpt_alloc(dev.id, vsmmu["parent"], 0, uapi.IOMMU_HWPT_DATA_ARM_SMMUV3, _ste(S1_STE0))
    assert e.value.errno == errno.EOPNOTSUPP
    nested = ctx.hwpt_alloc(dev.id, v, 0, uapi.IOMMU_HWPT_DATA_ARM_SMMUV3, _ste(S1_STE0))
    assert ctx.table.lookup(nested).priv["ste"] == (S1_STE0, 0)
    with pytest.raises(OSError) as e:
        ctx.attach(dev.id, nested)
    assert e.value.errno == errno.ENOENT  # no vDEVICE yet (section 1.5.5)
    ctx.vdevice_alloc(v, dev.id, 0x5)
    ctx.attach(dev.id, nested)
    assert vsmmu["attached"] == [(0x100, 0, nested)]
    kind, info = ctx.get_hw_info(dev.id, 40)
    assert kind == 2 and struct.unpack_from("<8I", info, 8) == (1, 2, 3, 4, 5, 6, 0x43B, 2)


def test_vsmmu_invalidate(vsmmu):
    ctx, dev, v = vsmmu["ctx"], vsmmu["dev"], vsmmu["viommu"]
    ctx.vdevice_alloc(v, dev.id, 0x5)
    vmid = ctx.table.lookup(v).priv["vmid"]
    cmds = [struct.pack("<QQ", CMDQ_OP_TLBI_NH_ASID | 0x77 << 32 | 0x12 << 48, 0),
            struct.pack("<QQ", CMDQ_OP_CFGI_CD | 0x5 << 32, 1),
            struct.pack("<QQ", CMDQ_OP_TLBI_NSNH_ALL, 0xFFFF),
            struct.pack("<QQ", CMDQ_OP_ATC_INV | 0x5 << 32, 0)]
    assert ctx.hwpt_invalidate(v, INV_T, cmds) == 4
    assert vsmmu["issued"] == [(CMDQ_OP_TLBI_NH_ASID | vmid << 32 | 0x12 << 48, 0),
                               (CMDQ_OP_CFGI_CD | 0x100 << 32, 1),
                               (0x10 | vmid << 32, 0),
                               (CMDQ_OP_ATC_INV | 0x100 << 32, 0)]
    for bad in (struct.pack("<QQ", 0x01, 0), struct.pack("<QQ", CMDQ_OP_CFGI_CD | 0x6 << 32, 0)):
        vsmmu["issued"].clear()
        with pytest.raises(OSError) as e:
            ctx.hwpt_invalidate(v, INV_T, [cmds[0], bad, cmds[0]])
        assert e.value.errno == errno.EIO and e.value.entry_num == 1
        assert len(vsmmu["issued"]) == 1  # the good command before it was issued
    assert ctx.hwpt_invalidate(v, INV_T, []) == 0  # documented probe


def test_event_forwarding_swaps_vsid(vsmmu):
    ctx, dev, v = vsmmu["ctx"], vsmmu["dev"], vsmmu["viommu"]
    nested = ctx.hwpt_alloc(dev.id, v, 0, uapi.IOMMU_HWPT_DATA_ARM_SMMUV3, _ste(S1_STE0))
    ctx.vdevice_alloc(v, dev.id, 0x5)
    q, fd = ctx.veventq_alloc(v, uapi.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3, 4)
    evt = struct.pack("<4Q", 0x10 | 0x100 << 32, 0x1234, 0xDEAD000, 0)
    assert report_event(dev, evt) == -errno.EOPNOTSUPP  # not a nested master yet
    ctx.attach(dev.id, nested)
    assert report_event(dev, evt) == 0
    assert report_event(dev, struct.pack("<4Q", 0x10, 1 << 39, 0, 0)) == -errno.EOPNOTSUPP  # S2
    assert report_event(dev, struct.pack("<4Q", 0x02, 0, 0, 0)) == -errno.EOPNOTSUPP
    data = ctx.read(fd, 100)
    assert data == struct.pack("<II", 0, 0) + struct.pack("<4Q", 0x10 | 0x5 << 32, 0x1234, 0xDEAD000, 0)
