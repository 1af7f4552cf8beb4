"""``devmodel demo``: the narrated main job of ``make demo``.

Serves the whole machine (DMA engine behind the emulated SMMUv3, simulated iommufd, the
guest vIOMMU), boots the guest in the bundled QEMU, brings the vIOMMU up with the guest
agent, and makes three faults happen: an unrecoverable translation fault, a page request
the guest resolves (PRI Success), and a burst that overflows the host's vEVENTQ. After
each, the fault's journey is printed from the trace: every layer it crossed, with the
time since its birth and per hop.
"""

from __future__ import annotations

import argparse
import re
import sys

from devmodel.trace import TRACER, format_table
from guest.harness import GuestError
from images.accel import choose_accel
from images.qemu import describe


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def guest_do(guest, command: str, timeout: float = 60) -> str:  # noqa: ANN001
    out = guest.check(command, timeout=timeout)
    print(f"guest$ {command}\n{out}", end="" if out.endswith("\n") else "\n", flush=True)
    return out


def journey(first_hop: str, title: str, since: int) -> None:
    """Print the journey of the faults born since ``since`` that reached ``first_hop``."""
    faults = [f for f in TRACER.faults(since) if any(e.hop == first_hop for e in TRACER.events(f))]
    say(f"{title}: the trace ({len(faults)} fault{'s' if len(faults) != 1 else ''})")
    print(format_table([e for f in faults[:2] for e in TRACER.events(f)]), flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from devmodel.session import machine_session

    say(f"QEMU: {describe()}, accelerator {choose_accel()}")
    try:
        with machine_session() as s:
            g = s.guest
            say(f"guest booted in {g.boot_seconds:.2f} s; it sees the vIOMMU (class 0806) and the DMA engine")
            guest_do(g, "pcilist")
            say("the guest agent brings the vIOMMU up like a Linux SMMUv3 driver (stream table, queues, CDs)")
            guest_do(g, "dm up")

            say("1. translation fault: the engine writes to an IOVA the guest never mapped")
            t0 = TRACER.clock()
            guest_do(g, "dm dma fill --pasid 1 --dst 0x300000 --len 64")
            guest_do(g, "dm events --wait 1 --timeout 20")
            journey("smmu.fault", "F_TRANSLATION from endpoint to guest", t0)

            say("2. page request: ATS+PRI on; the guest maps the page on demand and answers Success")
            t0 = TRACER.clock()
            for cmd in ("dm ats on", "dm pri enable", "dm buf alloc src 4096 --fill 0x5a",
                        "dm buf alloc dst 4096", "dm map 7 0x50000 --page-for-buffer src",
                        "dm dma copy --pasid 7 --src 0x50000 --dst 0x60000 --len 4096 --no-wait"):
                guest_do(g, cmd)
            prq = guest_do(g, "dm prq --wait 1 --timeout 20")
            prgi = re.search(r"prgi=(\w+)", prq).group(1)
            for cmd in ("dm map 7 0x60000 --page-for-buffer dst", f"dm resp 0x20 7 {prgi} success",
                        "dm dma wait 0", "dm buf cmp src dst"):
                guest_do(g, cmd)
            journey("guest.response", "page request round trip", t0)

            say("3. overflow: the VMM stops reading its vEVENTQ (depth 64) during 80 faults")
            t0 = TRACER.clock()
            with s.client() as ctl:  # exactly what `devmodel inject` sends
                ctl.call("inject.viommu.hold", on=True, stage="fd")
                ctl.call("inject.endpoint.dma", iova=0x900000, pasid=1, write=True, count=80, stride=4096)
                ctl.call("inject.viommu.hold", on=False, stage="fd")
            guest_do(g, "dm events --since 1 --wait 64 --timeout 30 | tail -2")
            guest_do(g, "dm counters | tr ' ' '\\n' | grep -E 'lost|overflow'")
            journey("iommufd.lost", "a lost event's journey ends in the guest's overflow flag", t0)
            say("done: every fault above carries one id from the endpoint to the guest "
                "(`devmodel trace` shows the same live)")
    except GuestError as exc:
        print(f"devmodel demo: {exc}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="narrated end-to-end fault demo (what make demo runs)")
    p.set_defaults(func=cmd_demo)
