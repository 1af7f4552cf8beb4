"""A minimal writer for the "newc" cpio format the kernel unpacks as an initramfs.

Writing it ourselves keeps the build free of root and of a host ``cpio``, and makes the
archive reproducible: every entry is owned by 0:0 with mtime 0.
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass
class Entry:
    """One archive member: a directory, a regular file or a symlink."""

    name: str
    mode: int
    data: bytes = b""


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, entry: Entry) -> bytes:
    name = entry.name.lstrip("/").encode() + b"\0"
    fields = [ino, entry.mode, 0, 0, 1, 0, len(entry.data), 0, 0, 0, 0, len(name), 0]
    head = MAGIC + b"".join(b"%08X" % f for f in fields) + name
    return head + _pad4(len(head))


def archive(entries: list[Entry]) -> bytes:
    """The uncompressed newc archive of ``entries`` in order, with its trailer."""
    out = bytearray()
    for ino, entry in enumerate([*entries, Entry(TRAILER, 0)], start=1):
        out += _header(ino, entry) + entry.data + _pad4(len(entry.data))
    return bytes(out)


def directory(name: str) -> Entry:
    return Entry(name, stat.S_IFDIR | 0o755)


def regular(name: str, data: bytes, executable: bool = False) -> Entry:
    return Entry(name, stat.S_IFREG | (0o755 if executable else 0o644), data)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def gzipped(entries: list[Entry]) -> bytes:
    """The archive gzip-compressed with a fixed mtime, as the kernel accepts it."""
    return gzip.compress(archive(entries), compresslevel=6, mtime=0)
