"""Translation inputs and outcomes shared by the SMMU and the endpoints that use it.

A fault is raised inside the pipeline as :class:`SmmuFault` (carrying the event fields
in spec names), caught once at the top of a translation, recorded in the Event queue
according to the rules of reference §3.3, and handed back to the endpoint as a
:class:`FaultInfo` inside a :class:`TranslationResult`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from devmodel.iommu.records import EventId


class Access(enum.IntEnum):
    """What an upstream transaction does: data read, data write or instruction fetch."""

    READ = 0
    WRITE = 1
    EXEC = 2

    @property
    def rnw(self) -> int:
        """Event RnW: 1 = read (instruction fetches are reads), 0 = write (pitfall 6)."""
        return 0 if self is Access.WRITE else 1


class SmmuFault(Exception):
    """Raised inside the translation pipeline; ``fields`` are event-record field values.

    ``configurable`` marks the four Translation-related faults whose fate depends on
    CD.{A,R,S} (stage 1) or STE.{S2R} (stage 2); every other fault aborts and records.
    ``record`` False means "abort silently" (STE.Config=abort, GBPA.ABORT).
    """

    def __init__(self, event: EventId | None, reason: str, *, stage: int = 0, level: int | None = None,
                 record: bool = True, **fields: int) -> None:
        super().__init__(f"{event.name if event else 'abort'}: {reason}")
        self.event = event
        self.reason = reason
        self.stage = stage
        self.level = level
        self.record = record
        self.fields = fields


@dataclass(slots=True)
class FaultInfo:
    """What the endpoint learns about a failed translation (and what the SMMU recorded)."""

    event: EventId | None
    reason: str
    stage: int = 0
    level: int | None = None
    recorded: bool = False
    abort: bool = True
    trace_id: int = 0  # the fault's devmodel.trace id (0 when tracing is disabled)
    fields: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.event.name if self.event is not None else "ABORT"


@dataclass(slots=True)
class TranslationResult:
    """Outcome of :meth:`SMMUv3.translate`.

    ``pa`` is valid for ``length`` bytes from the input address (to the end of the page
    or block). ``raz_wi`` means the transaction was terminated with CD.A=0: reads return
    zeros and writes are ignored, and the endpoint sees no abort.
    """

    pa: int | None
    length: int = 0
    fault: FaultInfo | None = None
    raz_wi: bool = False

    @property
    def ok(self) -> bool:
        return self.fault is None

    @property
    def aborted(self) -> bool:
        return self.fault is not None and self.fault.abort


class AtsStatus(enum.IntEnum):
    """ATS Translation Completion status (PCIe): Success, Unsupported Request, Completer Abort."""

    SUCCESS = 0
    UR = 1
    CA = 4


@dataclass(slots=True)
class AtsCompletion:
    """An ATS Translation Completion. R=W=0 with SUCCESS means "no access: use PRI"."""

    status: AtsStatus
    translated_addr: int = 0
    size: int = 4096
    r: bool = False
    w: bool = False
    x: bool = False
    priv: bool = False
    fault: FaultInfo | None = None
