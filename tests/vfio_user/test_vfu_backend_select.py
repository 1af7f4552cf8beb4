"""Backend selection (vfio_user/backend.py) and libvfio-user backend specifics.

The conformance suite runs every protocol case on both backends through the ``vfu``
fixture; this file covers what it cannot: choosing a backend, the error when the library
is missing, and lifecycle / contract points of the libvfio-user backend (model-owned
config space, reconnect needing vfu_attach_ctx again, IRQ masks, several devices).
Differences between the backends: docs/backends.md.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import subprocess
import sys
import time

import pytest

from vfio_user import protocol as P
from vfio_user.backend import (
    BACKENDS,
    LIBVFIO_USER,
    PYTHON,
    BackendUnavailable,
    available_backends,
    create_server,
)
from vfio_user.client import Client
from vfio_user.device import PciIrq, PciRegion
from vfio_user.libvfio_user import LIB_ENV, LIB_NAMES, library_candidates
from vfio_user.protocol import Command
from vfio_user.server import Server

from .conftest import VfuTestDevice, backend_skip_reason

needs_lib = pytest.mark.skipif(backend_skip_reason(LIBVFIO_USER) is not None,
                               reason=backend_skip_reason(LIBVFIO_USER) or "")


def test_python_is_default_and_always_available() -> None:
    assert BACKENDS[0] == PYTHON and available_backends()[0] == PYTHON
    s = create_server()
    assert isinstance(s, Server)
    s.stop()


def test_unknown_backend_is_value_error() -> None:
    with pytest.raises(ValueError, match="libvfio-user"):
        create_server("qemu")


def test_candidates_env_first_else_usual_names(monkeypatch) -> None:
    monkeypatch.setenv(LIB_ENV, "/nowhere/libvfio-user.so.0")
    assert library_candidates() == ["/nowhere/libvfio-user.so.0"]
    monkeypatch.delenv(LIB_ENV)
    assert set(LIB_NAMES) <= set(library_candidates())


def test_missing_library_error_names_what_was_tried(tmp_path) -> None:
    """A fresh interpreter (the library is loaded once per process) with a bad LIBVFIO_USER."""
    bad = str(tmp_path / "libvfio-user.so.0")
    code = ("from vfio_user.backend import create_server, available_backends, BackendUnavailable\n"
            "print(available_backends())\n"
            "try:\n    create_server('libvfio-user')\n"
            "except BackendUnavailable as e:\n    print('ERR', e)\n")
    env = dict(os.environ, **{LIB_ENV: bad})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60).stdout
    assert "['python']" in out
    assert "ERR" in out and bad in out and LIB_ENV in out
    assert BackendUnavailable.__mro__[1] is RuntimeError


# ---------------------------------------------------------------------------------------
# libvfio-user backend specifics


@pytest.fixture
def lib_server(sockdir):
    s = create_server(LIBVFIO_USER, dma_timeout=5.0)
    yield s
    s.stop()


def _serve(server, sockdir: str, name: str = "ep0.sock") -> tuple[str, VfuTestDevice]:
    dev = VfuTestDevice()
    path = os.path.join(sockdir, name)
    server.add_device(path, dev)
    return path, dev


def _wait(cond, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@needs_lib
def test_lib_socket_0600_and_removed_on_stop(sockdir) -> None:
    s = create_server(LIBVFIO_USER)
    path, dev = _serve(s, sockdir)
    s.start_in_thread()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    s.stop()
    assert not os.path.exists(path)
    with pytest.raises(OSError):
        socket.socket(socket.AF_UNIX).connect(path)
    dev.close()


@needs_lib
def test_lib_stale_socket_replaced_live_one_refused(sockdir, lib_server) -> None:
    path = os.path.join(sockdir, "ep0.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on
    _, dev = _serve(lib_server, sockdir)
    lib_server.start_in_thread()
    with pytest.raises(OSError):
        create_server(LIBVFIO_USER).add_device(path, VfuTestDevice())
    dev.close()


@needs_lib
def test_lib_config_space_owned_by_model(sockdir, lib_server) -> None:
    """VFU_REGION_FLAG_ALWAYS_CB: config reads/writes (incl. extended space) reach the model."""
    path, dev = _serve(lib_server, sockdir)
    lib_server.start_in_thread()
    with Client(path) as c:
        c.negotiate()
        assert c.region_read(PciRegion.CONFIG, 0, 4) == bytes(dev.config[0:4])
        # Extended capability header at 0x100 (ATS -> PASID), as the model built it.
        assert c.region_read(PciRegion.CONFIG, 0x100, 4) == bytes(dev.config[0x100:0x104])
        c.region_write(PciRegion.CONFIG, 0x04, b"\x06\x00")
        assert (PciRegion.CONFIG, 0x04, b"\x06\x00") in dev.writes
    dev.close()


@needs_lib
def test_lib_reconnect_detaches_then_attaches_again(sockdir, lib_server) -> None:
    """Spec "Client Disconnection": the next client needs vfu_attach_ctx again; DMA map dropped."""
    path, dev = _serve(lib_server, sockdir)
    lib_server.start_in_thread()
    c = Client(path)
    c.negotiate()
    c.map_memory(0x10000, 0x1000)
    assert _wait(lambda: dev.dma_changes >= 1)
    c.close()
    assert _wait(lambda: dev.events == ["attach", "detach"])
    with Client(path) as c2:
        c2.negotiate()
        assert c2.device_info().num_regions == 9
        assert _wait(lambda: dev.events == ["attach", "detach", "attach"])
        # The old map is gone: a DMA to it is a bus error, not a stale access.
        c2.region_write(0, 0x08, (0x10000).to_bytes(8, "little"))
        c2.region_write(0, 0x10, (0x10000).to_bytes(8, "little"))
        c2.region_write(0, 0x18, (4).to_bytes(8, "little"))
        c2.region_write(0, 0x20, (1).to_bytes(8, "little"))
        assert dev.dma_done.wait(5)
        assert dev.reg(0x28) == 2  # DMA_STATUS_BUS_ERROR
    dev.close()


@needs_lib
def test_lib_msix_trigger_and_mask_state(sockdir, lib_server) -> None:
    path, dev = _serve(lib_server, sockdir)
    lib_server.start_in_thread()
    with Client(path) as c:
        c.negotiate()
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        c.set_irqs(PciIrq.MSIX, P.IRQ_SET_DATA_EVENTFD | P.IRQ_SET_ACTION_TRIGGER, 0, 1, [efd])
        assert dev.ctx.trigger_irq(PciIrq.MSIX, 0)
        assert select.select([efd], [], [], 2)[0] and os.eventfd_read(efd) == 1
        c.set_irqs(PciIrq.MSIX, P.IRQ_SET_DATA_NONE | P.IRQ_SET_ACTION_MASK, 0, 1)
        assert dev.irq_changes[-1] == PciIrq.MSIX
        assert not dev.ctx.trigger_irq(PciIrq.MSIX, 0)  # masked: not delivered
        c.set_irqs(PciIrq.MSIX, P.IRQ_SET_DATA_NONE | P.IRQ_SET_ACTION_UNMASK, 0, 1)
        assert dev.ctx.trigger_irq(PciIrq.MSIX, 0)
        assert not dev.ctx.trigger_irq(PciIrq.MSIX, 7)  # no such vector
        os.close(efd)
    dev.close()


@needs_lib
def test_lib_many_devices_one_loop(sockdir, lib_server) -> None:
    devs = [_serve(lib_server, sockdir, f"ep{i}.sock") for i in range(3)]
    lib_server.start_in_thread()
    clients = [Client(p) for p, _ in devs]
    for c in clients:
        c.negotiate()
    for i, c in enumerate(clients):
        c.region_write(0, 0, bytes([i + 1]) * 8)
    for i, (c, (_, d)) in enumerate(zip(clients, devs)):
        assert c.region_read(0, 0, 8) == bytes([i + 1]) * 8 and d.reg(0) == int.from_bytes(bytes([i + 1]) * 8, "little")
        assert c.request(Command.DEVICE_RESET).error == 0 and d.resets == 1
        c.close()
    for _, d in devs:
        d.close()
