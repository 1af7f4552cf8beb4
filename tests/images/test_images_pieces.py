"""Image-building pieces that need no download: bzImage unpacking, module closure,
accelerator choice, mirror discovery, QEMU launcher shape, cache location."""

import lzma
import struct
from pathlib import Path

import pytest

from images import accel, cache, debian, initramfs, kernel, qemu

ELF = b"\x7fELF" + bytes(60) + b"vmlinux body" * 100


def make_bzimage(payload: bytes, setup_sects: int = 4) -> bytes:
    """A minimal x86 boot image: setup header fields per Documentation/arch/x86/boot.rst."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", setup, 0x248, 16, len(payload))
    return bytes(setup) + bytes(16) + payload + b"tail garbage"


def test_extract_vmlinux_from_xz_bzimage():
    image = make_bzimage(lzma.compress(ELF, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32))
    assert kernel.extract_vmlinux(image) == ELF


def test_extract_rejects_non_bzimage_and_other_compressions():
    with pytest.raises(kernel.KernelError, match="HdrS"):
        kernel.extract_vmlinux(b"\0" * 4096)
    with pytest.raises(kernel.KernelError, match="compression"):
        kernel.extract_vmlinux(make_bzimage(b"\x28\xb5\x2f\xfd" + bytes(100)))  # zstd magic


def test_bootable_passes_vmlinux_and_caches_extraction(tmp_path, monkeypatch):
    monkeypatch.setenv("DEVMODEL_CACHE", str(tmp_path / "c"))
    vm = tmp_path / "vmlinux"
    vm.write_bytes(ELF)
    assert kernel.bootable(vm) == vm
    bz = tmp_path / "bzImage"
    bz.write_bytes(make_bzimage(lzma.compress(ELF, format=lzma.FORMAT_XZ)))
    out = kernel.bootable(bz)
    assert out != bz and out.read_bytes() == ELF and str(out).startswith(str(tmp_path / "c"))


def test_user_kernel_from_environment(tmp_path, monkeypatch):
    vm = tmp_path / "vmlinux"
    vm.write_bytes(ELF)
    mods = tmp_path / "lib/modules/6.9.0-test"
    mods.mkdir(parents=True)
    (mods / "modules.dep").write_text("")
    monkeypatch.setenv("DEVMODEL_KERNEL", str(vm))
    monkeypatch.setenv("DEVMODEL_MODULES", str(tmp_path / "lib/modules"))
    k = kernel.find_kernel()
    assert (k.image, k.release) == (vm, "6.9.0-test")
    monkeypatch.setenv("DEVMODEL_KERNEL", str(tmp_path / "missing"))
    with pytest.raises(kernel.KernelError):
        kernel.find_kernel()


def fake_module(path: Path, depends: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF....\0license=GPL\0depends=" + depends.encode() + b"\0vermagic=6.1\0")


def test_module_closure_orders_dependencies_first(tmp_path):
    tree = tmp_path / "6.1.0-x"
    fake_module(tree / "kernel/drivers/uio/uio.ko", "")
    fake_module(tree / "kernel/drivers/uio/uio_pci_generic.ko", "uio")
    fake_module(tree / "kernel/lib/a-b.ko", "uio,uio_pci_generic")
    names = [p.name for p in initramfs.module_closure(tmp_path, "6.1.0-x", ["a_b"])]
    assert names == ["uio.ko", "uio_pci_generic.ko", "a-b.ko"]
    with pytest.raises(FileNotFoundError):
        initramfs.module_closure(tmp_path, "6.1.0-x", ["nope"])


CPU_VMX = "processor: 0\nflags\t\t: fpu vme vmx sse\n"
CPU_NONE = "processor: 0\nflags\t\t: fpu vme sse\n"


def test_kvm_needs_cpu_flag_device_and_no_pvm(tmp_path):
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    sysmod = tmp_path / "module"
    sysmod.mkdir()
    assert accel.kvm_usable(CPU_VMX, str(dev), str(sysmod))
    assert not accel.kvm_usable(CPU_NONE, str(dev), str(sysmod))
    assert not accel.kvm_usable(CPU_VMX, str(tmp_path / "absent"), str(sysmod))
    (sysmod / "kvm_pvm").mkdir()
    assert not accel.kvm_usable(CPU_VMX, str(dev), str(sysmod))


def test_accel_override(monkeypatch):
    monkeypatch.setenv("DEVMODEL_ACCEL", "TCG")
    assert accel.choose_accel() == "tcg"
    monkeypatch.setenv("DEVMODEL_ACCEL", "hvf")
    with pytest.raises(ValueError):
        accel.choose_accel()


def test_mirror_read_from_both_source_formats(tmp_path, monkeypatch):
    monkeypatch.delenv("DEVMODEL_DEBIAN_MIRROR", raising=False)
    one = tmp_path / "sources.list"
    one.write_text("# comment\ndeb [arch=amd64] http://mirror.test/debian/ bookworm main\n")
    assert debian.host_mirror([one]) == "http://mirror.test/debian"
    deb822 = tmp_path / "debian.sources"
    deb822.write_text("Types: deb\nURIs: http://other.test/debian\nSuites: bookworm\n")
    assert debian.host_mirror([tmp_path / "none", deb822]) == "http://other.test/debian"
    with pytest.raises(debian.DebianError):
        debian.host_mirror([tmp_path / "none"])
    monkeypatch.setenv("DEVMODEL_DEBIAN_MIRROR", "http://env.test/debian/")
    assert debian.host_mirror([one]) == "http://env.test/debian"


def test_bundled_qemu_runs_through_its_own_loader(tmp_path):
    argv = qemu.bundled_argv(tmp_path)
    loader = argv.index(str(tmp_path / qemu.MULTIARCH / "ld-linux-x86-64.so.2"))
    assert argv[loader + 1:loader + 3] == ["--library-path", str(tmp_path / qemu.MULTIARCH)]
    assert argv[loader + 3] == str(tmp_path / "usr/bin/qemu-system-x86_64")
    assert f"QEMU_MODULE_DIR={tmp_path / qemu.MULTIARCH / 'qemu'}" in argv


def test_user_qemu_without_vfio_user_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "qemu"
    fake.write_text("#!/bin/sh\necho 'name \"virtio-net-pci\"'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("DEVMODEL_QEMU", str(fake))
    qemu.qemu_argv.cache_clear()
    try:
        with pytest.raises(qemu.QemuError, match="vfio-user-pci"):
            qemu.qemu_argv()
        fake.write_text("#!/bin/sh\necho 'name \"vfio-user-pci\", bus PCI'\n")
        qemu.qemu_argv.cache_clear()
        assert qemu.qemu_argv() == [str(fake)]
    finally:
        qemu.qemu_argv.cache_clear()


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DEVMODEL_CACHE", str(tmp_path))
    assert cache.cache_dir("x", "y") == tmp_path / "x" / "y"
    assert (tmp_path / "x" / "y").is_dir()
    monkeypatch.delenv("DEVMODEL_CACHE")
    assert cache.cache_dir() == cache.PROJECT_ROOT / ".cache"
    assert cache.digest([1, "a"]) == cache.digest([1, "a"]) != cache.digest([2, "a"])
