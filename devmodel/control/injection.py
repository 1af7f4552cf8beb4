"""Fault injection at every layer, as control-socket commands (``inject.<layer>.<what>``).

Each injection enters a layer through the interface that layer really has, so what
follows is the model's genuine behaviour, not a shortcut:

* endpoint: a DMA access issued by the endpoint (StreamID, PASID) through the SMMU;
* smmu: a record written into the physical EVTQ / a PCIe page request into the PRIQ,
  exactly as the hardware would (queue full → the queue's overflow rule);
* host: ``iommufd_viommu_report_event`` / ``iommufd_report_iopf`` as a driver calls them
  (the selftest's TRIGGER_VEVENT / TRIGGER_IOPF), allocation failures, and a policy for
  page responses arriving on the FAULT fd (drop or delay);
* viommu: hold guest event delivery (records pile up in the vEVENTQ, then the guest queue
  overflows on release), raise a GERROR.

Every injected fault is born in the tracer with an ``inject`` hop, so ``devmodel trace``
follows it like any other. Arguments are validated by the control server (ranges below).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable

from devmodel.control.protocol import Param
from devmodel.control.server import CommandFailed, ControlServer
from devmodel.iommu import records as rec
from devmodel.iommu.faults import Access
from devmodel.iommufd.uapi import IOMMU_VEVENTQ_TYPE_ARM_SMMUV3
from devmodel.trace import TRACER
from vfio_user.device import MODEL_LOCK

if TYPE_CHECKING:
    from devmodel.machine import Machine

U64 = (1 << 64) - 1
SID_MAX = (1 << 32) - 1
SSID_MAX = (1 << 20) - 1
BURST_MAX = 100000
WORKER_TIMEOUT = 30.0


def _on_endpoint_worker(machine: "Machine", fn: Callable[[], Any]) -> Any:
    """Run ``fn`` where the endpoint's own DMA runs (its worker) and wait for the result."""
    ctx = machine.endpoint.ctx
    if ctx is None:
        raise CommandFailed("no vfio-user client attached to the endpoint (start QEMU first)")
    done = threading.Event()
    box: dict[str, Any] = {}

    def job() -> None:
        try:
            with MODEL_LOCK:
                box["result"] = fn()
        except Exception as exc:  # reported to the control client
            box["error"] = exc
        finally:
            done.set()
    ctx.call_soon(job)
    if not done.wait(WORKER_TIMEOUT):
        raise CommandFailed("the endpoint worker did not run the injection in time")
    if "error" in box:
        raise CommandFailed(f"{type(box['error']).__name__}: {box['error']}")
    return box["result"]


def register_injections(control: ControlServer, machine: "Machine") -> None:
    """Register every ``inject.*`` command for ``machine`` on ``control``."""
    host = machine.host
    sid = machine.endpoint.sid  # the endpoint's physical StreamID

    # --- endpoint ------------------------------------------------------------------------
    def endpoint_dma(iova: int, pasid: int | None, write: bool, count: int, stride: int) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            faults: list[int] = []
            ok = 0
            for i in range(count):
                addr = (iova + i * stride) & U64
                access = Access.WRITE if write else Access.READ
                with TRACER.origin("endpoint.dma", sid=sid, ssid=pasid, addr=addr, access=access.name,
                                   injected=True) as origin:
                    res = host.smmu.translate(sid, pasid, addr, 1, access)
                if res.ok:
                    ok += 1
                else:
                    faults.append(origin.fault)
            return {"translated": ok, "faulted": len(faults), "fault_ids": faults[:64]}
        return _on_endpoint_worker(machine, run)

    control.register("inject.endpoint.dma", endpoint_dma, {
        "iova": Param(int, required=True, min=0, max=U64, help="IOVA the endpoint accesses"),
        "pasid": Param(int, min=0, max=SSID_MAX, help="SubstreamID (omit for none)"),
        "write": Param(bool, default=False),
        "count": Param(int, default=1, min=1, max=BURST_MAX, help="a burst of this many accesses"),
        "stride": Param(int, default=4096, min=0, max=1 << 32, help="address step within a burst"),
    }, help="the endpoint issues DMA through the SMMU (a fault travels the whole path)")

    # --- smmu ----------------------------------------------------------------------------
    def smmu_event(event_id: int, stream: int | None, ssid: int | None, addr: int, write: bool,
                   s2: bool, count: int) -> dict[str, Any]:
        target = sid if stream is None else stream
        fields = {"EventID": event_id, "StreamID": target, "InputAddr": addr, "RnW": 0 if write else 1,
                  "S2": int(s2)}
        if ssid is not None:
            fields.update(SSV=1, SubstreamID=ssid)
        written, ids = 0, []
        with MODEL_LOCK:
            for _ in range(count):
                fid = TRACER.begin("inject", what="smmu.event", event=event_id, sid=target, ssid=ssid, addr=addr)
                ids.append(fid)
                written += bool(host.smmu.eventq.record(rec.EVENT.encode(fields), trace_id=fid))
        return {"written": written, "dropped": count - written, "fault_ids": ids[:64]}

    control.register("inject.smmu.event", smmu_event, {
        "event_id": Param(int, required=True, min=0, max=0xFF, help="EventID (e.g. 0x10 F_TRANSLATION)"),
        "stream": Param(int, min=0, max=SID_MAX, help="physical StreamID (default: the endpoint's)"),
        "ssid": Param(int, min=0, max=SSID_MAX),
        "addr": Param(int, default=0, min=0, max=U64),
        "write": Param(bool, default=False),
        "s2": Param(bool, default=False, help="a stage-2 fault (addr is an IPA)"),
        "count": Param(int, default=1, min=1, max=BURST_MAX, help="write this many (fill to overflow)"),
    }, help="write an arbitrary event record into the physical EVTQ")

    def smmu_prg(addr: int, pasid: int | None, prg_index: int, pages: int, write: bool) -> dict[str, Any]:
        queued = 0
        with MODEL_LOCK:
            fid = TRACER.begin("inject", what="smmu.page_request", sid=sid, ssid=pasid, addr=addr, pages=pages)
            for i in range(pages):
                queued += bool(host.smmu.page_request(sid, pasid, addr + i * 4096, prg_index, i == pages - 1,
                                                      read=True, write=write, trace_id=fid))
        return {"queued": queued, "fault_id": fid}

    control.register("inject.smmu.page_request", smmu_prg, {
        "addr": Param(int, required=True, min=0, max=U64),
        "pasid": Param(int, min=0, max=SSID_MAX),
        "prg_index": Param(int, default=1, min=0, max=511),
        "pages": Param(int, default=1, min=1, max=512, help="requests in the group (the last has Last=1)"),
        "write": Param(bool, default=False),
    }, help="a page request group from the endpoint into the physical PRIQ")

    # --- host / iommufd ------------------------------------------------------------------
    viommu = machine.viommu

    def host_vevent(event_id: int, vsid: int, addr: int, count: int) -> dict[str, Any]:
        data = rec.EVENT.encode({"EventID": event_id, "StreamID": vsid, "InputAddr": addr, "RnW": 1})
        results = []
        with MODEL_LOCK:
            for _ in range(count):
                fid = TRACER.begin("inject", what="host.vevent", event=event_id, vsid=vsid, addr=addr)
                results.append(host.ctx.viommu_report_event(viommu.viommu_id, IOMMU_VEVENTQ_TYPE_ARM_SMMUV3,
                                                            data, trace=fid))
        return {"queued": results.count(0), "failed": len(results) - results.count(0)}

    control.register("inject.host.vevent", host_vevent, {
        "event_id": Param(int, default=int(rec.EventId.F_TRANSLATION), min=0, max=0xFF),
        "vsid": Param(int, default=0x20, min=0, max=SID_MAX, help="virtual StreamID (already swapped)"),
        "addr": Param(int, default=0, min=0, max=U64),
        "count": Param(int, default=1, min=1, max=BURST_MAX),
    }, help="report a vevent to the vEVENTQ directly (like the selftest's TRIGGER_VEVENT)")

    def host_alloc_failures(count: int) -> dict[str, Any]:
        with MODEL_LOCK:
            host.ctx.inject_vevent_alloc_failures(viommu.veventq_id, count)
        return {"armed": count}

    control.register("inject.host.alloc_failures", host_alloc_failures, {
        "count": Param(int, required=True, min=0, max=BURST_MAX),
    }, help="the next N vEVENTQ reports fail their allocation (lost events)")

    def host_response(mode: str, count: int) -> dict[str, Any]:
        with MODEL_LOCK:
            policy = host.ctx.response_policy
            if mode == "release":
                return {"released": policy.release()}
            policy.mode, policy.remaining = mode, count
            return {"mode": mode, "count": count, "dropped_so_far": policy.dropped,
                    "held": len(policy.held)}

    control.register("inject.host.response", host_response, {
        "mode": Param(str, required=True, choices=("pass", "drop", "hold", "release")),
        "count": Param(int, default=1, min=0, max=BURST_MAX, help="how many page responses it applies to"),
    }, help="drop or hold (delay until 'release') the next page responses written to the FAULT fd")

    # --- viommu ----------------------------------------------------------------------------
    def viommu_hold(on: bool, stage: str) -> dict[str, Any]:
        with MODEL_LOCK:
            return viommu.hold_delivery(on, stage)

    control.register("inject.viommu.hold", viommu_hold, {
        "on": Param(bool, required=True),
        "stage": Param(str, default="guest", choices=("guest", "fd"),
                       help="guest: read the fds but hold writes to the guest queues (guest queue "
                            "overflows on release); fd: stop reading the fds (the host vEVENTQ overflows)"),
    }, help="hold event/PRI delivery to the guest; on=false releases everything held")

    def viommu_gerror(bit: str) -> dict[str, Any]:
        with MODEL_LOCK:
            return viommu.inject_gerror(bit)

    control.register("inject.viommu.gerror", viommu_gerror, {
        "bit": Param(str, required=True, choices=("CMDQ_ERR", "EVENTQ_ABT_ERR", "PRIQ_ABT_ERR",
                                                   "MSI_CMDQ_ABT_ERR", "MSI_EVENTQ_ABT_ERR",
                                                   "MSI_PRIQ_ABT_ERR", "MSI_GERROR_ABT_ERR", "SFM_ERR")),
    }, help="toggle a GERROR bit of the guest vIOMMU (and raise its GERROR vector)")
