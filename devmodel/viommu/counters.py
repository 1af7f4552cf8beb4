"""What the vIOMMU dropped, lost or answered on the guest's behalf: one queryable place.

Every record that does not reach the guest is counted here (and logged where it
happens), so a test or a user can account for each fault exactly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class VIommuCounters:
    """Counters of one vIOMMU function (names are stable: tests and traces use them).

    Events: ``events_read`` came out of the vEVENTQ fd; each then lands in exactly one of
    ``events_written`` (guest EVTQ) / ``events_dropped_full`` (guest EVTQ full) /
    ``events_dropped_disabled`` (EVENTQEN=0 or EVENTQ_ABT_ERR). ``events_lost_host`` are
    events the host lost before the VMM read them (LOST_EVENTS header or sequence gap).
    ``evtq_lost`` = host losses + both drop kinds: what the guest reads at VIOMMU_EVTQ_LOST.
    """

    events_read: int = 0
    events_written: int = 0
    events_dropped_full: int = 0
    events_dropped_disabled: int = 0
    events_lost_host: int = 0
    evtq_overflows: int = 0
    events_synthesized: Counter = field(default_factory=Counter)
    page_requests_read: int = 0
    groups_read: int = 0
    pri_written: int = 0
    pri_dropped: int = 0
    priq_overflows: int = 0
    pri_auto_responses: Counter = field(default_factory=Counter)
    pri_responses: Counter = field(default_factory=Counter)
    pri_resp_failure_as_invalid: int = 0
    pri_resp_unmatched: int = 0
    pri_resp_stale: int = 0
    groups_abandoned: int = 0
    plugs: int = 0  # endpoints hot-plugged (vDEVICE created, STE re-evaluated)
    unplugs: int = 0  # endpoints hot-unplugged (detached, vDEVICE destroyed)
    commands: Counter = field(default_factory=Counter)
    cmdq_errors: Counter = field(default_factory=Counter)
    invalidations: int = 0
    ste_installs: Counter = field(default_factory=Counter)
    sync_irqs: int = 0

    @property
    def evtq_lost(self) -> int:
        return self.events_lost_host + self.events_dropped_full + self.events_dropped_disabled

    def snapshot(self) -> dict:
        """A plain-dict copy (Counters become dicts) for logs and assertions."""
        out = {k: dict(v) if isinstance(v, Counter) else v for k, v in vars(self).items()}
        out["evtq_lost"] = self.evtq_lost
        return out
