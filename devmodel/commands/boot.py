"""``devmodel boot``: boot the tiny guest, run commands in it, power it off.

The smallest end-to-end check of the foundation: real QEMU, real kernel, real console.
"""

from __future__ import annotations

import argparse
import sys

from guest.harness import Guest, GuestConfig, GuestError


def cmd_boot(args: argparse.Namespace) -> int:
    commands = args.exec or ["uname -a", "cat /proc/cmdline", "pcilist"]
    config = GuestConfig(extra_args=list(args.qemu_arg or []))
    if args.plain_ram:
        config.memory_backend = None
    try:
        with Guest(config) as guest:
            print(f"guest booted in {guest.boot_seconds:.2f} s")
            worst = 0
            for command in commands:
                rc, out = guest.run(command, timeout=args.timeout)
                print(f"guest$ {command}\n{out}", end="" if out.endswith("\n") or not out else "\n")
                if rc:
                    print(f"(exit {rc})")
                worst = worst or rc
            return worst
    except GuestError as exc:
        print(f"devmodel boot: {exc}", file=sys.stderr)
        return 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("boot", help="boot the guest, run commands, power off")
    p.add_argument("--exec", "-e", action="append", metavar="CMD", help="guest command (repeatable)")
    p.add_argument("--qemu-arg", action="append", metavar="ARG", help="extra QEMU argument (repeatable)")
    p.add_argument("--plain-ram", action="store_true", help="no shared memory backend")
    p.add_argument("--timeout", type=float, default=60.0, help="per-command timeout in seconds")
    p.set_defaults(func=cmd_boot)
