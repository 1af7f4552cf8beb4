"""Per-fault traces: one id at a fault's birth, one structured event per hop.

A fault crosses layers that only exchange bytes (SMMU queue records, iommufd fd records,
guest queue records), none of which has room for a trace id. So the layers correlate by
what they do share: the physical address of a queue slot, a vEVENTQ sequence number, a
FAULT cookie, a guest queue slot. The producer :meth:`Tracer.link`\\ s that key to the
fault id when it writes the record, and the consumer :meth:`Tracer.take`\\ s it when it
reads the record. Nothing here changes a record byte, so fidelity is untouched.

Birth is lazy: an endpoint wraps each DMA in :meth:`Tracer.origin`, which costs a
thread-local assignment. Only when a lower layer reports a fault inside that scope does
:meth:`Tracer.current` allocate the id and emit the origin hop with the origin's own
timestamp, so per-hop latency starts where the endpoint issued the access.

Hop names are ``layer.step`` strings (see :data:`HOPS`); ``detail`` is a small dict of
JSON-able values. Events live in a bounded ring (overflow is counted, never silent);
subscribers (the control socket's ``trace`` stream, a trace file) get every event.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Iterator

#: The hops a fault can take, in journey order (documentation and table ordering).
HOPS = (
    "endpoint.dma",         # the access the endpoint issued (origin)
    "endpoint.page_request",
    "smmu.fault",           # the SMMU decided the access faults
    "smmu.evtq",            # event record written to the physical EVTQ slot
    "smmu.priq",            # page request written to the physical PRIQ slot
    "host.evtq",            # host driver consumed the EVTQ record
    "host.priq",
    "iommufd.veventq",      # record queued on a vEVENTQ (sequence number)
    "iommufd.fault",        # page-request group queued on a FAULT object (cookie)
    "iommufd.lost",         # dropped by iommufd (allocation failure / queue full)
    "viommu.read",          # the VMM read the record from the fd
    "guest.evtq",           # written to the guest's event queue slot (MSI-X raised)
    "guest.priq",
    "guest.overflow",       # guest queue full: dropped, overflow flag set
    "guest.consumed",       # the guest advanced CONS past the record
    "guest.response",       # guest CMD_PRI_RESP
    "iommufd.response",     # page response written to the FAULT fd
    "host.response",        # host driver's CMD_PRI_RESP
    "endpoint.prg_response",
    "endpoint.complete",
)

DEFAULT_CAPACITY = 65536


@dataclass(frozen=True)
class TraceEvent:
    """One hop of one fault."""

    fault: int
    hop: str
    t_ns: int
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"fault": self.fault, "hop": self.hop, "t_ns": self.t_ns,
                           **self.detail}, separators=(",", ":"), default=str)


@dataclass
class Origin:
    """The access an :meth:`Tracer.origin` scope stands for (what a fault is born with)."""

    hop: str
    t_ns: int
    detail: dict[str, Any]
    fault: int = 0

    def rearm(self, t_ns: int, **detail: Any) -> None:
        """Make the scope stand for a new access: its time and detail, not faulted yet.
        Cheaper than a new scope per access for an endpoint issuing many."""
        self.t_ns = t_ns
        self.detail.update(detail)
        self.fault = 0


class Tracer:
    """The process's fault tracer (thread-safe; subscribers run outside its lock)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.clock = clock
        self.enabled = True
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._events: deque[TraceEvent] = deque(maxlen=capacity)
        self._links: dict[Hashable, int] = {}
        self._subscribers: list[Callable[[TraceEvent], None]] = []
        self._local = threading.local()
        self.dropped = 0  # events pushed out of the ring before anyone read them

    # --- birth ----------------------------------------------------------------------
    def origin(self, hop: str, **detail: Any) -> "OriginScope":
        """Scope of one endpoint access; a fault inside it is born with this hop."""
        return OriginScope(self, Origin(hop, self.clock(), detail))

    def current(self, **birth_detail: Any) -> int:
        """The fault id of the access in progress on this thread, born on first call.

        Outside any :meth:`origin` scope a fault is born here with no origin hop (an
        injected record, for example).
        """
        if not self.enabled:
            return 0
        o: Origin | None = getattr(self._local, "origin", None)
        if o is None:
            return self.begin(None, **birth_detail)
        if not o.fault:
            o.fault = self.begin(o.hop, _t_ns=o.t_ns, **o.detail)
        return o.fault

    def in_fault(self) -> int:
        """The current access's fault id if it has faulted already, else 0 (no birth)."""
        o: Origin | None = getattr(self._local, "origin", None)
        return o.fault if o is not None else 0

    def begin(self, hop: str | None, _t_ns: int | None = None, **detail: Any) -> int:
        """A new fault id, recording ``hop`` (unless None) as its first event."""
        with self._lock:
            fault = next(self._ids)
        if hop is not None:
            self._emit(TraceEvent(fault, hop, _t_ns if _t_ns is not None else self.clock(), detail))
        return fault

    # --- hops -------------------------------------------------------------------------
    def hop(self, fault: int, hop: str, **detail: Any) -> None:
        """Record that ``fault`` reached ``hop`` now (no-op for fault 0 = untraced)."""
        if fault and self.enabled:
            self._emit(TraceEvent(fault, hop, self.clock(), detail))

    def link(self, key: Hashable, fault: int) -> None:
        """Remember that the record known by ``key`` carries ``fault``."""
        if fault and self.enabled:
            with self._lock:
                self._links[key] = fault
                if len(self._links) > 4 * (self._events.maxlen or DEFAULT_CAPACITY):
                    self._links.pop(next(iter(self._links)))  # oldest: a consumer never came

    def take(self, key: Hashable) -> int:
        """The fault linked to ``key`` (0 if none), forgetting the link."""
        with self._lock:
            return self._links.pop(key, 0)

    def peek(self, key: Hashable) -> int:
        with self._lock:
            return self._links.get(key, 0)

    # --- reading ------------------------------------------------------------------------
    def events(self, fault: int | None = None, since: int = 0) -> list[TraceEvent]:
        """Recorded events (of one fault, if given), oldest first, from ``since`` t_ns."""
        with self._lock:
            evs = list(self._events)
        return [e for e in evs if (fault is None or e.fault == fault) and e.t_ns >= since]

    def faults(self, since: int = 0) -> list[int]:
        """Fault ids seen since ``since``, in birth order."""
        seen: dict[int, None] = {}
        for e in self.events(since=since):
            seen.setdefault(e.fault, None)
        return list(seen)

    def subscribe(self, callback: Callable[[TraceEvent], None]) -> Callable[[], None]:
        """Call ``callback`` for every new event; returns the unsubscribe function."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)
        return unsubscribe

    def clear(self) -> None:
        with self._lock:
            self._events.clear()
            self._links.clear()
            self.dropped = 0

    def _emit(self, ev: TraceEvent) -> None:
        with self._lock:
            if len(self._events) == self._events.maxlen:
                self.dropped += 1
            self._events.append(ev)
            subs = list(self._subscribers)
        for cb in subs:
            try:
                cb(ev)
            except Exception:  # a broken subscriber must not break the fault path
                pass


class OriginScope:
    def __init__(self, tracer: Tracer, origin: Origin) -> None:
        self.tracer = tracer
        self.origin = origin
        self._saved: Origin | None = None

    def __enter__(self) -> Origin:
        local = self.tracer._local
        self._saved = getattr(local, "origin", None)
        local.origin = self.origin
        return self.origin

    def __exit__(self, *exc: object) -> None:
        self.tracer._local.origin = self._saved

    @property
    def fault(self) -> int:
        """The fault born inside this scope (0 if the access did not fault)."""
        return self.origin.fault


#: The process-wide tracer every layer reports to.
TRACER = Tracer()


def journey(events: Iterable[TraceEvent]) -> list[tuple[str, float, float]]:
    """(hop, ms since birth, ms since the previous hop) for one fault's events."""
    rows: list[tuple[str, float, float]] = []
    first = prev = None
    for e in sorted(events, key=lambda e: e.t_ns):
        first = e.t_ns if first is None else first
        rows.append((e.hop, (e.t_ns - first) / 1e6, 0.0 if prev is None else (e.t_ns - prev) / 1e6))
        prev = e.t_ns
    return rows


def format_table(events: Iterable[TraceEvent]) -> str:
    """A readable per-fault table with per-hop latency."""
    by_fault: dict[int, list[TraceEvent]] = {}
    for e in events:
        by_fault.setdefault(e.fault, []).append(e)
    lines: list[str] = []
    for fault, evs in by_fault.items():
        lines.append(f"fault {fault}:")
        for (hop, total, delta), ev in zip(journey(evs), sorted(evs, key=lambda e: e.t_ns)):
            detail = " ".join(f"{k}={_fmt(v)}" for k, v in ev.detail.items())
            lines.append(f"  {total:9.3f} ms  +{delta:8.3f} ms  {hop:<22} {detail}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return hex(v) if isinstance(v, int) and not isinstance(v, bool) and v > 9 else str(v)


def iter_jsonl(lines: Iterable[str]) -> Iterator[TraceEvent]:
    """Parse a trace file written as JSON lines back into events."""
    for line in lines:
        if line.strip():
            d = json.loads(line)
            yield TraceEvent(d.pop("fault"), d.pop("hop"), d.pop("t_ns"), d)
