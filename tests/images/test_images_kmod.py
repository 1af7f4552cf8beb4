"""The guest kernel module build (images/kmod.py): Debian header package names, the real
build against bookworm's headers, vermagic, the user-kernel rules and the tool check.

Reference: the shared reference guest.md, "Kernel" (out-of-tree modules for bookworm 6.1
build with linux-headers-6.1.*-amd64 + linux-kbuild-6.1 and the host gcc-12).
"""

import logging
import struct

import pytest

from images import initramfs, kmod
from images.kernel import Kernel, find_kernel

ELF_MAGIC = b"\x7fELF"
ET_REL = 1  # ELF e_type of a relocatable object: what a .ko is


@pytest.fixture
def debian_kernel(monkeypatch):
    """Debian's kernel, whatever the caller's environment says."""
    monkeypatch.delenv("DEVMODEL_KERNEL", raising=False)
    monkeypatch.delenv("DEVMODEL_KBUILD", raising=False)
    return find_kernel()


def test_header_package_names_follow_debian_abi():
    # Debian splits headers into the flavour package, its ABI -common and linux-kbuild-X.Y.
    assert kmod.debian_header_packages("6.1.0-50-amd64") == [
        "linux-headers-6.1.0-50-amd64", "linux-headers-6.1.0-50-common", "linux-kbuild-6.1"]
    with pytest.raises(kmod.KmodError, match="not a Debian flavour release"):
        kmod.debian_header_packages("6.9.0-rc1+")


def test_module_builds_for_the_debian_kernel_release(debian_kernel):
    ko = kmod.build(debian_kernel)
    data = ko.read_bytes()
    assert data[:4] == ELF_MAGIC and struct.unpack_from("<H", data, 16)[0] == ET_REL
    info = kmod.modinfo(data)
    # vermagic's first word must be the running release or insmod refuses the module.
    assert info["vermagic"].split(" ")[0] == debian_kernel.release
    assert info["license"] == "GPL" and info["name"] == kmod.MODULE_NAME
    assert info.get("depends", "") == ""  # /init loads it with plain insmod, no deps
    mtime = ko.stat().st_mtime_ns
    assert kmod.build(debian_kernel) == ko and ko.stat().st_mtime_ns == mtime  # cached


def test_objtree_uses_debian_compiler(debian_kernel):
    tree = kmod.debian_objtree(debian_kernel.release)
    assert kmod.required_compiler(tree) == "gcc-12"  # bookworm's kernel was built with it
    assert f"{debian_kernel.release.rsplit('-', 1)[0]}-common/Makefile" in (tree / "Makefile").read_text()


def test_missing_host_tools_are_named(tmp_path):
    with pytest.raises(kmod.KmodError) as info:
        kmod.check_tools("gcc-12", path=str(tmp_path))
    message = str(info.value)
    assert "gcc-12" in message and "make" in message and "binutils" in message


def test_user_kernel_without_kbuild_skips_module_with_warning(tmp_path, monkeypatch, caplog):
    image = tmp_path / "vmlinux"
    image.write_bytes(ELF_MAGIC)
    monkeypatch.setenv("DEVMODEL_KERNEL", str(image))
    monkeypatch.delenv("DEVMODEL_KBUILD", raising=False)
    with caplog.at_level(logging.WARNING, logger="images.kmod"):
        contribution = kmod.contribution(Kernel(image, None, "6.9.0-custom"))
    assert contribution.entries == [] and contribution.load == []
    assert kmod.MODULE_NAME in caplog.text and "DEVMODEL_KBUILD" in caplog.text


def test_user_kbuild_must_be_a_prepared_build_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DEVMODEL_KBUILD", str(tmp_path))
    with pytest.raises(kmod.KmodError, match="kernel.release"):
        kmod.build(Kernel(tmp_path / "vmlinux", None, None))
    (tmp_path / "include/config").mkdir(parents=True)
    (tmp_path / "include/config/kernel.release").write_text("6.9.0-other\n")
    with pytest.raises(kmod.KmodError, match="6.9.0-other"):
        kmod.build(Kernel(tmp_path / "vmlinux", None, "6.9.0-mine"))


def test_initramfs_carries_and_loads_the_module(debian_kernel):
    contribution = kmod.contribution(debian_kernel)
    names = [e.name for e in contribution.entries]
    assert names == [f"lib/modules/{kmod.KO_NAME}"] and contribution.load == [kmod.KO_NAME]
    entries = initramfs.entries(initramfs.busybox(), debian_kernel, list(initramfs.DEFAULT_MODULES),
                                [contribution])
    etc_modules = next(e for e in entries if e.name == "etc/modules").data.decode().split()
    # /init insmods in file order: Debian's modules first, ours (no dependencies) after.
    assert etc_modules[-1] == kmod.KO_NAME and "uio.ko" in etc_modules
