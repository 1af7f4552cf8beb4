"""The cffi layouts in devmodel.iommufd.uapi against the real kernel header.

A C program compiled against linux/iommufd.h from Debian's newest linux-libc-dev
(trixie-backports) prints sizeof and every field's offsetof for each modelled struct; any
difference with cffi fails (DESIGN.md: record formats declared once, sizes checked).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from devmodel.iommufd.uapi import UAPI_STRUCTS, ffi


def _fields(struct: str) -> list[str]:
    return [name for name, _ in ffi.typeof(f"struct {struct}").fields]


def _kernel_field(struct: str, field: str) -> str:
    """The header spells a few fields differently from the model."""
    if struct == "iommu_hw_info" and field == "out_data_type":
        return "out_data_type"  # member of an anonymous union in 6.18+
    return field


@pytest.fixture(scope="module")
def header_root() -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    try:
        from images import debian
    except ImportError as exc:  # pragma: no cover - the lead's module is missing
        pytest.skip(f"images.debian unavailable: {exc}")
    try:
        root = debian.unpacked(["linux-libc-dev"], suite="trixie-backports")
    except Exception as exc:  # noqa: BLE001 - any fetch failure means no header to check
        pytest.skip(f"cannot fetch linux-libc-dev from trixie-backports: {exc}")
    inc = root / "usr/include"
    if not (inc / "linux/iommufd.h").is_file():
        pytest.skip("linux-libc-dev has no linux/iommufd.h")
    return inc


def test_layouts_match_kernel_header(header_root: Path, tmp_path: Path) -> None:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/iommufd.h>",
             "int main(void) {"]
    for s in UAPI_STRUCTS:
        lines.append(f'printf("{s} sizeof %zu\\n", sizeof(struct {s}));')
        for f in _fields(s):
            kf = _kernel_field(s, f)
            lines.append(f'printf("{s} {f} %zu\\n", offsetof(struct {s}, {kf}));')
    lines += ["return 0;", "}"]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "layout"
    # The host's own headers come after the fetched ones, for <stdio.h> and <asm/types.h>.
    subprocess.run(["gcc", "-O0", "-I", str(header_root), "-o", str(exe), str(src)],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    kernel = {}
    for line in out.splitlines():
        s, f, v = line.split()
        kernel[(s, f)] = int(v)
    mismatches = []
    for s in UAPI_STRUCTS:
        if kernel[(s, "sizeof")] != ffi.sizeof(f"struct {s}"):
            mismatches.append(f"sizeof {s}: kernel {kernel[(s, 'sizeof')]} model {ffi.sizeof(f'struct {s}')}")
        for f in _fields(s):
            if kernel[(s, f)] != ffi.offsetof(f"struct {s}", f):
                mismatches.append(f"{s}.{f}: kernel {kernel[(s, f)]} model {ffi.offsetof(f'struct {s}', f)}")
    assert not mismatches, "\n".join(mismatches)
    assert len(kernel) > len(UAPI_STRUCTS) * 2  # the program really printed the fields


def test_record_sizes() -> None:
    """Sections 2.4, 2.5, 3.2: the fd record sizes user space depends on."""
    assert ffi.sizeof("struct iommu_hwpt_pgfault") == 40
    assert ffi.sizeof("struct iommu_hwpt_page_response") == 8
    assert ffi.sizeof("struct iommufd_vevent_header") == 8
    assert ffi.sizeof("struct iommu_vevent_arm_smmuv3") == 32
    assert ffi.sizeof("struct iommu_test_cmd") == 72  # union of 48 bytes at 16, last at 64
