"""Command queue: every opcode, CERROR_* rules, restart, CMD_SYNC, caches needing CFGI/TLBI (reference §1.9, §5, §6.7)."""

import pytest

from devmodel.iommu import records as rec
from devmodel.iommu import registers as R
from devmodel.iommu.builder import cd_fields, make_s1_stream, make_world
from devmodel.iommu.irq import IrqSource
from devmodel.iommu.records import Opcode, PrgResponseCode

DATA = 0x800000


def world(**kw):
    mem, alloc, smmu, sw = make_world(**kw)
    sw.enable()
    return mem, alloc, smmu, sw


def cerror(smmu):
    """(CMDQ_ERR active, CONS.ERR, CONS.RD)."""
    active = bool((smmu.read_reg(R.GERROR) ^ smmu.read_reg(R.GERRORN)) & R.Gerror.CMDQ_ERR)
    cons = smmu.read_reg(R.CMDQ_CONS)
    return active, (cons >> 24) & 0x7F, cons & 0xFFFFF


LEGAL = [
    (Opcode.CMD_PREFETCH_CONFIG, dict(StreamID=1)),
    (Opcode.CMD_PREFETCH_ADDR, dict(StreamID=1, Addr=0x1000)),
    (Opcode.CMD_CFGI_STE, dict(StreamID=1, Leaf=1)),
    (Opcode.CMD_CFGI_STE_RANGE, dict(StreamID=0, Range=3)),
    (Opcode.CMD_CFGI_STE_RANGE, dict(Range=31)),
    (Opcode.CMD_CFGI_CD, dict(StreamID=1, SubstreamID=0, Leaf=1)),
    (Opcode.CMD_CFGI_CD_ALL, dict(StreamID=1)),
    (Opcode.CMD_TLBI_NH_ALL, dict()),
    (Opcode.CMD_TLBI_NH_ASID, dict(ASID=1)),
    (Opcode.CMD_TLBI_NH_VA, dict(ASID=1, Addr=0x1000)),
    (Opcode.CMD_TLBI_NH_VAA, dict(Addr=0x1000, TG=1, NUM=3)),
    (Opcode.CMD_TLBI_S12_VMALL, dict(VMID=1)),
    (Opcode.CMD_TLBI_S2_IPA, dict(VMID=1, IPA=0x1000)),
    (Opcode.CMD_TLBI_NSNH_ALL, dict()),
    (Opcode.CMD_ATC_INV, dict(StreamID=1, Size=52)),
    (Opcode.CMD_PRI_RESP, dict(StreamID=1, PRGIndex=1, Resp=2)),
    (Opcode.CMD_SYNC, dict(CS=0)),
]


@pytest.mark.parametrize("op,fields", LEGAL)
def test_legal_commands_are_consumed(op, fields):
    """§5.2: each implemented command is consumed without error (CONS advances)."""
    _, _, smmu, sw = world()
    sw.cmd(op, **fields)
    assert cerror(smmu) == (False, 0, 1)


ILLEGAL = [
    ("reserved opcode", bytes([0x09]) + bytes(15)),
    ("IMPDEF opcode", bytes([0x80]) + bytes(15)),
    ("SSec=1", rec.encode_command(Opcode.CMD_CFGI_STE, SSec=1)),
    ("CMD_SYNC CS=0b11", rec.encode_command(Opcode.CMD_SYNC, CS=3)),
    ("PRI_RESP Resp=0b11", rec.encode_command(Opcode.CMD_PRI_RESP, Resp=3)),
    ("RESUME without stall", rec.encode_command(Opcode.CMD_RESUME)),
    ("STALL_TERM without stall", rec.encode_command(Opcode.CMD_STALL_TERM)),
    ("EL2 TLBI without Hyp", rec.encode_command(Opcode.CMD_TLBI_EL2_ALL)),
    ("EL3 TLBI on NS queue", rec.encode_command(Opcode.CMD_TLBI_EL3_ALL)),
    ("VMS_PIDM without MPAM", rec.encode_command(Opcode.CMD_CFGI_VMS_PIDM)),
    ("DPTI without DPT", rec.encode_command(Opcode.CMD_DPTI_ALL)),
    ("reserved range TLBI", rec.encode_command(Opcode.CMD_TLBI_NH_VA, TG=1, NUM=0, SCALE=0, TTL=0)),
]


@pytest.mark.parametrize("name,data", ILLEGAL, ids=[n for n, _ in ILLEGAL])
def test_illegal_commands(name, data):
    """Pitfall 4: CERROR_ILL; RD stays on the failing command; later commands have no effect (§5.4)."""
    _, _, smmu, sw = world()
    sw.cmd(Opcode.CMD_SYNC)
    sw.raw_cmd(data, doorbell=False)
    sw.cmd(Opcode.CMD_SYNC, CS=1)
    assert cerror(smmu) == (True, R.CmdqError.CERROR_ILL, 1)
    assert smmu.irqs.counts[IrqSource.CMD_SYNC] == 0


def test_stage_specific_commands_without_that_stage():
    """Pitfall 4: stage-2 TLBIs are ILL without S2P; CFGI_CD/NH TLBIs are ILL without S1P."""
    _, _, smmu, sw = world(profile=R.SmmuProfile(s2p=False))
    sw.cmd(Opcode.CMD_TLBI_S2_IPA, IPA=0)
    assert cerror(smmu)[:2] == (True, R.CmdqError.CERROR_ILL)
    _, _, smmu, sw = world(profile=R.SmmuProfile(s1p=False))
    sw.cmd(Opcode.CMD_CFGI_CD, StreamID=1)
    assert cerror(smmu)[:2] == (True, R.CmdqError.CERROR_ILL)
    _, _, smmu, sw = world(profile=R.SmmuProfile(ats=False, pri=False))
    sw.cmd(Opcode.CMD_ATC_INV)
    assert cerror(smmu)[:2] == (True, R.CmdqError.CERROR_ILL)


def test_cons_err_written_before_gerror_and_restart_on_ack():
    """Pitfall 3 / §5.4: ERR is visible when the GERROR interrupt fires; acknowledging re-fetches at RD."""
    _, _, smmu, sw = world()
    seen = []
    smmu.connect_irq(IrqSource.GERROR, lambda: seen.append(smmu.read_reg(R.CMDQ_CONS)))
    smmu.write_reg(R.IRQ_CTRL, R.IrqCtrl.GERROR_IRQEN)
    sw.raw_cmd(bytes([0x0F]) + bytes(15))
    assert seen and (seen[0] >> 24) & 0x7F == R.CmdqError.CERROR_ILL
    # Linux's recovery: overwrite the failing command with a CMD_SYNC, then acknowledge
    sw.mem.write(sw.cmdq, rec.encode_command(Opcode.CMD_SYNC))
    smmu.write_reg(R.GERRORN, smmu.read_reg(R.GERROR))
    assert cerror(smmu) == (False, 0, 1)


def test_command_fetch_abort():
    """§1.9: an external abort fetching a command is CERROR_ABT."""
    _, _, smmu, sw = world()
    smmu.write_reg(R.CR0, smmu.read_reg(R.CR0) & ~R.Cr0.CMDQEN)
    smmu.write_reg(R.CMDQ_BASE, 0x40_0000_0000 | 4, 8)
    smmu.write_reg(R.CR0, smmu.read_reg(R.CR0) | R.Cr0.CMDQEN)
    smmu.write_reg(R.CMDQ_PROD, 1)
    assert cerror(smmu) == (True, R.CmdqError.CERROR_ABT, 0)


def test_cmd_sync_msi_wired_and_sev():
    """§5.3: CS=SIG_IRQ writes MSIData to MSIAddress (MSIPOLL idiom) and pulses the wired output; CS=SEV signals an event."""
    mem, _, smmu, sw = world()
    wired, sev = [], []
    smmu.connect_irq(IrqSource.CMD_SYNC, lambda: wired.append(1))
    smmu.on_sev = lambda: sev.append(1)
    slot = sw.cmdq + (sw.cmd_prod % 64) * 16
    sw.cmd(Opcode.CMD_SYNC, CS=1, MSIAddress=slot, MSIData=0, MSIAttr=0xF, MSH=3)
    assert mem.read(slot, 4) == bytes(4) and wired == [1]
    sw.cmd(Opcode.CMD_SYNC, CS=1, MSIAddress=0x900000, MSIData=0x1234)
    assert int.from_bytes(mem.read(0x900000, 4), "little") == 0x1234
    sw.cmd(Opcode.CMD_SYNC, CS=2)
    assert sev == [1]


def test_cmd_sync_msi_abort():
    """§1.6: an aborted CMD_SYNC MSI raises MSI_CMDQ_ABT_ERR."""
    _, _, smmu, sw = world()
    sw.cmd(Opcode.CMD_SYNC, CS=1, MSIAddress=0x40_0000_0000, MSIData=1)
    assert smmu.read_reg(R.GERROR) & R.Gerror.MSI_CMDQ_ABT_ERR


def test_atc_inv_delivery_and_sync_failure():
    """§5.2 ATC_INV: delivered per StreamID with span Addr..Addr+4K*2^Size; a failed invalidation makes the next SYNC CERROR_ATC_INV_SYNC."""
    _, _, smmu, sw = world()
    got = []
    smmu.register_endpoint(9, atc_invalidate=lambda ssid, a, n, g: got.append((ssid, a, n, g)) or len(got) < 2)
    sw.cmd(Opcode.CMD_ATC_INV, StreamID=9, SSV=1, SubstreamID=4, Global=1, Size=1, Addr=0x3000)
    sw.cmd(Opcode.CMD_SYNC)
    assert got == [(4, 0x2000, 0x2000, True)] and cerror(smmu)[0] is False
    sw.cmd(Opcode.CMD_ATC_INV, StreamID=9, Size=0, Addr=0x5000)
    sw.cmd(Opcode.CMD_SYNC, CS=1)
    assert cerror(smmu) == (True, R.CmdqError.CERROR_ATC_INV_SYNC, 3)
    assert got[1] == (None, 0x5000, 0x1000, False)


def test_pri_resp_delivery_and_encoding():
    """§4.2 / pitfall 5: Resp 0 = Response Failure (0xF), 1 = Invalid Request, 2 = Success."""
    _, _, smmu, sw = world()
    got = []
    smmu.register_endpoint(9, prg_response=lambda ssid, idx, code: got.append((ssid, idx, code)))
    sw.cmd(Opcode.CMD_PRI_RESP, StreamID=9, PRGIndex=5, Resp=0)
    sw.cmd(Opcode.CMD_PRI_RESP, StreamID=9, SSV=1, SubstreamID=3, PRGIndex=6, Resp=1)
    sw.cmd(Opcode.CMD_PRI_RESP, StreamID=9, PRGIndex=7, Resp=2)
    assert got == [(None, 5, PrgResponseCode.RESPONSE_FAILURE), (3, 6, PrgResponseCode.INVALID_REQUEST),
                   (None, 7, PrgResponseCode.SUCCESS)]


def test_pri_resp_and_atc_inv_ignored_when_smmu_disabled():
    """§1.5: with SMMUEN=0, CMD_ATC_INV and CMD_PRI_RESP are IGNORED (not errors)."""
    _, _, smmu, sw = world()
    smmu.write_reg(R.CR0, smmu.read_reg(R.CR0) & ~R.Cr0.SMMUEN)
    got = []
    smmu.register_endpoint(9, prg_response=lambda *a: got.append(a), atc_invalidate=lambda *a: got.append(a))
    sw.cmd(Opcode.CMD_PRI_RESP, StreamID=9, PRGIndex=5, Resp=2)
    sw.cmd(Opcode.CMD_ATC_INV, StreamID=9)
    assert got == [] and cerror(smmu) == (False, 0, 2)


def test_cmdq_disabled_does_not_consume_until_enabled():
    """§1.5: CMDQEN=0 stops fetching; CMDQEN 0->1 starts processing a non-empty queue."""
    _, _, smmu, sw = world()
    smmu.write_reg(R.CR0, smmu.read_reg(R.CR0) & ~R.Cr0.CMDQEN)
    sw.cmd(Opcode.CMD_SYNC)
    assert smmu.read_reg(R.CMDQ_CONS) == 0
    smmu.write_reg(R.CR0, smmu.read_reg(R.CR0) | R.Cr0.CMDQEN)
    assert smmu.read_reg(R.CMDQ_CONS) == 1


# ---------------------------------------------------------------- caches (§6.7)

def test_stale_iotlb_until_tlbi():
    """§6.7: after unmapping, the cached translation is used until CMD_TLBI_NH_VA + SYNC."""
    _, _, smmu, sw = world()
    s = make_s1_stream(sw, 1)
    s.tables[0].map(0x1000, DATA)
    assert smmu.translate(1, None, 0x1000).pa == DATA
    s.tables[0].unmap(0x1000)
    assert smmu.translate(1, None, 0x1000).pa == DATA  # stale, as on hardware
    sw.cmd(Opcode.CMD_TLBI_NH_VA, ASID=2 + 64, Addr=0x2000)  # other page: no effect
    assert smmu.translate(1, None, 0x1000).ok
    sw.cmd(Opcode.CMD_TLBI_NH_VA, ASID=1 + 64, Addr=0x1000)
    sw.sync()
    assert not smmu.translate(1, None, 0x1000).ok


def test_tlbi_asid_and_range_and_global():
    """§5.2: NH_ASID spares global entries; NH_VAA with a range drops every ASID's entries in range."""
    _, _, smmu, sw = world()
    s = make_s1_stream(sw, 1)
    pt = s.tables[0]
    pt.map(0x1000, DATA, ng=False)
    pt.map(0x2000, DATA)
    pt.map(0x9000, DATA, ng=False)
    for va in (0x1000, 0x2000, 0x9000):
        assert smmu.translate(1, None, va).ok
        pt.unmap(va)
    sw.cmd(Opcode.CMD_TLBI_NH_ASID, ASID=65)
    assert smmu.translate(1, None, 0x1000).ok and not smmu.translate(1, None, 0x2000).ok
    sw.cmd(Opcode.CMD_TLBI_NH_VAA, Addr=0, TG=1, NUM=3, SCALE=0, TTL=0)  # 4 pages from 0
    assert not smmu.translate(1, None, 0x1000).ok and smmu.translate(1, None, 0x9000).ok
    sw.cmd(Opcode.CMD_TLBI_NSNH_ALL)
    assert not smmu.translate(1, None, 0x9000).ok


def test_stale_ste_and_cd_until_cfgi():
    """§6.7: STE and CD changes are invisible until CMD_CFGI_STE / CMD_CFGI_CD."""
    _, _, smmu, sw = world()
    s = make_s1_stream(sw, 1)
    s.tables[0].map(0x1000, DATA)
    assert smmu.translate(1, None, 0x1000).ok
    sw.write_ste(1, dict(V=0))
    sw.cmd(Opcode.CMD_TLBI_NSNH_ALL)
    assert smmu.translate(1, None, 0x1000).ok  # STE still cached
    sw.cmd(Opcode.CMD_CFGI_STE, StreamID=1, Leaf=1)
    assert smmu.translate(1, None, 0x1000).fault.event == rec.EventId.C_BAD_STE
    s = make_s1_stream(sw, 2)
    s.tables[0].map(0x1000, DATA)
    assert smmu.translate(2, None, 0x1000).ok
    sw.write_cd(s.cd_addr(0), cd_fields(s.tables[0].root, asid=130, A=1, R=1) | dict(V=0))
    sw.cmd(Opcode.CMD_TLBI_NSNH_ALL)
    assert smmu.translate(2, None, 0x1000).ok
    sw.cmd(Opcode.CMD_CFGI_CD, StreamID=2, SubstreamID=0, Leaf=1)
    assert smmu.translate(2, None, 0x1000).fault.event == rec.EventId.C_BAD_CD


def test_invalid_structures_are_not_cached():
    """§6.7: a failed/invalid STE is not cached, so fixing it needs no CFGI."""
    _, _, smmu, sw = world()
    assert smmu.translate(1, None, 0).fault.event == rec.EventId.C_BAD_STE
    s = make_s1_stream(sw, 1)
    s.tables[0].map(0, DATA)
    assert smmu.translate(1, None, 0).ok


def test_stage2_cache_needs_tlbi_s2_ipa():
    """§5.2: stage-2 translations are cached per VMID until CMD_TLBI_S2_IPA / S12_VMALL."""
    _, _, smmu, sw = world()
    from devmodel.iommu.builder import s2_fields
    table = {0x10: DATA}
    smmu.set_stage2(2, lambda ipa, acc: table[ipa >> 12] | (ipa & 0xFFF) if ipa >> 12 in table else None)
    sw.write_ste(3, dict(V=1, Config=rec.SteConfig.S2_TRANS, **s2_fields(2)))
    assert smmu.translate(3, None, 0x10000).pa == DATA
    del table[0x10]
    assert smmu.translate(3, None, 0x10000).pa == DATA
    sw.cmd(Opcode.CMD_TLBI_S2_IPA, VMID=2, IPA=0x10000)
    assert not smmu.translate(3, None, 0x10000).ok
