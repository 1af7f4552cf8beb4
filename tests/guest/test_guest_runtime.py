"""The guest runtime: Python 3 with the shared record modules, and the devmodel_uirq module
that makes MSI-X / MSI interrupts visible to guest userspace.

References: the shared reference guest.md ("Guest memory and devices from userspace":
BARs through sysfs resourceN, driver_override binding; "Kernel": no MSI for userspace on
stock kernels). Device registers used to raise interrupts from the guest side:
* igb (Intel 82576): GPIE (0x1514) bit 4 Multiple_MSIX selects per-vector MSI-X; EIMS
  (0x1524) enables, EICS (0x1520) sets and EICR (0x1580, write 1 to clear) clears
  extended causes, one bit per MSI-X vector (82576 datasheet, 7.3 and 8.8).
* QEMU's edu device: writing 0x60 raises its single MSI, 0x64 acknowledges it.
"""

import ast
import textwrap

import pytest

from devmodel.iommu import records
from images import guest_python

IGB_BDF = "0000:00:05.0"
EDU_BDF = "0000:00:06.0"
IGB_MSIX_VECTORS = 10  # QEMU's igb PF exposes 10 MSI-X table entries
GPIE, EICS, EIMS, EICR = 0x1514, 0x1520, 0x1524, 0x1580
GPIE_MULTIPLE_MSIX = 1 << 4
EDU_ID, EDU_RAISE, EDU_ACK = 0x00, 0x60, 0x64
EDU_ID_MAGIC = 0x010000ED  # version 1.0, "ed"


def guest_python3(guest, script: str, timeout: float = 60) -> str:
    """Run a Python script in the guest (heredoc through the console); return its output."""
    return guest.check(f"python3 - <<'PYEOF'\n{textwrap.dedent(script).strip()}\nPYEOF", timeout)


# -- host side: what goes into the image -----------------------------------------------------
def test_shared_closure_follows_module_level_devmodel_imports_only(tmp_path):
    pkg = tmp_path / "devmodel" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "devmodel/__init__.py").write_text("import devmodel.heavy\n")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from __future__ import annotations\nimport json\nfrom . import b\n"
                              "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from devmodel.heavy import X\n"
                              "def f():\n    from devmodel import heavy\n")
    (pkg / "b.py").write_text("from devmodel.sub.c import thing\n")
    (pkg / "c.py").write_text("thing = 1\n")
    (tmp_path / "devmodel/heavy.py").write_text("raise ImportError('never shipped')\n")
    files = guest_python.shared_closure(("devmodel/sub/a.py",), root=tmp_path)
    # Lazy and TYPE_CHECKING imports are not followed; package __init__ files are generated.
    assert [p.relative_to(tmp_path).as_posix() for p in files] == [
        "devmodel/sub/a.py", "devmodel/sub/b.py", "devmodel/sub/c.py"]
    with pytest.raises(guest_python.GuestPythonError, match="does not exist"):
        guest_python.shared_closure(("devmodel/nope.py",), root=tmp_path)


def test_real_shared_modules_are_pure_stdlib_and_staged():
    shared = {p.name for p in guest_python.shared_closure()}
    assert {"memory.py", "records.py", "bitfield.py"} <= shared
    stage = guest_python.staged()  # staging runs the staged interpreter as a check
    site = stage / guest_python.SITE_DIR
    assert (site / "devmodel/iommu/records.py").is_file()
    init = (site / "devmodel/iommu/__init__.py").read_text()
    assert ast.get_docstring(ast.parse(init)) and "import" not in init  # no side effects
    stdlib = stage / guest_python.STDLIB_DIR
    assert (stdlib / "os.pyc").is_file() and not list(stdlib.rglob("*.py"))  # sourceless
    assert (stage / "usr/bin/python3").readlink().name == guest_python.PYTHON
    assert (stage / "lib/x86_64-linux-gnu/libc.so.6").is_file()
    assert guest_python.size(stage) < 16 << 20  # what the initramfs grows by, uncompressed


def test_staging_refuses_to_write_outside_the_stage(tmp_path):
    stage = tmp_path / "stage"
    stage.mkdir()
    src = tmp_path / "f"
    src.write_bytes(b"x")
    outside = tmp_path / "victim"
    outside.write_bytes(b"keep")
    (stage / "link").symlink_to(outside)
    for dst in (stage / "link", stage / "../victim", stage / "/lib64/anything"):
        with pytest.raises(guest_python.GuestPythonError, match="refusing"):
            guest_python._copy(src, dst, stage)
    assert outside.read_bytes() == b"keep"
    guest_python._copy(src, stage / "sub/ok", stage)
    assert (stage / "sub/ok").read_bytes() == b"x"


# -- in the booted guest ---------------------------------------------------------------------
@pytest.mark.qemu
def test_guest_python_imports_shared_records_and_module_is_loaded(boot_guest):
    guest = boot_guest()
    expected = records.encode_event(records.EventId.F_TRANSLATION, StreamID=5, InputAddr=0x1234000).hex()
    out = guest_python3(guest, """
        import sys
        import devmodel.iommu.records as r
        print(r.__file__)
        print(r.encode_event(r.EventId.F_TRANSLATION, StreamID=5, InputAddr=0x1234000).hex())
        print("smmu" in sys.modules or "devmodel.iommu.smmu" in sys.modules)
    """).split()
    assert out == [f"/{guest_python.SITE_DIR}/devmodel/iommu/records.py", expected, "False"]
    assert guest.check("python3 -c 'import devmodel.memory, mmap, select, json, ctypes; print(1)'").strip() == "1"
    # /init insmods the module at boot (guest/rootfs/init reads /etc/modules).
    assert "devmodel_uirq" in guest.check("lsmod").split()
    assert guest.run("test -d /sys/bus/pci/drivers/devmodel_uirq")[0] == 0


@pytest.mark.qemu
def test_msix_and_msi_interrupts_are_counted_per_vector(boot_guest):
    guest = boot_guest(extra_args=["-device", f"igb,addr={IGB_BDF[-4:]}", "-device", f"edu,addr={EDU_BDF[-4:]}"])
    out = guest_python3(guest, f"""
        import errno, os
        import devmodel_uirq as uirq
        from devmodel_mmio import Bar
        with uirq.bind("{IGB_BDF}") as dev, Bar("{IGB_BDF}") as bar:
            print("mode", dev.mode, dev.nvec)
            print("before", dev.poll())                 # nothing new: EAGAIN -> None
            bar.write32({GPIE}, {GPIE_MULTIPLE_MSIX})
            bar.write32({EIMS}, 1 << 3)
            bar.write32({EICS}, 1 << 3)
            print("first", *dev.wait(5.0))
            print("again", dev.poll())                  # token consumed by the read
            bar.write32({EICR}, 1 << 3)
            bar.write32({EIMS}, 1 << 7)
            bar.write32({EICS}, (1 << 3) | (1 << 7))
            counts = dev.wait(5.0)
            while counts[7] == 0:                       # two MSIs may arrive in two wakeups
                counts = dev.wait(5.0)
            print("second", *counts)
            print("sysfs", *dev.snapshot())
            try:
                os.read(dev.fd, 8)                      # buffer smaller than 8 * nvec
            except OSError as e:
                print("short", errno.errorcode[e.errno])
            uirq.unbind("{IGB_BDF}")
            try:
                dev.wait(1.0)
            except uirq.UirqError as e:
                print("unbound", errno.errorcode[e.errno])
        with uirq.bind("{EDU_BDF}") as dev, Bar("{EDU_BDF}") as bar:
            print("edu", dev.mode, dev.nvec, hex(bar.read32({EDU_ID})))
            bar.write32({EDU_RAISE}, 1)
            print("edu-count", *dev.wait(5.0))
            bar.write32({EDU_ACK}, 1)
    """)
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert lines["mode"] == ["msix", str(IGB_MSIX_VECTORS)]
    assert lines["before"] == ["None"]
    expect = ["0"] * IGB_MSIX_VECTORS
    expect[3] = "1"
    assert lines["first"] == expect  # only the vector whose cause was set fired
    assert lines["again"] == ["None"]
    expect[3], expect[7] = "2", "1"
    assert lines["second"] == expect and lines["sysfs"] == expect
    assert lines["short"] == ["EINVAL"]
    assert lines["unbound"] == ["ENODEV"]  # open file survives the unbind, sees HUP
    assert lines["edu"] == ["msi", "1", hex(EDU_ID_MAGIC)]  # MSI fallback: edu has no MSI-X
    assert lines["edu-count"] == ["1"]
    irqs = guest.check("grep -c devmodel_uirq /proc/interrupts").strip()
    assert irqs == "1"  # igb's 10 vectors were freed on unbind; edu's one remains
