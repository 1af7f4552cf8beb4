"""The NIC behind the real vfio-user server and client: the backend fd is watched by the server's
event loop (DeviceContext.add_reader, callback under MODEL_LOCK, no DMA there) and the frames are
placed by the device worker; RX raises MSI-X vector 0 through the client's eventfd. With PRI, the
worker stops watching the fd while a frame waits for its PRG (backpressure) and watches it again
after the response (the NIC model docstring (devmodel/devices/nic.py) RX semantics; reference smmuv3-pcie.md §8.6).
"""

from __future__ import annotations

import os
import select
import tempfile
import time

import pytest

from devmodel.devices.nic_records import DescStatus, NicCounter, StatusBit
from devmodel.iommu import records as rec
from vfio_user.client import Client
from vfio_user.device import MODEL_LOCK, PciIrq
from vfio_user.protocol import IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD
from vfio_user.server import Server

from .test_nic_function import RX_BUF, NicRig, frame

NIC_MSIX_VECTORS = 3


class ServedRig(NicRig):
    """NicRig whose register accesses go through a real client to the served function."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.regions = client  # the client has region_read/region_write like the model


@pytest.fixture
def served():
    local = NicRig()
    local.dev.detach()  # served instead of the loopback context
    tmp = tempfile.mkdtemp(prefix="nic-served-")
    path = os.path.join(tmp, "nic.sock")
    server = Server()
    server.add_device(path, local.dev)
    server.start_in_thread()
    client = Client(path, timeout=5.0)
    efds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(NIC_MSIX_VECTORS)]
    try:
        client.negotiate()
        client.set_irqs(PciIrq.MSIX, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, NIC_MSIX_VECTORS, efds)
        rig = ServedRig(client)
        rig.__dict__.update({k: v for k, v in local.__dict__.items() if k not in ("ctx",)})
        rig.efds = efds
        yield rig
    finally:
        client.close()
        server.stop()
        local.close()
        for fd in efds:
            os.close(fd)
        os.rmdir(tmp)


def wait_until(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with MODEL_LOCK:
            if cond():
                return True
        time.sleep(0.005)
    return False


def test_served_rx_through_the_event_loop(served):
    """Frames written to the wire reach guest buffers via the server loop's reader and the worker;
    MSI-X vector 0 arrives on the client's eventfd."""
    rig = served
    rig.bring_up()
    rig.post_rx(3)
    frames = [frame(1, 64), frame(2, 1514), frame(3, 200)]
    for f in frames:
        assert rig.wire.inject(f)
    assert wait_until(lambda: rig.dev.nic.count(NicCounter.RX_PACKETS) == 3)
    assert select.select([rig.efds[0]], [], [], 5)[0] and os.eventfd_read(rig.efds[0]) >= 1
    for slot, f in enumerate(frames):
        assert rig.rx_desc(slot).Status == DescStatus.DONE and rig.rx_bytes(slot, len(f)) == f


def test_served_pri_backpressure(served):
    """§8.6 Success under the real loop: while the PRG is outstanding the fd is not watched and the second
    frame stays in the wire; after the response both frames are delivered."""
    rig = served
    rig.bring_up(ats=True, pri=True)
    rig.post_rx(1, mapped=False)
    rig.post_rx(1)
    assert rig.wire.inject(frame(1))
    assert wait_until(lambda: rig.dev.nic.status() & StatusBit.RX_WAIT_PRG)
    assert rig.wire.inject(frame(2))
    time.sleep(0.05)
    with MODEL_LOCK:
        assert rig.dev.nic.count(NicCounter.RX_PACKETS) == 0 and len(rig.dev.nic.fifo) == 0
        (req,) = rig.sw.page_requests()
        rig.map(RX_BUF)
        rig.sw.cmd(rec.Opcode.CMD_PRI_RESP, StreamID=req.StreamID, SSV=req.SSV, SubstreamID=req.SubstreamID,
                   PRGIndex=req.PRGIndex, Resp=rec.PriResp.SUCCESS)
    assert wait_until(lambda: rig.dev.nic.count(NicCounter.RX_PACKETS) == 2)
    assert rig.rx_bytes(0, 64) == frame(1) and rig.rx_bytes(1, 64) == frame(2)
