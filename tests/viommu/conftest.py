"""A guest, a VMM vIOMMU and a real host in one process.

Guest RAM is one ByteMemory: the host maps it as user memory (IOAS at IOVA = GPA), the
vIOMMU reaches it through an in-process DeviceContext (GPA view), and :class:`Guest`
plays a minimal SMMUv3 driver through BAR0 only. Endpoint faults are real: the emulated
SMMU translates with the host StreamID (``host.smmu.translate`` / ``page_request``).
"""

from __future__ import annotations

import select
from collections import deque

import pytest

from devmodel.host import HostMachine, QueueSizes
from devmodel.host.scenario import guest_view, user_memory
from devmodel.host.ste import guest_s1_ste
from devmodel.iommu import registers as R
from devmodel.iommu import records as rec
from devmodel.iommu.builder import Allocator, PageTable, cd_fields
from devmodel.pci import regs
from devmodel.viommu import VIommuFunction
from vfio_user.device import PciRegion

SID = 0x10          # physical StreamID of the endpoint
VSID = 0x20         # the guest's StreamID for it (guest BDF 00:04.0)
STRTAB = 0x20_0000
CMDQ = 0x21_0000
EVTQ = 0x22_0000
PRIQ = 0x23_0000
TABLES = 0x40_0000
STRTAB_LOG2 = 8


class InProcessContext:
    """DeviceContext over a ByteMemory: vectors recorded, call_soon queued, real fds."""

    def __init__(self, dma) -> None:  # noqa: ANN001
        self.dma = dma
        self.irqs: list[tuple[int, int]] = []
        self.work: deque = deque()
        self.readers: dict[int, object] = {}

    def trigger_irq(self, index: int, subindex: int = 0) -> bool:
        self.irqs.append((index, subindex))
        return True

    def call_soon(self, fn) -> None:  # noqa: ANN001
        self.work.append(fn)

    def add_reader(self, fd: int, callback) -> None:  # noqa: ANN001
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def pump(self) -> None:
        """Run the loop until quiet: readable fds (select on the real fds), then work."""
        for _ in range(100):
            busy = False
            if self.readers:
                ready, _, _ = select.select(list(self.readers), [], [], 0)
                for fd in ready:
                    self.readers[fd]()
                    busy = True
            while self.work:
                self.work.popleft()()
                busy = True
            if not busy:
                return
        raise AssertionError("event loop did not settle")

    def vectors(self) -> list[int]:
        return [sub for _, sub in self.irqs]


class Endpoint:
    """What the PCIe function behind SID receives (PRG responses)."""

    def __init__(self, host: HostMachine) -> None:
        self.prg: list[tuple] = []
        host.smmu.register_endpoint(SID, prg_response=lambda s, i, c: self.prg.append((s, i, c)))


class Guest:
    """A minimal guest SMMUv3 driver using only BAR0 of the vIOMMU and its own RAM."""

    def __init__(self, fn: VIommuFunction, ctx: InProcessContext, mem) -> None:  # noqa: ANN001
        self.fn, self.ctx, self.mem = fn, ctx, mem
        self.cmd_prod = 0
        self.evtq_cons = 0
        self.priq_cons = 0
        self.alloc = Allocator(TABLES, 0x20_0000)

    def rd(self, off: int, size: int = 4) -> int:
        return int.from_bytes(self.fn.region_read(PciRegion.BAR0, off, size), "little")

    def wr(self, off: int, value: int, size: int = 4) -> None:
        self.fn.region_write(PciRegion.BAR0, off, value.to_bytes(size, "little"))
        self.ctx.pump()

    def bring_up(self, evtq_log2: int = 4, priq_log2: int = 4, pri: bool = True) -> None:
        """Linux's order (smmuv3-pcie.md section 1.10)."""
        self.evtq_log2, self.priq_log2 = evtq_log2, priq_log2
        self.wr(R.CR0, 0)
        assert self.rd(R.CR0ACK) == 0
        self.wr(R.CR2, R.CR2_RECINVSID)
        self.wr(R.STRTAB_BASE, STRTAB, 8)
        self.wr(R.STRTAB_BASE_CFG, STRTAB_LOG2)
        self.wr(R.CMDQ_BASE, CMDQ | 8, 8)
        self.wr(R.CMDQ_PROD, 0)
        self.wr(R.CMDQ_CONS, 0)
        cr0 = R.Cr0.CMDQEN
        self.wr(R.CR0, cr0)
        self.wr(R.EVENTQ_BASE, EVTQ | evtq_log2, 8)
        self.wr(R.EVENTQ_PROD, 0)
        self.wr(R.EVENTQ_CONS, 0)
        cr0 |= R.Cr0.EVENTQEN
        if pri:
            self.wr(R.PRIQ_BASE, PRIQ | priq_log2, 8)
            self.wr(R.PRIQ_PROD, 0)
            self.wr(R.PRIQ_CONS, 0)
            cr0 |= R.Cr0.PRIQEN
        self.wr(R.CR0, cr0)
        self.wr(R.IRQ_CTRL, 0x7)
        self.wr(R.CR0, cr0 | R.Cr0.SMMUEN)
        assert self.rd(R.CR0ACK) == cr0 | R.Cr0.SMMUEN

    def cmd(self, opcode: rec.Opcode, doorbell: bool = True, **fields: int) -> None:
        self.raw_cmd(rec.encode_command(opcode, **fields), doorbell)

    def raw_cmd(self, data: bytes, doorbell: bool = True) -> None:
        self.mem.write(CMDQ + (self.cmd_prod & 0xFF) * rec.CMD_SIZE, data)
        self.cmd_prod = (self.cmd_prod + 1) & 0x1FF
        if doorbell:
            self.wr(R.CMDQ_PROD, self.cmd_prod)

    def sync(self) -> None:
        self.cmd(rec.Opcode.CMD_SYNC, CS=rec.SyncCS.SIG_IRQ)

    def write_ste(self, vsid: int, ste: bytes) -> None:
        self.mem.write(STRTAB + vsid * rec.STE_SIZE, ste.ljust(rec.STE_SIZE, b"\0"))

    def s1_stream(self, vsid: int = VSID, s1cdmax: int = 0) -> PageTable:
        """CD table + stage-1 table in guest RAM, STE written, CFGI_STE + SYNC."""
        pt = PageTable(self.mem, self.alloc)
        n = 1 << s1cdmax
        cd = self.alloc.alloc(rec.CD_SIZE * n, max(rec.CD_SIZE * n, 64))
        for i in range(n):
            self.mem.write(cd + i * rec.CD_SIZE, rec.CD.encode(cd_fields(pt.root, asid=vsid)))
        self.write_ste(vsid, guest_s1_ste(cd, s1cdmax=s1cdmax))
        self.cmd(rec.Opcode.CMD_CFGI_STE, StreamID=vsid, Leaf=1)
        self.sync()
        return pt

    def _drain(self, base, log2, size, prod_reg, cons_reg, cons_attr, layout, ack=True):  # noqa: ANN001
        prod = self.rd(prod_reg)
        cons = getattr(self, cons_attr)
        mask = (1 << (log2 + 1)) - 1
        out = []
        while (cons & mask) != (prod & mask):
            out.append(layout.decode(self.mem.read(base + (cons & ((1 << log2) - 1)) * size, size)))
            cons = (cons + 1) & mask
        setattr(self, cons_attr, cons)
        ov = prod & R.Q_OVFLG if ack else self.rd(cons_reg) & R.Q_OVFLG
        self.wr(cons_reg, cons | ov)
        return out

    def events(self, ack: bool = True) -> list:
        return self._drain(EVTQ, self.evtq_log2, rec.EVENT_SIZE, R.EVENTQ_PROD, R.EVENTQ_CONS,
                           "evtq_cons", rec.EVENT, ack)

    def page_requests(self, ack: bool = True) -> list:
        return self._drain(PRIQ, self.priq_log2, rec.PRI_SIZE, R.PRIQ_PROD, R.PRIQ_CONS,
                           "priq_cons", rec.PRI, ack)


def build(evtq_log2: int = 4, priq_log2: int = 4, veventq_depth: int = 64, bring_up: bool = True):
    user = user_memory()
    host = HostMachine(user, sizes=QueueSizes())
    gmem = guest_view(user)
    ctx_h = host.ctx
    dev = host.bind(SID, "dma-engine")
    ioas = ctx_h.ioas_alloc()
    ctx_h.ioas_map(ioas, user.base, user.size, iova=0)
    fn = VIommuFunction(ctx_h, ioas, {VSID: dev}, veventq_depth=veventq_depth)
    ctx = InProcessContext(gmem)
    fn.attach(ctx)
    cmd = regs.Command.MEMORY | regs.Command.MASTER
    fn.region_write(PciRegion.CONFIG, regs.PCI_COMMAND, int(cmd).to_bytes(2, "little"))
    msix = fn.msix.offset + regs.PCI_MSIX_FLAGS
    fn.region_write(PciRegion.CONFIG, msix, int(regs.PCI_MSIX_FLAGS_ENABLE).to_bytes(2, "little"))
    guest = Guest(fn, ctx, gmem)
    if bring_up:
        guest.bring_up(evtq_log2, priq_log2)
    return host, fn, ctx, guest, dev


@pytest.fixture
def world():
    host, fn, ctx, guest, dev = build()
    guest.endpoint = Endpoint(host)  # type: ignore[attr-defined]
    yield host, fn, ctx, guest
    host.close()
