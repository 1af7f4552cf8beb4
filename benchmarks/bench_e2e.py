"""Faults into a booted guest: latency from the endpoint's faulting access to the record
in the guest's event queue (and to the guest driver consuming it), and sustained faults
per second into the guest. Whole machine, real QEMU, guest agent up (interrupt driven).

Timestamps come from the fault traces (one monotonic clock in this process):
``endpoint.dma`` (birth) -> ``guest.evtq`` (record written, MSI-X raised) and
``guest.consumed`` (the guest advanced EVENTQ_CONS past it).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devmodel.session import machine_session  # noqa: E402
from devmodel.trace import TRACER  # noqa: E402
from images.accel import choose_accel  # noqa: E402

SINGLE = 200  # one fault at a time, each waited for
CHUNK = 32  # within the vEVENTQ depth, so nothing is lost
CHUNKS = 20
TIMEOUT = 30.0


def hop_time(fault: int, hop: str) -> int | None:
    return next((e.t_ns for e in TRACER.events(fault) if e.hop == hop), None)


def wait_for(faults: list[int], hop: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while any(hop_time(f, hop) is None for f in faults):
        if time.monotonic() > deadline:
            raise RuntimeError(f"faults did not reach {hop} within {TIMEOUT} s")
        time.sleep(0.0005)


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main() -> None:
    with machine_session() as s:
        s.guest.check("dm up", timeout=60)
        ctl = s.client()

        def inject(**args):  # noqa: ANN003, ANN202 - the control socket's inject.endpoint.dma
            return ctl.call("inject.endpoint.dma", **args)
        to_record, to_consumed = [], []
        for i in range(SINGLE):
            TRACER.clear()
            (fault,) = inject(iova=0x10000000 + i * 4096, pasid=1, write=True, count=1, stride=4096)["fault_ids"]
            wait_for([fault], "guest.consumed")
            born = hop_time(fault, "endpoint.dma")
            to_record.append((hop_time(fault, "guest.evtq") - born) / 1e3)
            to_consumed.append((hop_time(fault, "guest.consumed") - born) / 1e3)
        t0 = time.monotonic()
        total = 0
        for c in range(CHUNKS):
            TRACER.clear()
            ids = inject(iova=0x20000000 + c * CHUNK * 4096, pasid=1, write=True, count=CHUNK,
                         stride=4096)["fault_ids"]
            wait_for(ids, "guest.evtq")
            total += len(ids)
        rate = total / (time.monotonic() - t0)
        lost = s.machine.viommu.counters.events_lost_host
    accel = choose_accel()
    print(f"fault-to-guest-evtq-median-{accel}: {statistics.median(to_record):.0f} us")
    print(f"fault-to-guest-evtq-p99-{accel}: {pct(to_record, 99):.0f} us")
    print(f"fault-to-guest-consumed-median-{accel}: {statistics.median(to_consumed):.0f} us")
    print(f"fault-to-guest-consumed-p99-{accel}: {pct(to_consumed, 99):.0f} us")
    print(f"sustained-faults-into-guest-{accel}: {rate:.0f} faults/s (lost {lost})")


if __name__ == "__main__":
    main()
