"""``devmodel qemu plug NAME | unplug NAME | query``: hot-plug through a running ``devmodel run``.

The commands go to the control socket (``--control PATH``, else ``DEVMODEL_CONTROL``, else
the default path, as for ``devmodel stats``), which forwards them to QEMU over QMP
(:func:`devmodel.qmp.register_qmp_commands`). NAME is a served device name, e.g.
``dma_engine``. ``unplug`` returns only once QEMU reported the device deleted, which
needs the guest's acknowledgement (PCIe hot-plug); a guest that never acknowledges ends
in an error after ``--timeout`` seconds.

Exit statuses: 0 done, 1 the model or QEMU refused (message on stderr), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from devmodel.commands.control import default_control_path

#: Seconds the control socket may take beyond the QEMU-side timeout before we give up.
REPLY_MARGIN = 10.0
DEFAULT_TIMEOUT = 15
EXIT_FAILED = 1
EXIT_USAGE = 2


def _call(args: argparse.Namespace, cmd: str, **kw: Any) -> tuple[int, Any]:
    """(exit status, result) of one control command; errors are printed here."""
    from devmodel.control import ControlClient, ControlError

    path = args.control or os.environ.get("DEVMODEL_CONTROL") or default_control_path()
    wait = float(kw.get("timeout", DEFAULT_TIMEOUT)) + REPLY_MARGIN
    try:
        client = ControlClient(path, timeout=wait)
    except OSError as exc:
        print(f"devmodel qemu: cannot reach the control socket {path}: {exc.strerror or exc} "
              "(is `devmodel run` running? use --control PATH)", file=sys.stderr)
        return EXIT_FAILED, None
    with client:
        try:
            return 0, client.call(cmd, **kw)
        except ControlError as exc:
            print(f"devmodel qemu: {cmd}: {exc}", file=sys.stderr)
            return (EXIT_USAGE if exc.code == "bad-args" else EXIT_FAILED), None
        except (OSError, ValueError) as exc:  # timeout, closed socket, garbled reply
            print(f"devmodel qemu: {cmd}: no answer from {path}: {exc}", file=sys.stderr)
            return EXIT_FAILED, None


def run_plug(args: argparse.Namespace) -> int:
    status, result = _call(args, "qemu.plug", device=args.name, timeout=args.timeout)
    if status == 0:
        print(f"plugged {result['device']} (QEMU id {result['qemu_id']})")
    return status


def run_unplug(args: argparse.Namespace) -> int:
    status, result = _call(args, "qemu.unplug", device=args.name, timeout=args.timeout)
    if status == 0:
        print(f"unplugged {result['device']} (QEMU id {result['qemu_id']})")
    return status


def run_query(args: argparse.Namespace) -> int:
    status, result = _call(args, "qemu.query")
    if status != 0:
        return status
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for dev in result:
        print(f"{dev['bdf']}  {dev['vendor_id'][2:]}:{dev['device_id'][2:]}  class {dev['class'][2:]}  "
              f"{dev['qdev_id'] or '-':<12} {dev['description']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``plug``/``unplug``/``query`` under ``devmodel qemu``.

    ``devmodel qemu`` alone already exists (devmodel.commands.image: find or bootstrap QEMU);
    when it does, the actions are added to that parser, so plain ``devmodel qemu`` keeps
    its meaning and ``devmodel qemu plug NAME`` etc. select ours.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--control", metavar="PATH", help=f"control socket (default {default_control_path()})")
    parser = subparsers.choices.get("qemu")
    if parser is None:
        parser = subparsers.add_parser(
            "qemu", help="hot-plug/unplug served devices and list QEMU's PCI functions (QMP)",
            description="Ask a running `devmodel run` to hot-plug or hot-unplug one of its served "
                        "devices, or list the PCI functions QEMU shows the guest.")
    sub = parser.add_subparsers(dest="qemu_command", metavar="ACTION",
                                required=parser.get_default("func") is None,
                                description="with a running `devmodel run` (through its control socket):")
    for name, func, what in (("plug", run_plug, "hot-plug a served device again (QMP device_add)"),
                             ("unplug", run_unplug, "hot-unplug a served device and wait until QEMU "
                                                    "deleted it (needs the guest's acknowledgement)")):
        p = sub.add_parser(name, parents=[common], help=what)
        p.add_argument("name", metavar="NAME", help="served device name, e.g. dma_engine")
        p.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                       help=f"how long QEMU and the guest may take (default {DEFAULT_TIMEOUT})")
        p.set_defaults(func=func)
    p = sub.add_parser("query", parents=[common], help="PCI functions QEMU shows the guest (QMP query-pci)")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=run_query)
