"""A running workbench: the machine served over vfio-user, its control socket, and a guest.

``devmodel run``, ``devmodel demo``, the end-to-end tests and the benchmarks all need
the same sequence, in this order (see the project's vfio-user notes): build the
:class:`~devmodel.machine.Machine`, serve each function on its own socket, open the
control socket, then boot the bundled QEMU with guest RAM in a shared memfd and every
function at its fixed slot. :func:`machine_session` does it and always tears it all down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from devmodel.control import ControlServer
from devmodel.control.injection import register_injections
from devmodel.machine import Machine

log = logging.getLogger(__name__)


@dataclass
class Session:
    machine: Machine
    server: Any
    control: ControlServer
    directory: str
    sockets: dict[str, str] = field(default_factory=dict)
    guest: Any = None

    def qemu_device_args(self) -> list[str]:
        """``-device`` arguments attaching every function at its slot."""
        args: list[str] = []
        for f in self.machine.functions:
            spec = {"driver": "vfio-user-pci", "socket": {"path": self.sockets[f.name], "type": "unix"},
                    "id": f.name, **getattr(f.model, "qemu_properties", {})}
            args += ["-device", json.dumps(spec, separators=(",", ":"))]
        return args


@contextlib.contextmanager
def machine_session(*, boot: bool = True, memory_mb: int = 1024, directory: str | None = None,
                    backend: str = "python", **guest_overrides: Any) -> Iterator[Session]:
    """Serve the machine (and boot a guest attached to it unless ``boot=False``)."""
    from vfio_user.backend import create_server

    own_dir = directory is None
    directory = directory or tempfile.mkdtemp(prefix="devmodel-")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    machine = Machine(ram_mb=memory_mb)
    server = create_server(backend)
    control = None
    session = None
    try:
        sockets = {}
        for f in machine.functions:
            sockets[f.name] = os.path.join(directory, f"{f.name}.sock")
            server.add_device(sockets[f.name], f.model)
        server.start_in_thread()
        control = ControlServer(os.path.join(directory, "control.sock"))
        control.add_stats("machine", machine.counters)
        register_injections(control, machine)
        control.start()
        session = Session(machine, server, control, directory, sockets)
        if boot:
            from guest.harness import Guest
            extra = list(guest_overrides.pop("extra_args", []))
            session.guest = Guest(memory_mb=memory_mb, extra_args=session.qemu_device_args() + extra,
                                  **guest_overrides)
            session.guest.start()  # assigned first: a failed boot is still torn down
        yield session
    finally:
        if session is not None and session.guest is not None:
            session.guest.close()
        server.stop()
        if control is not None:
            control.stop()
        machine.close()
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)
