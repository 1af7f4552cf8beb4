"""DMA engine endpoint through the SMMU: copy/fill, faults without PRI, and the three PRI outcomes
(reference §8.5 PRI credits/RF/UPRGI, §8.6 PRG response codes)."""

from devmodel.devices.dma_engine import DmaEngine, SimpleAts, SimplePri
from devmodel.devices.dma_engine_records import (COMPLETION, DESCRIPTOR, CompletionStatus, DescFlags, DmaOpcode,
                                                 FaultCounter, MSIX_VECTOR_COMPLETION, MSIX_VECTOR_ERROR)
from devmodel.iommu import records as rec
from devmodel.iommu.builder import make_s1_stream, make_world
from devmodel.iommu.records import EventId, Opcode

SID = 0x10
PASID = 5
RING, COMPL, SRC, DST = 0x100000, 0x200000, 0x300000, 0x400000  # IOVAs
PA = 0x800000  # data pages start here


class Rig:
    def __init__(self, *, pri=True, ats=True, allocation=32):
        self.mem, self.alloc, self.smmu, self.sw = make_world()
        self.sw.enable()
        self.stream = make_s1_stream(self.sw, SID, ssids=(PASID,), s1cdmax=3, eats=rec.EATS_FULL)
        self.pt = self.stream.tables[PASID]
        self.next_pa = PA
        self.irqs = []
        self.pri = SimplePri(allocation=allocation, _enabled=pri)
        self.eng = DmaEngine(self.smmu, SID, self.mem, pri=self.pri, ats=SimpleAts(ats),
                             interrupt=self.irqs.append)
        self.map(RING)
        self.map(COMPL)
        self.eng.configure(RING, 4, PASID)
        self.eng.set_enabled(True)
        self.slot = 0

    def map(self, va, write=True):
        pa = self.next_pa
        self.next_pa += 0x1000
        self.pt.map(va, pa, write=write)
        return pa

    def pa_of(self, va):
        r = self.smmu.translate(SID, PASID, va)
        assert r.ok
        return r.pa

    def submit(self, opcode, src, dst, length, flags=DescFlags.RCR | DescFlags.RCI):
        d = DESCRIPTOR.encode(Opcode=opcode, Flags=int(flags), PASID_EN=1, PASID=PASID,
                              CompletionAddr=COMPL + self.slot * 32, Src=src, Dst=dst, Length=length)
        self.mem.write(self.pa_of(RING + self.slot * 64), d)
        self.slot += 1
        self.eng.doorbell(self.slot)

    def completion(self, slot=None):
        slot = self.slot - 1 if slot is None else slot
        return COMPLETION.decode(self.mem.read(self.pa_of(COMPL + slot * 32), 32))

    def respond(self, req, resp):
        self.sw.cmd(Opcode.CMD_PRI_RESP, StreamID=SID, SSV=req.SSV, SubstreamID=req.SubstreamID,
                    PRGIndex=req.PRGIndex, Resp=resp)


def test_copy_and_fill_success():
    """COPY across pages and FILL with a pattern complete with SUCCESS and an MSI-X on the completion vector."""
    r = Rig()
    for i in range(2):
        pa = r.map(SRC + i * 0x1000)
        r.mem.write(pa, bytes([i + 1]) * 0x1000)
        r.map(DST + i * 0x1000)
    r.submit(DmaOpcode.COPY, SRC + 0x800, DST + 0x10, 0x1000)
    c = r.completion()
    assert c.Status == CompletionStatus.SUCCESS and c.BytesCompleted == 0x1000
    got = r.mem.read(r.pa_of(DST + 0x10), 0xFF0) + r.mem.read(r.pa_of(DST + 0x1000), 0x10)
    assert got == bytes([1]) * 0x800 + bytes([2]) * 0x800
    r.submit(DmaOpcode.FILL, 0x0807060504030201, DST + 3, 13)
    assert r.mem.read(r.pa_of(DST + 3), 13) == bytes([1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5])
    assert r.irqs == [MSIX_VECTOR_COMPLETION] * 2


def test_fault_without_pri_untranslated_records_event():
    """Without ATS/PRI, an untranslated access that faults aborts: the SMMU records F_TRANSLATION and the
    descriptor reports PAGE_FAULT with the faulting address."""
    r = Rig(ats=False, pri=False)
    r.map(SRC)
    r.submit(DmaOpcode.COPY, SRC, DST + 0x40, 64)
    c = r.completion()
    assert c.Status == CompletionStatus.PAGE_FAULT and c.FaultAddr == DST + 0x40 and c.FaultRnW == 0
    assert c.FaultEvent == EventId.F_TRANSLATION
    ev = r.sw.events()
    assert len(ev) == 1 and ev[0].SubstreamID == PASID and ev[0].SSV == 1 and ev[0].InputAddr == DST + 0x40
    assert r.eng.count(FaultCounter.TRANSLATION) == 1


def test_ats_fault_without_pri_fails_descriptor():
    """§8.6: with ATS but PRI disabled, a no-access completion cannot be resolved: PAGE_FAULT, no page request."""
    r = Rig(pri=False)
    r.map(SRC)
    r.submit(DmaOpcode.COPY, SRC, DST, 64)
    assert r.completion().Status == CompletionStatus.PAGE_FAULT
    assert r.sw.page_requests() == [] and r.sw.events() == []


def test_pri_success_retries_and_completes():
    """§8.6 Success: the device retries after the PRG response; the copy completes with the right bytes."""
    r = Rig()
    pa = r.map(SRC)
    r.mem.write(pa, b"hello world!" * 10)
    r.submit(DmaOpcode.COPY, SRC, DST, 120)
    (req,) = r.sw.page_requests()
    assert req.L == 1 and req.W == 1 and req.PageAddr == DST and req.SubstreamID == PASID
    assert r.eng.waiting_prg and r.eng.pri_outstanding == 1
    r.map(DST)  # "software" makes the page resident, then answers
    r.respond(req, rec.PriResp.SUCCESS)
    assert r.completion().Status == CompletionStatus.SUCCESS
    assert r.mem.read(r.pa_of(DST), 120) == b"hello world!" * 10
    assert r.eng.pri_outstanding == 0 and r.eng.count(FaultCounter.PRG_SUCCESS) == 1


def test_pri_invalid_request_completes_with_fault_address():
    """§8.6 Invalid Request: the descriptor completes with PAGE_FAULT and the faulting address; PRI stays enabled."""
    r = Rig()
    r.map(SRC)
    r.submit(DmaOpcode.COPY, SRC, DST + 0x100, 16)
    (req,) = r.sw.page_requests()
    r.respond(req, rec.PriResp.INVALID_REQUEST)
    c = r.completion()
    assert c.Status == CompletionStatus.PAGE_FAULT and c.FaultAddr == DST + 0x100
    assert r.pri.enabled and not r.pri.response_failure and not r.eng.halted


def test_pri_response_failure_sets_rf_and_stops():
    """§8.6 Response Failure: RF set, engine stops, later PRG responses ignored; Enable 0->1 clears RF (§8.5)."""
    r = Rig()
    r.map(SRC)
    r.submit(DmaOpcode.COPY, SRC, DST, 16)
    (req,) = r.sw.page_requests()
    r.respond(req, rec.PriResp.RESPONSE_FAILURE)
    assert r.completion().Status == CompletionStatus.PRI_RESPONSE_FAILURE
    assert r.pri.response_failure and r.eng.halted and MSIX_VECTOR_ERROR in r.irqs
    r.respond(req, rec.PriResp.SUCCESS)  # ignored while RF is set: no UPRGI either
    assert not r.pri.unexpected_prg_index
    r.pri.enabled = False
    r.pri.enabled = True
    assert not r.pri.response_failure


def test_pri_disabled_in_smmu_gives_auto_response_failure():
    """§2/§8.2: with PRIQEN=0 the SMMU answers Response Failure itself; the endpoint sets RF and halts."""
    r = Rig()
    from devmodel.iommu import registers as R
    r.smmu.write_reg(R.CR0, r.smmu.read_reg(R.CR0) & ~R.Cr0.PRIQEN)
    r.map(SRC)
    r.submit(DmaOpcode.COPY, SRC, DST, 16)
    assert r.pri.response_failure and r.eng.halted
    assert r.completion().Status == CompletionStatus.PRI_RESPONSE_FAILURE


def test_prg_groups_pages_and_respects_credits():
    """§8.5 credits: a PRG carries at most Allocation requests, Last=1 on the final one; credits return on response."""
    r = Rig(allocation=2)
    r.map(SRC)
    r.map(SRC + 0x1000)
    r.map(SRC + 0x2000)
    r.submit(DmaOpcode.COPY, SRC, DST, 0x3000)
    reqs = r.sw.page_requests()
    assert [(q.PageAddr, q.L) for q in reqs] == [(DST, 0), (DST + 0x1000, 1)]
    assert len({q.PRGIndex for q in reqs}) == 1 and r.eng.pri_outstanding == 2
    r.map(DST)
    r.map(DST + 0x1000)
    r.respond(reqs[-1], rec.PriResp.SUCCESS)
    (req3,) = r.sw.page_requests()
    assert req3.PageAddr == DST + 0x2000 and req3.L == 1 and req3.PRGIndex != reqs[0].PRGIndex
    r.map(DST + 0x2000)
    r.respond(req3, rec.PriResp.SUCCESS)
    assert r.completion().Status == CompletionStatus.SUCCESS


def test_unexpected_prg_index_sets_uprgi():
    """§8.6: a response whose index matches no outstanding PRG is discarded and sets UPRGI."""
    r = Rig()
    r.sw.cmd(Opcode.CMD_PRI_RESP, StreamID=SID, PRGIndex=77, Resp=rec.PriResp.SUCCESS)
    assert r.pri.unexpected_prg_index and r.eng.count(FaultCounter.UNEXPECTED_PRG) == 1


def test_atc_invalidate_drops_cached_translation():
    """§5.2 CMD_ATC_INV reaches the endpoint's ATC: a stale translation is used until invalidated."""
    r = Rig()
    pa_src = r.map(SRC)
    r.mem.write(pa_src, b"A" * 16)
    r.map(DST)
    r.submit(DmaOpcode.COPY, SRC, DST, 16)
    new = r.next_pa
    r.next_pa += 0x1000
    r.mem.write(new, b"B" * 16)
    r.pt.map(SRC, new)
    r.sw.cmd(Opcode.CMD_TLBI_NH_VA, ASID=PASID + 1 + SID * 64, Addr=SRC)
    r.submit(DmaOpcode.COPY, SRC, DST, 16)
    assert r.mem.read(r.pa_of(DST), 16) == b"A" * 16  # endpoint ATC still holds the old page
    r.sw.cmd(Opcode.CMD_ATC_INV, StreamID=SID, SSV=1, SubstreamID=PASID, Addr=SRC, Size=0)
    r.submit(DmaOpcode.COPY, SRC, DST, 16)
    assert r.mem.read(r.pa_of(DST), 16) == b"B" * 16


def test_bad_descriptors():
    """Unknown opcodes and PRIV without a PASID complete with an error status, not a crash."""
    r = Rig()
    r.submit(0x7F, 0, 0, 0)
    assert r.completion().Status == CompletionStatus.BAD_OPCODE
    r.submit(DmaOpcode.FILL, 0, DST, 8, flags=DescFlags.RCR | 0x80)
    assert r.completion().Status == CompletionStatus.BAD_DESCRIPTOR
