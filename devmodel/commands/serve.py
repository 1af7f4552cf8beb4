"""``devmodel serve``: serve device models on vfio-user sockets for QEMU to attach.

Each device gets its own UNIX socket (mode 0600). The command prints the QEMU arguments
that attach them — QEMU only accepts the JSON form of ``-device`` for ``vfio-user-pci``,
must find the server already listening, and needs guest RAM in a *shared* memfd memory
backend or device DMA is invisible to the guest (see the project's vfio-user notes) —
then serves until Ctrl-C or SIGTERM.

Devices are found by name: ``--device NAME`` loads :mod:`devmodel.devices.NAME` and
calls its ``create_device()`` factory, so a new device model needs no change here.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shlex
import signal
import sys
import tempfile
import threading

from vfio_user.device import VfioUserDevice

log = logging.getLogger(__name__)

DEFAULT_DEVICE = "testdev"
QEMU_MEMORY = "512M"


def default_dir() -> str:
    """A per-user socket directory under the runtime or temp directory."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(base, f"devmodel-{os.getuid()}")


def create_device(name: str) -> VfioUserDevice:
    """Instantiate device model ``name`` through its module's ``create_device()``."""
    if not name.isidentifier():
        raise ValueError(f"bad device name {name!r}")
    try:
        module = importlib.import_module(f"devmodel.devices.{name}")
    except ModuleNotFoundError as exc:
        raise ValueError(f"unknown device {name!r}") from exc
    factory = getattr(module, "create_device", None)
    if factory is None:
        raise ValueError(f"devmodel.devices.{name} has no create_device()")
    return factory()


def plan_sockets(devices: list[str], sockets: list[str] | None, directory: str | None) -> list[tuple[str, str, str]]:
    """Pair devices with socket paths and QEMU ids: [(device, path, id)].

    With ``--socket`` given N times and one device name, that device is served N times;
    otherwise the counts must match. With ``--dir`` (or by default) sockets are named
    ``<device><n>.sock`` inside the directory.
    """
    if sockets:
        if len(devices) == 1 and len(sockets) > 1:
            devices = devices * len(sockets)
        if len(devices) != len(sockets):
            raise ValueError(f"{len(devices)} devices but {len(sockets)} sockets")
        paths = [os.path.abspath(p) for p in sockets]
    else:
        directory = os.path.abspath(directory or default_dir())
        paths = [os.path.join(directory, f"{name}{i}.sock") for i, name in enumerate(devices)]
    return [(name, path, f"ep{i}") for i, (name, path) in enumerate(zip(devices, paths))]


def qemu_arguments(plan: list[tuple[str, str, str]]) -> list[str]:
    """The QEMU command-line fragments that attach every planned socket."""
    args = [
        f"-machine q35,memory-backend=mem -m {QEMU_MEMORY}",
        f"-object memory-backend-memfd,id=mem,size={QEMU_MEMORY},share=on",
    ]
    for _, path, dev_id in plan:
        spec = {"driver": "vfio-user-pci", "socket": {"path": path, "type": "unix"}, "id": dev_id}
        args.append("-device " + shlex.quote(json.dumps(spec, separators=(",", ":"))))
    return args


def print_instructions(plan: list[tuple[str, str, str]], out=sys.stdout) -> None:
    print("Serving:", file=out)
    for name, path, dev_id in plan:
        print(f"  {dev_id}: {name} on {path}", file=out)
    print("\nAttach with these QEMU arguments (start QEMU after this server; it never reconnects):",
          file=out)
    print("  " + " \\\n  ".join(qemu_arguments(plan)), file=out)
    print("\nGuest RAM must be a shared memfd backend (share=on); with share=off QEMU maps it "
          "copy-on-write and device DMA silently never reaches the guest.", file=out)
    print("Press Ctrl-C to stop.", file=out, flush=True)


def run(args: argparse.Namespace) -> int:
    """Create the devices and sockets, print the QEMU arguments, serve until a signal."""
    from vfio_user.server import Server  # imported here so `devmodel --help` stays light

    devices = args.device or [DEFAULT_DEVICE]
    try:
        plan = plan_sockets(devices, args.socket, args.dir)
        models = [(create_device(name), path) for name, path, _ in plan]
    except ValueError as exc:
        print(f"devmodel serve: {exc}", file=sys.stderr)
        return 2
    for _, path in models:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    server = Server()
    for model, path in models:
        server.add_device(path, model)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start_in_thread()
        print_instructions(plan)
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("stopping server")
        server.stop()
        for model, _ in models:
            close = getattr(model, "close", None)
            if close is not None:
                close()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve device models over vfio-user for QEMU",
        description="Serve device models on vfio-user UNIX sockets and print the QEMU "
                    "arguments that attach them.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--dir", help=f"directory for the sockets (default: {default_dir()})")
    where.add_argument("--socket", action="append", metavar="PATH",
                       help="socket path, once per device (repeatable)")
    parser.add_argument("--device", action="append", metavar="NAME",
                        help=f"device model from devmodel.devices (repeatable; default {DEFAULT_DEVICE})")
    parser.set_defaults(func=run)
