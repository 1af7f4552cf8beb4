"""The Command queue: consumption, every opcode's effect, and command errors (§1.9, §5).

Consumption runs synchronously when software writes CMDQ_PROD, enables CMDQEN, or
acknowledges CMDQ_ERR through GERRORN. On an error, RD stays on the failing command,
CMDQ_CONS.ERR is written, and only then GERROR.CMDQ_ERR toggles (pitfall 3); later
commands have no effect until the error is acknowledged, which restarts consumption at
the command RD points to.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from devmodel.iommu import registers as R
from devmodel.iommu.bitfield import Fields
from devmodel.iommu.irq import Interrupts, IrqSource
from devmodel.iommu.queue import QueueRegs
from devmodel.iommu.records import (CFGI_ALL_RANGE, CMD_SIZE, PRI_RESP_TO_PCIE, Opcode, PriResp,
                                    SyncCS, decode_command)
from devmodel.memory import BusError, Memory

if TYPE_CHECKING:
    from devmodel.iommu.smmu import SMMUv3

log = logging.getLogger(__name__)

CmdqError = R.CmdqError


class IllegalCommand(Exception):
    """CERROR_ILL with a reason for the log."""


class CommandQueue(QueueRegs):
    """CMDQ_BASE / CMDQ_PROD / CMDQ_CONS and the consumer."""

    def __init__(self, memory: Memory, irqs: Interrupts, smmu: "SMMUv3", max_log2: int) -> None:
        super().__init__("cmdq", CMD_SIZE, max_log2)
        self.memory = memory
        self.irqs = irqs
        self.smmu = smmu
        self.enabled = False
        self.err: int = CmdqError.CERROR_NONE
        self.atc_inv_failed = False
        self.executed = 0

    def reset(self) -> None:
        super().reset()
        self.enabled = False
        self.err = CmdqError.CERROR_NONE
        self.atc_inv_failed = False

    def read_cons(self) -> int:
        return self.cons | (int(self.err) << R.CMDQ_CONS_ERR_SHIFT)

    def write_cons(self, value: int) -> None:
        """CONS is writable only while CMDQEN=0 (and ACKed 0)."""
        if self.enabled:
            log.info("CMDQ_CONS write %#x ignored: CMDQEN=1", value)
            return
        self.cons = value & R.Q_IDX_MASK
        self.err = (value & R.CMDQ_CONS_ERR_MASK) >> R.CMDQ_CONS_ERR_SHIFT

    def write_prod(self, value: int) -> None:
        self.prod = value & R.Q_IDX_MASK
        self.consume()

    # ------------------------------------------------------------ consumer
    def consume(self) -> None:
        """Process commands from CONS to PROD unless disabled or an error is active."""
        if not self.enabled or self.irqs.active(R.Gerror.CMDQ_ERR):
            return
        budget = self.entries + 1
        while not self.is_empty() and budget:
            budget -= 1
            addr = self.entry_addr(self.cons)
            try:
                data = self.memory.read(addr, CMD_SIZE)
            except BusError as e:
                self._error(CmdqError.CERROR_ABT, f"fetch at {addr:#x} aborted: {e}")
                return
            err = self.execute(data)
            if err is not None:
                self._error(err[0], err[1])
                return
            self.cons = self.incr(self.cons)
            self.executed += 1

    def _error(self, code: CmdqError, why: str) -> None:
        self.err = code  # CONS.ERR first, then GERROR (pitfall 3)
        log.warning("cmdq: %s at CONS=%#x: %s", code.name, self.cons, why)
        self.irqs.raise_gerror(R.Gerror.CMDQ_ERR)

    # ------------------------------------------------------------ commands
    def execute(self, data: bytes) -> tuple[CmdqError, str] | None:
        """Run one command; return (error, reason) to stop the queue."""
        op, f = decode_command(data)
        if f is None:
            return CmdqError.CERROR_ILL, f"reserved opcode {op:#04x}"
        name = Opcode(op).name
        if f.SSec:
            return CmdqError.CERROR_ILL, f"{name} with SSec=1 on the Non-secure queue"
        handler = getattr(self, "_" + name.lower(), None)
        if handler is None:
            return CmdqError.CERROR_ILL, f"{name} not implemented by this SMMU"
        try:
            result = handler(f)
        except IllegalCommand as e:
            return CmdqError.CERROR_ILL, f"{name}: {e}"
        if result is not None:
            return result
        log.debug("cmdq: %s done", name)
        return None

    @property
    def p(self) -> R.SmmuProfile:
        return self.smmu.profile

    def _cmd_prefetch_config(self, f: Fields) -> None:
        """Hint only: never raises events."""

    _cmd_prefetch_addr = _cmd_prefetch_config

    def _cmd_cfgi_ste(self, f: Fields) -> None:
        self.smmu.config_cache.inv_ste(f.StreamID, bool(f.Leaf), self.smmu.strtab.split)

    def _cmd_cfgi_ste_range(self, f: Fields) -> None:
        if f.Range == CFGI_ALL_RANGE:
            self.smmu.config_cache.inv_all()
        else:
            self.smmu.config_cache.inv_ste_range(f.StreamID, f.Range)

    def _need_s1(self) -> None:
        if not self.p.s1p:
            raise IllegalCommand("no stage 1")

    def _need_s2(self) -> None:
        if not self.p.s2p:
            raise IllegalCommand("no stage 2")

    def _cmd_cfgi_cd(self, f: Fields) -> None:
        self._need_s1()
        self.smmu.config_cache.inv_cd(f.StreamID, f.SubstreamID, bool(f.Leaf))

    def _cmd_cfgi_cd_all(self, f: Fields) -> None:
        self._need_s1()
        self.smmu.config_cache.inv_cd_all(f.StreamID)

    def _range(self, f: Fields) -> int:
        """Bytes covered by a TLBI: one page, or (NUM+1)*2^SCALE granules (RIL)."""
        if f.TG == 0:
            return 1
        if not self.p.ril:
            raise IllegalCommand("range TLBI without IDR3.RIL")
        if f.NUM == 0 and f.SCALE == 0 and f.TTL == 0:
            raise IllegalCommand("reserved range: TG!=0 with NUM=SCALE=TTL=0")
        granule = {1: 1 << 12, 2: 1 << 14, 3: 1 << 16}[f.TG]
        return (f.NUM + 1) * (1 << f.SCALE) * granule

    def _cmd_tlbi_nh_all(self, f: Fields) -> None:
        self._need_s1()
        self.smmu.iotlb.inv_vmid_s1(f.VMID if self.p.s2p else 0)

    def _cmd_tlbi_nh_asid(self, f: Fields) -> None:
        self._need_s1()
        self.smmu.iotlb.inv_asid(f.VMID if self.p.s2p else 0, f.ASID)

    def _cmd_tlbi_nh_va(self, f: Fields) -> None:
        self._need_s1()
        self.smmu.iotlb.inv_va(f.VMID if self.p.s2p else 0, f.ASID, f.Addr, self._range(f))

    def _cmd_tlbi_nh_vaa(self, f: Fields) -> None:
        self._need_s1()
        self.smmu.iotlb.inv_va(f.VMID if self.p.s2p else 0, None, f.Addr, self._range(f))

    def _el2(self, f: Fields) -> None:
        if not self.p.hyp:
            raise IllegalCommand("EL2 TLBI without IDR0.Hyp")
        self.smmu.iotlb.inv_all()

    _cmd_tlbi_el2_all = _cmd_tlbi_el2_asid = _cmd_tlbi_el2_va = _cmd_tlbi_el2_vaa = _el2

    def _cmd_tlbi_s12_vmall(self, f: Fields) -> None:
        self._need_s2()
        self.smmu.iotlb.inv_vmid_s1(f.VMID)
        self.smmu.iotlb.inv_vmid_s2(f.VMID)

    def _cmd_tlbi_s2_ipa(self, f: Fields) -> None:
        self._need_s2()
        self.smmu.iotlb.inv_ipa(f.VMID, f.IPA, self._range(f))

    def _cmd_tlbi_nsnh_all(self, f: Fields) -> None:
        self.smmu.iotlb.inv_all()

    def _cmd_atc_inv(self, f: Fields) -> None:
        if not self.p.ats:
            raise IllegalCommand("no ATS")
        if not self.smmu.smmuen:
            log.info("cmdq: CMD_ATC_INV ignored: SMMUEN=0")
            return
        size = f.Size
        length = 1 << 64 if size >= 52 else 4096 << size
        addr = f.Addr & ~(length - 1) if size < 52 else 0
        ssid = f.SubstreamID if f.SSV else None
        ok = self.smmu.deliver_atc_invalidate(f.StreamID, ssid, addr, length, bool(f.Global and f.SSV))
        if not ok:
            self.atc_inv_failed = True

    def _cmd_pri_resp(self, f: Fields) -> None:
        if not self.p.pri:
            raise IllegalCommand("no PRI")
        if f.Resp == 0b11:
            raise IllegalCommand("Resp=0b11 reserved")
        if not self.smmu.smmuen:
            log.info("cmdq: CMD_PRI_RESP ignored: SMMUEN=0")
            return
        code = PRI_RESP_TO_PCIE[PriResp(f.Resp)]
        ssid = f.SubstreamID if f.SSV else None
        self.smmu.deliver_prg_response(f.StreamID, ssid, f.PRGIndex, code)

    def _cmd_resume(self, f: Fields) -> None:
        if self.p.stall_model == 0b01:
            raise IllegalCommand("no stall model (STALL_MODEL=0b01)")

    _cmd_stall_term = _cmd_resume

    def _cmd_sync(self, f: Fields) -> tuple[CmdqError, str] | None:
        if f.CS == 0b11:
            raise IllegalCommand("CS=0b11 reserved")
        if self.atc_inv_failed:
            self.atc_inv_failed = False
            return CmdqError.CERROR_ATC_INV_SYNC, "an earlier CMD_ATC_INV did not complete"
        if f.CS == SyncCS.SIG_IRQ:
            if self.p.msi and f.MSIAddress:
                self.irqs.msi_write(IrqSource.CMD_SYNC, f.MSIAddress, f.MSIData)
            self.irqs.pulse(IrqSource.CMD_SYNC)
        elif f.CS == SyncCS.SIG_SEV and self.p.sev:
            self.smmu.sev()
        log.debug("cmdq: CMD_SYNC complete (CS=%d)", f.CS)
        return None

