"""The VMM's side of endpoint hot-plug, in-process: the endpoint's vfio-user client is the
device's presence. Real server, real clients (one per function), a real memfd as guest RAM.

When the endpoint's client goes away the VMM must do what QEMU does for a departing
passthrough device (iommufd.md section 1.6): detach it (its fault-capable HWPT goes),
destroy its vDEVICE, unbind it; when a client attaches again, bind it anew and plug it
into the vIOMMU at the same vSID.
"""

from __future__ import annotations


import pytest

from devmodel.machine import ENDPOINT_VSID, HOTPLUG_VSID, Machine
from vfio_user.client import Client
from vfio_user.server import Server

from .conftest import wait_until

RAM_MB = 4


@pytest.mark.parametrize("hotplug", [False, True], ids=["machine", "machine-hotplug"])
def test_endpoint_client_leaving_unplugs_and_returning_plugs(tmp_path, hotplug):
    m = Machine(ram_mb=RAM_MB, hotplug=hotplug)
    vsid = HOTPLUG_VSID if hotplug else ENDPOINT_VSID
    assert m.endpoint_vsid == vsid
    assert (m.endpoint.msi is not None, m.endpoint.msix is None) == (hotplug, hotplug)
    server = Server()
    paths = {name: str(tmp_path / f"{name}.sock") for name in ("viommu", "engine")}
    server.add_device(paths["viommu"], m.viommu)
    server.add_device(paths["engine"], m.endpoint)
    server.start_in_thread()
    ctx = m.host.ctx
    try:
        viommu = Client(paths["viommu"])
        viommu.negotiate()
        viommu.map_memory(0, RAM_MB << 20)
        engine = Client(paths["engine"])
        engine.negotiate()
        dev = m.dev_id
        vdev = m.viommu.vdevice_ids[vsid]
        engine.close()
        assert wait_until(lambda: m.dev_id is None)
        assert vsid not in m.viommu.endpoints and vsid not in m.viommu.vdevice_ids
        with pytest.raises(OSError):
            ctx.device(dev)  # unbound
        with pytest.raises(OSError):
            ctx.destroy(vdev)  # already destroyed
        assert m.counters()["vmm"] == {"plugs": 0, "unplugs": 1, "endpoint_present": False}
        assert m.viommu.counters.unplugs == 1

        engine = Client(paths["engine"])
        engine.negotiate()
        assert wait_until(lambda: m.dev_id is not None and vsid in m.viommu.endpoints)
        assert ctx.device(m.dev_id).sid == m.endpoint.sid
        # SMMUEN=0 in the guest vIOMMU: the plugged endpoint gets the GBPA configuration.
        assert m.viommu.endpoints[vsid].hwpt_id in (m.viommu.bypass_hwpt, m.viommu.abort_hwpt)
        assert m.counters()["vmm"] == {"plugs": 1, "unplugs": 1, "endpoint_present": True}
        engine.close()
        viommu.close()
    finally:
        server.stop()
        m.close()
