"""``devmodel inspect SOCKET`` prints the device like lspci -vv, through the protocol."""

from devmodel.cli import main


def test_inspect_output(vfu, capsys, tdev) -> None:
    assert main(["inspect", vfu.path]) == 0
    out = capsys.readouterr().out
    assert f"vendor {tdev.VENDOR_ID:04x} device {tdev.DEVICE_ID:04x} class {tdev.CLASS_CODE:06x}" in out
    assert "Region 0: Memory (32-bit, non-prefetchable) [size=8K]" in out
    assert "[40] Express Endpoint" in out
    assert "[70] MSI-X Enable- Count=4" in out
    assert "[100 v1] Address Translation Service (ATS)" in out
    assert "[110 v1] Process Address Space ID (PASID)" in out
    assert "[120 v1] Page Request Interface (PRI)" in out
    assert "sparse mmap: [0x1000, 0x2000)" in out
    assert "IRQ MSIX: count=4 flags=eventfd" in out
    assert "Region CONFIG: size=0x1000 flags=read,write" in out


def test_inspect_missing_socket(sockdir, capsys) -> None:
    assert main(["inspect", sockdir + "/nothing.sock"]) == 1
