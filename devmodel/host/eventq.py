"""The host's Event queue handler (Linux ``arm_smmu_evtq_thread`` / ``arm_smmu_handle_event``).

Each physical event record is decoded once and goes exactly one way
(iommufd.md section 3.7):

* stage-2 faults (S2=1) are the host's own business (the IPA is not in the IOAS or the
  IOAS forbids the access): logged and counted, never forwarded to the guest;
* the eight forwardable IDs (C_BAD_STE, F_STREAM_DISABLED, C_BAD_SUBSTREAMID, C_BAD_CD,
  F_TRANSLATION, F_ADDR_SIZE, F_ACCESS, F_PERMISSION) of a master attached to a nested
  domain of a vSMMU go to the vEVENTQ through the iommufd SMMUv3 driver's
  ``report_event``, which swaps the virtual SID in;
* everything else is logged and counted as unhandled.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from devmodel.host.counters import HostCounters
from devmodel.iommu.records import EventId, decode_event
from devmodel.iommufd.arm_smmuv3 import FORWARDED_EVENTS, report_event
from devmodel.iommufd.device import Device
from devmodel.trace import TRACER

log = logging.getLogger(__name__)

#: sid -> the iommufd device bound with that StreamID (None when not bound).
MasterLookup = Callable[[int], "Device | None"]


def event_name(event_id: int) -> str:
    try:
        return EventId(event_id).name
    except ValueError:
        return f"EVENT_{event_id:#04x}"


def event_identity(evt) -> str:  # noqa: ANN001
    """How logs name one fault: event, stream, substream, address."""
    ssid = f"{evt.SubstreamID:#x}" if evt.SSV else "-"
    return (f"{event_name(evt.EventID)} sid={evt.StreamID:#x} ssid={ssid} "
            f"addr={evt.InputAddr:#x}{' S2 ipa=%#x' % evt.IPA if evt.S2 else ''}")


class HostEventHandler:
    """Routes physical events: vEVENTQ, stage-2 accounting, or the log."""

    def __init__(self, masters: MasterLookup, counters: HostCounters, lock: threading.RLock) -> None:
        self.masters = masters
        self.counters = counters
        self.lock = lock

    def __call__(self, record: bytes, pa: int | None = None) -> None:
        evt = decode_event(record)
        name = event_name(evt.EventID)
        ident = event_identity(evt)
        self.counters.events[name] += 1
        fid = TRACER.take(("smmu.evtq", pa)) if pa is not None else 0
        TRACER.hop(fid, "host.evtq", event=name, sid=evt.StreamID, addr=evt.InputAddr)
        log.info("evtq: %s", ident)
        if evt.Stall:
            # STALL_MODEL=terminate on every modelled SMMU: a stall record is unexpected.
            log.warning("evtq: %s: stall events are not handled (no stall model)", ident)
            self.counters.events_unhandled += 1
            return
        if evt.S2:
            log.info("evtq: %s: stage-2 fault, handled by the host (not forwarded)", ident)
            self.counters.events_stage2 += 1
            return
        device = self.masters(evt.StreamID)
        if device is None:
            log.warning("evtq: %s: no master bound to this StreamID", ident)
            self.counters.events_unhandled += 1
            return
        if evt.EventID not in FORWARDED_EVENTS or device.nested_viommu() is None:
            log.info("evtq: %s: not a forwardable event of a nested master (dev %d): logged",
                     ident, device.id)
            self.counters.events_unhandled += 1
            return
        with self.lock:
            rc = report_event(device, record, trace=fid)
        if rc == 0:
            self.counters.events_forwarded += 1
            log.info("evtq: %s: forwarded to the vEVENTQ of dev %d", ident, device.id)
        else:
            self.counters.events_dropped += 1
            log.warning("evtq: %s: vEVENTQ refused it (%d): dropped", ident, rc)
