"""``devmodel demo``: the narrated main job of ``make demo``.

Boots the guest in the bundled QEMU and shows each layer doing its part. As layers land
this grows into the full fault journey (endpoint -> SMMU -> iommufd -> vIOMMU -> guest).
"""

from __future__ import annotations

import argparse
import sys

from guest.harness import Guest, GuestError
from images.accel import choose_accel
from images.qemu import describe


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    say(f"QEMU: {describe()}, accelerator {choose_accel()}")
    try:
        with Guest() as guest:
            say(f"guest booted to its shell in {guest.boot_seconds:.2f} s")
            for command in ("uname -r", "pcilist"):
                print(f"guest$ {command}\n{guest.check(command)}", end="")
            say("guest powered off cleanly")
    except GuestError as exc:
        print(f"devmodel demo: {exc}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="narrated end-to-end demo (what make demo runs)")
    p.set_defaults(func=cmd_demo)
