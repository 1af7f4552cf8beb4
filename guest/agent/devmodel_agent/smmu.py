"""A Linux-like SMMUv3 driver over :class:`~devmodel_agent.hw.Regs` and reserved memory.

Bring-up follows the order of the Linux driver's device reset (reference smmuv3-pcie.md
§1.10): CR0=0 (ACK polled), CR1/CR2, linear stream table, CMDQ + CMDQEN, CFGI_ALL and
TLBI_NSNH_ALL + CMD_SYNC, EVENTQ + EVENTQEN, PRIQ + PRIQEN, IRQ_CTRL (ACK polled),
SMMUEN. Every CR0 / IRQ_CTRL write is followed by polling its ACK register.

Queues (§2): PROD/CONS are ``index | wrap << log2size``; the output queues (EVTQ, PRIQ)
signal a lost record by toggling PROD.OVFLG, which software acknowledges by copying it
into CONS.OVACKFLG. GERROR (§1.6) is toggle based: an error is active while
GERROR[x] != GERRORN[x]; CMDQ_ERR is recovered like Linux does for CERROR_ILL: the
offending command is overwritten by a CMD_SYNC, then GERRORN acknowledges and the
SMMU restarts at CONS.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from dataclasses import dataclass, field

from devmodel.iommu import records as rec
from devmodel.iommu import registers as R
from devmodel.iommu.bitfield import Fields
from devmodel.iommu.builder import cd_fields, ste_s1
from devmodel.iommu.records import Opcode, SyncCS

from devmodel_agent.hw import PAGE, AgentError, Allocator, Memory, Regs, read64, write64
from devmodel_agent.pgtable import PageTable

log = logging.getLogger(__name__)

ACK_TIMEOUT = 1.0
SYNC_TIMEOUT = 3.0
WAIT_SLICE = 0.05
#: CR1: queues and tables Inner Shareable, write-back cacheable (Linux's choice).
CR1_WB_ISH = 1 << 0 | 1 << 2 | 3 << 4 | 1 << 6 | 1 << 8 | 3 << 10
T0SZ = 25  # 39-bit IOVA space: three levels from level 1
DEFAULT_CDMAX = 8  # linear CD table of 256 entries: PASIDs 1..255 (CD 0 = no PASID)
ATC_INV_ALL = 52  # CMD_ATC_INV Size >= 52: the whole address space
STE_MODES = ("s1", "abort", "bypass", "bad", "invalid")


@dataclass(frozen=True)
class SmmuIds:
    """What the ID registers say (only what a Linux-like driver checks or sizes from)."""

    idr0: int
    idr1: int
    idr5: int

    @property
    def s1p(self) -> bool:
        return bool(self.idr0 & R.IDR0_S1P)

    @property
    def s2p(self) -> bool:
        return bool(self.idr0 & R.IDR0_S2P)

    @property
    def ttf_aarch64(self) -> bool:
        return bool((self.idr0 >> 2) & 0b10)

    @property
    def ats(self) -> bool:
        return bool(self.idr0 & R.IDR0_ATS)

    @property
    def pri(self) -> bool:
        return bool(self.idr0 & R.IDR0_PRI)

    @property
    def sid_bits(self) -> int:
        return self.idr1 & R.IDR1_SIDSIZE_MASK

    @property
    def ssid_bits(self) -> int:
        return (self.idr1 >> R.IDR1_SSIDSIZE_SHIFT) & 0x1F

    def qs(self, shift: int) -> int:
        return (self.idr1 >> shift) & 0x1F

    @property
    def gran4k(self) -> bool:
        return bool(self.idr5 & 1 << 4)


class QueueGeometry:
    """Index arithmetic of one queue: ``index | wrap`` with ``log2size`` index bits."""

    def __init__(self, base: int, log2size: int, entry_size: int) -> None:
        self.base = base
        self.log2size = log2size
        self.entry_size = entry_size

    @property
    def entries(self) -> int:
        return 1 << self.log2size

    def wrapped(self, ptr: int) -> int:
        return ptr & ((self.entries << 1) - 1)

    def incr(self, ptr: int) -> int:
        return (self.wrapped(ptr) + 1) & ((self.entries << 1) - 1)

    def slot(self, ptr: int) -> int:
        return self.base + (ptr & (self.entries - 1)) * self.entry_size

    def index(self, ptr: int) -> int:
        return ptr & (self.entries - 1)

    def count(self, prod: int, cons: int) -> int:
        return (self.wrapped(prod) - self.wrapped(cons)) & ((self.entries << 1) - 1)

    @property
    def base_reg(self) -> int:
        return self.base | self.log2size | R.Q_BASE_HINT


@dataclass
class Context:
    """One CD (one PASID, or CD 0 for untagged traffic) and its stage-1 page table."""

    pasid: int
    asid: int
    table: PageTable


@dataclass
class Stream:
    """Everything the agent keeps for one StreamID: its STE mode and CD table."""

    sid: int
    mode: str = "abort"
    cd_table: int = 0
    cdmax: int = DEFAULT_CDMAX
    eats: bool = False
    contexts: dict[int, Context] = field(default_factory=dict)


@dataclass
class CmdResult:
    """What happened to one submitted batch: queue indices used and command errors seen."""

    indices: list[int]
    errors: list[dict]
    synced: bool


@dataclass
class Drained:
    """Records taken from an output queue and whether the hardware flagged an overflow."""

    records: list[Fields]
    overflow: bool
    prod: int
    cons: int


class SmmuDriver:
    """Bring-up, stream table, CDs, page tables, CMDQ/EVTQ/PRIQ and GERROR handling.

    Callers serialise hardware access with :attr:`lock` (re-entrant); :meth:`notify` is
    called by the interrupt thread without the lock so a CMD_SYNC waiter wakes up.
    """

    def __init__(self, regs: Regs, mem: Memory, alloc: Allocator, *, cmdq_log2: int = 8, evtq_log2: int = 8,
                 priq_log2: int = 8, sid_bits: int = 8) -> None:
        self.regs = regs
        self.mem = mem
        self.alloc = alloc
        self.want = dict(cmdq=cmdq_log2, evtq=evtq_log2, priq=priq_log2)
        self.want_sid_bits = sid_bits
        self.lock = threading.RLock()
        self.wake = threading.Condition()
        self.ids: SmmuIds | None = None
        self.cmdq: QueueGeometry | None = None
        self.evtq: QueueGeometry | None = None
        self.priq: QueueGeometry | None = None
        self.strtab = 0
        self.sid_bits = 0
        self.cmd_prod = 0
        self.evt_cons = 0
        self.evt_ovack = 0
        self.pri_cons = 0
        self.pri_ovack = 0
        self.streams: dict[int, Stream] = {}
        self.gerror_log: list[dict] = []
        self.counters = dict(cmds=0, syncs=0, cmdq_errors=0, gerrors=0, evtq_overflows=0, priq_overflows=0,
                             events=0, page_requests=0)
        self.up = False

    # ------------------------------------------------------------ helpers
    def notify(self) -> None:
        """Wake threads waiting for the SMMU (CMD_SYNC / GERROR interrupt arrived)."""
        with self.wake:
            self.wake.notify_all()

    def _sleep_for_irq(self, timeout: float) -> None:
        with self.wake:
            self.wake.wait(timeout)

    def _poll_ack(self, ack_reg: int, value: int, mask: int, what: str) -> None:
        deadline = time.monotonic() + ACK_TIMEOUT
        while (self.regs.read32(ack_reg) & mask) != (value & mask):
            if time.monotonic() > deadline:
                raise AgentError(errno.ETIMEDOUT, f"{what}: ACK register {ack_reg:#x} did not reach {value:#x}")
            time.sleep(0.001)

    def write_cr0(self, value: int) -> None:
        """Write CR0 and poll CR0ACK until every field is Updated (§1.5)."""
        self.regs.write32(R.CR0, value)
        self._poll_ack(R.CR0ACK, value, R.CR0_MASK, "CR0")
        log.info("CR0 = %#x (acknowledged)", value)

    def write_irq_ctrl(self, value: int) -> None:
        self.regs.write32(R.IRQ_CTRL, value)
        self._poll_ack(R.IRQ_CTRLACK, value, 0x7, "IRQ_CTRL")
        log.info("IRQ_CTRL = %#x (acknowledged)", value)

    # ------------------------------------------------------------ bring-up
    def probe(self) -> SmmuIds:
        """Read and check the ID registers like arm_smmu_device_hw_probe."""
        ids = SmmuIds(self.regs.read32(R.IDR0), self.regs.read32(R.IDR1), self.regs.read32(R.IDR5))
        if not ids.s1p:
            raise AgentError(errno.ENODEV, "SMMU has no stage 1 (IDR0.S1P=0)")
        if not ids.ttf_aarch64:
            raise AgentError(errno.ENODEV, "SMMU lacks AArch64 table format (IDR0.TTF)")
        if not ids.gran4k:
            raise AgentError(errno.ENODEV, "SMMU lacks the 4 KiB granule (IDR5.GRAN4K)")
        self.ids = ids
        log.info("SMMU IDR0=%#x IDR1=%#x IDR5=%#x: SIDSIZE=%d SSIDSIZE=%d ATS=%d PRI=%d", ids.idr0, ids.idr1,
                 ids.idr5, ids.sid_bits, ids.ssid_bits, ids.ats, ids.pri)
        return ids

    def bring_up(self) -> None:
        """The whole Linux-like reset sequence; leaves the SMMU enabled with all STEs abort."""
        with self.lock:
            ids = self.probe()
            if self.regs.read32(R.CR0) & R.Cr0.SMMUEN:
                log.info("SMMU was enabled: disabling first")
            self.write_cr0(0)
            self.write_irq_ctrl(0)
            self.regs.write32(R.CR1, CR1_WB_ISH)
            self.regs.write32(R.CR2, R.CR2_PTM | R.CR2_RECINVSID)
            self._setup_strtab(ids)
            self._setup_queues(ids)
            cr0 = R.Cr0.CMDQEN
            self.write_cr0(cr0)
            self.submit([rec.encode_command(Opcode.CMD_CFGI_STE_RANGE, Range=rec.CFGI_ALL_RANGE),
                         rec.encode_command(Opcode.CMD_TLBI_NSNH_ALL)])
            cr0 |= R.Cr0.EVENTQEN
            self.write_cr0(cr0)
            irqs = R.IrqCtrl.GERROR_IRQEN | R.IrqCtrl.EVENTQ_IRQEN
            if ids.pri:
                cr0 |= R.Cr0.PRIQEN
                self.write_cr0(cr0)
                irqs |= R.IrqCtrl.PRIQ_IRQEN
            self.write_irq_ctrl(int(irqs))
            cr0 |= R.Cr0.SMMUEN
            self.write_cr0(cr0)
            self.up = True
            log.info("SMMU up: strtab=%#x (%d SID bits) cmdq=%#x evtq=%#x priq=%s", self.strtab, self.sid_bits,
                     self.cmdq.base, self.evtq.base, hex(self.priq.base) if self.priq else "none")

    def _setup_strtab(self, ids: SmmuIds) -> None:
        self.sid_bits = min(self.want_sid_bits, ids.sid_bits)
        size = rec.STE_SIZE << self.sid_bits
        self.strtab = self.alloc.alloc(size, size)
        abort = rec.STE.encode(V=1, Config=rec.SteConfig.ABORT)
        self.mem.write(self.strtab, abort * (1 << self.sid_bits))
        self.regs.write64(R.STRTAB_BASE, self.strtab | R.Q_BASE_HINT)
        self.regs.write32(R.STRTAB_BASE_CFG, self.sid_bits | R.STRTAB_FMT_LINEAR << R.STRTAB_CFG_FMT_SHIFT)

    def _queue(self, name: str, max_log2: int, entry_size: int) -> QueueGeometry:
        log2 = max(1, min(self.want[name], max_log2))
        size = entry_size << log2
        return QueueGeometry(self.alloc.alloc(size, max(size, PAGE)), log2, entry_size)

    def _setup_queues(self, ids: SmmuIds) -> None:
        self.cmdq = self._queue("cmdq", ids.qs(R.IDR1_CMDQS_SHIFT), rec.CMD_SIZE)
        self.regs.write64(R.CMDQ_BASE, self.cmdq.base_reg)
        self.regs.write32(R.CMDQ_PROD, 0)
        self.regs.write32(R.CMDQ_CONS, 0)
        self.cmd_prod = 0
        self.evtq = self._queue("evtq", ids.qs(R.IDR1_EVENTQS_SHIFT), rec.EVENT_SIZE)
        self.regs.write64(R.EVENTQ_BASE, self.evtq.base_reg)
        self.regs.write32(R.EVENTQ_PROD, 0)
        self.regs.write32(R.EVENTQ_CONS, 0)
        self.evt_cons = self.evt_ovack = 0
        if ids.pri:
            self.priq = self._queue("priq", ids.qs(R.IDR1_PRIQS_SHIFT), rec.PRI_SIZE)
            self.regs.write64(R.PRIQ_BASE, self.priq.base_reg)
            self.regs.write32(R.PRIQ_PROD, 0)
            self.regs.write32(R.PRIQ_CONS, 0)
            self.pri_cons = self.pri_ovack = 0

    def shut_down(self) -> None:
        """IRQs off, then CR0=0 (the SMMU goes back to GBPA behaviour)."""
        with self.lock:
            if not self.up:
                return
            self.write_irq_ctrl(0)
            self.write_cr0(0)
            self.up = False

    # ------------------------------------------------------------ command queue
    def _require_up(self) -> None:
        if not self.up or self.cmdq is None:
            raise AgentError(errno.ENODEV, "SMMU not brought up")

    def submit(self, commands: list[bytes], sync: bool = True, timeout: float = SYNC_TIMEOUT) -> CmdResult:
        """Append ``commands`` (+ CMD_SYNC with CS=SIG_IRQ), ring PROD, wait for consumption.

        A CMDQ error seen while waiting is handled here (the waiter holds the lock, so the
        interrupt thread cannot): the error is logged with its index and opcode, the
        command replaced by a CMD_SYNC, GERRORN acknowledged, and waiting goes on.
        """
        with self.lock:
            q = self.cmdq
            if q is None:
                raise AgentError(errno.ENODEV, "SMMU not brought up")
            batch = list(commands)
            if sync:
                batch.append(rec.encode_command(Opcode.CMD_SYNC, CS=SyncCS.SIG_IRQ))
            if len(batch) > q.entries:
                raise AgentError(errno.E2BIG, f"{len(batch)} commands exceed the {q.entries}-entry CMDQ")
            self._wait_cmdq_space(len(batch), timeout)
            indices = []
            for data in batch:
                if len(data) != rec.CMD_SIZE:
                    raise AgentError(errno.EINVAL, f"a command is {rec.CMD_SIZE} bytes, got {len(data)}")
                indices.append(q.index(self.cmd_prod))
                self.mem.write(q.slot(self.cmd_prod), data)
                self.cmd_prod = q.incr(self.cmd_prod)
            self.counters["cmds"] += len(commands)
            if sync:
                self.counters["syncs"] += 1
            first_error = len(self.gerror_log)
            self.regs.write32(R.CMDQ_PROD, self.cmd_prod)
            log.info("cmdq: %d command(s) at %s, PROD=%#x", len(batch), indices, self.cmd_prod)
            synced = self._wait_consumed(self.cmd_prod, timeout)
            errors = [e for e in self.gerror_log[first_error:] if "cmdq_err" in e]
            return CmdResult(indices[:len(commands)], errors, synced)

    def _cons(self) -> int:
        return self.regs.read32(R.CMDQ_CONS)

    def _wait_cmdq_space(self, n: int, timeout: float) -> None:
        q = self.cmdq
        deadline = time.monotonic() + timeout
        while q.entries - q.count(self.cmd_prod, self._cons() & R.Q_IDX_MASK) < n:
            self._check_gerror()
            if time.monotonic() > deadline:
                raise AgentError(errno.EBUSY, "CMDQ full")
            self._sleep_for_irq(WAIT_SLICE)

    def _wait_consumed(self, prod: int, timeout: float) -> bool:
        q = self.cmdq
        deadline = time.monotonic() + timeout
        while True:
            cons = self._cons() & R.Q_IDX_MASK
            if q.count(prod, cons) == 0:
                return True
            if self._check_gerror():
                continue
            if time.monotonic() > deadline:
                log.warning("cmdq: CMD_SYNC not consumed in %.1f s (PROD=%#x CONS=%#x)", timeout, prod, cons)
                return False
            self._sleep_for_irq(WAIT_SLICE)

    # ------------------------------------------------------------ GERROR
    def gerror_active(self) -> int:
        return (self.regs.read32(R.GERROR) ^ self.regs.read32(R.GERRORN)) & R.GERROR_MASK

    def _check_gerror(self) -> bool:
        if self.gerror_active():
            self.handle_gerror()
            return True
        return False

    def handle_gerror(self) -> list[dict]:
        """Log and acknowledge every active global error; recover the CMDQ (§1.6, pitfall 3)."""
        with self.lock:
            gerror = self.regs.read32(R.GERROR)
            gerrorn = self.regs.read32(R.GERRORN)
            active = (gerror ^ gerrorn) & R.GERROR_MASK
            if not active:
                return []
            out = []
            for bit in R.Gerror:
                if not active & bit:
                    continue
                self.counters["gerrors"] += 1
                entry: dict = dict(seq=len(self.gerror_log) + 1, bit=bit.name, gerror=gerror, gerrorn=gerrorn)
                if bit == R.Gerror.CMDQ_ERR:
                    entry.update(self._recover_cmdq())
                log.warning("GERROR %s active: %s", bit.name, entry)
                self.gerror_log.append(entry)
                out.append(entry)
            # Acknowledge exactly the bits handled: toggle them in GERRORN.
            self.regs.write32(R.GERRORN, gerrorn ^ active)
            return out

    def _recover_cmdq(self) -> dict:
        """CMDQ_CONS.ERR says why; replace the command at CONS with a CMD_SYNC (Linux)."""
        self.counters["cmdq_errors"] += 1
        cons = self._cons()
        code = (cons & R.CMDQ_CONS_ERR_MASK) >> R.CMDQ_CONS_ERR_SHIFT
        q = self.cmdq
        slot = q.slot(cons)
        bad = self.mem.read(slot, rec.CMD_SIZE)
        try:
            name = R.CmdqError(code).name
        except ValueError:
            name = f"ERR_{code:#x}"
        self.mem.write(slot, rec.encode_command(Opcode.CMD_SYNC, CS=SyncCS.SIG_NONE))
        return dict(cmdq_err=name, cmdq_err_code=code, index=q.index(cons), opcode=bad[0],
                    command=bad.hex(), recovered=1)

    # ------------------------------------------------------------ output queues
    def _drain(self, q: QueueGeometry, prod_reg: int, cons_reg: int, layout, cons: int,
               ovack: int) -> tuple[Drained, int, int]:
        records: list[Fields] = []
        prod = self.regs.read32(prod_reg)
        while q.count(prod & R.Q_IDX_MASK, cons):
            while q.count(prod & R.Q_IDX_MASK, cons):
                records.append(layout.decode(self.mem.read(q.slot(cons), q.entry_size)))
                cons = q.incr(cons)
                self.regs.write32(cons_reg, cons | ovack)
            prod = self.regs.read32(prod_reg)
        overflow = bool((prod & R.Q_OVFLG) != ovack)
        if overflow:
            ovack = prod & R.Q_OVFLG
            self.regs.write32(cons_reg, cons | ovack)
        return Drained(records, overflow, prod, cons), cons, ovack

    def drain_events(self) -> Drained:
        """Take every record from the EVTQ; acknowledge an overflow (OVFLG -> OVACKFLG)."""
        with self.lock:
            self._require_up()
            d, self.evt_cons, self.evt_ovack = self._drain(self.evtq, R.EVENTQ_PROD, R.EVENTQ_CONS, rec.EVENT,
                                                           self.evt_cons, self.evt_ovack)
            self.counters["events"] += len(d.records)
            if d.overflow:
                self.counters["evtq_overflows"] += 1
                log.warning("evtq: overflow flagged by the SMMU (records were lost); acknowledged")
            return d

    def drain_page_requests(self) -> Drained:
        with self.lock:
            self._require_up()
            if self.priq is None:
                return Drained([], False, 0, 0)
            d, self.pri_cons, self.pri_ovack = self._drain(self.priq, R.PRIQ_PROD, R.PRIQ_CONS, rec.PRI,
                                                           self.pri_cons, self.pri_ovack)
            self.counters["page_requests"] += len(d.records)
            if d.overflow:
                self.counters["priq_overflows"] += 1
                log.warning("priq: overflow flagged by the SMMU (requests discarded); acknowledged")
            return d

    def evtq_pending(self) -> tuple[int, bool]:
        """Records waiting in the EVTQ and whether an overflow is flagged (without draining)."""
        with self.lock:
            prod = self.regs.read32(R.EVENTQ_PROD)
            return self.evtq.count(prod & R.Q_IDX_MASK, self.evt_cons), bool((prod & R.Q_OVFLG) != self.evt_ovack)

    # ------------------------------------------------------------ stream table / CDs
    def stream(self, sid: int) -> Stream:
        if not 0 <= sid < 1 << self.sid_bits:
            raise AgentError(errno.ERANGE, f"sid {sid:#x} outside the {self.sid_bits}-bit stream table")
        return self.streams.setdefault(sid, Stream(sid))

    def ste_addr(self, sid: int) -> int:
        return self.strtab + sid * rec.STE_SIZE

    def write_ste(self, sid: int, mode: str, *, eats: bool = False, new_cd: bool = False) -> Stream:
        """Write the STE of ``sid`` (s1 | abort | bypass | bad | invalid) and invalidate it.

        ``bad`` is V=1, Config=S1 with S1CDMax=31 (> any SSIDSIZE: ILLEGAL, C_BAD_STE);
        ``invalid`` is V=0 (also C_BAD_STE). Dwords 1-7 are written before dword 0 so the
        SMMU never sees a valid first dword with stale others.
        """
        if mode not in STE_MODES:
            raise AgentError(errno.EINVAL, f"STE mode {mode!r} not one of {', '.join(STE_MODES)}")
        with self.lock:
            self._require_up()
            st = self.stream(sid)
            if mode == "s1":
                if new_cd or not st.cd_table:
                    self.new_cd_table(st)
                fields = ste_s1(st.cd_table, s1cdmax=st.cdmax, eats=rec.EATS_FULL if eats else rec.EATS_OFF)
            elif mode == "abort":
                fields = dict(V=1, Config=rec.SteConfig.ABORT)
            elif mode == "bypass":
                fields = dict(V=1, Config=rec.SteConfig.BYPASS)
            elif mode == "bad":
                fields = dict(V=1, Config=rec.SteConfig.S1_TRANS, S1ContextPtr=st.cd_table or self.strtab,
                              S1CDMax=31)
            else:
                fields = dict(V=0)
            data = rec.STE.encode(fields)
            addr = self.ste_addr(sid)
            self.mem.write(addr + 8, data[8:])
            self.mem.write(addr, data[:8])
            had_eats = st.eats
            st.mode = mode
            st.eats = eats and mode == "s1"
            cmds = [rec.encode_command(Opcode.CMD_CFGI_STE, StreamID=sid, Leaf=1)]
            if (had_eats or st.eats) and self.ids is not None and self.ids.ats:
                # The endpoint's ATC may hold translations of the old configuration.
                cmds.append(rec.encode_command(Opcode.CMD_ATC_INV, StreamID=sid, Size=ATC_INV_ALL))
            self.submit(cmds)
            log.info("STE sid=%#x -> %s at %#x", sid, mode, addr)
            return st

    def new_cd_table(self, st: Stream) -> None:
        cdmax = min(DEFAULT_CDMAX, self.ids.ssid_bits if self.ids else DEFAULT_CDMAX) or 0
        size = rec.CD_SIZE << cdmax
        st.cd_table = self.alloc.alloc(size, size)
        st.cdmax = cdmax
        st.contexts = {}
        log.info("sid=%#x: new CD table at %#x (%d entries)", st.sid, st.cd_table, 1 << cdmax)

    def context(self, sid: int, pasid: int, create: bool = True) -> Context:
        """The CD for ``pasid`` (0 = untagged traffic) of ``sid``, created on demand."""
        with self.lock:
            st = self.stream(sid)
            ctx = st.contexts.get(pasid)
            if ctx is not None:
                return ctx
            if not create:
                raise AgentError(errno.ENOENT, f"sid {sid:#x} has no context for pasid {pasid}")
            if not st.cd_table:
                self.new_cd_table(st)
            if not 0 <= pasid < 1 << st.cdmax:
                raise AgentError(errno.ERANGE, f"pasid {pasid} outside the {1 << st.cdmax}-entry CD table")
            asid = (sid << st.cdmax | pasid) + 1 & 0xFFFF
            ctx = Context(pasid, asid, PageTable(self.mem, self.alloc, T0SZ))
            cd = rec.CD.encode(cd_fields(ctx.table.root, asid=asid, t0sz=T0SZ))
            addr = st.cd_table + pasid * rec.CD_SIZE
            self.mem.write(addr + 8, cd[8:])
            self.mem.write(addr, cd[:8])
            st.contexts[pasid] = ctx
            self.submit([rec.encode_command(Opcode.CMD_CFGI_CD, StreamID=sid, SubstreamID=pasid, Leaf=1)])
            log.info("sid=%#x pasid=%d: CD at %#x asid=%d ttb0=%#x", sid, pasid, addr, asid, ctx.table.root)
            return ctx

    def invalidate_page(self, sid: int, ctx: Context, iova: int) -> CmdResult:
        """TLBI by VA for the context's ASID (+ ATC invalidation when the STE has EATS)."""
        cmds = [rec.encode_command(Opcode.CMD_TLBI_NH_VA, ASID=ctx.asid, Addr=iova, Leaf=1)]
        st = self.streams.get(sid)
        if st is not None and st.eats and self.ids is not None and self.ids.ats:
            ssv = int(ctx.pasid != 0)
            cmds.append(rec.encode_command(Opcode.CMD_ATC_INV, StreamID=sid, SSV=ssv, SubstreamID=ctx.pasid,
                                           Addr=iova, Size=0))
        return self.submit(cmds)

    def pri_response(self, sid: int, ssid: int | None, prg_index: int, resp: rec.PriResp) -> CmdResult:
        """CMD_PRI_RESP (Resp encodings of reference §4.2) + CMD_SYNC."""
        cmd = rec.encode_command(Opcode.CMD_PRI_RESP, StreamID=sid, SSV=int(ssid is not None),
                                 SubstreamID=ssid or 0, PRGIndex=prg_index & 0x1FF, Resp=int(resp))
        log.info("PRI response sid=%#x ssid=%s prg=%d %s", sid, ssid, prg_index, resp.name)
        return self.submit([cmd])

    def regs_snapshot(self) -> dict[str, int]:
        with self.lock:
            r = self.regs
            out = dict(cr0=r.read32(R.CR0), cr0ack=r.read32(R.CR0ACK), irq_ctrl=r.read32(R.IRQ_CTRL),
                       gerror=r.read32(R.GERROR), gerrorn=r.read32(R.GERRORN), cmdq_prod=r.read32(R.CMDQ_PROD),
                       cmdq_cons=r.read32(R.CMDQ_CONS), eventq_prod=r.read32(R.EVENTQ_PROD),
                       eventq_cons=r.read32(R.EVENTQ_CONS))
            if self.priq is not None:
                out.update(priq_prod=r.read32(R.PRIQ_PROD), priq_cons=r.read32(R.PRIQ_CONS))
            return out
