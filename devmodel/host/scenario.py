"""A nested master in miniature: what a VMM and its guest set up around one endpoint.

Used by the host tests and benchmark, and handy for demos. Guest RAM is user memory
mapped 1:1 into an IOAS at IOVA (= guest PA) ``GPA_BASE``; :class:`GuestRam` views the
same bytes at guest physical addresses, so the guest's CD table and stage-1 page table
are built where the SMMU will find them through stage 2. The VMM side: NEST_PARENT HWPT,
ARM_SMMUV3 vIOMMU, vDEVICE (vSID), vEVENTQ, FAULT, nested HWPT from the guest STE,
attach.
"""

from __future__ import annotations

from dataclasses import dataclass

from devmodel.host.machine import HostMachine
from devmodel.host.ste import guest_s1_ste
from devmodel.iommu import records as rec
from devmodel.iommu.builder import Allocator, PageTable, cd_fields
from devmodel.iommufd import uapi
from devmodel.memory import ByteMemory

USER_BASE = 0x7F00_0000_0000
GPA_BASE = 0
GUEST_RAM_SIZE = 8 << 20
GUEST_TABLES = 0x10_0000  # guest tables live in [1 MiB, 4 MiB) of guest RAM
GUEST_TABLES_SIZE = 3 << 20
VEVENTQ_DEPTH = 64


def user_memory(size: int = GUEST_RAM_SIZE, base: int = USER_BASE) -> ByteMemory:
    """The VMM's guest RAM: a buffer at a fixed user VA."""
    return ByteMemory(size, base=base)


def guest_view(user: ByteMemory, gpa_base: int = GPA_BASE) -> ByteMemory:
    """The same bytes seen at guest physical addresses."""
    return ByteMemory(user.size, base=gpa_base, buffer=user.buf)


@dataclass
class NestedMaster:
    """Every ID and fd of one nested master, plus the guest's stage-1 table."""

    host: HostMachine
    sid: int
    vsid: int
    dev_id: int
    ioas_id: int
    parent_id: int
    viommu_id: int
    vdev_id: int
    nested_id: int
    fault_id: int
    fault_fd: int
    veventq_id: int
    veventq_fd: int
    cd_addr: int
    page_table: PageTable
    guest: ByteMemory

    def map_guest_page(self, va: int, gpa: int, write: bool = True) -> None:
        """The guest maps ``va`` -> ``gpa`` in its stage-1 table (CD 0)."""
        self.page_table.map(va, gpa, write=write)


def make_nested_master(host: HostMachine, user: ByteMemory, sid: int, vsid: int,
                       ioas_id: int | None = None, name: str = "ep",
                       veventq_depth: int = VEVENTQ_DEPTH, s1cdmax: int = 0) -> NestedMaster:
    """Bind ``sid``, build the guest's stage 1 and attach it nested under a vSMMU."""
    ctx = host.ctx
    guest = guest_view(user)
    dev_id = host.bind(sid, name)
    if ioas_id is None:
        ioas_id = ctx.ioas_alloc()
        ctx.ioas_map(ioas_id, user.base, user.size, iova=GPA_BASE)
    parent = ctx.hwpt_alloc(dev_id, ioas_id, uapi.IOMMU_HWPT_ALLOC_NEST_PARENT)
    viommu = ctx.viommu_alloc(dev_id, parent, uapi.IOMMU_VIOMMU_TYPE_ARM_SMMUV3)
    vdev = ctx.vdevice_alloc(viommu, dev_id, vsid)
    veventq_id, veventq_fd = ctx.veventq_alloc(viommu, uapi.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3,
                                               veventq_depth)
    fault_id, fault_fd = ctx.fault_alloc()
    alloc = Allocator(GUEST_TABLES + (sid % 16) * (GUEST_TABLES_SIZE // 16), GUEST_TABLES_SIZE // 16)
    cd_size = rec.CD_SIZE << s1cdmax
    cd_addr = alloc.alloc(cd_size, max(cd_size, 64))
    pt = PageTable(guest, alloc)
    guest.write(cd_addr, rec.CD.encode(cd_fields(pt.root, asid=vsid & 0xFFFF)))
    ste = guest_s1_ste(cd_addr, s1cdmax=s1cdmax)
    nested = ctx.hwpt_alloc(dev_id, viommu, 0, uapi.IOMMU_HWPT_DATA_ARM_SMMUV3, ste,
                            fault_id=fault_id)
    ctx.attach(dev_id, nested)
    return NestedMaster(host, sid, vsid, dev_id, ioas_id, parent, viommu, vdev, nested, fault_id,
                        fault_fd, veventq_id, veventq_fd, cd_addr, pt, guest)
