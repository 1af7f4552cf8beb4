"""The IOPF core (``drivers/iommu/io-pgfault.c``): page requests, groups, one response each.

A driver reports page requests one at a time; requests without LAST_PAGE wait on the
device's partial list, and the LAST_PAGE request closes a group made of every partial
request with the same grpid (PASID not compared), in arrival order, then itself. The group
sits on the device's pending list until exactly one response goes back to the driver
(reference section 2.2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from devmodel.iommufd.uapi import (
    IOMMU_PAGE_RESP_FAILURE,
    IOMMU_PAGE_RESP_INVALID,
    IOMMU_PGFAULT_FLAGS_LAST_PAGE,
    IOMMU_PGFAULT_FLAGS_PASID_VALID,
)

if TYPE_CHECKING:
    from devmodel.iommufd.device import AttachHandle, Device

log = logging.getLogger(__name__)


@dataclass
class PageRequest:
    """``struct iommu_fault_page_request``: one request of a PRI group (or one stall)."""

    flags: int
    pasid: int
    grpid: int
    perm: int
    addr: int
    private_data: tuple[int, int] = (0, 0)
    #: Fault id of the request (devmodel.trace), 0 when untraced; not part of the record.
    trace: int = field(default=0, compare=False)

    @property
    def last(self) -> bool:
        return bool(self.flags & IOMMU_PGFAULT_FLAGS_LAST_PAGE)

    @property
    def pasid_valid(self) -> bool:
        return bool(self.flags & IOMMU_PGFAULT_FLAGS_PASID_VALID)


#: Called once per group with the group's last request and the kernel response code
#: (IOMMU_PAGE_RESP_SUCCESS / INVALID / FAILURE); the host glue turns it into CMD_PRI_RESP.
ResponseCallback = Callable[[PageRequest, int], None]


@dataclass(eq=False)
class IopfGroup:
    """``struct iopf_group``: the requests of one PRG, the handle it was routed by."""

    device: "Device"
    handle: "AttachHandle"
    requests: list[PageRequest]
    on_response: ResponseCallback | None
    cookie: int = 0
    responded: bool = field(default=False)

    @property
    def last(self) -> PageRequest:
        return self.requests[-1]

    @property
    def trace(self) -> int:
        """The group's fault id: its Last request's, else the first traced member's."""
        if self.last.trace:
            return self.last.trace
        return next((r.trace for r in self.requests if r.trace), 0)

    def respond(self, code: int) -> bool:
        """Send the group's response to the driver, at most once (io-pgfault rule)."""
        if self.responded:
            return False
        self.responded = True
        if self in self.device.pending:
            self.device.pending.remove(self)
        log.info("iopf response dev=%d pasid=%#x grpid=%#x code=%d", self.device.id,
                 self.last.pasid, self.last.grpid, code)
        if self.on_response is not None:
            self.on_response(self.last, code)
        return True


def report_device_fault(device: "Device", req: PageRequest,
                        on_response: ResponseCallback | None = None) -> int:
    """``iommu_report_device_fault``: route one request to the attached domain's handler.

    Returns 0, or a negative errno like the kernel (the caller has then already had its
    INVALID/FAILURE response through ``on_response``).
    """
    handle = device.find_fault_handler(req)
    log.info("iopf request dev=%d flags=%#x pasid=%#x grpid=%#x addr=%#x -> %s", device.id,
             req.flags, req.pasid, req.grpid, req.addr, handle)
    if handle is None:
        if on_response is not None:
            on_response(req, IOMMU_PAGE_RESP_INVALID)
        return -22  # -EINVAL: nobody takes page faults here
    if not req.last:
        device.partial.append(req)
        return 0
    members = [r for r in device.partial if r.grpid == req.grpid]
    device.partial = [r for r in device.partial if r.grpid != req.grpid]
    group = IopfGroup(device, handle, [*members, req], on_response)
    device.pending.append(group)
    fault = handle.hwpt.fault
    if fault is None:  # handler vanished between lookup and delivery
        group.respond(IOMMU_PAGE_RESP_FAILURE)
        return 0
    fault.handle_group(group)
    return 0
