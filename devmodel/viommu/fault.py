"""Reading the FAULT fd and answering it (iommufd.md section 2).

A read yields whole groups of 40-byte ``struct iommu_hwpt_pgfault`` records sharing one
cookie, the LAST_PAGE record last. Each group becomes one :class:`PageGroup` (vSID found
from the record's dev_id), each record one guest PRI queue record. The guest answers with
CMD_PRI_RESP naming (StreamID, PRGIndex); :class:`PendingResponses` finds the cookie and
the response goes back as ``struct iommu_hwpt_page_response {cookie, code}``.

Response codes: the FAULT fd accepts only SUCCESS (0) and INVALID (1) (section 2.5; the
FAILURE code was removed from the uAPI because a PCIe Response Failure disables PRI for
the whole function, shared by its VFs). A guest CMD_PRI_RESP with Resp=ResponseFailure
is therefore written as INVALID (the pages are not made resident, the device reports the
accesses as errors and PRI stays enabled) and counted in
``pri_resp_failure_as_invalid``. Likewise the SMMUv3 automatic Response Failure (PRIQ
disabled) is written as INVALID.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from devmodel.iommu.records import PRI, PriResp
from devmodel.iommufd import uapi
from devmodel.trace import TRACER

log = logging.getLogger(__name__)

#: CMD_PRI_RESP.Resp (decoded by value, smmuv3-pcie.md section 4.2) -> FAULT fd code.
PRI_RESP_TO_FAULT_CODE = {
    PriResp.SUCCESS: uapi.IOMMUFD_PAGE_RESP_SUCCESS,
    PriResp.INVALID_REQUEST: uapi.IOMMUFD_PAGE_RESP_INVALID,
    PriResp.RESPONSE_FAILURE: uapi.IOMMUFD_PAGE_RESP_INVALID,
}


@dataclass
class PageGroup:
    """One FAULT group on its way to the guest PRIQ."""

    cookie: int
    vsid: int
    records: list = field(default_factory=list)  # decoded iommu_hwpt_pgfault
    fault: int = 0

    @property
    def last(self):  # noqa: ANN201
        return self.records[-1]

    @property
    def prg_index(self) -> int:
        return self.last.grpid

    def pri_records(self) -> list[tuple[bytes, bool]]:
        """(PRI queue record, is Last) per request, in arrival order."""
        out = []
        for r in self.records:
            ssv = bool(r.flags & uapi.IOMMU_PGFAULT_FLAGS_PASID_VALID)
            last = bool(r.flags & uapi.IOMMU_PGFAULT_FLAGS_LAST_PAGE)
            rec = PRI.encode(StreamID=self.vsid, SSV=int(ssv), SubstreamID=r.pasid if ssv else 0,
                             R=int(bool(r.perm & uapi.IOMMU_PGFAULT_PERM_READ)),
                             W=int(bool(r.perm & uapi.IOMMU_PGFAULT_PERM_WRITE)),
                             Exec=int(ssv and bool(r.perm & uapi.IOMMU_PGFAULT_PERM_EXEC)),
                             Priv=int(ssv and bool(r.perm & uapi.IOMMU_PGFAULT_PERM_PRIV)),
                             L=int(last), PRGIndex=r.grpid & 0x1FF, PageAddr=r.addr & ~0xFFF)
            out.append((rec, last))
        return out


class FaultReader:
    """Turns FAULT fd bytes into :class:`PageGroup` s (records of one cookie, in order)."""

    def __init__(self, fault_id: int, vsid_of: dict[int, int]) -> None:
        self.fault_id = fault_id
        self.vsid_of = vsid_of  # dev_id -> vSID

    def parse(self, data: bytes) -> tuple[list[PageGroup], list[int]]:
        """(groups, cookies of records from unknown devices: to be answered INVALID)."""
        groups: list[PageGroup] = []
        orphans: list[int] = []
        by_cookie: dict[int, PageGroup] = {}
        for pos in range(0, len(data) - uapi.PGFAULT_SIZE + 1, uapi.PGFAULT_SIZE):
            r = uapi.unpack("iommu_hwpt_pgfault", data[pos:pos + uapi.PGFAULT_SIZE])
            vsid = self.vsid_of.get(r.dev_id)
            if vsid is None:
                log.warning("fault %d: record of unknown dev_id %d (cookie %d)", self.fault_id,
                            r.dev_id, r.cookie)
                if r.cookie not in orphans:
                    orphans.append(r.cookie)
                continue
            group = by_cookie.get(r.cookie)
            if group is None:
                group = PageGroup(r.cookie, vsid, fault=TRACER.take(("fault", self.fault_id, r.cookie)))
                by_cookie[r.cookie] = group
                groups.append(group)
            group.records.append(r)
        return groups, orphans


@dataclass
class Outstanding:
    cookie: int
    fault: int
    pasid: int | None


class PendingResponses:
    """Groups the guest has seen and must answer: (vSID, PRG index) -> cookie."""

    def __init__(self) -> None:
        self.by_prg: dict[tuple[int, int], Outstanding] = {}

    def add(self, group: PageGroup) -> None:
        key = (group.vsid, group.prg_index)
        if key in self.by_prg:
            log.warning("pri: vsid %#x PRG %d reused before its response (cookie %d dropped)",
                        group.vsid, group.prg_index, self.by_prg[key].cookie)
        last = group.last
        pasid = last.pasid if last.flags & uapi.IOMMU_PGFAULT_FLAGS_PASID_VALID else None
        self.by_prg[key] = Outstanding(group.cookie, group.fault, pasid)

    def outstanding(self) -> int:
        """How many groups the guest still owes a response (``stats``: prgs_outstanding)."""
        return len(self.by_prg)

    def take(self, vsid: int, prg_index: int) -> Outstanding | None:
        return self.by_prg.pop((vsid, prg_index), None)

    def drop_vsid(self, vsid: int) -> int:
        """The kernel auto-answered this vSID's groups (replace/detach): forget them."""
        keys = [k for k in self.by_prg if k[0] == vsid]
        for k in keys:
            del self.by_prg[k]
        return len(keys)

    def clear(self) -> None:
        self.by_prg.clear()
