"""The guest initramfs: busybox-static, ``/init``, the guest agent files, kernel modules.

Everything comes from Debian packages and ``guest/rootfs`` in this repository. The
archive is cached under a key made of all its inputs (busybox package, kernel release,
module list, every file of ``guest/rootfs`` and this builder itself), so it is rebuilt
exactly when one of them changes.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path

from images import cpio, guest_python, kmod
from images.cache import cache_dir, digest, file_digest
from images.debian import unpacked
from images.kernel import Kernel

log = logging.getLogger(__name__)

ROOTFS = Path(__file__).resolve().parent.parent / "guest" / "rootfs"
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX_SUITE = "bookworm"
#: Modules the guest loads at boot, in dependency order after resolution.
DEFAULT_MODULES = ("uio_pci_generic",)
DIRS = ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "usr/local", "usr/local/bin", "etc",
        "proc", "sys", "dev", "tmp", "run", "root", "lib", "lib/modules", "mnt")


def busybox() -> Path:
    """Debian's static busybox binary (downloaded once)."""
    return unpacked([BUSYBOX_PACKAGE], BUSYBOX_SUITE) / "bin" / "busybox"


def applets(busybox_bin: Path) -> list[str]:
    """Applet paths (``bin/sh``, ``sbin/insmod`` ...) the busybox build supports."""
    out = subprocess.run([str(busybox_bin), "--list-full"], capture_output=True, text=True, check=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def modinfo_depends(ko: bytes) -> list[str]:
    """The ``depends=`` list of a module's .modinfo strings (Debian ships no modules.dep)."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    return [d for d in m.group(1).decode().split(",") if d] if m else []


def module_closure(modules_dir: Path, release: str, names: list[str]) -> list[Path]:
    """Module files for ``names`` and their dependencies, dependencies first."""
    tree = modules_dir / release
    by_name = {re.sub(r"\.ko(\.\w+)?$", "", p.name).replace("-", "_"): p for p in tree.rglob("*.ko*")}
    order: list[Path] = []

    def visit(name: str) -> None:
        path = by_name.get(name.replace("-", "_"))
        if path is None:
            raise FileNotFoundError(f"module {name} not found under {tree}")
        if path in order:
            return
        for dep in modinfo_depends(path.read_bytes()):
            visit(dep)
        order.append(path)

    for name in names:
        visit(name)
    return order


def rootfs_files() -> list[Path]:
    """Every file of ``guest/rootfs`` (the agent, /init, /etc)."""
    return sorted(p for p in ROOTFS.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


# -- guest runtime pieces built elsewhere (images/guest_python.py, images/kmod.py) ----------
def contributions(kernel: Kernel) -> list[kmod.Contribution]:
    """Extra members: the guest's Python 3 and the devmodel_uirq module (loaded at boot)."""
    return [guest_python.contribution(), kmod.contribution(kernel)]


def entries(busybox_bin: Path, kernel: Kernel, modules: list[str],
            extras: list[kmod.Contribution] = ()) -> list[cpio.Entry]:
    """All archive members, directories first."""
    out = [cpio.directory(d) for d in DIRS]
    out.append(cpio.regular("bin/busybox", busybox_bin.read_bytes(), executable=True))
    for applet in applets(busybox_bin):
        if applet.lstrip("/") != "bin/busybox":
            out.append(cpio.symlink(applet.lstrip("/"), "/bin/busybox"))
    seen = {e.name for e in out}
    for path in rootfs_files():
        rel = path.relative_to(ROOTFS)
        for parent in reversed(rel.parents[:-1]):
            if str(parent) not in seen:
                out.append(cpio.directory(str(parent)))
                seen.add(str(parent))
        out.append(cpio.regular(str(rel), path.read_bytes(), executable=os.access(path, os.X_OK)))
    load: list[str] = []
    if modules and kernel.modules and kernel.release:
        for path in module_closure(kernel.modules, kernel.release, modules):
            out.append(cpio.regular(f"lib/modules/{path.name}", path.read_bytes()))
            load.append(path.name)
    elif modules:
        log.warning("kernel has no modules tree; the guest boots without %s", ", ".join(modules))
    for extra in extras:
        out.extend(extra.entries)
        load.extend(extra.load)
    if load:
        out.append(cpio.regular("etc/modules", "".join(name + "\n" for name in load).encode()))
    return out


def build(kernel: Kernel, modules: list[str] | None = None) -> Path:
    """Return the cached initramfs for ``kernel``, building it when an input changed."""
    mods = list(DEFAULT_MODULES if modules is None else modules)
    bb = busybox()
    extras = contributions(kernel)
    key = digest(bb.stat().st_size, file_digest(bb), kernel.release, str(kernel.modules), mods,
                 [x.key for x in extras],
                 file_digest(*rootfs_files(), Path(__file__), Path(cpio.__file__)))
    out = cache_dir("initramfs") / f"initrd-{key}.cpio.gz"
    if out.exists():
        return out
    log.info("building initramfs %s", out.name)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(cpio.gzipped(entries(bb, kernel, mods, extras)))
    tmp.rename(out)
    return out
