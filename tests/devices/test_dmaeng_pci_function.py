"""DMA engine PCI function: identity, capabilities, BAR0 registers, DMA through a real SMMUv3,
the three PRI outcomes through the PRI capability, Bus Master gating and resets.

Spec rules cited per test: reference smmuv3-pcie.md §8.1 (PCIe capability), §8.2 (MSI-X
sending rule), §8.3-§8.5 (ATS/PASID/PRI registers), §8.6 (PRG response codes); PCI 3.0
§6.2.2 (Bus Master Enable); PCIe §6.6.2 (FLR). Register semantics: the module docstring
of devmodel.devices.dma_engine_pci.
"""

from __future__ import annotations

from devmodel.devices.dma_engine_pci import DmaEngineFunction
from devmodel.devices.dma_engine_records import (COMPLETION, CTRL_ENABLE, DESCRIPTOR, DescFlags, ENGINE_ID, MSIX_VECTOR_COMPLETION, MSIX_VECTOR_ERROR,
                                                 QCFG_PASID_EN, STATUS_ENABLED, STATUS_HALTED, STATUS_WAIT_PRG,
                                                 CompletionStatus, DmaOpcode, FaultCounter, Reg)
from devmodel.iommu import records as rec
from devmodel.iommu.builder import make_s1_stream, make_world
from devmodel.iommu.records import EventId, Opcode
from devmodel.pci import regs
from vfio_user.device import PciIrq, PciRegion

from .conftest import COMPL, DST, PASID, RING, SID, SRC, LocalContext

MSIX = PciIrq.MSIX


def test_identity_and_capabilities(rig):
    """§8.1: vendor 0x1af4 / device 0x10f2 / class 0x088000, PCIe v2 endpoint with FLR and EE prefix,
    MSI-X with 2 vectors in BAR2, ATS at 0x100, PASID width 20, PRI with Stopped=1 at reset."""
    assert rig.cfg(regs.PCI_VENDOR_ID, 2) == 0x1AF4 and rig.cfg(regs.PCI_DEVICE_ID, 2) == 0x10F2
    assert rig.cfg(regs.PCI_CLASS_PROG, 3) == 0x088000
    assert rig.cfg(regs.PCI_STATUS, 2) & regs.Status.CAP_LIST
    exp = rig.dev.express.offset
    assert rig.cfg(exp + regs.PCI_EXP_DEVCAP, 4) & regs.PCI_EXP_DEVCAP_FLR
    assert rig.cfg(exp + regs.PCI_EXP_DEVCAP2, 4) & regs.PCI_EXP_DEVCAP2_EE_PREFIX
    msix = rig.dev.msix.offset
    assert rig.cfg(msix + regs.PCI_MSIX_FLAGS, 2) & 0x7FF == 1  # table size N-1
    assert rig.cfg(msix + regs.PCI_MSIX_TABLE, 4) & 7 == 2 and rig.cfg(msix + regs.PCI_MSIX_PBA, 4) & 7 == 2
    assert rig.dev.ats.offset == regs.PCI_EXT_CAP_START
    assert rig.cfg(regs.PCI_EXT_CAP_START, 4) & 0xFFFF == regs.ExtCapId.ATS
    pasid_cap = rig.cfg(rig.dev.pasid.offset + regs.PCI_PASID_CAP, 2)
    assert (pasid_cap & regs.PCI_PASID_CAP_WIDTH_MASK) >> regs.PCI_PASID_CAP_WIDTH_SHIFT == 20
    assert rig.pri_status() & regs.PCI_PRI_STATUS_STOPPED
    assert rig.cfg(rig.dev.pri.offset + regs.PCI_PRI_MAX_REQ, 4) == 32
    assert rig.dev.irq_info(PciIrq.INTX).count == 0 and rig.dev.irq_info(MSIX).count == 2


def test_bar0_registers(rig):
    """Module docstring register map: ID, QUEUE_BASE as one 8-byte access or two halves, QUEUE_CFG masking,
    ring registers locked while enabled, RO and unimplemented offsets ignore writes."""
    rig.set_cfg(regs.PCI_COMMAND, 2, regs.Command.MEMORY | regs.Command.MASTER)
    assert rig.reg(Reg.ID) == ENGINE_ID
    rig.set_reg(Reg.QUEUE_BASE, 0x1234_5678_9ABC_DE00, 8)
    assert rig.reg(Reg.QUEUE_BASE, 8) == 0x1234_5678_9ABC_DE00
    rig.set_reg(Reg.QUEUE_BASE + 4, 0)
    rig.set_reg(Reg.QUEUE_BASE, RING)
    assert rig.reg(Reg.QUEUE_BASE) == RING and rig.reg(Reg.QUEUE_BASE + 4) == 0
    rig.set_reg(Reg.QUEUE_CFG, 0xFFFF_FFFF)
    assert rig.reg(Reg.QUEUE_CFG) == 0x8FFF_FF1F  # LOG2SIZE[4:0] PASID[27:8] PASID_EN[31]
    rig.set_reg(Reg.QUEUE_CFG, 4 | QCFG_PASID_EN | PASID << 8)
    rig.set_reg(Reg.CTRL, CTRL_ENABLE)
    assert rig.reg(Reg.CTRL) == CTRL_ENABLE and rig.reg(Reg.STATUS) == STATUS_ENABLED
    rig.set_reg(Reg.QUEUE_BASE, 0x5000)  # ignored while enabled
    assert rig.reg(Reg.QUEUE_BASE) == RING and rig.dev.engine.queue_base == RING
    rig.set_reg(Reg.QUEUE_HEAD, 7)  # RO
    rig.set_reg(Reg.STATUS, 0xFF)
    assert rig.reg(Reg.QUEUE_HEAD) == 0 and rig.reg(Reg.STATUS) == STATUS_ENABLED
    rig.set_reg(0x800, 0xDEAD)  # unimplemented: RAZ/WI
    assert rig.reg(0x800) == 0
    assert rig.reg(Reg.FAULTS + 4 * FaultCounter.TRANSLATION) == 0


def test_copy_succeeds_with_completion_and_msix(rig):
    """A COPY rings the doorbell without DMA in the handler (work runs via call_soon), copies the bytes,
    writes a SUCCESS completion and sends MSI-X vector 0 (§8.2 sending rule: enabled, BME set)."""
    rig.bring_up()
    for i in range(2):
        rig.mem.write(rig.map(SRC + i * 0x1000), bytes([0x41 + i]) * 0x1000)
        rig.map(DST + i * 0x1000)
    rig.submit(DmaOpcode.COPY, SRC + 0x800, DST + 0x10, 0x1000, run=False)
    assert rig.ctx.pending and rig.completion().Status == CompletionStatus.NONE  # nothing ran in the handler
    rig.ctx.run_pending()
    c = rig.completion()
    assert c.Status == CompletionStatus.SUCCESS and c.BytesCompleted == 0x1000
    got = rig.mem.read(rig.pa_of(DST + 0x10), 0xFF0) + rig.mem.read(rig.pa_of(DST + 0x1000), 0x10)
    assert got == b"A" * 0x800 + b"B" * 0x800
    assert rig.ctx.fired(MSIX, MSIX_VECTOR_COMPLETION) == 1 and rig.ctx.fired(MSIX, MSIX_VECTOR_ERROR) == 0
    assert rig.reg(Reg.QUEUE_HEAD) == 1 and rig.reg(Reg.QUEUE_TAIL) == 1


def test_translation_fault_without_pri_completes_page_fault(rig):
    """Untranslated DMA (ATS off) to an unmapped IOVA: the SMMU records F_TRANSLATION (§3) with the
    descriptor's PASID as SSID, the descriptor completes PAGE_FAULT with the address, FAULTS counts it."""
    rig.bring_up()
    rig.map(SRC)
    rig.submit(DmaOpcode.FILL, 0x1122334455667788, DST + 0x40, 64)
    c = rig.completion()
    assert c.Status == CompletionStatus.PAGE_FAULT and c.FaultAddr == DST + 0x40 and c.FaultRnW == 0
    assert c.FaultEvent == EventId.F_TRANSLATION
    (ev,) = rig.sw.events()
    assert ev.EventID == EventId.F_TRANSLATION and ev.StreamID == SID and ev.SSV == 1
    assert ev.SubstreamID == PASID and ev.InputAddr == DST + 0x40
    assert rig.fault_counter(FaultCounter.TRANSLATION) == 1
    assert rig.ctx.fired(MSIX, MSIX_VECTOR_COMPLETION) == 1


def test_pri_success_retries_and_copies(rig):
    """§8.6 Success: the page request goes out within the PRI Allocation, Stopped reads 0 while enabled,
    STATUS.WAIT_PRG is set until the response; after it the engine retries and the bytes are right."""
    rig.bring_up(ats=True, pri=True)
    rig.mem.write(rig.map(SRC), b"page request!!" * 8)
    rig.submit(DmaOpcode.COPY, SRC, DST, 112)
    (req,) = rig.sw.page_requests()
    assert req.StreamID == SID and req.SubstreamID == PASID and req.PageAddr == DST and req.W == 1 and req.L == 1
    assert rig.reg(Reg.STATUS) & STATUS_WAIT_PRG and rig.dev.pri.outstanding == 1
    assert rig.completion().Status == CompletionStatus.NONE
    rig.map(DST)
    rig.respond(req, rec.PriResp.SUCCESS)
    assert rig.completion().Status == CompletionStatus.SUCCESS
    assert rig.mem.read(rig.pa_of(DST), 112) == b"page request!!" * 8
    assert not rig.reg(Reg.STATUS) & STATUS_WAIT_PRG and rig.dev.pri.outstanding == 0
    assert rig.fault_counter(FaultCounter.PRG_SUCCESS) == 1 and rig.fault_counter(FaultCounter.PAGE_REQUEST) == 1


def test_pri_invalid_request_completes_page_fault_with_address(rig):
    """§8.6 Invalid Request: the descriptor reports PAGE_FAULT and the faulting address; PRI stays enabled."""
    rig.bring_up(ats=True, pri=True)
    rig.map(SRC)
    rig.submit(DmaOpcode.COPY, SRC, DST + 0x200, 32)
    (req,) = rig.sw.page_requests()
    rig.respond(req, rec.PriResp.INVALID_REQUEST)
    c = rig.completion()
    assert c.Status == CompletionStatus.PAGE_FAULT and c.FaultAddr == DST + 0x200
    assert rig.dev.pri.enabled and not rig.pri_status() & regs.PCI_PRI_STATUS_RF
    assert not rig.reg(Reg.STATUS) & STATUS_HALTED


def test_pri_response_failure_sets_rf_and_halts(rig):
    """§8.6 Response Failure: PRI Status.RF set, engine halted with the error vector, later responses
    ignored; §8.5 Enable 0->1 clears RF and CTRL 0->1 restarts the engine."""
    rig.bring_up(ats=True, pri=True)
    rig.map(SRC)
    rig.submit(DmaOpcode.COPY, SRC, DST, 32)
    (req,) = rig.sw.page_requests()
    rig.respond(req, rec.PriResp.RESPONSE_FAILURE)
    assert rig.completion().Status == CompletionStatus.PRI_RESPONSE_FAILURE
    assert rig.pri_status() & regs.PCI_PRI_STATUS_RF
    assert rig.reg(Reg.STATUS) & STATUS_HALTED and rig.ctx.fired(MSIX, MSIX_VECTOR_ERROR) >= 1
    rig.respond(req, rec.PriResp.SUCCESS)  # ignored while RF: no UPRGI
    assert not rig.pri_status() & regs.PCI_PRI_STATUS_UPRGI
    o = rig.dev.pri.offset
    rig.set_cfg(o + regs.PCI_PRI_STATUS, 2, regs.PCI_PRI_STATUS_RF)  # RW1C alone does not re-arm PRI
    assert rig.dev.engine.pri.response_failure
    rig.set_cfg(o + regs.PCI_PRI_CTRL, 2, 0)
    rig.set_cfg(o + regs.PCI_PRI_CTRL, 2, regs.PCI_PRI_CTRL_ENABLE)
    assert not rig.pri_status() & regs.PCI_PRI_STATUS_RF and not rig.dev.engine.pri.response_failure
    rig.set_reg(Reg.CTRL, 0)
    rig.set_reg(Reg.CTRL, CTRL_ENABLE)
    assert rig.reg(Reg.STATUS) == STATUS_ENABLED
    rig.map(DST)
    rig.submit(DmaOpcode.COPY, SRC, DST, 32)
    assert rig.completion().Status == CompletionStatus.SUCCESS


def test_unexpected_prg_index_sets_uprgi(rig):
    """§8.6: a PRG Response naming no outstanding PRG is discarded and sets PRI Status.UPRGI (RW1C)."""
    rig.bring_up(ats=True, pri=True)
    rig.sw.cmd(Opcode.CMD_PRI_RESP, StreamID=SID, PRGIndex=99, Resp=rec.PriResp.SUCCESS)
    rig.ctx.run_pending()
    assert rig.pri_status() & regs.PCI_PRI_STATUS_UPRGI
    rig.set_cfg(rig.dev.pri.offset + regs.PCI_PRI_STATUS, 2, regs.PCI_PRI_STATUS_UPRGI)
    assert not rig.pri_status() & regs.PCI_PRI_STATUS_UPRGI


def test_pri_disable_then_reset_discards_outstanding_group(rig):
    """§8.5: Enable 1->0 with a request outstanding leaves Stopped=0; Reset discards it (Stopped=1) and the
    waiting descriptor, unable to page-request any more, completes PAGE_FAULT."""
    rig.bring_up(ats=True, pri=True)
    rig.map(SRC)
    rig.submit(DmaOpcode.COPY, SRC, DST, 32)
    assert len(rig.sw.page_requests()) == 1
    o = rig.dev.pri.offset
    rig.set_cfg(o + regs.PCI_PRI_CTRL, 2, 0)
    assert not rig.pri_status() & regs.PCI_PRI_STATUS_STOPPED
    rig.set_cfg(o + regs.PCI_PRI_CTRL, 2, regs.PCI_PRI_CTRL_RESET)
    assert rig.pri_status() & regs.PCI_PRI_STATUS_STOPPED
    rig.ctx.run_pending()
    assert rig.completion().Status == CompletionStatus.PAGE_FAULT and not rig.dev.engine.waiting_prg


def test_bus_master_off_refuses_dma(rig):
    """PCI 3.0 §6.2.2: with Bus Master Enable clear the engine issues no memory request: the descriptor
    fetch fails before the SMMU (no event, no page request), the engine halts, and the error MSI-X stays
    pending in the PBA (§8.2) until BME is set again."""
    rig.bring_up()
    rig.mem.write(rig.map(SRC), b"x" * 64)
    dst_pa = rig.map(DST)
    rig.set_cfg(regs.PCI_COMMAND, 2, regs.Command.MEMORY)  # BME off: engine stopped and reset
    assert rig.reg(Reg.CTRL) == 0 and rig.reg(Reg.QUEUE_BASE) == 0
    rig.set_reg(Reg.QUEUE_BASE, RING, 8)
    rig.set_reg(Reg.QUEUE_CFG, 4 | QCFG_PASID_EN | PASID << 8)
    rig.set_reg(Reg.CTRL, CTRL_ENABLE)
    rig.submit(DmaOpcode.COPY, SRC, DST, 64)
    assert rig.reg(Reg.STATUS) & STATUS_HALTED and rig.reg(Reg.QUEUE_HEAD) == 0
    assert rig.fault_counter(FaultCounter.BUS_ERROR) == 1
    assert rig.mem.read(dst_pa, 64) == bytes(64) and rig.sw.events() == [] and rig.sw.page_requests() == []
    assert rig.ctx.fired(MSIX, MSIX_VECTOR_ERROR) == 0
    pba = int.from_bytes(rig.dev.region_read(PciRegion.BAR2, 0x800, 8), "little")
    assert pba & (1 << MSIX_VECTOR_ERROR)
    rig.set_cfg(regs.PCI_COMMAND, 2, regs.Command.MEMORY | regs.Command.MASTER)
    assert rig.ctx.fired(MSIX, MSIX_VECTOR_ERROR) == 1


def test_flr_resets_engine_and_drops_scheduled_work(rig):
    """PCIe §6.6.2 FLR (DevCtl.Initiate FLR): config back to defaults, engine registers and counters to
    reset values, and a descriptor rung before the FLR never runs."""
    rig.bring_up()
    rig.map(SRC)
    rig.submit(DmaOpcode.COPY, SRC, DST, 16)  # faults: counter becomes 1
    assert rig.fault_counter(FaultCounter.TRANSLATION) == 1
    rig.map(DST)
    rig.submit(DmaOpcode.COPY, SRC, DST, 16, run=False)
    exp = rig.dev.express.offset
    rig.set_cfg(exp + regs.PCI_EXP_DEVCTL, 2, rig.cfg(exp + regs.PCI_EXP_DEVCTL, 2) | regs.PCI_EXP_DEVCTL_BCR_FLR)
    assert rig.cfg(regs.PCI_COMMAND, 2) == 0
    assert not rig.cfg(rig.dev.msix.offset + regs.PCI_MSIX_FLAGS, 2) & regs.PCI_MSIX_FLAGS_ENABLE
    rig.set_cfg(regs.PCI_COMMAND, 2, regs.Command.MEMORY)
    assert rig.reg(Reg.CTRL) == 0 and rig.reg(Reg.STATUS) == 0 and rig.reg(Reg.QUEUE_BASE, 8) == 0
    assert rig.reg(Reg.QUEUE_CFG) == 0 and rig.reg(Reg.QUEUE_HEAD) == 0 and rig.reg(Reg.QUEUE_TAIL) == 0
    assert rig.fault_counter(FaultCounter.TRANSLATION) == 0
    rig.ctx.run_pending()
    assert rig.completion().Status == CompletionStatus.NONE  # the pre-FLR descriptor did not run


def test_device_reset_region_and_doorbell_without_client():
    """DEVICE_RESET is a function reset; work rung before a client attaches runs once one attaches."""
    mem, _alloc, smmu, sw = make_world()
    sw.enable()
    s = make_s1_stream(sw, SID, ssids=(PASID,), s1cdmax=3)
    pt = s.tables[PASID]
    pt.map(RING, 0x900000)
    pt.map(COMPL, 0x901000)
    dev = DmaEngineFunction(smmu, SID, mem)
    command = regs.Command.MEMORY | regs.Command.MASTER
    dev.region_write(PciRegion.CONFIG, regs.PCI_COMMAND, command.to_bytes(2, "little"))
    dev.region_write(PciRegion.BAR0, Reg.QUEUE_BASE, RING.to_bytes(8, "little"))
    dev.region_write(PciRegion.BAR0, Reg.QUEUE_CFG, (4 | QCFG_PASID_EN | PASID << 8).to_bytes(4, "little"))
    dev.region_write(PciRegion.BAR0, Reg.CTRL, CTRL_ENABLE.to_bytes(4, "little"))
    mem.write(0x900000, DESCRIPTOR.encode(Opcode=DmaOpcode.NOP, Flags=int(DescFlags.RCR), PASID_EN=1, PASID=PASID,
                                          CompletionAddr=COMPL))
    dev.region_write(PciRegion.BAR0, Reg.QUEUE_TAIL, (1).to_bytes(4, "little"))
    assert COMPLETION.decode(mem.read(0x901000, 32)).Status == CompletionStatus.NONE
    ctx = LocalContext(mem)
    dev.attach(ctx)
    ctx.run_pending()
    assert COMPLETION.decode(mem.read(0x901000, 32)).Status == CompletionStatus.SUCCESS
    dev.reset()
    assert int.from_bytes(dev.region_read(PciRegion.CONFIG, regs.PCI_COMMAND, 2), "little") == 0
    assert dev.engine.head == 0 and not dev.engine.enabled
    ctx.close()
    dev.close()
