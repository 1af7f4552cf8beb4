"""Choose the vfio-user server backend: our pure-Python server (default) or libvfio-user.

Both backends serve the same :class:`vfio_user.device.VfioUserDevice` models with the
same public API (``add_device``, ``start_in_thread``, ``serve_forever``, ``stop``,
``add_reader``/``remove_reader``), so commands only pick a name. The libvfio-user backend
needs the nutanix/libvfio-user shared library at run time; when it is missing,
:func:`create_server` raises :class:`BackendUnavailable` whose message says which files
were tried and how to point ``LIBVFIO_USER`` at a build. Differences between the
backends are documented in docs/backends.md.
"""

from __future__ import annotations

import logging
from typing import Any, Union

from vfio_user.libvfio_user import LIB_ENV, LibraryNotFound, LibvfioUserServer, load_library
from vfio_user.server import Server

log = logging.getLogger(__name__)

PYTHON = "python"
LIBVFIO_USER = "libvfio-user"
#: Every backend name, default first (for argparse ``choices``).
BACKENDS = (PYTHON, LIBVFIO_USER)
DEFAULT_BACKEND = PYTHON

AnyServer = Union[Server, LibvfioUserServer]


class BackendUnavailable(RuntimeError):
    """The backend exists but cannot run here (its library is missing)."""


def available_backends() -> list[str]:
    """Backends that can run on this machine, default first."""
    names = [PYTHON]
    try:
        load_library()
    except LibraryNotFound as exc:
        log.debug("libvfio-user backend unavailable: %s", exc.strerror)
    else:
        names.append(LIBVFIO_USER)
    return names


def unavailable_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run here, or None when it can (for skips and CLI errors)."""
    if backend == PYTHON:
        return None
    if backend != LIBVFIO_USER:
        return f"unknown vfio-user backend {backend!r}; choose one of {', '.join(BACKENDS)}"
    try:
        load_library()
    except LibraryNotFound as exc:
        return str(exc.strerror)
    return None


def create_server(backend: str = DEFAULT_BACKEND, **options: Any) -> AnyServer:
    """A server of ``backend`` ("python" or "libvfio-user"); ``options`` go to its constructor.

    Raises ValueError for an unknown name and :class:`BackendUnavailable` when the
    libvfio-user library cannot be loaded (the message names what was tried and how to
    set ``LIBVFIO_USER``).
    """
    if backend == PYTHON:
        return Server(**options)
    if backend == LIBVFIO_USER:
        try:
            return LibvfioUserServer(**options)
        except LibraryNotFound as exc:
            raise BackendUnavailable(exc.strerror) from None
    raise ValueError(f"unknown vfio-user backend {backend!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["AnyServer", "BACKENDS", "BackendUnavailable", "DEFAULT_BACKEND", "LIBVFIO_USER",
           "LIB_ENV", "PYTHON", "available_backends", "create_server", "unavailable_reason"]
