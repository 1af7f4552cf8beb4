"""What the host driver saw: one place for every counter the layers above may query."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class HostCounters:
    """Counters of the host SMMUv3 driver (names are stable: tests and traces use them).

    ``events`` counts physical EVTQ records by EventID name; every record then lands in
    exactly one of ``events_forwarded`` / ``events_stage2`` / ``events_unhandled`` /
    ``events_dropped`` (forwardable but the vEVENTQ refused it, e.g. no queue).
    """

    events: Counter = field(default_factory=Counter)
    events_forwarded: int = 0
    events_stage2: int = 0
    events_unhandled: int = 0
    events_dropped: int = 0
    evtq_overflows: int = 0
    priq_overflows: int = 0
    page_requests: int = 0
    stop_markers: int = 0
    partials_discarded: int = 0
    unknown_sid: int = 0
    groups: int = 0
    responses: Counter = field(default_factory=Counter)
    commands: int = 0
    syncs: int = 0
    cmdq_errors: Counter = field(default_factory=Counter)
    gerrors: Counter = field(default_factory=Counter)

    def snapshot(self) -> dict:
        """A plain-dict copy (Counters become dicts) for logs, traces and assertions."""
        out = {}
        for name, value in vars(self).items():
            out[name] = dict(value) if isinstance(value, Counter) else value
        return out
