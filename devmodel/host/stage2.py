"""Stage 2 from an IOAS, and the VMIDs that name each stage 2 in the SMMU.

Every paging HWPT and every vIOMMU gets a VMID; the physical STE carries it in S2VMID and
the emulated SMMU calls the VMID's stage-2 hook to translate an IPA. The hook answers
from :meth:`devmodel.iommufd.ioas.Ioas.translate`: the user VA (= host PA in this model,
see :mod:`devmodel.host.physmem`) or a stage-2 fault: F_TRANSLATION when the IPA is not
mapped in the IOAS, F_PERMISSION when the mapping lacks READABLE/WRITEABLE.
"""

from __future__ import annotations

import logging

from devmodel.iommu.faults import Access
from devmodel.iommu.records import EventId
from devmodel.iommu.translation import Stage2Fault
from devmodel.iommufd.ioas import Ioas
from devmodel.iommufd.uapi import IOMMU_IOAS_MAP_READABLE, IOMMU_IOAS_MAP_WRITEABLE

log = logging.getLogger(__name__)

VMID_BITS_16 = 16


class IoasStage2:
    """The stage-2 hook of one VMID: IPA -> user VA through an IOAS."""

    def __init__(self, ioas: Ioas, vmid: int) -> None:
        self.ioas = ioas
        self.vmid = vmid

    def __call__(self, ipa: int, access: Access) -> int | Stage2Fault:
        hit = self.ioas.translate(ipa)
        if hit is None:
            log.info("stage2 vmid %d: IPA %#x not mapped in IOAS %d", self.vmid, ipa, self.ioas.id)
            return Stage2Fault(EventId.F_TRANSLATION, f"IPA {ipa:#x} not in IOAS {self.ioas.id}")
        user_va, prot = hit
        need = IOMMU_IOAS_MAP_WRITEABLE if access is Access.WRITE else IOMMU_IOAS_MAP_READABLE
        if not prot & need:
            log.info("stage2 vmid %d: IPA %#x %s denied by IOAS prot %#x", self.vmid, ipa,
                     access.name, prot)
            return Stage2Fault(EventId.F_PERMISSION, f"IOAS {self.ioas.id} prot {prot:#x}")
        return user_va


class VmidAllocator:
    """Lowest-free VMIDs from 1 (0 is left unused, as Linux reserves it)."""

    def __init__(self, bits: int = VMID_BITS_16) -> None:
        self.limit = 1 << bits
        self.used: set[int] = set()

    def alloc(self) -> int:
        for vmid in range(1, self.limit):
            if vmid not in self.used:
                self.used.add(vmid)
                return vmid
        raise OSError(28, "no free VMID")  # ENOSPC

    def free(self, vmid: int) -> None:
        self.used.discard(vmid)
