"""The agent's driver logic (guest/agent/devmodel_agent) against the emulated SMMUv3 and the
DMA engine core: bring-up, tables, EVTQ, CMD_SYNC, GERROR recovery, PRI, overflow.

References: the shared reference smmuv3-pcie.md §1.5 (CR0/CR0ACK), §1.6 (GERROR toggles,
CMDQ_ERR restart), §1.8 (linear stream table), §2 (queues, OVFLG/OVACKFLG), §3 (event
fields), §4.2 (CMD_PRI_RESP Resp), §6 (STE/CD), §8.5-8.6 (PRI enable, PRG responses).
"""

from __future__ import annotations

from argparse import Namespace

from devmodel.devices.dma_engine_records import CompletionStatus
from devmodel.iommu import records as rec
from devmodel.iommu import registers as R
from devmodel.iommu.faults import Access
from devmodel.iommu.records import EventId

from .conftest import kv, run

VSID = 0x20




def test_bring_up_programs_queues_tables_and_enables(host_agent):
    """§1.10 order ends with SMMUEN; every CR0 field ACKed; linear stream table covering the vSID."""
    agent, world = host_agent
    smmu = world.smmu
    want = R.Cr0.SMMUEN | R.Cr0.EVENTQEN | R.Cr0.CMDQEN | R.Cr0.PRIQEN
    assert smmu.read_reg(R.CR0ACK) == want
    assert smmu.read_reg(R.IRQ_CTRLACK) == 0x7
    cfg = smmu.read_reg(R.STRTAB_BASE_CFG)
    assert cfg & R.STRTAB_CFG_LOG2SIZE_MASK >= VSID.bit_length()
    assert (cfg >> R.STRTAB_CFG_FMT_SHIFT) & 3 == R.STRTAB_FMT_LINEAR
    # The CFGI_ALL/TLBI_NSNH_ALL/CMD_SYNC batch was consumed (CONS caught up, no error).
    assert smmu.read_reg(R.CMDQ_CONS) == smmu.read_reg(R.CMDQ_PROD)
    ste = rec.STE.decode(world.mem.read(agent.smmu.ste_addr(VSID), rec.STE_SIZE))
    assert ste.V == 1 and ste.Config == rec.SteConfig.S1_TRANS
    cd0 = rec.CD.decode(world.mem.read(ste.S1ContextPtr, rec.CD_SIZE))
    assert cd0.V == 1 and cd0.TTB0 == agent.smmu.streams[VSID].contexts[0].table.root
    # The ring is reachable untagged at IOVA = PA through CD 0 (what the engine fetches with).
    ring = agent.engine.ring
    r = smmu.translate(VSID, None, ring, 64, Access.READ)
    assert r.ok and r.pa == ring
    # Other SIDs abort (Linux-like default STEs: V=1, Config=abort).
    other = rec.STE.decode(world.mem.read(agent.smmu.ste_addr(0x18), rec.STE_SIZE))
    assert other.V == 1 and other.Config == rec.SteConfig.ABORT


def test_map_unmap_and_read_only_pages(host_agent):
    """Stage-1 4 KiB leaves with AP[1]=1 (unprivileged DMA, pitfall 7); --ro sets AP[2]; unmap + TLBI."""
    agent, world = host_agent
    rc, out = run(agent, "buf", "alloc", "b", "8192")
    assert rc == 0
    pa = int(kv(out[0])["pa"], 16)
    rc, out = run(agent, "map", "3", "0x100000", "--page-for-buffer", "b", "--pages", "2")
    assert rc == 0 and [kv(line)["pa"] for line in out] == [hex(pa), hex(pa + 0x1000)]
    r = world.smmu.translate(VSID, 3, 0x101008, 8, Access.WRITE)
    assert r.ok and r.pa == pa + 0x1008
    run(agent, "map", "3", "0x200000", "--ro")
    assert world.smmu.translate(VSID, 3, 0x200000, 8, Access.READ).ok
    w = world.smmu.translate(VSID, 3, 0x200000, 8, Access.WRITE)
    assert not w.ok and w.fault.event == EventId.F_PERMISSION
    rc, out = run(agent, "unmap", "3", "0x100000")
    assert rc == 0 and kv(out[0])["was_mapped"] == "1"
    t = world.smmu.translate(VSID, 3, 0x100000, 8, Access.READ)
    assert not t.ok and t.fault.event == EventId.F_TRANSLATION  # the TLBI removed the cached walk


def test_translation_fault_read_back_from_evtq(host_agent):
    """A FILL at an unmapped IOVA: completion PAGE_FAULT at that address, and the interrupt thread
    drains F_TRANSLATION with StreamID=vSID, SSV=1, SSID=PASID, RnW=0 (a write), CLASS=IN (§3)."""
    agent, world = host_agent
    rc, out = run(agent, "dma", "fill", "--pasid", "5", "--dst", "0x300010", "--len", "64")
    assert rc == 0
    d = kv(out[0])
    assert d["status"] == "PAGE_FAULT" and d["fault_addr"] == "0x300010" and d["fault_rnw"] == "0"
    rc, out = run(agent, "events", "--wait", "1", "--timeout", "5")
    assert rc == 0
    ev = kv(out[0])
    assert (ev["name"], ev["sid"], ev["ssv"], ev["ssid"], ev["addr"], ev["rnw"], ev["class"]) == (
        "F_TRANSLATION", "0x20", "1", "5", "0x300010", "0", "IN")
    # Both arrived as interrupts (the completion may be reaped by the waiter before its thread runs).
    assert agent.wait_until(lambda: agent.irq_counts["eventq"] >= 1 and agent.irq_counts["dma_completion"] >= 1, 2)
    assert world.smmu.read_reg(R.EVENTQ_CONS) & R.Q_IDX_MASK == world.smmu.read_reg(R.EVENTQ_PROD) & R.Q_IDX_MASK


def test_permission_fault_on_read_only_page(host_agent):
    agent, _ = host_agent
    run(agent, "map", "1", "0x400000", "--ro")
    rc, out = run(agent, "dma", "fill", "--pasid", "1", "--dst", "0x400000", "--len", "8")
    assert kv(out[0])["status"] == "PAGE_FAULT"
    rc, out = run(agent, "events", "--wait", "1")
    assert kv(out[0])["name"] == "F_PERMISSION" and kv(out[0])["rnw"] == "0"


def test_copy_success_moves_the_right_bytes(host_agent):
    agent, _ = host_agent
    run(agent, "buf", "alloc", "src", "4096", "--fill", "0xa5")
    run(agent, "buf", "alloc", "dst", "4096")
    run(agent, "map", "2", "0x10000", "--page-for-buffer", "src")
    run(agent, "map", "2", "0x20000", "--page-for-buffer", "dst")
    rc, out = run(agent, "dma", "copy", "--pasid", "2", "--src", "0x10000", "--dst", "0x20000", "--len", "4096")
    assert rc == 0 and kv(out[0])["status"] == "SUCCESS" and kv(out[0])["bytes"] == "4096"
    assert kv(run(agent, "buf", "cmp", "src", "dst")[1][0])["equal"] == "1"


def test_cmd_sync_raises_its_vector(host_agent):
    """CMD_SYNC with CS=SIG_IRQ pulses the CMD_SYNC interrupt (vector 3 in the vIOMMU)."""
    agent, _ = host_agent
    before = agent.smmu.counters["syncs"]
    rc, out = run(agent, "cmd", "sync")
    assert rc == 0 and kv(out[0])["synced"] == "1"
    assert agent.smmu.counters["syncs"] == before + 1
    assert agent.wait_until(lambda: agent.irq_counts["cmd_sync"] >= before + 1, 2)


def test_illegal_command_cerror_ill_at_its_index_and_recovery(host_agent):
    """§1.6/pitfall 3-4: a reserved opcode stops the CMDQ with CONS.ERR=CERROR_ILL at that index;
    the agent replaces it by CMD_SYNC, toggles GERRORN, and the queue runs on."""
    agent, world = host_agent
    rc, out = run(agent, "cmd", "raw", "0xff", "0", "0", "0")
    assert rc == 1
    cmd, err = kv(out[0]), kv(out[1])
    assert cmd["result"] == "error"
    assert err["cmdq_err"] == "CERROR_ILL" and err["index"] == cmd["index"] and err["opcode"] == "0xff"
    assert world.smmu.read_reg(R.GERROR) == world.smmu.read_reg(R.GERRORN)  # acknowledged
    # TLBI_S12_VMALL is illegal without stage 2 (the vIOMMU has S2P=0).
    rc, out = run(agent, "cmd", "tlbi", "s12-vmall", "--vmid", "1")
    assert rc == 1 and kv(out[1])["cmdq_err"] == "CERROR_ILL" and kv(out[1])["opcode"] == "0x28"
    rc, out = run(agent, "cmd", "tlbi", "nh-asid", "--asid", "2")
    assert rc == 0 and kv(out[0])["result"] == "ok"
    rc, out = run(agent, "gerror")
    assert [kv(line)["bit"] for line in out[:-1]] == ["CMDQ_ERR", "CMDQ_ERR"]
    assert kv(out[-1])["active"] == "0"


def test_bad_ste_gives_c_bad_ste_and_recovers(host_agent):
    agent, _ = host_agent
    rc, _ = run(agent, "ste", "0x20", "bad")
    assert rc == 0
    rc, out = run(agent, "dma", "fill", "--pasid", "1", "--dst", "0x1000", "--len", "8", "--timeout", "0.3")
    assert rc == 3 and "HALTED" in kv(out[1])["state"]  # ring fetch refused: engine halts
    rc, out = run(agent, "events", "--wait", "1")
    assert kv(out[0])["name"] == "C_BAD_STE" and kv(out[0])["sid"] == "0x20"
    run(agent, "ste", "0x20", "s1")
    run(agent, "dma", "restart")
    run(agent, "map", "1", "0x1000")
    rc, out = run(agent, "dma", "fill", "--pasid", "1", "--dst", "0x1000", "--len", "8")
    assert rc == 0 and kv(out[0])["status"] == "SUCCESS"


def _pri_on(agent) -> None:
    assert run(agent, "ats", "on")[0] == 0
    rc, out = run(agent, "pri", "enable")
    assert rc == 0 and kv(out[0])["enabled"] == "1"


def test_pri_success_maps_responds_and_dma_completes(host_agent):
    """§8.6: a page request for the missing dst page; map it, CMD_PRI_RESP Success (Resp=0b10),
    the engine retries and the copy completes with the source bytes."""
    agent, world = host_agent
    _pri_on(agent)
    run(agent, "buf", "alloc", "src", "4096", "--fill", "0x3c")
    run(agent, "buf", "alloc", "dst", "4096")
    run(agent, "map", "7", "0x50000", "--page-for-buffer", "src")
    rc, out = run(agent, "dma", "copy", "--pasid", "7", "--src", "0x50000", "--dst", "0x60000", "--len", "4096",
                  "--no-wait")
    slot = kv(out[0])["slot"]
    rc, out = run(agent, "prq", "--wait", "1")
    req = kv(out[0])
    assert (req["sid"], req["ssid"], req["addr"], req["w"], req["l"], req["state"]) == (
        "0x20", "7", "0x60000", "1", "1", "pending")
    run(agent, "map", "7", "0x60000", "--page-for-buffer", "dst")
    rc, out = run(agent, "resp", "0x20", "7", req["prgi"], "success")
    assert rc == 0 and kv(out[0])["known"] == "1"
    rc, out = run(agent, "dma", "wait", slot)
    assert rc == 0 and kv(out[0])["status"] == "SUCCESS"
    assert kv(run(agent, "buf", "cmp", "src", "dst")[1][0])["equal"] == "1"
    assert kv(run(agent, "prq")[1][0])["state"] == "success"


def test_pri_invalid_completion_shows_fault_address(host_agent):
    agent, _ = host_agent
    _pri_on(agent)
    run(agent, "pri", "auto", "invalid")
    rc, out = run(agent, "dma", "fill", "--pasid", "4", "--dst", "0x70040", "--len", "16")
    d = kv(out[0])
    assert d["status"] == "PAGE_FAULT" and d["fault_addr"] == "0x70040"
    assert kv(run(agent, "prq")[1][0])["state"] == "auto-invalid"


def test_pri_auto_success_maps_the_faulting_page(host_agent):
    agent, world = host_agent
    _pri_on(agent)
    run(agent, "pri", "auto", "success")
    rc, out = run(agent, "dma", "fill", "--pasid", "4", "--dst", "0x90000", "--len", "4096",
                  "--pattern", "0x1122334455667788")
    assert kv(out[0])["status"] == "SUCCESS"
    pa = agent.smmu.context(VSID, 4).table.lookup(0x90000).pa
    assert world.mem.read(pa, 8) == bytes.fromhex("8877665544332211")


def test_ste_replace_with_page_requests_outstanding(host_agent):
    """Replacing the STE (fresh CD table) answers the SID's outstanding groups Invalid, as Linux
    flushes pending faults on a domain change; the waiting descriptor completes PAGE_FAULT."""
    agent, _ = host_agent
    _pri_on(agent)
    out = run(agent, "dma", "fill", "--pasid", "6", "--dst", "0xa0000", "--len", "8", "--no-wait")[1]
    slot = kv(out[0])["slot"]
    assert run(agent, "prq", "--wait", "1", "--pending")[0] == 0
    rc, out = run(agent, "ste", "0x20", "s1", "--new-cd")
    assert rc == 0 and kv(out[0])["pending_answered"] == "1"
    rc, out = run(agent, "dma", "wait", slot)
    assert kv(out[0])["status"] == "PAGE_FAULT"
    # The new CD table still carries the ring and completions: DMA works after a fresh map.
    run(agent, "map", "6", "0xa0000")
    assert kv(run(agent, "dma", "fill", "--pasid", "6", "--dst", "0xa0000", "--len", "8")[1][0])["status"] == "SUCCESS"


def test_evtq_overflow_burst_counts_exactly_what_was_lost(small_evtq_agent):
    """§2: with the EVTQ (4 entries) full, the SMMU drops records and toggles OVFLG once; the agent
    acknowledges (OVACKFLG) and counts exactly the faults that produced no event, which is what
    the hardware dropped."""
    agent, world = small_evtq_agent
    rc, out = run(agent, "dma", "burst", "--pasid", "1", "--iova", "0x800000", "--count", "10")
    assert rc == 0
    b = kv(out[0])
    assert (b["faulted"], b["events"], b["lost"], b["overflow"], b["evtq_entries"]) == ("10", "4", "6", "1", "4")
    assert world.smmu.eventq.dropped == 6
    prod, cons = world.smmu.read_reg(R.EVENTQ_PROD), world.smmu.read_reg(R.EVENTQ_CONS)
    assert prod & R.Q_OVFLG == cons & R.Q_OVFLG  # overflow acknowledged
    assert agent.smmu.counters["evtq_overflows"] == 1
    # Recording continues after the acknowledgement.
    run(agent, "dma", "fill", "--pasid", "1", "--dst", "0x900000", "--len", "8")
    rc, out = run(agent, "events", "--since", "5", "--wait", "1")
    assert rc == 0 and kv(out[-1])["addr"] == "0x900000"


def test_bad_input_gives_errno_records_not_crashes(host_agent):
    agent, _ = host_agent
    assert run(agent, "map", "1", "0x1001")[1][0].startswith("error errno=EINVAL")
    assert run(agent, "map", "999", "0x1000")[1][0].startswith("error errno=ERANGE")
    assert run(agent, "buf", "read", "nope")[1][0].startswith("error errno=ENOENT")
    assert run(agent, "cmd", "raw", "1", "2", "3")[1][0].startswith("error errno=EINVAL")
    assert run(agent, "dma", "wait", "63")[1][0].startswith("error errno=ENOENT")
    assert run(agent, "unmap", "77", "0x1000")[1][0].startswith("error errno=ENOENT")
