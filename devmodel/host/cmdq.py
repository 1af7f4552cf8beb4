"""The host's Command queue: building, issuing and syncing commands, and CMDQ_ERR recovery.

Software owns CMDQ_PROD (the doorbell) and must check CONS for space before writing
(reference smmuv3-pcie.md section 2). Each batch ends with CMD_SYNC; with MSI support the
sync uses Linux's MSIPOLL idiom (section 5.3: CS=SIG_IRQ, MSIAddress = the CMD_SYNC slot
itself, MSIData = 0; completion = the slot's first word reads 0), otherwise CS=SIG_NONE
and CONS passing the sync. Command errors are recovered like Linux's
``arm_smmu_cmdq_skip_err`` (section 1.9): CERROR_ILL overwrites the bad command with a
CMD_SYNC, CERROR_ABT / CERROR_ATC_INV_SYNC retry; then GERRORN acknowledges CMDQ_ERR.
"""

from __future__ import annotations

import logging

from devmodel.host.counters import HostCounters
from devmodel.host.queue import SmmuMmio
from devmodel.iommu import registers as R
from devmodel.iommu.records import CMD_SIZE, Opcode, SyncCS, decode_command, encode_command
from devmodel.memory import Memory

log = logging.getLogger(__name__)

#: Linux issues at most this many commands before a CMD_SYNC (CMDQ_BATCH_ENTRIES - 1).
BATCH_COMMANDS = 63
#: How often one stuck command is retried (CERROR_ABT) before it is skipped.
MAX_RETRIES = 4
MSI_ATTR_OIWB = 0xF
MSH_ISH = 0b11


class CommandError(Exception):
    """The CMDQ did not make progress even after recovery (a host emergency)."""


class HostCommandQueue:
    """CMDQ_BASE/PROD/CONS from the software side."""

    def __init__(self, mmio: SmmuMmio, memory: Memory, base: int, log2: int,
                 counters: HostCounters, msi_poll: bool) -> None:
        self.mmio = mmio
        self.memory = memory
        self.base = base
        self.log2 = log2
        self.counters = counters
        self.msi_poll = msi_poll
        self.prod = 0

    @property
    def entries(self) -> int:
        return 1 << self.log2

    def _mask(self) -> int:
        return (1 << (self.log2 + 1)) - 1

    def slot_addr(self, ptr: int) -> int:
        """Host-memory address of the command slot that queue pointer ``ptr`` names."""
        return self.base + (ptr & (self.entries - 1)) * CMD_SIZE

    def reset(self) -> None:
        self.prod = 0
        self.mmio.write_reg(R.CMDQ_PROD, 0)
        self.mmio.write_reg(R.CMDQ_CONS, 0)

    def _cons(self) -> int:
        return self.mmio.read_reg(R.CMDQ_CONS) & self._mask()

    def _space(self) -> int:
        used = (self.prod - self._cons()) & self._mask()
        return self.entries - used

    # ------------------------------------------------------------ issuing
    def issue(self, commands: list[bytes], sync: bool = True) -> None:
        """Queue ``commands`` (16-byte records) in batches, each closed by CMD_SYNC."""
        for i in range(0, max(len(commands), 1), BATCH_COMMANDS):
            batch = commands[i:i + BATCH_COMMANDS]
            if not batch and not sync:
                return
            self._write_batch(batch, sync)

    def command(self, opcode: Opcode, sync: bool = True, **fields: int) -> None:
        """One command (fields named as in devmodel.iommu.records.COMMANDS)."""
        self.issue([encode_command(opcode, **fields)], sync)

    def _write_batch(self, batch: list[bytes], sync: bool) -> None:
        needed = len(batch) + int(sync)
        if needed > self.entries:
            raise CommandError(f"batch of {needed} commands exceeds the CMDQ")
        if self._space() < needed:
            self.recover()
            if self._space() < needed:
                raise CommandError("CMDQ full and not consuming")
        for cmd in batch:
            self._put(cmd)
            log.debug("cmdq: queued %s", _opname(cmd[0]))
        self.counters.commands += len(batch)
        sync_slot = None
        if sync:
            sync_slot = self.slot_addr(self.prod)
            if self.msi_poll:
                self._put(encode_command(Opcode.CMD_SYNC, CS=SyncCS.SIG_IRQ, MSIAddress=sync_slot,
                                         MSIData=0, MSIAttr=MSI_ATTR_OIWB, MSH=MSH_ISH))
            else:
                self._put(encode_command(Opcode.CMD_SYNC, CS=SyncCS.SIG_NONE))
            self.counters.syncs += 1
        self.mmio.write_reg(R.CMDQ_PROD, self.prod)
        self._wait(sync_slot)

    def _put(self, cmd: bytes) -> None:
        self.memory.write(self.slot_addr(self.prod), cmd)
        self.prod = (self.prod + 1) & self._mask()

    def _wait(self, sync_slot: int | None) -> None:
        """Wait for CONS to reach PROD (and the MSIPOLL word to clear), recovering errors."""
        for _ in range(MAX_RETRIES * 2 + 2):
            if self._cons() == self.prod:
                break
            self.recover()
        else:
            raise CommandError(f"CMDQ stuck at CONS={self._cons():#x} PROD={self.prod:#x}")
        if sync_slot is not None and self.msi_poll:
            word = int.from_bytes(self.memory.read(sync_slot, 4), "little")
            if word:
                # Recovery may have replaced the sync; the CONS check above still holds.
                log.debug("cmdq: MSIPOLL word at %#x still %#x (sync replaced?)", sync_slot, word)

    # ------------------------------------------------------------ errors
    def recover(self) -> bool:
        """Handle an active CMDQ_ERR (also called from the GERROR handler); True if one was."""
        gerror = self.mmio.read_reg(R.GERROR)
        gerrorn = self.mmio.read_reg(R.GERRORN)
        if not (gerror ^ gerrorn) & R.Gerror.CMDQ_ERR:
            return False
        cons = self.mmio.read_reg(R.CMDQ_CONS)
        err = (cons & R.CMDQ_CONS_ERR_MASK) >> R.CMDQ_CONS_ERR_SHIFT
        try:
            name = R.CmdqError(err).name
        except ValueError:
            name = f"CERROR_{err:#x}"
        slot = self.slot_addr(cons & self._mask())
        op, _ = decode_command(self.memory.read(slot, CMD_SIZE))
        log.warning("cmdq: %s at CONS=%#x (opcode %#04x)", name, cons & R.Q_IDX_MASK, op)
        self.counters.cmdq_errors[name] += 1
        if err == R.CmdqError.CERROR_ILL or self.counters.cmdq_errors[name] % MAX_RETRIES == 0:
            # Skip the command: a sync in its place keeps the queue's ordering semantics.
            self.memory.write(slot, encode_command(Opcode.CMD_SYNC, CS=SyncCS.SIG_NONE))
            log.warning("cmdq: command at CONS=%#x replaced by CMD_SYNC", cons & R.Q_IDX_MASK)
        self.mmio.write_reg(R.GERRORN, gerrorn ^ R.Gerror.CMDQ_ERR)
        return True


def _opname(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"opcode {opcode:#04x}"
