"""Find a QEMU that has the ``vfio-user-pci`` client (QEMU >= 10.1).

Order: ``DEVMODEL_QEMU`` (a binary, or a command line split like a shell would); else a
``qemu-system-x86_64`` on PATH whose ``-device help`` lists ``vfio-user-pci``; else Debian
trixie-backports' QEMU unpacked into a private prefix under the project cache and run
through that prefix's own dynamic loader (its binaries need a newer glibc than Debian 12
has, and this way nothing is installed on the system).

:func:`qemu_argv` is the one place that knows how to launch it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from images.debian import unpacked

log = logging.getLogger(__name__)

BINARY = "qemu-system-x86_64"
PACKAGE = "qemu-system-x86"
SUITE = "trixie-backports"
MULTIARCH = "usr/lib/x86_64-linux-gnu"


class QemuError(RuntimeError):
    """No usable QEMU; the message says how to get one."""


def has_vfio_user(argv: list[str]) -> bool:
    """True when this QEMU lists the vfio-user-pci device."""
    try:
        out = subprocess.run([*argv, "-device", "help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return '"vfio-user-pci"' in out.stdout


def version(argv: list[str]) -> tuple[int, int, int]:
    """QEMU's version triple from ``-version``."""
    out = subprocess.run([*argv, "-version"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    if not m:
        raise QemuError(f"cannot read the version of {argv[0]}: {out[:200]!r}")
    return tuple(int(x) for x in m.groups())  # type: ignore[return-value]


def bundled_argv(prefix: Path) -> list[str]:
    """Launch a QEMU unpacked into ``prefix`` through the prefix's loader and libraries."""
    libdir = prefix / MULTIARCH
    return [
        "env", f"QEMU_MODULE_DIR={libdir / 'qemu'}",
        str(libdir / "ld-linux-x86-64.so.2"), "--library-path", str(libdir),
        str(prefix / "usr/bin" / BINARY),
        "-L", str(prefix / "usr/share/qemu"), "-L", str(prefix / "usr/share/seabios"),
    ]


def bundled_prefix() -> Path:
    """Download (once) Debian's backports QEMU with its whole dependency closure."""
    return unpacked([PACKAGE], SUITE, closure=True)


@functools.lru_cache(maxsize=1)
def qemu_argv() -> list[str]:
    """The argv prefix that starts a vfio-user capable QEMU (see the module docstring)."""
    env = os.environ.get("DEVMODEL_QEMU")
    if env:
        argv = shlex.split(env)
        if not has_vfio_user(argv):
            raise QemuError(f"DEVMODEL_QEMU={env} does not run or has no vfio-user-pci device (QEMU >= 10.1 needed)")
        return argv
    system = shutil.which(BINARY)
    if system and has_vfio_user([system]):
        return [system]
    if system:
        log.info("%s on PATH has no vfio-user-pci; using the bundled QEMU", system)
    argv = bundled_argv(bundled_prefix())
    if not has_vfio_user(argv):
        raise QemuError("the bundled QEMU does not start or lacks vfio-user-pci; set DEVMODEL_QEMU")
    return argv


def describe() -> str:
    """One line for humans: which QEMU and its version."""
    argv = qemu_argv()
    binary = next((a for a in argv if a.endswith(BINARY)), argv[0])
    return f"{binary} {'.'.join(map(str, version(argv)))}"
