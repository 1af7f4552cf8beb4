"""Server lifecycle: sockets, disconnect behaviour (spec "Client Disconnection"), many devices."""

import os
import socket
import stat
import threading
import time

import pytest

from vfio_user.client import Client
from vfio_user.device import MODEL_LOCK, PciIrq
from vfio_user import protocol as P
from vfio_user.server import Server


def test_socket_mode_0600(vfu) -> None:
    assert stat.S_IMODE(os.stat(vfu.path).st_mode) == 0o600


def test_disconnect_unmaps_closes_eventfds_detaches_keeps_state(vfu, tdev) -> None:
    c = vfu.client()
    rd, wr = os.pipe()
    c.set_irqs(PciIrq.MSIX, P.IRQ_SET_DATA_EVENTFD | P.IRQ_SET_ACTION_TRIGGER, 0, 1, [wr])
    os.close(wr)
    c.map_memory(0x10000, 0x1000)
    c.region_write(0, tdev.REG_SCRATCH, b"keep")
    c.close()
    assert tdev.fd_closed_by_peer(rd)  # IRQ eventfd closed
    os.close(rd)
    for _ in range(100):
        if vfu.device.events == ["attach", "detach"]:
            break
        time.sleep(0.01)
    assert vfu.device.events == ["attach", "detach"]
    c2 = vfu.client()
    assert c2.region_read(0, tdev.REG_SCRATCH, 4) == b"keep"       # state kept
    assert c2.request(P.Command.DMA_UNMAP, P.DMA_UNMAP.pack(24, 0, 0x10000, 0x1000)).error == 2  # maps gone
    c2.close()


def test_second_client_refused_while_attached(vfu) -> None:
    c = vfu.client()
    other = Client(vfu.path, timeout=2)
    with pytest.raises((ConnectionError, OSError)):
        other.negotiate()
    other.close()
    assert c.device_info().num_irqs == 5
    c.close()


def test_stop_removes_socket_and_refuses_connections(sockdir, tdev) -> None:
    s = Server()
    dev = tdev.VfuTestDevice()
    path = os.path.join(sockdir, "a.sock")
    s.add_device(path, dev)
    s.start_in_thread()
    c = Client(path)
    c.negotiate()
    s.stop()
    assert not os.path.exists(path)
    assert dev.events == ["attach", "detach"]
    c.close()
    dev.close()


def test_stale_socket_file_replaced_live_one_refused(sockdir, tdev) -> None:
    path = os.path.join(sockdir, "stale.sock")
    old = socket.socket(socket.AF_UNIX)
    old.bind(path)
    old.close()  # leaves the file behind, nobody listening
    s = Server()
    s.add_device(path, tdev.VfuTestDevice())
    s.start_in_thread()
    s2 = Server()
    with pytest.raises(OSError):
        s2.add_device(path, tdev.VfuTestDevice())  # a live server listens there
    s2.stop()
    s.stop()


def test_many_devices_one_loop(sockdir, tdev) -> None:
    s = Server()
    devs = [tdev.VfuTestDevice() for _ in range(3)]
    paths = [os.path.join(sockdir, f"fn{i}.sock") for i in range(3)]
    for p, d in zip(paths, devs):
        s.add_device(p, d)
    threads_before = s.start_in_thread()
    clients = [Client(p) for p in paths]
    for i, c in enumerate(clients):
        c.negotiate()
        c.region_write(0, tdev.REG_SCRATCH, bytes([i]) * 4)
    for i, c in enumerate(clients):
        assert c.region_read(0, tdev.REG_SCRATCH, 4) == bytes([i]) * 4
        c.close()
    s.stop()
    assert not threads_before.is_alive()
    for d in devs:
        d.close()


def test_extra_reader_runs_in_loop(vfu) -> None:
    fired = []
    efd = os.eventfd(0, os.EFD_NONBLOCK)

    def cb():
        os.eventfd_read(efd)
        fired.append(vfu.server.in_loop_thread())

    vfu.server.add_reader(efd, cb)
    os.eventfd_write(efd, 1)
    for _ in range(200):
        if fired:
            break
        time.sleep(0.005)
    assert fired == [True]
    vfu.server.remove_reader(efd)
    os.close(efd)


def _conn_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vfu-conn-")]


def test_each_client_has_a_reader_thread_and_stop_joins_them(sockdir, tdev) -> None:
    """Our server reads each attached client in a thread of its own (vfio_user/server.py:
    one recvmsg and one send per serial round trip); stop() must leave none behind, even
    for a client that stays connected and silent."""
    s = Server()
    devs = [tdev.VfuTestDevice() for _ in range(2)]
    paths = [os.path.join(sockdir, f"r{i}.sock") for i in range(2)]
    for p, d in zip(paths, devs):
        s.add_device(p, d)
    s.start_in_thread()
    before = set(_conn_threads())
    clients = [Client(p) for p in paths]
    for c in clients:
        c.negotiate()
    mine = set(_conn_threads()) - before
    assert sorted(t.name for t in mine) == ["vfu-conn-r0.sock", "vfu-conn-r1.sock"]
    s.stop()
    assert not any(t.is_alive() for t in mine)
    assert all(d.events == ["attach", "detach"] for d in devs)
    for c in clients:
        c.close()
    for d in devs:
        d.close()


def test_posted_writes_before_a_hangup_land_before_the_next_client(vfu, tdev) -> None:
    """A client that posts writes and hangs up, then a new client at once (QEMU's order on
    a device reset of the connection): the new client is accepted, not refused as a second
    client, and sees the last posted value, as a server reading requests in order must."""
    for round_ in range(20):
        c = vfu.client()
        for i in range(50):
            c.region_write(0, tdev.REG_SCRATCH, (round_ * 100 + i).to_bytes(4, "little"), posted=True)
        c.close()
        c2 = vfu.client()
        assert int.from_bytes(c2.region_read(0, tdev.REG_SCRATCH, 4), "little") == round_ * 100 + 49
        c2.close()


def test_reader_removed_while_its_event_waits_for_the_model_lock_does_not_run(vfu) -> None:
    """Requests are served outside the loop thread, under MODEL_LOCK: a model that removes
    (and closes) a watched fd there must not have its callback run afterwards for an
    event the loop had already taken."""
    fired = []
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    vfu.server.add_reader(efd, lambda: fired.append(os.eventfd_read(efd)))
    with MODEL_LOCK:
        os.eventfd_write(efd, 1)
        time.sleep(0.2)  # the loop takes the event and waits for the lock
        vfu.server.remove_reader(efd)
    time.sleep(0.1)
    assert fired == []
    os.close(efd)


def test_a_server_bug_while_serving_drops_that_client_only(sockdir, tdev, monkeypatch) -> None:
    """An unexpected exception in a reader thread (a bug, not bad input: that gets an errno)
    closes that connection, so the client sees it, and the next client is served."""
    import vfio_user.server as server_mod

    s = Server()
    path = os.path.join(sockdir, "bug.sock")
    s.add_device(path, tdev.VfuTestDevice())
    s.start_in_thread()
    c = Client(path, timeout=5)
    c.negotiate()
    real = server_mod._Connection.receive

    def broken(self):
        monkeypatch.setattr(server_mod._Connection, "receive", real)
        raise RuntimeError("injected server bug")

    monkeypatch.setattr(server_mod._Connection, "receive", broken)
    # The reader may already be waiting in the real receive(): that one serves a request,
    # the next call is the broken one. Either way the client sees the connection go.
    with pytest.raises((ConnectionError, OSError)):
        for _ in range(2):
            c.region_read(0, tdev.REG_SCRATCH, 4)
    c.close()
    c2 = Client(path, timeout=5)
    c2.negotiate()
    c2.region_write(0, tdev.REG_SCRATCH, b"okay")
    assert c2.region_read(0, tdev.REG_SCRATCH, 4) == b"okay"
    c2.close()
    s.stop()
