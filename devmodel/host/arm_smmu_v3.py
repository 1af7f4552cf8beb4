"""The host's SMMUv3 device driver (the hardware half of Linux's arm-smmu-v3).

It talks to the SMMU only through the register interface (``read_reg``/``write_reg``) and
the memory both share, plus the one hook real hardware has no register for: the stage-2
translation of a VMID (see :mod:`devmodel.host.ste`). It:

* probes the ID registers and refuses an SMMU Linux would refuse;
* brings the SMMU up in Linux's order (smmuv3-pcie.md section 1.10): GBPA abort if
  enabled, CR0=0, CR1/CR2, stream table (2-level, SPLIT=8, when IDR0.ST_LEVEL allows),
  CMDQ + CFGI_ALL/TLBI_NSNH_ALL, EVTQ, PRIQ, ATSCHK, IRQ_CTRL=0, MSI configuration,
  IRQ_CTRL, SMMUEN, each CR0/IRQ_CTRL step polled through its ACK register;
* owns the stream table: blocked, stage-2 and nested STEs, each write followed by
  CMD_CFGI_STE + CMD_SYNC;
* services the EVTQ, PRIQ and GERROR interrupts.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from devmodel.host import ste as S
from devmodel.host.cmdq import HostCommandQueue
from devmodel.host.counters import HostCounters
from devmodel.host.eventq import HostEventHandler
from devmodel.host.irq import IrqDispatcher, Vector
from devmodel.host.physmem import HostPhysicalMemory
from devmodel.host.priq import HostPriHandler
from devmodel.host.queue import OutputQueue, SmmuMmio
from devmodel.host.stage2 import IoasStage2, VmidAllocator
from devmodel.iommu import records as rec
from devmodel.iommu import registers as R
from devmodel.iommu.records import Opcode, PriResp
from devmodel.iommu.translation import Stage2Hook
from devmodel.iommufd import IommufdContext
from devmodel.iommufd.device import Device
from devmodel.iommufd.ioas import Ioas

log = logging.getLogger(__name__)

POLL_LIMIT = 1000
STRTAB_SPLIT = 8
LINEAR_SID_BITS_MAX = 12  # a linear table of 4096 STEs (256 KiB) at most
CR1_WB, CR1_ISH = 1, 3
CR1_VALUE = (CR1_WB | CR1_WB << 2 | CR1_ISH << 4  # QUEUE_IC, QUEUE_OC, QUEUE_SH
             | CR1_WB << 6 | CR1_WB << 8 | CR1_ISH << 10)  # TABLE_IC, TABLE_OC, TABLE_SH
IRQ_CFG1_OFFSET = 8  # *_IRQ_CFG1 follows *_IRQ_CFG0 (64-bit)
IRQ_CFG2_OFFSET = 12
IRQ_CFG2_DEVICE_NGNRE = 0x1
IRQ_CTRL_MASK = 0x7
ATC_INV_SIZE_ALL = 52
IDR0_TTF_SHIFT, IDR0_TTF_MASK = 2, 0x3
IDR0_TTF_AARCH64 = 0b10
IDR0_ST_LEVEL_MASK = 0x3
IDR0_STALL_MODEL_SHIFT, IDR0_STALL_MODEL_MASK = 24, 0x3
IDR1_REL, IDR1_QUEUES_PRESET, IDR1_TABLES_PRESET = 1 << 28, 1 << 29, 1 << 30
IDR1_QS_MASK = 0x1F
IDR5_OAS_MASK = 0x7
CMDQS_MIN = 7  # Linux rejects CMDQS <= 6
EINVAL = 22

#: Wire a wired interrupt output to a handler (used only without MSI).
WireIrq = Callable[[Vector, Callable[[], None]], None]
#: Install (or remove, with None) the stage-2 hook of a VMID.
SetStage2 = Callable[[int, "Stage2Hook | None"], None]


class ProbeError(Exception):
    """The SMMU lacks something this driver needs (Linux would fail the probe)."""


@dataclass
class Master:
    """One StreamID the host manages: its bound iommufd device and ATS setting."""

    sid: int
    device: Device | None = None
    ats: bool = False
    config: str = "blocked"


@dataclass(frozen=True)
class QueueSizes:
    """log2 entries the driver asks for (capped by IDR1)."""

    cmdq: int = 8
    evtq: int = 7
    priq: int = 7


class ArmSmmuV3:
    """Probe, bring-up, stream table and interrupt handling of one SMMUv3."""

    def __init__(self, mmio: SmmuMmio, memory: HostPhysicalMemory, ctx: IommufdContext,
                 set_stage2: SetStage2, *, lock: threading.RLock | None = None,
                 threaded_irqs: bool = False, sizes: QueueSizes = QueueSizes(),
                 doorbell_base: int | None = None, wire_irq: WireIrq | None = None) -> None:
        self.mmio = mmio
        self.memory = memory
        self.ctx = ctx
        self.set_stage2 = set_stage2
        self.lock = lock or ctx.lock
        self.counters = HostCounters()
        self.irqs = IrqDispatcher(threaded_irqs)
        self.masters: dict[int, Master] = {}
        self.vmids = VmidAllocator()
        self.stage2: dict[int, IoasStage2] = {}
        self.sizes = sizes
        self.doorbell_base = doorbell_base
        self.wire_irq = wire_irq
        self.l2_tables: dict[int, int] = {}
        self.enabled = False
        self.cr0 = 0
        self._probe()

    # ------------------------------------------------------------ probe
    def _probe(self) -> None:
        rd = self.mmio.read_reg
        self.idr = tuple(rd(off) for off in (R.IDR0, R.IDR1, R.IDR2, R.IDR3, R.IDR4, R.IDR5))
        self.iidr = rd(R.IIDR)
        self.aidr = rd(R.AIDR)
        idr0, idr1, _, _, _, idr5 = self.idr
        if not (idr0 >> IDR0_TTF_SHIFT) & IDR0_TTF_MASK & IDR0_TTF_AARCH64:
            raise ProbeError("IDR0.TTF lacks AArch64 tables")
        if not idr0 & R.IDR0_S2P:
            raise ProbeError("no stage 2: iommufd nesting needs IDR0.S2P")
        if idr1 & (IDR1_REL | IDR1_QUEUES_PRESET | IDR1_TABLES_PRESET):
            raise ProbeError("embedded implementation (REL/QUEUES_PRESET/TABLES_PRESET)")
        if (idr1 >> R.IDR1_CMDQS_SHIFT) & IDR1_QS_MASK < CMDQS_MIN:
            raise ProbeError("CMDQS too small")
        self.s1p = bool(idr0 & R.IDR0_S1P)
        self.pri = bool(idr0 & R.IDR0_PRI)
        self.ats = bool(idr0 & R.IDR0_ATS)
        self.msi = bool(idr0 & R.IDR0_MSI) and self.doorbell_base is not None
        self.two_level = bool((idr0 >> R.IDR0_ST_LEVEL_SHIFT) & IDR0_ST_LEVEL_MASK)
        self.stall_model = (idr0 >> IDR0_STALL_MODEL_SHIFT) & IDR0_STALL_MODEL_MASK
        self.sid_bits = idr1 & R.IDR1_SIDSIZE_MASK
        self.s2ps = idr5 & IDR5_OAS_MASK
        self.cmdq_log2 = min(self.sizes.cmdq, (idr1 >> R.IDR1_CMDQS_SHIFT) & IDR1_QS_MASK)
        self.evtq_log2 = min(self.sizes.evtq, (idr1 >> R.IDR1_EVENTQS_SHIFT) & IDR1_QS_MASK)
        self.priq_log2 = min(self.sizes.priq, (idr1 >> R.IDR1_PRIQS_SHIFT) & IDR1_QS_MASK)
        log.info("smmu probe: IDR0=%#x IDR1=%#x IDR5=%#x: s1=%d pri=%d ats=%d msi=%d 2lvl=%d "
                 "sid_bits=%d", idr0, idr1, idr5, self.s1p, self.pri, self.ats, self.msi,
                 self.two_level, self.sid_bits)

    # ------------------------------------------------------------ bring-up
    def _poll(self, reg: int, mask: int, value: int, what: str) -> None:
        for _ in range(POLL_LIMIT):
            if self.mmio.read_reg(reg) & mask == value & mask:
                return
        raise ProbeError(f"{what}: timeout waiting for {value:#x}")

    def _write_cr0(self, value: int) -> None:
        self.mmio.write_reg(R.CR0, int(value))
        self._poll(R.CR0ACK, R.CR0_MASK, int(value), "CR0ACK")
        self.cr0 = int(value)

    def _write_irq_ctrl(self, value: int) -> None:
        self.mmio.write_reg(R.IRQ_CTRL, int(value))
        self._poll(R.IRQ_CTRLACK, IRQ_CTRL_MASK, int(value), "IRQ_CTRLACK")

    def reset(self) -> None:
        """``arm_smmu_device_reset``: the full bring-up sequence."""
        with self.lock:
            rd, wr = self.mmio.read_reg, self.mmio.write_reg
            if rd(R.CR0) & R.Cr0.SMMUEN:
                log.info("smmu reset: SMMU enabled at probe: GBPA.ABORT first")
                wr(R.GBPA, (rd(R.GBPA) & R.GBPA_FIELDS_MASK) | R.GBPA_ABORT | R.GBPA_UPDATE)
                self._poll(R.GBPA, R.GBPA_UPDATE, 0, "GBPA.Update")
            self._write_cr0(0)
            wr(R.CR1, CR1_VALUE)
            wr(R.CR2, R.CR2_PTM | R.CR2_RECINVSID)
            self._init_strtab()
            self._init_cmdq()
            self._write_cr0(R.Cr0.CMDQEN)
            self.cmdq.command(Opcode.CMD_CFGI_STE_RANGE, Range=rec.CFGI_ALL_RANGE)
            self.cmdq.command(Opcode.CMD_TLBI_NSNH_ALL)
            self._init_evtq()
            cr0 = R.Cr0.CMDQEN | R.Cr0.EVENTQEN
            self._write_cr0(cr0)
            if self.pri:
                self._init_priq()
                cr0 |= R.Cr0.PRIQEN
                self._write_cr0(cr0)
            if self.ats:
                cr0 |= R.Cr0.ATSCHK
                self._write_cr0(cr0)
            self._setup_irqs()
            self._write_cr0(cr0 | R.Cr0.SMMUEN)
            self.enabled = True
            log.info("smmu reset: enabled (CR0=%#x)", self.cr0)

    def _init_strtab(self) -> None:
        if self.two_level and self.sid_bits > STRTAB_SPLIT:
            size = (1 << (self.sid_bits - STRTAB_SPLIT)) * rec.L1STD_SIZE
            self.strtab = self.memory.alloc(size, max(size, 64))
            cfg = (self.sid_bits | STRTAB_SPLIT << R.STRTAB_CFG_SPLIT_SHIFT
                   | R.STRTAB_FMT_2LEVEL << R.STRTAB_CFG_FMT_SHIFT)
            self.linear = False
            self.linear_bits = 0
        else:
            bits = min(self.sid_bits, LINEAR_SID_BITS_MAX)
            size = rec.STE_SIZE << bits
            self.strtab = self.memory.alloc(size, size)
            self.memory.write(self.strtab, S.blocked_ste() * (1 << bits))
            cfg = bits | R.STRTAB_FMT_LINEAR << R.STRTAB_CFG_FMT_SHIFT
            self.linear = True
            self.linear_bits = bits
        self.mmio.write_reg(R.STRTAB_BASE, self.strtab | R.Q_BASE_HINT, 8)
        self.mmio.write_reg(R.STRTAB_BASE_CFG, cfg)
        log.info("smmu reset: stream table at %#x (%s, cfg %#x)", self.strtab,
                 "linear" if self.linear else "2-level", cfg)

    def _queue_mem(self, log2: int, entry: int) -> int:
        size = max(entry << log2, 32)
        return self.memory.alloc(size, size)

    def _init_cmdq(self) -> None:
        base = self._queue_mem(self.cmdq_log2, rec.CMD_SIZE)
        self.mmio.write_reg(R.CMDQ_BASE, base | R.Q_BASE_HINT | self.cmdq_log2, 8)
        self.cmdq = HostCommandQueue(self.mmio, self.memory, base, self.cmdq_log2, self.counters,
                                     msi_poll=bool(self.idr[0] & R.IDR0_MSI))
        self.cmdq.reset()

    def _init_evtq(self) -> None:
        base = self._queue_mem(self.evtq_log2, rec.EVENT_SIZE)
        self.mmio.write_reg(R.EVENTQ_BASE, base | R.Q_BASE_HINT | self.evtq_log2, 8)
        self.evtq = OutputQueue("evtq", self.mmio, self.memory, base, self.evtq_log2,
                                rec.EVENT_SIZE, R.EVENTQ_PROD, R.EVENTQ_CONS)
        self.evtq.reset()
        self.event_handler = HostEventHandler(self._device_of, self.counters, self.lock)

    def _init_priq(self) -> None:
        base = self._queue_mem(self.priq_log2, rec.PRI_SIZE)
        self.mmio.write_reg(R.PRIQ_BASE, base | R.Q_BASE_HINT | self.priq_log2, 8)
        self.priq = OutputQueue("priq", self.mmio, self.memory, base, self.priq_log2,
                                rec.PRI_SIZE, R.PRIQ_PROD, R.PRIQ_CONS)
        self.priq.reset()
        self.pri_handler = HostPriHandler(self._device_of, self.ctx, self.pri_response,
                                          self.counters, self.lock)

    def _setup_irqs(self) -> None:
        self._write_irq_ctrl(0)
        sources = [(Vector.EVTQ, R.EVENTQ_IRQ_CFG0, self.handle_evtq),
                   (Vector.GERROR, R.GERROR_IRQ_CFG0, self.handle_gerror)]
        if self.pri:
            sources.append((Vector.PRIQ, R.PRIQ_IRQ_CFG0, self.handle_priq))
        for vector, cfg0, handler in sources:
            self.irqs.handlers[vector] = self._locked(handler)
            if self.msi:
                self.mmio.write_reg(cfg0, self.doorbell_base, 8)
                self.mmio.write_reg(cfg0 + IRQ_CFG1_OFFSET, int(vector))
                self.mmio.write_reg(cfg0 + IRQ_CFG2_OFFSET, IRQ_CFG2_DEVICE_NGNRE)
            elif self.wire_irq is not None:
                self.wire_irq(vector, lambda v=vector: self.irqs.raise_irq(v))
        enables = R.IrqCtrl.EVENTQ_IRQEN | R.IrqCtrl.GERROR_IRQEN
        if self.pri:
            enables |= R.IrqCtrl.PRIQ_IRQEN
        self._write_irq_ctrl(int(enables))
        log.info("smmu reset: interrupts %s, IRQ_CTRL=%#x", "MSI" if self.msi else "wired",
                 int(enables))

    def _locked(self, handler: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with self.lock:
                handler()
        return run

    def shutdown(self) -> None:
        """Disable everything (interrupts off, CR0=0)."""
        with self.lock:
            if self.enabled:
                self._write_irq_ctrl(0)
                self._write_cr0(0)
                self.enabled = False
            self.irqs.close()

    # ------------------------------------------------------------ interrupt handlers
    def handle_evtq(self) -> None:
        n = self.evtq.drain(self.event_handler, self._evtq_overflow)
        log.debug("evtq irq: %d records", n)

    def _evtq_overflow(self) -> None:
        self.counters.evtq_overflows += 1

    def handle_priq(self) -> None:
        n = self.priq.drain(self.pri_handler, self._priq_overflow)
        log.debug("priq irq: %d records", n)

    def _priq_overflow(self) -> None:
        self.counters.priq_overflows += 1
        self.pri_handler.discard_partials()

    def handle_gerror(self) -> None:
        """Log and acknowledge active global errors (CMDQ_ERR goes through recovery)."""
        gerror = self.mmio.read_reg(R.GERROR)
        active = (gerror ^ self.mmio.read_reg(R.GERRORN)) & R.GERROR_MASK
        if not active:
            return
        for bit in R.Gerror:
            if active & bit:
                self.counters.gerrors[bit.name] += 1
                log.warning("gerror: %s active", bit.name)
        if active & R.Gerror.CMDQ_ERR:
            self.cmdq.recover()
        rest = active & ~R.Gerror.CMDQ_ERR
        if rest:
            self.mmio.write_reg(R.GERRORN, self.mmio.read_reg(R.GERRORN) ^ rest)

    # ------------------------------------------------------------ masters and STEs
    def add_master(self, sid: int, ats: bool = False) -> Master:
        """Manage ``sid`` (its L2 stream table exists, its STE is blocked)."""
        with self.lock:
            if sid < 0 or sid >> self.sid_bits or (self.linear and sid >> self.linear_bits):
                raise OSError(EINVAL, f"StreamID {sid:#x} beyond the stream table")
            master = self.masters.get(sid)
            if master is None:
                master = self.masters[sid] = Master(sid, ats=ats and self.ats)
                self._ensure_l2(sid)
            return master

    def remove_master(self, sid: int) -> None:
        with self.lock:
            if sid in self.masters:
                self.block(sid)
                del self.masters[sid]

    def _device_of(self, sid: int) -> Device | None:
        master = self.masters.get(sid)
        return master.device if master is not None else None

    def _ensure_l2(self, sid: int) -> None:
        """A 2-level table's L2 for ``sid``: 256 blocked STEs, then the L1STD (Span=9)."""
        if self.linear:
            return
        l1 = sid >> STRTAB_SPLIT
        if l1 in self.l2_tables:
            return
        size = rec.STE_SIZE << STRTAB_SPLIT
        l2 = self.memory.alloc(size, size)
        self.memory.write(l2, S.blocked_ste() * (1 << STRTAB_SPLIT))
        self.memory.write(self.strtab + l1 * rec.L1STD_SIZE,
                          rec.L1STD.encode(Span=STRTAB_SPLIT + 1, L2Ptr=l2))
        self.l2_tables[l1] = l2
        log.info("strtab: L2 table for sids %#x.. at %#x", l1 << STRTAB_SPLIT, l2)
        if self.enabled:
            self.cmdq.command(Opcode.CMD_CFGI_STE, StreamID=sid, Leaf=0)

    def ste_addr(self, sid: int) -> int:
        if self.linear:
            return self.strtab + sid * rec.STE_SIZE
        low = sid & ((1 << STRTAB_SPLIT) - 1)
        return self.l2_tables[sid >> STRTAB_SPLIT] + low * rec.STE_SIZE

    def write_ste(self, sid: int, ste: bytes, what: str) -> None:
        """Write the whole STE, then CMD_CFGI_STE + CMD_SYNC (section 6.7)."""
        master = self.add_master(sid)
        addr = self.ste_addr(sid)
        self.memory.write(addr, ste)
        master.config = what
        log.info("strtab: sid %#x STE at %#x <- %s", sid, addr, what)
        self.cmdq.command(Opcode.CMD_CFGI_STE, StreamID=sid, Leaf=1)

    def _eats(self, sid: int, requested: bool = True) -> int:
        """Physical EATS: full ATS when the master supports it and the domain does not
        disable it (a nested domain enables ATS only if the guest STE asked: EATS=0b01)."""
        master = self.masters.get(sid)
        ats = master is not None and master.ats and requested
        return rec.EATS_FULL if ats else rec.EATS_OFF

    def block(self, sid: int) -> None:
        """Blocked STE; ATS masters also get their ATC flushed (CMD_ATC_INV, everything)."""
        with self.lock:
            self.write_ste(sid, S.blocked_ste(), "blocked")
            if self.masters[sid].ats:
                self.cmdq.command(Opcode.CMD_ATC_INV, StreamID=sid, Size=ATC_INV_SIZE_ALL)

    def install_s2(self, sid: int, vmid: int) -> None:
        with self.lock:
            self.write_ste(sid, S.s2_ste(vmid, self.s2ps, self._eats(sid)), f"stage 2 (vmid {vmid})")

    def install_nested(self, sid: int, ste0: int, ste1: int, vmid: int,
                       enable_ats: bool = False) -> None:
        with self.lock:
            ste = S.nested_ste(ste0, ste1, vmid, self.s2ps, self._eats(sid, enable_ats),
                               allow_s1stalld=self.stall_model == 0)
            self.write_ste(sid, ste, f"nested (guest STE {ste0:#x}/{ste1:#x}, vmid {vmid})")

    # ------------------------------------------------------------ VMIDs / stage 2
    def alloc_vmid(self, ioas: Ioas) -> int:
        with self.lock:
            vmid = self.vmids.alloc()
            self.stage2[vmid] = IoasStage2(ioas, vmid)
            self.set_stage2(vmid, self.stage2[vmid])
            log.info("vmid %d: stage 2 = IOAS %d", vmid, ioas.id)
            return vmid

    def free_vmid(self, vmid: int) -> None:
        """Drop the VMID's cached translations (both stages), then its stage-2 hook."""
        with self.lock:
            self.cmdq.command(Opcode.CMD_TLBI_S12_VMALL, VMID=vmid)
            self.set_stage2(vmid, None)
            self.stage2.pop(vmid, None)
            self.vmids.free(vmid)
            log.info("vmid %d freed", vmid)

    def flush_ioas(self, ioas: Ioas) -> int:
        """Flush every VMID whose stage 2 is ``ioas``; how many."""
        with self.lock:
            vmids = [v for v, s2 in self.stage2.items() if s2.ioas is ioas]
            for vmid in vmids:
                self.flush_vmid(vmid)
            return len(vmids)

    def flush_vmid(self, vmid: int) -> None:
        """The IOAS behind ``vmid`` changed (unmap): drop its cached translations."""
        with self.lock:
            self.cmdq.command(Opcode.CMD_TLBI_S12_VMALL, VMID=vmid)

    # ------------------------------------------------------------ commands
    def issue_user_commands(self, cmds: list[tuple[int, int]]) -> None:
        """Converted guest invalidations (vSID already translated): batches + CMD_SYNC."""
        with self.lock:
            raw = [c0.to_bytes(8, "little") + c1.to_bytes(8, "little") for c0, c1 in cmds]
            self.cmdq.issue(raw)

    def pri_response(self, sid: int, ssid: int | None, prg_index: int, resp: PriResp) -> None:
        """CMD_PRI_RESP (+ CMD_SYNC) for one page request group."""
        with self.lock:
            self.cmdq.command(Opcode.CMD_PRI_RESP, StreamID=sid, SSV=int(ssid is not None),
                              SubstreamID=ssid or 0, PRGIndex=prg_index, Resp=int(resp))
