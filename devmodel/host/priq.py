"""The host's PRI queue handler: page requests grouped by PRG index until Last (as
io-pgfault does), delivered to iommufd's FAULT object, answered with CMD_PRI_RESP.

* A record with L=0 waits on the host's partial list of its (StreamID, PRG index).
* L=1 closes the group: its partial requests in arrival order, then itself, are reported
  with ``IommufdContext.report_iopf`` one after another (iommufd's own grouping then sees a
  complete group at once) and share one response callback, so exactly one CMD_PRI_RESP
  goes out per group, whatever iommufd answers (iommufd.md section 2.2).
* Stop Markers (SSV=1, L=1, R=W=0) need no response and are discarded
  (smmuv3-pcie.md section 4.1).
* A PRIQ overflow means Last requests were auto-answered by the SMMU, so every partial
  group is discarded (``iopf_queue_discard_partial``).
* The response code maps iommufd -> CMD_PRI_RESP.Resp by value (section 4.2; Linux's
  enum names are misleading): SUCCESS -> Success (0b10), INVALID -> InvalidRequest
  (0b01), FAILURE -> ResponseFailure (0b00).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from devmodel.host.counters import HostCounters
from devmodel.host.eventq import MasterLookup
from devmodel.iommu.records import PRI, PriResp, is_stop_marker
from devmodel.iommufd import IommufdContext, PageRequest
from devmodel.trace import TRACER
from devmodel.iommufd.uapi import (
    IOMMU_PAGE_RESP_FAILURE,
    IOMMU_PAGE_RESP_INVALID,
    IOMMU_PAGE_RESP_SUCCESS,
    IOMMU_PGFAULT_FLAGS_LAST_PAGE,
    IOMMU_PGFAULT_FLAGS_PASID_VALID,
    IOMMU_PGFAULT_PERM_EXEC,
    IOMMU_PGFAULT_PERM_PRIV,
    IOMMU_PGFAULT_PERM_READ,
    IOMMU_PGFAULT_PERM_WRITE,
)

log = logging.getLogger(__name__)

#: iommufd / io-pgfault response code -> CMD_PRI_RESP.Resp.
IOPF_TO_PRI_RESP = {
    IOMMU_PAGE_RESP_SUCCESS: PriResp.SUCCESS,
    IOMMU_PAGE_RESP_INVALID: PriResp.INVALID_REQUEST,
    IOMMU_PAGE_RESP_FAILURE: PriResp.RESPONSE_FAILURE,
}

#: respond(sid, ssid or None, prg_index, resp): issue CMD_PRI_RESP + CMD_SYNC.
PriResponder = Callable[[int, "int | None", int, PriResp], None]


@dataclass(eq=False)
class PrgGroup:
    """One page request group of one StreamID, answered at most once."""

    sid: int
    prg_index: int
    requests: list[PageRequest] = field(default_factory=list)
    responded: bool = False

    def ident(self) -> str:
        last = self.requests[-1] if self.requests else None
        pasid = f"{last.pasid:#x}" if last is not None and last.pasid_valid else "-"
        addrs = ",".join(f"{r.addr:#x}" for r in self.requests)
        return f"prg sid={self.sid:#x} pasid={pasid} index={self.prg_index} pages=[{addrs}]"


def page_request(rec) -> PageRequest:  # noqa: ANN001
    """A PRI queue record as io-pgfault's ``struct iommu_fault_page_request``."""
    flags = (IOMMU_PGFAULT_FLAGS_LAST_PAGE if rec.L else 0) | (
        IOMMU_PGFAULT_FLAGS_PASID_VALID if rec.SSV else 0)
    perm = ((IOMMU_PGFAULT_PERM_READ if rec.R else 0) | (IOMMU_PGFAULT_PERM_WRITE if rec.W else 0)
            | (IOMMU_PGFAULT_PERM_EXEC if rec.Exec else 0) | (IOMMU_PGFAULT_PERM_PRIV if rec.Priv else 0))
    return PageRequest(flags=flags, pasid=rec.SubstreamID if rec.SSV else 0, grpid=rec.PRGIndex,
                       perm=perm, addr=rec.PageAddr)


class HostPriHandler:
    """PRIQ records -> groups -> FAULT; iommufd responses -> CMD_PRI_RESP."""

    def __init__(self, masters: MasterLookup, ctx: IommufdContext, respond: PriResponder,
                 counters: HostCounters, lock: threading.RLock) -> None:
        self.masters = masters
        self.ctx = ctx
        self.respond = respond
        self.counters = counters
        self.lock = lock
        self.partial: dict[tuple[int, int], PrgGroup] = {}

    def __call__(self, record: bytes, pa: int | None = None) -> None:
        rec = PRI.decode(record)
        req = page_request(rec)
        req.trace = TRACER.take(("smmu.priq", pa)) if pa is not None else 0
        TRACER.hop(req.trace, "host.priq", sid=rec.StreamID, prg=rec.PRGIndex, last=rec.L,
                   addr=req.addr)
        sid = rec.StreamID
        pasid = f"{req.pasid:#x}" if req.pasid_valid else "-"
        ident = f"ppr sid={sid:#x} pasid={pasid} index={rec.PRGIndex} addr={req.addr:#x} L={rec.L}"
        if is_stop_marker(rec):
            self.counters.stop_markers += 1
            log.info("priq: %s: stop marker, discarded", ident)
            return
        self.counters.page_requests += 1
        device = self.masters(sid)
        if device is None:
            self.counters.unknown_sid += 1
            log.warning("priq: %s: no master bound to this StreamID", ident)
            if req.last:
                self.respond(sid, req.pasid if req.pasid_valid else None, rec.PRGIndex,
                             PriResp.INVALID_REQUEST)
                self.counters.responses[PriResp.INVALID_REQUEST.name] += 1
            return
        key = (sid, rec.PRGIndex)
        group = self.partial.setdefault(key, PrgGroup(sid, rec.PRGIndex))
        group.requests.append(req)
        if not req.last:
            log.info("priq: %s: partial (%d so far)", ident, len(group.requests))
            return
        del self.partial[key]
        self._deliver(device.id, group)

    def _deliver(self, dev_id: int, group: PrgGroup) -> None:
        self.counters.groups += 1
        log.info("priq: %s: group of %d complete -> FAULT of dev %d", group.ident(),
                 len(group.requests), dev_id)

        def on_response(last: PageRequest, code: int) -> None:
            self._group_response(group, code)

        with self.lock:
            for req in group.requests:
                self.ctx.report_iopf(dev_id, req, on_response)

    def _group_response(self, group: PrgGroup, code: int) -> None:
        if group.responded:
            return
        group.responded = True
        resp = IOPF_TO_PRI_RESP.get(code, PriResp.RESPONSE_FAILURE)
        last = group.requests[-1]
        ssid = last.pasid if last.pasid_valid else None
        log.info("priq: %s: response %d -> CMD_PRI_RESP %s", group.ident(), code, resp.name)
        fid = last.trace or next((r.trace for r in group.requests if r.trace), 0)
        TRACER.hop(fid, "host.response", sid=group.sid, prg=group.prg_index, resp=resp.name)
        self.counters.responses[resp.name] += 1
        self.respond(group.sid, ssid, group.prg_index, resp)

    def discard_partials(self) -> int:
        """PRIQ overflow: groups still waiting for Last will never complete."""
        n = sum(len(g.requests) for g in self.partial.values())
        for group in self.partial.values():
            log.warning("priq: overflow: discarding partial %s", group.ident())
        self.partial.clear()
        self.counters.partials_discarded += n
        return n
