"""QemuMonitor against a real QEMU running the real guest.

What is checked and why (project reference vfio-user-qemu.md, "Hotplug into a
pcie-root-port with QMP device_add works; device_del needs a guest that cooperates"; the
task notes: a hot-pluggable bus is a pcie-root-port, the guest sees plug/unplug through
PCIe hot-plug):

- query-pci describes bus 0 as QEMU built it (the root port we asked for is there);
- device_add behind the root port makes the device appear in the guest's sysfs;
- device_del returns only with DEVICE_DELETED for that id, after which the guest no
  longer lists the device; the same id plugs again;
- QEMU's error replies surface as QmpError carrying QEMU's error class and text;
- a guest that cannot acknowledge (vCPUs stopped) turns device_del into TimeoutError, and
  the late acknowledgement still arrives as an event once the guest runs again;
- the monitor can be used from several threads at once (control-socket handler thread).

The test device is QEMU's own ``pci-testdev`` (1b36:0005, no MSI-X: QEMU 11.1.3 aborts on
device_del of a vfio-user device with MSI-X, so that case is not exercised here).
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from devmodel.qmp import DEVICE_DELETED, QemuMonitor, QmpError, summarize_pci
from guest.harness import Guest

pytestmark = pytest.mark.qemu

ROOT_PORT = "rp1"
ROOT_PORT_ARGS = ["-device", f"pcie-root-port,id={ROOT_PORT},bus=pcie.0,chassis=1,addr=0x6"]
TESTDEV = {"driver": "pci-testdev", "bus": ROOT_PORT}
TESTDEV_IDS = "0x1b36 0x0005"  # QEMU's pci-testdev vendor/device as sysfs prints them
PCI_CLASS_BRIDGE_PCI = "0x0604"
#: Sysfs lines "<bdf> <vendor> <device>" for every PCI function the guest kernel knows.
LIST_PCI = 'for d in /sys/bus/pci/devices/*; do echo "${d##*/} $(cat $d/vendor) $(cat $d/device)"; done'


@pytest.fixture(scope="module")
def guest():
    """One booted guest with a hot-pluggable root port for the whole module (boots cost)."""
    g = Guest(extra_args=list(ROOT_PORT_ARGS))
    try:
        g.start()
        yield g
    finally:
        g.close()


def guest_has_testdev(guest: Guest) -> bool:
    return TESTDEV_IDS in guest.check(LIST_PCI)


def wait_guest(guest: Guest, present: bool, timeout: float = 10.0) -> None:
    """Poll the guest's sysfs until the test device is (or is no longer) there."""
    deadline = time.monotonic() + timeout * guest.scale
    while guest_has_testdev(guest) != present:
        assert time.monotonic() < deadline, f"guest never {'saw' if present else 'lost'} the device:\n" \
                                            + guest.check(LIST_PCI)
        time.sleep(0.2)


def test_query_pci_lists_bus_zero_with_the_root_port(guest):
    buses = guest.qmp.query_pci()
    assert buses[0]["bus"] == 0
    summary = summarize_pci(buses)
    ports = [d for d in summary if d["qdev_id"] == ROOT_PORT]
    assert len(ports) == 1
    assert ports[0]["bdf"] == "00:06.0" and ports[0]["class"] == PCI_CLASS_BRIDGE_PCI
    assert summary[0]["bdf"] == "00:00.0"  # the q35 host bridge


def test_plug_is_seen_by_the_guest_and_unplug_waits_for_device_deleted(guest):
    mon = guest.qmp
    assert not guest_has_testdev(guest)
    for round_ in range(2):  # the second round is the re-plug of the same id
        mon.device_add({**TESTDEV, "id": "td"})
        assert any(d["qdev_id"] == "td" for d in summarize_pci(mon.query_pci()))
        wait_guest(guest, present=True)
        event = mon.device_del("td")
        assert event["event"] == DEVICE_DELETED and event["data"]["device"] == "td", round_
        # DEVICE_DELETED comes after the guest released the device: it is gone at once.
        assert not guest_has_testdev(guest)
        assert not any(d["qdev_id"] == "td" for d in summarize_pci(mon.query_pci()))
    deleted = [e for e in mon.events if e["event"] == DEVICE_DELETED and e["data"].get("device") == "td"]
    assert len(deleted) == 2


def test_qemu_errors_surface_as_qmp_error_with_qemus_words(guest):
    mon = guest.qmp
    with pytest.raises(QmpError) as info:
        mon.device_add({"driver": "no-such-device", "id": "bad0"})
    assert info.value.error_class == "GenericError"
    assert "'no-such-device' is not a valid device model name" in info.value.desc
    assert info.value.command == "device_add"
    with pytest.raises(QmpError) as info:
        mon.device_add({**TESTDEV, "id": ROOT_PORT})  # an id QEMU already uses
    assert "Duplicate" in info.value.desc
    with pytest.raises(QmpError) as info:
        mon.device_del("nothing-by-this-id")
    assert info.value.error_class == "DeviceNotFound"
    with pytest.raises(QmpError) as info:
        mon.command("no-such-command")
    assert info.value.error_class == "CommandNotFound"


def test_guest_that_never_acknowledges_gives_timeout_error(guest):
    """With the vCPUs stopped the guest cannot answer the attention button: device_del must
    not claim success. Once the guest runs again its late acknowledgement completes the
    removal and the event is still recorded."""
    mon = guest.qmp
    mon.device_add({**TESTDEV, "id": "td2"})
    wait_guest(guest, present=True)
    mon.command("stop")
    try:
        mark = mon.mark()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="did not acknowledge"):
            mon.device_del("td2", timeout=2.0)
        assert 2.0 <= time.monotonic() - t0 < 5.0
    finally:
        mon.command("cont")
    event = mon.wait_event(DEVICE_DELETED, lambda d: d.get("device") == "td2", timeout=15, after=mark)
    assert event is not None
    wait_guest(guest, present=False)


def test_monitor_is_usable_from_many_threads(guest):
    """Concurrent commands each get their own answer (the control socket's handler thread
    and the main thread share one monitor)."""
    results: list[object] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(5):
                results.append(guest.qmp.command("query-status")["status"])
                results.append(len(guest.qmp.query_pci()[0]["devices"]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert results.count("running") == 20
    assert len(results) == 40


def test_connection_loss_is_reported_not_hung():
    """After QEMU quits, commands fail fast with ConnectionError instead of waiting."""
    g = Guest(extra_args=list(ROOT_PORT_ARGS))
    try:
        g.start()
        mon = g.qmp
        assert mon.connected
        pid = g.child.pid
        mon.quit()
        deadline = time.monotonic() + 10
        while mon.connected:
            assert time.monotonic() < deadline, "monitor did not notice QEMU leaving"
            time.sleep(0.05)
        with pytest.raises(ConnectionError):
            mon.query_pci()
        with pytest.raises(ConnectionError):
            mon.wait_event(DEVICE_DELETED, timeout=5)
    finally:
        g.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_connect_to_nothing_fails_within_the_timeout(tmp_path):
    mon = QemuMonitor()
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="cannot connect"):
        mon.connect(str(tmp_path / "absent.sock"), timeout=0.5)
    assert time.monotonic() - t0 < 3
    mon.close()  # harmless on a monitor that never connected
