"""The guest kernel: Debian bookworm's 6.1, booted as an uncompressed vmlinux through PVH.

Measured here (see the project's guest notes): PVH boot of the uncompressed image reaches a
shell in about 1.5 s under TCG, against about 3.9 s for the bzImage, because nothing has
to be decompressed in emulated code. So we extract ``vmlinux`` from Debian's bzImage once
and cache it.

``DEVMODEL_KERNEL`` (a bzImage or a vmlinux) and ``DEVMODEL_MODULES`` (the directory that
holds ``<release>/modules.dep``, i.e. a ``lib/modules``) let a kernel developer boot their
own kernel instead.
"""

from __future__ import annotations

import lzma
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from images.cache import cache_dir
from images.debian import AptState, unpacked

SUITE = "bookworm"
METAPACKAGE = "linux-image-amd64"

XZ_MAGIC = b"\xfd7zXZ\x00"
ELF_MAGIC = b"\x7fELF"


class KernelError(RuntimeError):
    """The kernel image could not be found or decoded."""


@dataclass
class Kernel:
    """A bootable kernel and, when known, its modules tree (``lib/modules``)."""

    image: Path
    modules: Path | None
    release: str | None


def bzimage_payload(data: bytes) -> tuple[bytes, bytes]:
    """Return (compression magic, payload) of an x86 bzImage (boot protocol >= 2.08)."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        raise KernelError("not an x86 bzImage (no HdrS boot header)")
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start:start + payload_length]
    return payload[:6], payload


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Decompress the ELF vmlinux from a bzImage (xz only: that is what 6.1 uses)."""
    magic, payload = bzimage_payload(bzimage)
    if magic != XZ_MAGIC:
        raise KernelError(f"unsupported bzImage compression (magic {magic.hex()}); pass a vmlinux instead")
    out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if out[:4] != ELF_MAGIC:
        raise KernelError("decompressed payload is not an ELF vmlinux")
    return out


def bootable(image: Path) -> Path:
    """An image QEMU boots fast: vmlinux as is, a bzImage turned into a cached vmlinux.

    A bzImage whose payload we cannot decompress is returned unchanged (QEMU boots it the
    slow way).
    """
    data = image.read_bytes()
    if data[:4] == ELF_MAGIC:
        return image
    try:
        vmlinux = extract_vmlinux(data)
    except KernelError:
        return image
    st = image.stat()
    out = cache_dir("kernel") / f"vmlinux-{image.name}-{st.st_size}-{int(st.st_mtime)}"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(vmlinux)
        tmp.rename(out)
    return out


def debian_release() -> str:
    """The ABI package the bookworm metapackage points at, e.g. ``linux-image-6.1.0-41-amd64``.

    Resolved once and remembered next to the private apt lists it came from (asking
    apt-cache costs about a second per boot); ``make clean`` forgets both.
    """
    apt = AptState((SUITE,))
    remembered = apt.root / "kernel-package"
    if remembered.exists():
        return remembered.read_text().strip()
    for dep in apt.depends(METAPACKAGE):
        if dep.startswith("linux-image-") and dep != METAPACKAGE:
            remembered.write_text(dep + "\n")
            return dep
    raise KernelError(f"{METAPACKAGE} in {SUITE} depends on no linux-image package")


def debian_kernel() -> Kernel:
    """Download (once) Debian's bookworm kernel and return its vmlinux and modules."""
    package = debian_release()
    root = unpacked([package], SUITE)
    images = sorted((root / "boot").glob("vmlinuz-*"))
    if not images:
        raise KernelError(f"{package} has no /boot/vmlinuz")
    release = images[0].name.removeprefix("vmlinuz-")
    return Kernel(bootable(images[0]), root / "lib/modules", release)


def find_kernel() -> Kernel:
    """The user's kernel when ``DEVMODEL_KERNEL`` is set, else Debian's."""
    user = os.environ.get("DEVMODEL_KERNEL")
    if user:
        image = Path(user)
        if not image.is_file():
            raise KernelError(f"DEVMODEL_KERNEL={user} is not a file")
        mods = os.environ.get("DEVMODEL_MODULES")
        modules = Path(mods) if mods else None
        release = None
        if modules and modules.is_dir():
            found = [d.name for d in modules.iterdir() if (d / "modules.dep").exists()]
            release = found[0] if len(found) == 1 else None
        return Kernel(bootable(image), modules, release)
    return debian_kernel()
