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
import contextlib
import importlib
import json
import logging
import os
import shlex
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vfio_user.device import VfioUserDevice

if TYPE_CHECKING:
    from vfio_user.server import Server

log = logging.getLogger(__name__)

#: The whole machine (vIOMMU + DMA engine behind the SMMU, devmodel.machine): several
#: functions served together, each at its fixed slot.
MACHINE = "machine"
#: The same machine with its endpoint behind a PCIe root port, so QEMU can hot-unplug and
#: re-plug it (``devmodel qemu unplug|plug dma_engine``); see devmodel.machine.
MACHINE_HOTPLUG = "machine-hotplug"
MACHINES = {MACHINE: {}, MACHINE_HOTPLUG: {"hotplug": True}}
DEFAULT_DEVICE = MACHINE
QEMU_MEMORY = "1G"  # the guest agent's reserved window sits at 512 MiB


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


def qemu_device_spec(path: str, dev_id: str, model: VfioUserDevice | None = None) -> dict[str, Any]:
    """The JSON properties of one ``-device vfio-user-pci``: the single place they are made.

    A device factory influences them by giving its model a ``qemu_properties`` dict (for
    example ``{"addr": "0x4"}`` to pin the function at a fixed slot); those entries are
    merged over the defaults, except the socket, which is always the one we serve.
    """
    spec: dict[str, Any] = {"driver": "vfio-user-pci", "socket": {"path": path, "type": "unix"}, "id": dev_id}
    extra = getattr(model, "qemu_properties", None) if model is not None else None
    if extra:
        spec.update({k: v for k, v in dict(extra).items() if k != "socket"})
    return spec


def qemu_device_json(path: str, dev_id: str, model: VfioUserDevice | None = None) -> str:
    """:func:`qemu_device_spec` as the compact JSON QEMU's ``-device`` accepts."""
    return json.dumps(qemu_device_spec(path, dev_id, model), separators=(",", ":"))


def qemu_arguments(plan: list[tuple[str, str, str]],
                   models: list[VfioUserDevice] | None = None, pre: list[str] | None = None) -> list[str]:
    """The QEMU command-line fragments that attach every planned socket (``pre``: arguments
    the devices need first, such as a machine's root port)."""
    args = [
        f"-machine q35,memory-backend=mem -m {QEMU_MEMORY}",
        f"-object memory-backend-memfd,id=mem,size={QEMU_MEMORY},share=on",
    ]
    if pre:
        args.append(shlex.join(pre))
    for i, (_, path, dev_id) in enumerate(plan):
        model = models[i] if models is not None else None
        args.append("-device " + shlex.quote(qemu_device_json(path, dev_id, model)))
    return args


@dataclass
class ServedDevice:
    """One device model and where it is served."""

    name: str
    path: str
    qemu_id: str
    model: VfioUserDevice
    #: The :class:`devmodel.machine.Machine` this function belongs to (None for a lone device).
    machine: Any = None

    def qemu_device_json(self) -> str:
        return qemu_device_json(self.path, self.qemu_id, self.model)


def create_served(devices: list[str], sockets: list[str] | None = None,
                  directory: str | None = None, ram_mb: int = 1024) -> list[ServedDevice]:
    """Plan sockets and instantiate the models; ValueError on a bad name or count.

    Models created before a failure are closed, so a bad ``--device`` leaks nothing.
    """
    if any(name in MACHINES for name in devices):
        return _create_machine(devices, sockets, directory, ram_mb)
    plan = plan_sockets(devices, sockets, directory)
    served: list[ServedDevice] = []
    try:
        for name, path, dev_id in plan:
            served.append(ServedDevice(name, path, dev_id, create_device(name)))
    except BaseException:
        close_models(served)
        raise
    return served


def _create_machine(devices: list[str], sockets: list[str] | None, directory: str | None,
                    ram_mb: int) -> list[ServedDevice]:
    """The machine's functions, one socket each (``<function>.sock`` in the directory)."""
    from devmodel.machine import Machine

    if len(devices) != 1:
        raise ValueError(f"{devices[0] if devices[0] in MACHINES else MACHINE!r} is served alone "
                         "(it already contains its endpoint)")
    m = Machine(ram_mb=ram_mb, **MACHINES[devices[0]])
    if sockets and len(sockets) != len(m.functions):
        m.close()
        raise ValueError(f"the machine has {len(m.functions)} functions "
                         f"({', '.join(f.name for f in m.functions)}) but {len(sockets)} sockets were given")
    directory = os.path.abspath(directory or default_dir())
    paths = [os.path.abspath(p) for p in sockets] if sockets else \
        [os.path.join(directory, f"{f.name}.sock") for f in m.functions]
    return [ServedDevice(f.name, path, f.name, f.model, m) for f, path in zip(m.functions, paths)]


def close_models(served: list[ServedDevice]) -> None:
    """Release what the models hold (memfds, threads) through their optional ``close()``."""
    for machine in {id(i.machine): i.machine for i in served if i.machine is not None}.values():
        try:
            machine.close()
        except Exception:
            log.exception("closing the machine failed")
    for item in served:
        close = getattr(item.model, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.exception("closing %s failed", item.name)


def control_path(served: list[ServedDevice]) -> str:
    """The control socket lives next to the first vfio-user socket."""
    return os.path.join(os.path.dirname(served[0].path), "control.sock")


def qemu_device_args(served: list[ServedDevice]) -> list[str]:
    """``-device <json>`` pairs for every served device, in plan order, after what each
    machine needs first (its root port)."""
    args: list[str] = []
    for machine in {id(i.machine): i.machine for i in served if i.machine is not None}.values():
        args += machine.qemu_args
    for item in served:
        args += ["-device", item.qemu_device_json()]
    return args


@dataclass
class Serving:
    """What :func:`serving` runs: the vfio-user server, the control server, the machine."""

    server: Any
    control: Any
    machine: Any = None


@contextlib.contextmanager
def serving(served: list[ServedDevice], backend: str = "python") -> Iterator[Serving]:
    """Serve every device on its socket, plus the control socket; on exit stop both
    (sockets are removed) and close the models, whatever happened inside."""
    # imported here so `devmodel --help` stays light
    from devmodel.control import ControlServer
    from devmodel.control.injection import register_injections
    from vfio_user.backend import create_server

    control = None
    try:
        server = create_server(backend)
    except BaseException:
        close_models(served)
        raise
    try:
        for item in served:
            os.makedirs(os.path.dirname(item.path), mode=0o700, exist_ok=True)
            server.add_device(item.path, item.model)
        server.start_in_thread()
        control = ControlServer(control_path(served))
        machine = next((i.machine for i in served if i.machine is not None), None)
        if machine is not None:
            control.add_stats("machine", machine.counters)
            register_injections(control, machine)
        control.start()
        yield Serving(server, control, machine)
    finally:
        log.info("stopping server")
        server.stop()
        if control is not None:
            control.stop()
        close_models(served)


@contextlib.contextmanager
def nic_network(served: list[ServedDevice], enabled: bool, out=sys.stderr) -> Iterator[Any]:
    """Cable the machine's NIC to a tap in a fresh network namespace (devmodel.net) while
    the block runs; yields the NetNamespace (None when not enabled or no machine is served).
    NetAdminUnavailable (an OSError) says why when this machine cannot make one. Enter it
    before :func:`serving`: pyroute2 forks to create the namespace, and a fork while other
    threads hold locks can hang the child."""
    machine = next((i.machine for i in served if i.machine is not None), None)
    if not enabled or machine is None:
        yield None
        return
    from devmodel.net import NetNamespace
    with NetNamespace() as ns:
        machine.set_nic_backend(ns.backend)
        print(f"NIC cabled to {ns.ifname} ({ns.address}) in network namespace {ns.name}; "
              f"e.g. ip netns exec {ns.name} tcpdump -i {ns.ifname}", file=out, flush=True)
        try:
            yield ns
        finally:
            machine.set_nic_backend(None)


def add_nic_netns_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nic-netns", action="store_true",
                        help="cable the machine's NIC to a tap in a private network namespace "
                             "(needs CAP_NET_ADMIN; removed on exit)")


def print_instructions(plan: list[tuple[str, str, str]], out=sys.stdout,
                       models: list[VfioUserDevice] | None = None, pre: list[str] | None = None) -> None:
    print("Serving:", file=out)
    for name, path, dev_id in plan:
        print(f"  {dev_id}: {name} on {path}", file=out)
    print("\nAttach with these QEMU arguments (start QEMU after this server; it never reconnects):",
          file=out)
    print("  " + " \\\n  ".join(qemu_arguments(plan, models, pre)), file=out)
    print("\nGuest RAM must be a shared memfd backend (share=on); with share=off QEMU maps it "
          "copy-on-write and device DMA silently never reaches the guest.", file=out)
    print("Press Ctrl-C to stop.", file=out, flush=True)


def run(args: argparse.Namespace) -> int:
    """Create the devices and sockets, print the QEMU arguments, serve until a signal."""
    from vfio_user.backend import BackendUnavailable

    devices = args.device or [DEFAULT_DEVICE]
    try:
        served = create_served(devices, args.socket, args.dir)
    except ValueError as exc:
        print(f"devmodel serve: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with nic_network(served, args.nic_netns), serving(served, args.backend):  # fork before threads
            machines = {id(d.machine): d.machine for d in served if d.machine is not None}
            print_instructions([(d.name, d.path, d.qemu_id) for d in served],
                               models=[d.model for d in served],
                               pre=[a for m in machines.values() for a in m.qemu_args])
            print(f"Control socket: {control_path(served)} (devmodel stats|trace|inject --control ...)",
                  flush=True)
            while not stop.wait(1.0):
                pass
    except (BackendUnavailable, OSError) as exc:  # OSError: NetAdminUnavailable
        print(f"devmodel serve: {exc}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def add_backend_option(parser: argparse.ArgumentParser) -> None:
    from vfio_user.backend import BACKENDS
    parser.add_argument("--backend", choices=BACKENDS, default="python",
                        help="vfio-user server: the pure-Python one (default) or libvfio-user "
                             "(set LIBVFIO_USER to the library if it is not installed)")


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
    add_backend_option(parser)
    add_nic_netns_option(parser)
    parser.set_defaults(func=run)
