"""A running workbench for code: the machine served over vfio-user, its control socket,
and a booted guest, as Python objects.

``devmodel run`` is the command-line face of the same sequence; the demo, the end-to-end
tests and the benchmarks use :func:`machine_session` because they need the objects too
(the machine's counters, the control socket's path, the guest console). Both go through
:func:`devmodel.commands.serve.create_served` / :func:`~devmodel.commands.serve.serving`,
so sockets, slots and the control socket are the ones a user gets.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from devmodel.commands.serve import MACHINE, create_served, qemu_device_args, serving
from devmodel.control import ControlClient, ControlServer
from devmodel.machine import Machine


@dataclass
class Session:
    machine: Machine
    server: Any
    control: ControlServer
    directory: str
    guest: Any = None

    def client(self, timeout: float = 60.0) -> ControlClient:
        """A client of this session's control socket (the interface users have)."""
        return ControlClient(self.control.path, timeout=timeout)


@contextlib.contextmanager
def machine_session(*, boot: bool = True, memory_mb: int = 1024, directory: str | None = None,
                    backend: str = "python", device: str = MACHINE,
                    **guest_overrides: Any) -> Iterator[Session]:
    """Serve the machine (and boot a guest attached to it unless ``boot=False``);
    ``device``: ``machine`` or ``machine-hotplug`` (devmodel.commands.serve.MACHINES)."""
    own_dir = directory is None
    directory = directory or tempfile.mkdtemp(prefix="devmodel-")
    try:
        served = create_served([device], None, directory, ram_mb=memory_mb)
        with serving(served, backend) as running:
            session = Session(running.machine, running.server, running.control, directory)
            try:
                if boot:
                    from guest.harness import Guest
                    extra = list(guest_overrides.pop("extra_args", []))
                    session.guest = Guest(memory_mb=memory_mb, extra_args=qemu_device_args(served) + extra,
                                          **guest_overrides)
                    session.guest.start()  # assigned first: a failed boot is still torn down
                    from devmodel.qmp import register_qmp_commands
                    register_qmp_commands(running.control, session.guest.qmp, served)
                yield session
            finally:
                if session.guest is not None:
                    session.guest.close()
    finally:
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)
