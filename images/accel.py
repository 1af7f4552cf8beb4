"""Choose the QEMU accelerator: KVM only when it really works, else TCG.

On this workplace ``/dev/kvm`` is ``kvm_pvm``, a software virtualizer on which Debian
kernels hang or die with emulation failures, and ``-accel kvm -accel tcg`` does not fall
back because KVM initialises fine. So KVM needs all of: a CPU with vmx/svm, an openable
``/dev/kvm`` and no ``kvm_pvm`` module. ``DEVMODEL_ACCEL`` overrides the choice.
"""

from __future__ import annotations

import os
from pathlib import Path

VALID = ("kvm", "tcg")


def kvm_usable(cpuinfo: str | None = None, kvm_dev: str = "/dev/kvm", sysmod: str = "/sys/module") -> bool:
    """True when hardware KVM is present and not the kvm_pvm software virtualizer."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    if not flags & {"vmx", "svm"}:
        return False
    if Path(sysmod, "kvm_pvm").exists():
        return False
    try:
        fd = os.open(kvm_dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def choose_accel() -> str:
    """``DEVMODEL_ACCEL`` if set (kvm or tcg), else kvm when usable, else tcg."""
    forced = os.environ.get("DEVMODEL_ACCEL", "").strip().lower()
    if forced:
        if forced not in VALID:
            raise ValueError(f"DEVMODEL_ACCEL must be one of {VALID}, not {forced!r}")
        return forced
    return "kvm" if kvm_usable() else "tcg"
