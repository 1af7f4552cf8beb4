"""ATS, PASID and PRI extended capabilities: register layout and control/status rules.

Each test cites the rule of reference smmuv3-pcie.md §8.3 (ATS), §8.4 (PASID) or §8.5
(PRI; PCIe Base Spec §10.5.2) it checks.
"""

from __future__ import annotations

import pytest

from devmodel.pci import AtsCapability, PasidCapability, PciExpressCapability, PciFunction, PriCapability, regs
from vfio_user.device import PciRegion

CFG = PciRegion.CONFIG


def rd(dev, offset: int, size: int) -> int:
    return int.from_bytes(dev.region_read(CFG, offset, size), "little")


def wr(dev, offset: int, size: int, value: int) -> None:
    dev.region_write(CFG, offset, value.to_bytes(size, "little"))


class Endpoint(PciFunction):
    vendor_id = 0x1AF4
    device_id = 0x10F3

    def realize(self) -> None:
        self.add_capability(PciExpressCapability())
        self.ats = self.add_ext_capability(AtsCapability(invalidate_queue_depth=32))
        self.pasid = self.add_ext_capability(PasidCapability(max_width=16, exec_supported=True))
        self.pri = self.add_ext_capability(PriCapability(capacity=64, pasid_required=True))


@pytest.fixture
def dev():
    return Endpoint()


# --- ATS ---------------------------------------------------------------------------------------
def test_ats_capability_register(dev):
    """§8.3: ATS Capability is RO: queue depth 0 encodes 32, Page Aligned Request[5]."""
    o = dev.ats.offset
    cap = rd(dev, o + regs.PCI_ATS_CAP, 2)
    assert cap & regs.PCI_ATS_CAP_QDEP_MASK == 0
    assert dev.ats.invalidate_queue_depth == 32
    assert cap & regs.PCI_ATS_CAP_PAGE_ALIGNED
    wr(dev, o + regs.PCI_ATS_CAP, 2, 0)
    assert rd(dev, o + regs.PCI_ATS_CAP, 2) == cap


def test_ats_enable_and_stu(dev):
    """§8.3: Linux writes Enable | (page_shift - 12); STU = 2^(STU+12) bytes; other bits RO."""
    o = dev.ats.offset
    assert not dev.ats.enabled
    wr(dev, o + regs.PCI_ATS_CTRL, 2, regs.PCI_ATS_CTRL_ENABLE | (16 - 12) | 0x7F00)
    assert rd(dev, o + regs.PCI_ATS_CTRL, 2) == regs.PCI_ATS_CTRL_ENABLE | 4
    assert dev.ats.enabled and dev.ats.stu == 4
    assert dev.ats.smallest_translation_unit == 64 * 1024


def test_ats_listener_sees_disable(dev):
    """Disabling ATS must reach the endpoint (it owns the ATC to flush)."""
    seen = []
    dev.ats.add_listener(lambda cap: seen.append(cap.enabled))
    o = dev.ats.offset
    wr(dev, o + regs.PCI_ATS_CTRL, 2, regs.PCI_ATS_CTRL_ENABLE)
    wr(dev, o + regs.PCI_ATS_CTRL, 2, regs.PCI_ATS_CTRL_ENABLE)  # no change: no call
    wr(dev, o + regs.PCI_ATS_CTRL, 2, 0)
    assert seen == [True, False]


# --- PASID -------------------------------------------------------------------------------------
def test_pasid_capability_register(dev):
    """§8.4: Max PASID Width[12:8], Execute Permission Supported[1], Privileged[2] RO."""
    cap = rd(dev, dev.pasid.offset + regs.PCI_PASID_CAP, 2)
    assert (cap & regs.PCI_PASID_CAP_WIDTH_MASK) >> regs.PCI_PASID_CAP_WIDTH_SHIFT == 16
    assert cap & regs.PCI_PASID_CAP_EXEC and not cap & regs.PCI_PASID_CAP_PRIV
    assert dev.pasid.max_width == 16 and dev.pasid.max_pasid == 0xFFFF


def test_pasid_control_only_advertised_features_enable(dev):
    """§8.4: enable bits for unsupported features stay 0 (Linux enables only advertised ones)."""
    o = dev.pasid.offset
    wr(dev, o + regs.PCI_PASID_CTRL, 2, 0xFFFF)
    assert rd(dev, o + regs.PCI_PASID_CTRL, 2) == regs.PCI_PASID_CTRL_ENABLE | regs.PCI_PASID_CTRL_EXEC
    assert dev.pasid.enabled and dev.pasid.exec_permission and not dev.pasid.privileged_mode
    assert dev.pasid.accepts(0xFFFF) and not dev.pasid.accepts(0x10000)
    wr(dev, o + regs.PCI_PASID_CTRL, 2, 0)
    assert not dev.pasid.accepts(1)


def test_pasid_width_bounded_by_tlp_prefix():
    with pytest.raises(ValueError):
        PasidCapability(max_width=21)


# --- PRI ---------------------------------------------------------------------------------------
def pri_ctrl(dev, value: int) -> None:
    wr(dev, dev.pri.offset + regs.PCI_PRI_CTRL, 2, value)


def pri_status(dev) -> int:
    return rd(dev, dev.pri.offset + regs.PCI_PRI_STATUS, 2)


def test_pri_reset_values(dev):
    """§8.5: Stopped resets to 1; PRG Response PASID Required RO; Capacity RO."""
    o = dev.pri.offset
    assert pri_status(dev) == regs.PCI_PRI_STATUS_STOPPED | regs.PCI_PRI_STATUS_PASID
    assert rd(dev, o + regs.PCI_PRI_MAX_REQ, 4) == 64
    wr(dev, o + regs.PCI_PRI_MAX_REQ, 4, 1)
    wr(dev, o + regs.PCI_PRI_STATUS, 2, 0xFFFF)
    assert rd(dev, o + regs.PCI_PRI_MAX_REQ, 4) == 64
    assert pri_status(dev) == regs.PCI_PRI_STATUS_STOPPED | regs.PCI_PRI_STATUS_PASID
    assert dev.pri.stopped and dev.pri.pasid_required and dev.pri.capacity == 64


def test_pri_allocation_is_read_write(dev):
    """§8.5: Outstanding Page Request Allocation is fully writable (QEMU mask too)."""
    wr(dev, dev.pri.offset + regs.PCI_PRI_ALLOC_REQ, 4, 0xFFFFFFFF)
    assert dev.pri.allocation == 0xFFFFFFFF
    wr(dev, dev.pri.offset + regs.PCI_PRI_ALLOC_REQ, 4, 16)
    assert dev.pri.allocation == 16


def test_pri_linux_enable_sequence_and_credits(dev):
    """§8.5 Linux sequence + Credits: with Enable=0, Stopped=1, write Allocation, set
    Enable; a device must never exceed Allocation."""
    assert not dev.pri.enabled and dev.pri.stopped
    wr(dev, dev.pri.offset + regs.PCI_PRI_ALLOC_REQ, 4, 2)
    assert not dev.pri.may_issue()  # Enable clear: no new Page Requests
    pri_ctrl(dev, regs.PCI_PRI_CTRL_ENABLE)
    assert dev.pri.enabled
    assert not pri_status(dev) & regs.PCI_PRI_STATUS_STOPPED
    assert dev.pri.may_issue(2) and not dev.pri.may_issue(3)
    dev.pri.note_outstanding(2)
    assert not dev.pri.may_issue()
    dev.pri.note_outstanding(1)
    assert dev.pri.may_issue()


def test_pri_stopped_follows_outstanding_after_disable(dev):
    """§8.5 Stopped: with Enable=0 it is 0 while requests are outstanding, 1 once all
    completed."""
    wr(dev, dev.pri.offset + regs.PCI_PRI_ALLOC_REQ, 4, 8)
    pri_ctrl(dev, regs.PCI_PRI_CTRL_ENABLE)
    dev.pri.note_outstanding(3)
    pri_ctrl(dev, 0)
    assert not dev.pri.stopped
    dev.pri.note_outstanding(1)
    assert not dev.pri.stopped
    dev.pri.note_outstanding(0)
    assert dev.pri.stopped


def test_pri_reset_discards_state_when_disabled(dev):
    """§8.5 Reset: with Enable=0 it discards outstanding state and forces Stopped; reads 0."""
    discarded = []
    dev.pri.add_discard_listener(lambda cap: discarded.append(cap.outstanding))
    wr(dev, dev.pri.offset + regs.PCI_PRI_ALLOC_REQ, 4, 8)
    pri_ctrl(dev, regs.PCI_PRI_CTRL_ENABLE)
    dev.pri.note_outstanding(4)
    pri_ctrl(dev, regs.PCI_PRI_CTRL_RESET)  # clears Enable in the same write
    assert discarded == [0]
    assert dev.pri.outstanding == 0 and dev.pri.stopped
    assert rd(dev, dev.pri.offset + regs.PCI_PRI_CTRL, 2) == 0


def test_pri_reset_ignored_while_enabled(dev):
    """§8.5 Reset: ignored while Enable=1, and still reads 0."""
    discarded = []
    dev.pri.add_discard_listener(lambda cap: discarded.append(True))
    pri_ctrl(dev, regs.PCI_PRI_CTRL_ENABLE)
    dev.pri.note_outstanding(2)
    pri_ctrl(dev, regs.PCI_PRI_CTRL_ENABLE | regs.PCI_PRI_CTRL_RESET)
    assert discarded == [] and dev.pri.outstanding == 2 and dev.pri.enabled
    assert rd(dev, dev.pri.offset + regs.PCI_PRI_CTRL, 2) == regs.PCI_PRI_CTRL_ENABLE


def test_pri_response_failure_is_w1c_and_stops_until_reenabled(dev):
    """§8.5/§8.6: RF (RW1C) set on Response Failure; the function stops issuing until
    Enable goes 0→1, which also clears RF and UPRGI."""
    wr(dev, dev.pri.offset + regs.PCI_PRI_ALLOC_REQ, 4, 8)
    pri_ctrl(dev, regs.PCI_PRI_CTRL_ENABLE)
    dev.pri.set_response_failure()
    dev.pri.set_uprgi()
    assert pri_status(dev) & regs.PCI_PRI_STATUS_RF and dev.pri.uprgi
    assert not dev.pri.may_issue()
    wr(dev, dev.pri.offset + regs.PCI_PRI_STATUS, 2, regs.PCI_PRI_STATUS_RF)  # W1C
    assert not dev.pri.response_failure and dev.pri.uprgi
    assert not dev.pri.may_issue()  # clearing RF alone does not re-arm
    wr(dev, dev.pri.offset + regs.PCI_PRI_STATUS, 2, 0)  # writing 0 keeps UPRGI
    assert dev.pri.uprgi
    dev.pri.set_response_failure()
    pri_ctrl(dev, 0)
    pri_ctrl(dev, regs.PCI_PRI_CTRL_ENABLE)
    assert not dev.pri.response_failure and not dev.pri.uprgi
    assert dev.pri.may_issue()


def test_pri_uprgi_w1c(dev):
    """§8.5: UPRGI is RW1C and independent of RF."""
    dev.pri.set_uprgi()
    wr(dev, dev.pri.offset + regs.PCI_PRI_STATUS, 2, regs.PCI_PRI_STATUS_UPRGI)
    assert not dev.pri.uprgi
    dev.pri.set_unexpected_prg_index()  # the DMA engine's PriPort name
    assert pri_status(dev) & regs.PCI_PRI_STATUS_UPRGI


def test_pri_function_reset(dev):
    """PCIe §6.6.2: after a function reset PRI is disabled, Stopped=1, nothing outstanding."""
    wr(dev, dev.pri.offset + regs.PCI_PRI_ALLOC_REQ, 4, 8)
    pri_ctrl(dev, regs.PCI_PRI_CTRL_ENABLE)
    dev.pri.note_outstanding(3)
    dev.pri.set_response_failure()
    dev.reset()
    assert not dev.pri.enabled and dev.pri.stopped and dev.pri.outstanding == 0
    assert dev.pri.allocation == 0 and not dev.pri.failed and not dev.pri.response_failure


def test_pri_without_pasid_required():
    class NoPasid(PciFunction):
        def realize(self) -> None:
            self.pri = self.add_ext_capability(PriCapability(capacity=1, pasid_required=False))

    d = NoPasid()
    assert rd(d, d.pri.offset + regs.PCI_PRI_STATUS, 2) == regs.PCI_PRI_STATUS_STOPPED
