"""The agent in a booted guest survives the DMA engine's removal through sysfs and finds it
again after a bus rescan (issue 8).

``echo 1 > /sys/bus/pci/devices/<bdf>/remove`` unbinds devmodel_uirq (its file reports
EPOLLHUP) and revokes the sysfs BAR mapping (an access would be SIGBUS and kill the
daemon); ``echo 1 > /sys/bus/pci/rescan`` enumerates the function again as a new device.
Reference guest.md (BAR mmap through sysfs, devmodel_uirq), machine interface (engine at
00:04.0, vSID 0x20).
"""

from __future__ import annotations

import shlex
import time

import pytest

from devmodel.session import machine_session

pytestmark = pytest.mark.qemu

ENGINE_BDF = "0000:00:04.0"


def parse(out: str) -> list[dict[str, str]]:
    recs = []
    for line in out.splitlines():
        parts = shlex.split(line)
        if parts:
            recs.append({"_": parts[0], **dict(p.split("=", 1) for p in parts[1:] if "=" in p)})
    return recs


class Dm:
    def __init__(self, guest) -> None:  # noqa: ANN001
        self.guest = guest

    def __call__(self, cmd: str, rc: int = 0, timeout: float = 60) -> list[dict[str, str]]:
        code, out = self.guest.run(f"dm {cmd}", timeout=timeout)
        assert code == rc, f"dm {cmd}: rc {code}\n{out}"
        return parse(out)

    def device(self, dev: str) -> dict[str, str]:
        return next(r for r in self("status") if r["_"] == "device" and r["dev"] == dev)


@pytest.fixture
def guest_dm(tmp_path):
    with machine_session(directory=str(tmp_path / "sock")) as s:
        dm = Dm(s.guest)
        dm("up")
        yield dm


def test_sysfs_remove_and_rescan_engine(guest_dm):
    dm = guest_dm
    guest = dm.guest
    dm("buf alloc b 4096")
    dm("map 0 0x40000 --page-for-buffer b")
    assert dm("dma fill --dst 0x40000 --len 8")[0]["status"] == "SUCCESS"
    guest.check(f"echo 1 > /sys/bus/pci/devices/{ENGINE_BDF}/remove")
    # The interrupt thread notices the hang-up by itself; the daemon is still serving.
    deadline = time.monotonic() + 30
    while dm.device("engine")["state"] != "gone":
        assert time.monotonic() < deadline, "agent never noticed the removal"
        time.sleep(0.2)
    t0 = time.monotonic()
    err = dm("dma fill --dst 0x40000 --len 8", rc=1)[0]
    assert err["_"] == "error" and err["errno"] == "ENODEV"
    assert time.monotonic() - t0 < 20  # a clear error, not the 5 s wait plus a hang
    assert guest.run("test -e /run/dm.sock")[0] == 0 and "devmodel_agent" in guest.check("ps")
    # Bus rescan: a new function at the same BDF; dm rescan re-creates the driver state.
    guest.check("echo 1 > /sys/bus/pci/rescan")
    found = next(r for r in dm("rescan --no-bus") if r["dev"] == "engine")
    assert (found["result"], found["bdf"], found["sid"]) == ("found", ENGINE_BDF, "0x20")
    dm("map 0 0x40000 --page-for-buffer b")  # the old tables went with the old device
    assert dm("dma fill --dst 0x40000 --len 8 --pattern 0x0102030405060708")[0]["status"] == "SUCCESS"
    assert dm("buf read b --len 8")[0]["hex"] == "0807060504030201"
    assert dm.device("engine")["removals"] == "1"
    assert "SIGBUS" not in guest.console and "Bus error" not in guest.console
