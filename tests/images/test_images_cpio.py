"""The newc writer produces archives the kernel's initramfs unpacker accepts.

Checked against the format rules of the kernel's Documentation/driver-api/early-userspace
/buffer-format.rst: 110-byte ASCII-hex header starting "070701", name NUL-terminated and
padded with the header to 4 bytes, data padded to 4 bytes, "TRAILER!!!" last.
"""

import gzip
import stat

from images import cpio


def parse(blob: bytes) -> list[tuple[str, int, bytes]]:
    """An independent reader for the test (not sharing code with the writer)."""
    out, off = [], 0
    while True:
        assert blob[off:off + 6] == b"070701", f"bad magic at {off}"
        fields = [int(blob[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = off + 110
        name = blob[name_start:name_start + namesize]
        assert name.endswith(b"\0")
        data_start = (name_start + namesize + 3) & ~3
        data = blob[data_start:data_start + filesize]
        off = (data_start + filesize + 3) & ~3
        if name[:-1] == b"TRAILER!!!":
            assert off == len(blob)
            return out
        out.append((name[:-1].decode(), mode, data))


def test_roundtrip_entries_modes_and_padding():
    entries = [cpio.directory("bin"), cpio.regular("bin/tool", b"abcde", executable=True),
               cpio.regular("etc/x", b""), cpio.symlink("bin/sh", "/bin/busybox")]
    got = parse(cpio.archive(entries))
    assert got == [("bin", stat.S_IFDIR | 0o755, b""),
                   ("bin/tool", stat.S_IFREG | 0o755, b"abcde"),
                   ("etc/x", stat.S_IFREG | 0o644, b""),
                   ("bin/sh", stat.S_IFLNK | 0o777, b"/bin/busybox")]


def test_leading_slash_stripped_and_every_entry_aligned():
    blob = cpio.archive([cpio.regular("/init", b"x" * 7)])
    assert parse(blob)[0][0] == "init"
    assert len(blob) % 4 == 0


def test_gzip_is_reproducible():
    entries = [cpio.regular("a", b"1")]
    assert cpio.gzipped(entries) == cpio.gzipped(entries)
    assert parse(gzip.decompress(cpio.gzipped(entries)))[0][2] == b"1"
