"""``devmodel stats``, ``devmodel trace`` and ``devmodel inject``: clients of a running model.

They talk to the control socket that ``devmodel serve`` / ``devmodel run`` open (by
default ``control.sock`` in the socket directory; ``--control PATH`` to choose).
``inject`` is generic: ``devmodel inject endpoint.dma iova=0x1000 pasid=1`` sends the
command ``inject.endpoint.dma`` with those arguments; the model validates them and
``devmodel inject --list`` shows what it offers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

CONTROL_NAME = "control.sock"


def default_control_path() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(base, f"devmodel-{os.getuid()}", CONTROL_NAME)


def _client(args: argparse.Namespace):
    from devmodel.control import ControlClient
    path = args.control or os.environ.get("DEVMODEL_CONTROL") or default_control_path()
    try:
        return ControlClient(path)
    except OSError as exc:
        raise SystemExit(f"devmodel: cannot reach the control socket {path}: {exc.strerror or exc} "
                         "(is `devmodel serve` or `devmodel run` running? use --control PATH)")


def parse_value(text: str) -> Any:
    """Command-line value -> JSON value: integers (any base), true/false, else a string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text, 0)
    except ValueError:
        return text


def _call(args: argparse.Namespace, cmd: str, **kw: Any) -> Any:
    from devmodel.control import ControlError
    with _client(args) as c:
        try:
            return c.call(cmd, **kw)
        except ControlError as exc:
            print(f"devmodel: {cmd}: {exc}", file=sys.stderr)
            raise SystemExit(1)


def run_stats(args: argparse.Namespace) -> int:
    print(json.dumps(_call(args, "stats"), indent=2, sort_keys=True))
    return 0


def run_trace(args: argparse.Namespace) -> int:
    from devmodel.trace import TraceEvent, format_table
    out = open(args.file, "a") if args.file else None

    def emit(d: dict[str, Any]) -> None:
        line = json.dumps(d, separators=(",", ":"))
        if out is not None:
            out.write(line + "\n")
            out.flush()
        if args.json:
            print(line, flush=True)
        else:
            d = dict(d)
            ev = TraceEvent(d.pop("fault"), d.pop("hop"), d.pop("t_ns"), d)
            print(format_table([ev]).splitlines()[1], f"[fault {ev.fault}]", flush=True)
    try:
        if args.follow:
            with _client(args) as c:
                for ev in c.follow():
                    emit(ev)
            return 0
        kw: dict[str, Any] = {"last": args.last}
        if args.fault:
            kw["fault"] = args.fault
        events = _call(args, "trace.dump", **kw)
        if args.json or out is not None:
            for d in events:
                if out is not None:
                    out.write(json.dumps(d, separators=(",", ":")) + "\n")
                if args.json:
                    print(json.dumps(d, separators=(",", ":")))
        if not args.json:
            evs = [TraceEvent(d.pop("fault"), d.pop("hop"), d.pop("t_ns"), d) for d in events]
            print(format_table(evs) or "(no trace events)")
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if out is not None:
            out.close()


def run_inject(args: argparse.Namespace) -> int:
    if args.list or not args.what:
        cmds = _call(args, "help")
        for name, info in cmds.items():
            if name.startswith("inject."):
                params = " ".join(f"{k}=<{p['type']}>" if p["required"] else f"[{k}=<{p['type']}>]"
                                  for k, p in info["params"].items())
                print(f"{name[len('inject.'):]:<28} {params}\n    {info['help']}")
        return 0
    kw: dict[str, Any] = {}
    for item in args.params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"devmodel inject: expected key=value, got {item!r}", file=sys.stderr)
            return 2
        kw[key] = parse_value(value)
    print(json.dumps(_call(args, f"inject.{args.what}", **kw), indent=2, sort_keys=True))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--control", metavar="PATH", help=f"control socket (default {default_control_path()})")

    p = subparsers.add_parser("stats", parents=[common], help="counters of a running model (JSON)")
    p.set_defaults(func=run_stats)

    p = subparsers.add_parser("trace", parents=[common], help="per-fault traces of a running model")
    p.add_argument("--follow", "-f", action="store_true", help="stream new events live")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.add_argument("--fault", type=int, help="only this fault id")
    p.add_argument("--last", type=int, default=1000, help="at most this many recorded events")
    p.add_argument("--file", help="also append the events to this JSON-lines file")
    p.set_defaults(func=run_trace)

    p = subparsers.add_parser("inject", parents=[common], help="inject a fault at any layer of a running model")
    p.add_argument("--list", action="store_true", help="list injection commands and their arguments")
    p.add_argument("what", nargs="?", help="e.g. endpoint.dma, smmu.event, host.vevent, viommu.hold")
    p.add_argument("params", nargs="*", metavar="key=value")
    p.set_defaults(func=run_inject)
