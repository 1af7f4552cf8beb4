"""Reading the vEVENTQ fd (iommufd.md section 3): records, sequence numbers, losses.

The fd yields ``struct iommufd_vevent_header {flags, sequence}`` records, each followed by
a 32-byte SMMUv3 event (vSID already in place), and at most one trailing 8-byte
LOST_EVENTS header. Sequence numbers advance by one per *reported* event, lost ones
included, modulo 2^31 (section 3.4): a gap of d > 1 between records means d - 1 lost
events; a LOST_EVENTS header with sequence L after record P means L - P lost events.
The reader turns the stream into an ordered list of :class:`Vevent` and
:class:`LostEvents` items, taking each record's trace link ("veventq", id, sequence).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field

from devmodel.iommu.records import EVENT_SIZE
from devmodel.iommufd.uapi import INT_MAX, IOMMU_VEVENTQ_FLAG_LOST_EVENTS, VEVENT_HEADER_SIZE
from devmodel.trace import TRACER

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")
assert _HEADER.size == VEVENT_HEADER_SIZE
SEQ_MOD = INT_MAX + 1
#: At most this many lost sequence numbers have their trace links collected one by one.
MAX_TRACED_LOSSES = 4096


@dataclass
class Vevent:
    """One SMMUv3 event from the host."""

    sequence: int
    data: bytes
    fault: int = 0


@dataclass
class LostEvents:
    """``count`` events the host reported but the VMM never got."""

    count: int
    faults: list[int] = field(default_factory=list)


class VeventReader:
    """Parses vEVENTQ reads and keeps the sequence state across them."""

    def __init__(self, veventq_id: int) -> None:
        self.veventq_id = veventq_id
        self.prev_seq = -1  # a fresh queue starts at sequence 0

    def _lost_between(self, first: int, last: int) -> LostEvents:
        """Sequences ``first``..``last`` inclusive (mod 2^31) were lost."""
        count = (last - first + 1) % SEQ_MOD
        faults = []
        for i in range(min(count, MAX_TRACED_LOSSES)):
            fid = TRACER.take(("veventq", self.veventq_id, (first + i) % SEQ_MOD))
            if fid:
                faults.append(fid)
        return LostEvents(count, faults)

    def parse(self, data: bytes) -> list[Vevent | LostEvents]:
        """Decode one read's bytes (whole records only, as the kernel returns them)."""
        out: list[Vevent | LostEvents] = []
        pos = 0
        while pos + VEVENT_HEADER_SIZE <= len(data):
            flags, seq = _HEADER.unpack_from(data, pos)
            pos += VEVENT_HEADER_SIZE
            expected = (self.prev_seq + 1) % SEQ_MOD
            if flags & IOMMU_VEVENTQ_FLAG_LOST_EVENTS:
                lost = self._lost_between(expected, seq)
                log.warning("veventq %d: LOST_EVENTS header seq=%d: %d events lost",
                            self.veventq_id, seq, lost.count)
                out.append(lost)
                self.prev_seq = seq
                continue
            if pos + EVENT_SIZE > len(data):
                log.error("veventq %d: truncated record at seq %d", self.veventq_id, seq)
                break
            if seq != expected:  # a new vEVENTQ's sequence starts at 0, so a loss before the first read counts too
                lost = self._lost_between(expected, (seq - 1) % SEQ_MOD)
                log.warning("veventq %d: sequence gap %d -> %d: %d events lost",
                            self.veventq_id, self.prev_seq, seq, lost.count)
                out.append(lost)
            fid = TRACER.take(("veventq", self.veventq_id, seq))
            out.append(Vevent(seq, bytes(data[pos:pos + EVENT_SIZE]), fid))
            pos += EVENT_SIZE
            self.prev_seq = seq
        return out
