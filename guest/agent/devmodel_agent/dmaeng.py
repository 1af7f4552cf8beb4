"""Driver for the DMA engine endpoint: descriptor ring, completion records, doorbell.

Registers, descriptor and completion layouts are the shared ones of
``devmodel.devices.dma_engine_records``. The ring and the completion area live in
reserved RAM and are reached by the engine through the SMMU: the ring with untagged
traffic (CD 0), each completion record with the descriptor's PASID, so the agent maps
both identity (IOVA = physical address) in CD 0 and in every PASID it uses.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from devmodel.devices.dma_engine_records import (COMPLETION, COMPLETION_SIZE, CTRL_ENABLE, DESC_SIZE, DESCRIPTOR,
                                                 ENGINE_ID, QCFG_LOG2SIZE_MASK, STATUS_ENABLED, STATUS_HALTED,
                                                 STATUS_WAIT_CREDIT, STATUS_WAIT_PRG, CompletionStatus,
                                                 DescFlags, DmaOpcode, FaultCounter, Reg)
from devmodel.iommu.bitfield import Fields

from devmodel_agent.hw import PAGE, AgentError, Allocator, Memory, Regs

log = logging.getLogger(__name__)

STATUS_BITS = ((STATUS_ENABLED, "ENABLED"), (STATUS_HALTED, "HALTED"), (STATUS_WAIT_PRG, "WAIT_PRG"),
               (STATUS_WAIT_CREDIT, "WAIT_CREDIT"))


def status_names(status: int) -> str:
    names = [name for bit, name in STATUS_BITS if status & bit]
    return "|".join(names) or "IDLE"


def completion_name(status: int) -> str:
    try:
        return CompletionStatus(status).name
    except ValueError:
        return f"UNKNOWN_{status:#x}"


@dataclass
class Job:
    """One submitted descriptor and, once written, its completion record."""

    slot: int
    op: str
    pasid: int
    src: int
    dst: int
    length: int
    completion: Fields | None = None

    @property
    def done(self) -> bool:
        return self.completion is not None


class DmaEngineDriver:
    """Ring management over the engine's BAR0 registers."""

    def __init__(self, regs: Regs, mem: Memory, alloc: Allocator, log2size: int = 6) -> None:
        self.regs = regs
        self.mem = mem
        self.alloc = alloc
        self.log2size = log2size
        self.ring = 0
        self.completions = 0
        self.tail = 0
        self.jobs: dict[int, Job] = {}

    @property
    def entries(self) -> int:
        return 1 << self.log2size

    def control_pages(self) -> list[int]:
        """Pages the engine must reach untagged (ring) or with every PASID (completions)."""
        ring = range(self.ring, self.ring + DESC_SIZE * self.entries, PAGE)
        comp = range(self.completions, self.completions + COMPLETION_SIZE * self.entries, PAGE)
        return [*ring, *comp]

    def completion_pages(self) -> list[int]:
        return list(range(self.completions, self.completions + COMPLETION_SIZE * self.entries, PAGE))

    def probe(self) -> None:
        ident = self.regs.read32(Reg.ID)
        if ident != ENGINE_ID:
            raise AgentError(errno.ENODEV, f"DMA engine ID register reads {ident:#x}, not {ENGINE_ID:#x}")

    def allocate(self) -> None:
        ring_size = DESC_SIZE * self.entries
        self.ring = self.alloc.alloc(ring_size, max(ring_size, PAGE))
        self.completions = self.alloc.alloc(COMPLETION_SIZE * self.entries)

    def start(self) -> None:
        """Disable, program the ring (IOVA = physical, no PASID), enable; the ring restarts at 0."""
        self.regs.write32(Reg.CTRL, 0)
        self.regs.write64(Reg.QUEUE_BASE, self.ring)
        self.regs.write32(Reg.QUEUE_CFG, self.log2size & QCFG_LOG2SIZE_MASK)
        self.regs.write32(Reg.QUEUE_TAIL, 0)
        self.tail = 0
        self.jobs.clear()
        self.regs.write32(Reg.CTRL, CTRL_ENABLE)
        log.info("dma engine: ring %#x (%d entries), completions %#x, status %s", self.ring, self.entries,
                 self.completions, status_names(self.status()))

    def stop(self) -> None:
        self.regs.write32(Reg.CTRL, 0)

    def status(self) -> int:
        return self.regs.read32(Reg.STATUS)

    def head(self) -> int:
        return self.regs.read32(Reg.QUEUE_HEAD)

    def fault_counters(self) -> dict[str, int]:
        return {f"eng_{c.name.lower()}": self.regs.read32(Reg.FAULTS + 4 * c) for c in FaultCounter}

    def completion_addr(self, slot: int) -> int:
        return self.completions + slot * COMPLETION_SIZE

    def submit(self, op: str, *, pasid: int, src: int = 0, dst: int = 0, length: int = 0,
               doorbell: bool = True) -> Job:
        """Write one descriptor (completion record + interrupt requested) and ring the doorbell."""
        opcode = {"copy": DmaOpcode.COPY, "fill": DmaOpcode.FILL, "nop": DmaOpcode.NOP}.get(op)
        if opcode is None:
            raise AgentError(errno.EINVAL, f"unknown DMA operation {op!r}")
        if not 0 <= length <= 0xFFFF_FFFF or not 0 <= pasid < 1 << 20:
            raise AgentError(errno.EINVAL, "length or pasid out of range")
        slot = self.tail
        if self.in_flight() >= self.entries - 1:
            raise AgentError(errno.EBUSY, f"descriptor ring full ({self.entries - 1} in flight)")
        comp = self.completion_addr(slot)
        self.mem.write(comp, bytes(COMPLETION_SIZE))
        desc = DESCRIPTOR.encode(Opcode=int(opcode), Flags=int(DescFlags.RCR | DescFlags.RCI),
                                 PASID_EN=int(pasid != 0), PASID=pasid, CompletionAddr=comp, Src=src, Dst=dst,
                                 Length=length)
        self.mem.write(self.ring + slot * DESC_SIZE, desc)
        job = Job(slot, op, pasid, src, dst, length)
        self.jobs[slot] = job
        self.tail = (slot + 1) % self.entries
        if doorbell:
            self.ring_doorbell()
        log.info("dma: slot %d %s pasid=%d src=%#x dst=%#x len=%#x", slot, op, pasid, src, dst, length)
        return job

    def ring_doorbell(self) -> None:
        self.regs.write32(Reg.QUEUE_TAIL, self.tail)

    def in_flight(self) -> int:
        return sum(1 for j in self.jobs.values() if not j.done)

    def reap(self) -> list[Job]:
        """Read the completion records of unfinished jobs; return those that completed now."""
        done = []
        for job in self.jobs.values():
            if job.done:
                continue
            raw = self.mem.read(self.completion_addr(job.slot), COMPLETION_SIZE)
            c = COMPLETION.decode(raw)
            if c.Status != CompletionStatus.NONE:
                job.completion = c
                done.append(job)
                log.info("dma: slot %d completed %s bytes=%d fault_addr=%#x", job.slot,
                         completion_name(c.Status), c.BytesCompleted, c.FaultAddr)
        return done
