"""Hot-unplug and re-plug of the endpoint with a page request outstanding (issue 8).

The ``machine-hotplug`` layout puts the DMA engine behind a PCIe root port (01:00.0, vSID
0x100, MSI: QEMU 11.1 aborts when it unplugs a vfio-user function with MSI-X). The test
drives QEMU through QMP via the control socket (``qemu.unplug`` / ``qemu.plug``), as a user
would with ``devmodel qemu unplug dma_engine``.

What unplug must do (iommufd.md section 1.6: detaching a device from a fault-capable HWPT
answers its outstanding groups INVALID; the VMM destroys the vDEVICE and unbinds): the
kernel auto-responds, the response reaches the departing endpoint, nothing stays
outstanding at any layer, and the guest's late answer to the dead request is refused and
counted, not forwarded. Re-plug: bound anew at the same vSID, and PRI works again.
"""

from __future__ import annotations


import pytest

from devmodel.machine import HOTPLUG_VSID
from devmodel.session import machine_session
from devmodel.trace import TRACER
from guest.harness import parse_records as parse

pytestmark = pytest.mark.qemu

VSID = HOTPLUG_VSID


@pytest.fixture
def rig(tmp_path):
    TRACER.clear()
    with machine_session(directory=str(tmp_path / "s"), device="machine-hotplug") as s:
        def dm(cmd: str, rc: int = 0, timeout: float = 60) -> list[dict]:
            code, out = s.guest.run(f"dm {cmd}", timeout=timeout)
            assert code == rc, f"dm {cmd}: rc {code}\n{out}"
            return parse(out)

        def one(cmd: str, kind: str) -> dict:
            recs = [r for r in dm(cmd) if r["_"] == kind]
            assert len(recs) == 1, recs
            return recs[0]
        s.dm, s.one = dm, one
        with s.client() as ctl:
            s.ctl = ctl
            yield s


def _page_request_outstanding(rig) -> dict:
    rig.dm("ats on")
    rig.dm("pri enable")
    rig.dm("buf alloc src 4096 --fill 0x3c")
    rig.dm("buf alloc dst 4096")
    rig.dm("map 7 0x50000 --page-for-buffer src")
    rig.one("dma copy --pasid 7 --src 0x50000 --dst 0x60000 --len 4096 --no-wait", "dma")
    req = rig.one("prq --wait 1 --timeout 30", "prq")
    assert (req["sid"], req["ssid"], req["addr"]) == (VSID, 7, 0x60000)
    return req


def test_unplug_with_outstanding_page_request_auto_responds_and_replug_works(rig):
    m = rig.machine
    rig.dm("up")
    req = _page_request_outstanding(rig)
    stats = rig.ctl.call("stats")["machine"]
    assert (stats["endpoint"]["pri_outstanding"], stats["viommu"]["prgs_outstanding"]) == (1, 1)

    rig.ctl.call("qemu.unplug", device="dma_engine", timeout=60)
    # The guest lost the device; the agent noticed and keeps serving.
    (eng,) = [r for r in rig.dm("rescan --no-bus") if r.get("dev") == "engine"]
    assert (eng["state"], eng["result"], eng["removals"]) == ("gone", "absent", 1)
    # Everything released, at every layer.
    assert m.dev_id is None and VSID not in m.viommu.endpoints
    assert not m.endpoint.engine.waiting_prg
    stats = rig.ctl.call("stats")["machine"]
    assert (stats["endpoint"]["pri_outstanding"], stats["viommu"]["prgs_outstanding"]) == (0, 0)
    assert stats["viommu"]["groups_abandoned"] == 1
    assert stats["vmm"] == {"plugs": 0, "unplugs": 1, "endpoint_present": False}
    auto = [e for e in TRACER.events() if e.hop == "iommufd.response" and e.detail.get("auto")]
    assert len(auto) == 1
    hops = [e.hop for e in TRACER.events(auto[0].fault)]
    # The guest saw the request and never answered; the kernel's INVALID went down to the
    # SMMU. The guest's removal had already cleared Bus Master, which stops the engine and
    # drops its groups, so the endpoint takes it as an unexpected PRG index (PCIe UPRGI).
    assert "guest.priq" in hops and "guest.response" not in hops and "host.response" in hops
    # The guest answers the dead request late: refused by the vIOMMU and counted, not forwarded.
    rig.dm(f"resp {VSID} 7 {req['prgi']} success")
    assert rig.ctl.call("stats")["machine"]["viommu"]["pri_resp_unmatched"] == 1
    assert len([e for e in TRACER.events() if e.hop == "iommufd.response"]) == 1

    rig.ctl.call("qemu.plug", device="dma_engine", timeout=60)
    (eng,) = [r for r in rig.dm("rescan") if r.get("dev") == "engine"]
    assert (eng["state"], eng["sid"]) == ("present", VSID), eng
    # Bound anew (iommufd hands out the lowest free id, like the kernel's xa_alloc: the old
    # dev_id may come back) and plugged at the same vSID with a new vDEVICE.
    assert m.dev_id is not None and VSID in m.viommu.endpoints
    assert rig.ctl.call("stats")["machine"]["vmm"] == {"plugs": 1, "unplugs": 1, "endpoint_present": True}
    # PRI works again on the re-plugged device, answered by the guest.
    rig.dm("ats on")
    rig.dm("pri enable")
    rig.dm("pri auto success")
    rig.dm("map 7 0x50000 --page-for-buffer src")
    done = rig.one("dma copy --pasid 7 --src 0x50000 --dst 0x70000 --len 4096", "dma")
    assert done["status"] == "SUCCESS" and done["bytes"] == 4096
