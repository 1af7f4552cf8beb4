"""Build the guest's own kernel module, ``devmodel_uirq`` (guest/kmod), at image-build time.

Why a module at all: Debian's kernel gives guest userspace no MSI/MSI-X without an IOMMU,
and the guest agent must see which vector a device raised. The module is built out of
tree against Debian bookworm's headers for the exact kernel release we boot
(``linux-headers-<release>``, ``linux-headers-<abi>-common``, ``linux-kbuild-<major.minor>``),
unpacked privately, with the host's gcc (the version the headers name: gcc-12 for
bookworm). Nothing is installed on the host.

Debian's per-flavour headers directory names its ``-common`` sibling by absolute path, so
we run kbuild from a private object tree: symlinks to the unpacked headers plus a
``Makefile`` that includes the unpacked ``-common`` one.

With a user kernel (``DEVMODEL_KERNEL``) the module is skipped with a warning unless
``DEVMODEL_KBUILD`` names that kernel's build directory. Results are cached by
(module source, kernel release, build tree, this builder).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from images import cpio
from images.cache import cache_dir, digest, file_digest
from images.debian import unpacked
from images.kernel import SUITE, Kernel

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent.parent / "guest" / "kmod"
MODULE_NAME = "devmodel_uirq"
KO_NAME = f"{MODULE_NAME}.ko"
#: A Debian flavour release: ``6.1.0-50-amd64`` -> ABI ``6.1.0-50``, flavour ``amd64``.
DEBIAN_RELEASE_RE = re.compile(r"^(?P<abi>(?P<major>\d+)\.(?P<minor>\d+)\.\d+-\d+)-(?P<flavour>[\w-]+)$")
#: Entries of the flavour headers directory that the private object tree links to.
OBJTREE_LINKS = (".config", ".kernelvariables", "Module.symvers", "arch", "include")
BUILD_TIMEOUT_S = 600


class KmodError(RuntimeError):
    """The module could not be built; the message names what is missing."""


@dataclass
class Contribution:
    """What a builder adds to the initramfs: files, modules to insmod at boot, a cache key."""

    key: str
    entries: list[cpio.Entry] = field(default_factory=list)
    #: File names under /lib/modules that /init loads, in order (appended to /etc/modules).
    load: list[str] = field(default_factory=list)


def source_files() -> list[Path]:
    """The module's inputs: its C source and Kbuild file."""
    return sorted(p for p in SOURCE_DIR.iterdir() if p.is_file() and (p.suffix in (".c", ".h") or p.name == "Kbuild"))


def debian_header_packages(release: str) -> list[str]:
    """The bookworm packages that hold kbuild headers for ``release`` (e.g. 6.1.0-50-amd64)."""
    m = DEBIAN_RELEASE_RE.match(release)
    if not m:
        raise KmodError(f"kernel release {release!r} is not a Debian flavour release (like 6.1.0-50-amd64)")
    return [f"linux-headers-{release}", f"linux-headers-{m['abi']}-common", f"linux-kbuild-{m['major']}.{m['minor']}"]


def kernel_variables(objtree: Path) -> dict[str, str]:
    """``.kernelvariables`` of a Debian headers tree (CC names the gcc the kernel was built with)."""
    path = objtree / ".kernelvariables"
    out: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            m = re.match(r"^\s*(?:override\s+)?(\w+)\s*:?=\s*(.*)$", line)
            if m:
                out[m.group(1)] = m.group(2).strip()
    return out


def required_compiler(objtree: Path) -> str:
    """The compiler kbuild will call: ``gcc-NN`` from Debian's headers, else ``gcc``."""
    m = re.search(r"(gcc(?:-\d+)?)\s*$", kernel_variables(objtree).get("CC", ""))
    return m.group(1) if m else "gcc"


def check_tools(compiler: str, path: str | None = None) -> None:
    """Fail with one message naming every missing host tool (and the Debian package)."""
    missing = [f"{tool} (Debian package {pkg})" for tool, pkg in
               ((compiler, compiler if compiler != "gcc" else "gcc"), ("make", "make"), ("ld", "binutils"))
               if shutil.which(tool, path=path) is None]
    if missing:
        raise KmodError("cannot build the guest kernel module: missing host tools: " + ", ".join(missing))


def debian_objtree(release: str) -> Path:
    """A private kbuild object tree for Debian's ``release`` headers (see module docstring)."""
    packages = debian_header_packages(release)
    root = unpacked(packages, SUITE)
    flavour = root / "usr/src" / f"linux-headers-{release}"
    common = root / "usr/src" / packages[1]
    kbuild = root / "usr/lib" / packages[2]
    for need in (flavour / "Makefile", common / "Makefile", kbuild / "scripts"):
        if not need.exists():
            raise KmodError(f"{need.relative_to(root)} missing from the unpacked {', '.join(packages)}")
    tree = cache_dir("kmod", f"objtree-{release}-{digest(str(root))}")
    for name in OBJTREE_LINKS:
        _link(tree / name, flavour / name)
    _link(tree / "scripts", kbuild / "scripts")
    _link(tree / "tools", kbuild / "tools")
    (tree / "Makefile").write_text(f"include {common / 'Makefile'}\n")
    return tree


def _link(link: Path, target: Path) -> None:
    """Make ``link`` point at ``target`` (idempotent; tolerates a concurrent builder)."""
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)


def compile_module(objtree: Path, release: str, compiler: str | None) -> Path:
    """Run kbuild for guest/kmod in a scratch copy of the source; return the .ko path."""
    check_tools(compiler or "gcc")
    key = digest(file_digest(*source_files(), Path(__file__)), release, str(objtree))
    out_dir = cache_dir("kmod", f"{MODULE_NAME}-{release}-{key}")
    ko = out_dir / KO_NAME
    if ko.exists():
        return ko
    work = out_dir / f"build-{os.getpid()}"  # private: parallel builders do not collide
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    for src in source_files():
        shutil.copy2(src, work / src.name)
    argv = ["make", "-C", str(objtree), f"M={work}", f"-j{os.cpu_count() or 1}", "modules"]
    if compiler:
        argv.append(f"CC={compiler}")
    log.info("building %s for %s", KO_NAME, release)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise KmodError(f"kernel module build timed out after {BUILD_TIMEOUT_S} s") from None
    built = work / KO_NAME
    if proc.returncode != 0 or not built.exists():
        raise KmodError(f"kernel module build failed ({' '.join(argv)}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    warnings = [line for line in proc.stderr.splitlines() if "warning:" in line]
    if warnings:
        log.warning("%s built with compiler warnings:\n%s", KO_NAME, "\n".join(warnings))
    vermagic = modinfo(built.read_bytes()).get("vermagic", "")
    if vermagic.split(" ")[0] != release:
        raise KmodError(f"{KO_NAME} has vermagic {vermagic!r}, not for kernel {release}")
    tmp = work / f"{KO_NAME}.done"
    shutil.copy2(built, tmp)
    tmp.rename(ko)
    shutil.rmtree(work, ignore_errors=True)
    return ko


def modinfo(ko: bytes) -> dict[str, str]:
    """The ``key=value`` strings of a module's .modinfo (first value per key)."""
    out: dict[str, str] = {}
    for m in re.finditer(rb"(?:^|\0)(vermagic|license|name|depends|description)=([^\0]*)", ko):
        out.setdefault(m.group(1).decode(), m.group(2).decode(errors="replace"))
    return out


def user_kbuild_release(kbuild: Path) -> str:
    """The release a user's kernel build directory was configured for."""
    path = kbuild / "include/config/kernel.release"
    if not path.exists():
        raise KmodError(f"DEVMODEL_KBUILD={kbuild} has no include/config/kernel.release (not a prepared kernel build dir)")
    return path.read_text().strip()


def build(kernel: Kernel) -> Path | None:
    """The module for ``kernel``, or None (with a warning) when it cannot be built for it.

    Debian's kernel: built against Debian's headers. A user kernel: built only when
    ``DEVMODEL_KBUILD`` points at its build directory.
    """
    kbuild = os.environ.get("DEVMODEL_KBUILD")
    if kbuild:
        tree = Path(kbuild)
        release = user_kbuild_release(tree)
        if kernel.release and kernel.release != release:
            raise KmodError(f"DEVMODEL_KBUILD is for {release} but the guest kernel is {kernel.release}")
        return compile_module(tree, release, None)
    if os.environ.get("DEVMODEL_KERNEL"):
        log.warning("user kernel without DEVMODEL_KBUILD: the guest boots without %s "
                    "(no MSI/MSI-X counting for guest userspace)", MODULE_NAME)
        return None
    if not kernel.release:
        log.warning("kernel release unknown: the guest boots without %s", MODULE_NAME)
        return None
    objtree = debian_objtree(kernel.release)
    return compile_module(objtree, kernel.release, required_compiler(objtree))


def contribution(kernel: Kernel) -> Contribution:
    """The module as initramfs entries (``/lib/modules/devmodel_uirq.ko``, loaded at boot)."""
    ko = build(kernel)
    if ko is None:
        return Contribution(key="none")
    return Contribution(key=file_digest(ko), entries=[cpio.regular(f"lib/modules/{KO_NAME}", ko.read_bytes())],
                        load=[KO_NAME])
