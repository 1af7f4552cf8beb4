"""The guest's Command queue: consumption, checks, batching into IOMMU_HWPT_INVALIDATE.

Consumption (smmuv3-pcie.md sections 1.9, 5) runs in the function's worker when the
guest writes CMDQ_PROD, enables CMDQEN or acknowledges CMDQ_ERR. Invalidations the host
must perform (TLBI_NH_*, TLBI_NSNH_ALL, CFGI_CD*, ATC_INV) are gathered into one
IOMMU_HWPT_INVALIDATE on the vIOMMU per run of consecutive commands; ``entry_num`` on
failure is the index of the entry the host refused, so the guest's CMDQ stops exactly
there: RD on that command, CMDQ_CONS.ERR = CERROR_ILL, then GERROR.CMDQ_ERR toggles
(ERR is written before GERROR, pitfall 3). Commands after an error have no effect until
the guest acknowledges through GERRORN; processing then restarts at RD (and on any later
CMDQ_PROD write). Everything else is handled by the function: CFGI_STE*, PRI_RESP, SYNC.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from devmodel.iommu import registers as R
from devmodel.iommu.bitfield import Fields
from devmodel.iommu.queue import QueueRegs
from devmodel.iommu.records import CMD_SIZE, Opcode, decode_command
from devmodel.memory import BusError, Memory
from devmodel.viommu.registers import QUEUE_LOG2_MAX, VIOMMU_PROFILE

log = logging.getLogger(__name__)

CmdqError = R.CmdqError
SYNC_CS_ILLEGAL = 0b11
PRI_RESP_RESERVED = 0b11

#: Guest commands forwarded to the host as vIOMMU invalidations (iommufd.md section 4.3).
HOST_INVALIDATIONS = frozenset({
    Opcode.CMD_TLBI_NH_ALL, Opcode.CMD_TLBI_NH_ASID, Opcode.CMD_TLBI_NH_VA,
    Opcode.CMD_TLBI_NH_VAA, Opcode.CMD_TLBI_NSNH_ALL, Opcode.CMD_CFGI_CD,
    Opcode.CMD_CFGI_CD_ALL, Opcode.CMD_ATC_INV})
#: Opcodes this implementation does not have (smmuv3-pcie.md section 5.2 / pitfall 4).
_NOT_IMPLEMENTED = {
    Opcode.CMD_CFGI_VMS_PIDM: "no MPAM",
    Opcode.CMD_TLBI_EL3_ALL: "Secure queue only", Opcode.CMD_TLBI_EL3_VA: "Secure queue only",
    Opcode.CMD_TLBI_EL2_ALL: "IDR0.Hyp=0", Opcode.CMD_TLBI_EL2_ASID: "IDR0.Hyp=0",
    Opcode.CMD_TLBI_EL2_VA: "IDR0.Hyp=0", Opcode.CMD_TLBI_EL2_VAA: "IDR0.Hyp=0",
    Opcode.CMD_TLBI_S12_VMALL: "no stage 2", Opcode.CMD_TLBI_S2_IPA: "no stage 2",
    Opcode.CMD_RESUME: "STALL_MODEL=terminate", Opcode.CMD_STALL_TERM: "STALL_MODEL=terminate",
    Opcode.CMD_DPTI_ALL: "no DPT", Opcode.CMD_DPTI_PA: "no DPT",
}
_RANGE_TLBI = frozenset({Opcode.CMD_TLBI_NH_VA, Opcode.CMD_TLBI_NH_VAA})


class CommandSink(Protocol):
    """What executing a guest command needs from the function."""

    def cmdq_error_active(self) -> bool: ...

    def cmdq_error(self, code: CmdqError, what: str) -> None: ...

    def invalidate(self, cmds: list[bytes]) -> int | None:
        """Host invalidation of ``cmds``; None, or the index of the refused entry."""
        ...

    def execute(self, opcode: Opcode, cmd: Fields, raw: bytes) -> None: ...

    def skip_invalidation(self, opcode: Opcode) -> bool:
        """True when the command is IGNORED (ATC_INV with SMMUEN=0)."""
        ...


@dataclass
class _Pending:
    ptr: int
    raw: bytes


def illegal(opcode: int, cmd: Fields | None) -> str | None:
    """Why a command is CERROR_ILL here (smmuv3-pcie.md pitfall 4), else None."""
    if cmd is None:
        return f"reserved opcode {opcode:#04x}"
    if cmd.SSec:
        return "SSec=1 on the Non-secure queue"
    op = Opcode(opcode)
    if op in _NOT_IMPLEMENTED:
        return f"{op.name}: {_NOT_IMPLEMENTED[op]}"
    if op == Opcode.CMD_SYNC and cmd.CS == SYNC_CS_ILLEGAL:
        return "CMD_SYNC CS=0b11"
    if op == Opcode.CMD_PRI_RESP and cmd.Resp == PRI_RESP_RESERVED:
        return "CMD_PRI_RESP Resp=0b11"
    if op in (Opcode.CMD_PRI_RESP,) and not VIOMMU_PROFILE.pri:
        return "no PRI"
    if op in _RANGE_TLBI and cmd.TG and not (cmd.NUM or cmd.SCALE or cmd.TTL):
        return "range TLBI with TG!=0 and NUM=SCALE=TTL=0 (reserved)"
    return None


class GuestCommandQueue(QueueRegs):
    """CMDQ_BASE / CMDQ_PROD / CMDQ_CONS of the vIOMMU and its consumer."""

    def __init__(self, dma, sink: CommandSink) -> None:  # noqa: ANN001 - callable -> Memory
        super().__init__("cmdq", CMD_SIZE, QUEUE_LOG2_MAX)
        self.dma = dma
        self.sink = sink
        self.enabled = False
        self.err: int = CmdqError.CERROR_NONE

    def reset(self) -> None:
        super().reset()
        self.enabled = False
        self.err = CmdqError.CERROR_NONE

    def read_cons(self) -> int:
        return self.cons | int(self.err) << R.CMDQ_CONS_ERR_SHIFT

    def write_cons(self, value: int) -> None:
        """RW only while CMDQEN=0 (and ACKed 0), RO otherwise."""
        if self.enabled:
            log.info("guest cmdq: CMDQ_CONS write %#x ignored: CMDQEN=1", value)
            return
        self.cons = value & R.Q_IDX_MASK
        self.err = (value & R.CMDQ_CONS_ERR_MASK) >> R.CMDQ_CONS_ERR_SHIFT

    def _fail(self, ptr: int, code: CmdqError, what: str) -> None:
        self.cons = self.wrapped(ptr)
        self.err = code
        self.sink.cmdq_error(code, what)

    def _flush(self, batch: list[_Pending]) -> bool:
        if not batch:
            return True
        bad = self.sink.invalidate([p.raw for p in batch])
        if bad is not None:
            self._fail(batch[bad].ptr, CmdqError.CERROR_ILL,
                       f"host refused invalidation at CONS={batch[bad].ptr:#x}")
            return False
        self.cons = self.incr(batch[-1].ptr)
        batch.clear()
        return True

    def consume(self) -> int:
        """Run commands from RD to WR; returns how many completed."""
        if not self.enabled or self.sink.cmdq_error_active():
            return 0
        done = 0
        batch: list[_Pending] = []
        ptr = self.wrapped(self.cons)
        for _ in range(self.entries + 1):
            if ptr == self.wrapped(self.prod):
                break
            try:
                raw = self.dma().read(self.entry_addr(ptr), CMD_SIZE)
            except BusError as e:
                if self._flush(batch):
                    self._fail(ptr, CmdqError.CERROR_ABT, f"command fetch: {e}")
                return done
            opcode, cmd = decode_command(raw)
            why = illegal(opcode, cmd)
            if why is not None:
                if self._flush(batch):
                    self._fail(ptr, CmdqError.CERROR_ILL, why)
                return done
            op = Opcode(opcode)
            if op in HOST_INVALIDATIONS:
                if not self.sink.skip_invalidation(op):
                    batch.append(_Pending(ptr, raw))
                    ptr = self.incr(ptr)
                    done += 1
                    continue
            elif not self._flush(batch):
                return done
            else:
                self.sink.execute(op, cmd, raw)
            ptr = self.incr(ptr)
            done += 1
            if not batch:
                self.cons = ptr
        if self._flush(batch):
            self.cons = ptr
        return done
