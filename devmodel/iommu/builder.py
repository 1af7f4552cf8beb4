"""Software-side helpers: build stream tables, CDs and stage-1 page tables in a Memory,
and drive an SMMU's queues the way a driver would.

Used by the tests (on a ByteMemory) and usable by any layer that plays "software" to the
emulated SMMU. Everything goes through the real record layouts and the real register
interface; nothing reaches into SMMU internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from devmodel.iommu import records as rec
from devmodel.iommu import registers as R
from devmodel.iommu.bitfield import Fields
from devmodel.iommu.records import Opcode
from devmodel.iommu.stage1 import (DESC_AF, DESC_AP_RO, DESC_AP_UNPRIV, DESC_NG, DESC_PXN, DESC_TABLE,
                                   DESC_UXN, DESC_VALID, level_shift, start_level)
from devmodel.memory import ByteMemory, Memory


class Allocator:
    """A bump allocator over a window of a memory (never frees)."""

    def __init__(self, base: int, size: int) -> None:
        self.next = base
        self.end = base + size

    def alloc(self, size: int, align: int = 4096) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise MemoryError(f"allocator exhausted: {size:#x} bytes")
        self.next = addr + size
        return addr


def ste_s1(cd_ptr: int, *, s1cdmax: int = 0, s1fmt: int = rec.S1FMT_LINEAR, s1dss: int = rec.S1DSS_SSID0,
           eats: int = rec.EATS_OFF, **extra: int) -> dict[str, int]:
    """Fields of a Linux-like stage-1 STE (Config=0b101)."""
    f = dict(V=1, Config=rec.SteConfig.S1_TRANS, S1ContextPtr=cd_ptr, S1CDMax=s1cdmax, S1Fmt=s1fmt,
             S1DSS=s1dss, S1CIR=1, S1COR=1, S1CSH=3, SHCFG=1, EATS=eats)
    f.update(extra)
    return f


def s2_fields(vmid: int, *, t0sz: int = 16, sl0: int = 2, s2r: int = 1, **extra: int) -> dict[str, int]:
    """Stage-2 fields that pass the ILLEGAL checks (4 KiB, AArch64, 48-bit IPA)."""
    f = dict(S2VMID=vmid, S2T0SZ=t0sz, S2SL0=sl0, S2TG=0, S2PS=5, S2AA64=1, S2R=s2r, S2TTB=0)
    f.update(extra)
    return f


def cd_fields(ttb0: int, *, asid: int = 1, t0sz: int = 25, a: int = 1, r: int = 1, s: int = 0,
              **extra: int) -> dict[str, int]:
    """Fields of a Linux-like CD: 4 KiB TTB0, EPD1=1, IPS=48 bits, AA64, R=A=1."""
    f = dict(V=1, T0SZ=t0sz, TG0=rec.TG0_4K, IR0=1, OR0=1, SH0=3, EPD1=1, IPS=5, AA64=1,
             A=a, R=r, S=s, ASET=1, ASID=asid, TTB0=ttb0, MAIR0=0x0404FF44)
    f.update(extra)
    return f


def _read64(mem: Memory, addr: int) -> int:
    return int.from_bytes(mem.read(addr, 8), "little")


def _write64(mem: Memory, addr: int, value: int) -> None:
    mem.write(addr, value.to_bytes(8, "little"))


@dataclass
class PageTable:
    """A stage-1 AArch64 4 KiB page table in any :class:`Memory` (tables allocated on
    demand). The guest agent's page tables build on it too."""

    mem: Memory
    alloc: Allocator
    t0sz: int = 25
    root: int = 0
    tables: dict[tuple[int, int], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.root:
            self.root = self.alloc.alloc(4096)

    @property
    def start(self) -> int:
        return start_level(64 - self.t0sz)

    def _entry_addr(self, va: int, level: int, create: bool) -> int | None:
        table = self.root
        lvl = self.start
        while lvl < level:
            addr = table + ((va >> level_shift(lvl)) & 0x1FF) * 8
            desc = _read64(self.mem, addr)
            if not desc & DESC_VALID:
                if not create:
                    return None
                nxt = self.alloc.alloc(4096)
                self.mem.write(nxt, bytes(4096))
                _write64(self.mem, addr, nxt | DESC_VALID | DESC_TABLE)
                desc = _read64(self.mem, addr)
            table = desc & ((1 << 48) - 1) & ~0xFFF
            lvl += 1
        return table + ((va >> level_shift(level)) & 0x1FF) * 8

    def map(self, va: int, pa: int, *, level: int = 3, write: bool = True, unpriv: bool = True,
            af: bool = True, uxn: bool = False, pxn: bool = False, ng: bool = True, raw: int | None = None) -> int:
        """Map one page (level 3) or block (level 1/2); return the descriptor address."""
        addr = self._entry_addr(va, level, True)
        assert addr is not None
        if raw is None:
            raw = pa | DESC_VALID | (DESC_TABLE if level == 3 else 0)
            raw |= (0 if write else DESC_AP_RO) | (DESC_AP_UNPRIV if unpriv else 0)
            raw |= (DESC_AF if af else 0) | (DESC_UXN if uxn else 0) | (DESC_PXN if pxn else 0)
            raw |= DESC_NG if ng else 0
        _write64(self.mem, addr, raw)
        return addr

    def entry(self, va: int, level: int = 3) -> tuple[int, int] | None:
        """(descriptor address, descriptor) at ``level`` for ``va``; None without tables there."""
        addr = self._entry_addr(va, level, False)
        return None if addr is None else (addr, _read64(self.mem, addr))

    def set_table_desc(self, va: int, level: int, bits_to_set: int) -> None:
        """OR attribute bits (APTable, XNTable) into the table descriptor at ``level``."""
        addr = self._entry_addr(va, level, True)
        assert addr is not None
        _write64(self.mem, addr, _read64(self.mem, addr) | bits_to_set)

    def unmap(self, va: int, level: int = 3) -> None:
        addr = self._entry_addr(va, level, False)
        if addr is not None:
            _write64(self.mem, addr, 0)


class SmmuSoftware:
    """Plays the driver: tables, queues and bring-up through the register interface."""

    def __init__(self, smmu, mem: ByteMemory, alloc: Allocator, *, sid_bits: int = 8,
                 cmdq_log2: int = 6, eventq_log2: int = 4, priq_log2: int = 4, two_level: bool = False,
                 split: int = 6) -> None:
        self.smmu = smmu
        self.mem = mem
        self.alloc = alloc
        self.sid_bits = sid_bits
        self.two_level = two_level
        self.split = split
        self.cmdq = alloc.alloc(max(16 << cmdq_log2, 4096))
        self.cmdq_log2 = cmdq_log2
        self.eventq = alloc.alloc(max(32 << eventq_log2, 4096))
        self.eventq_log2 = eventq_log2
        self.priq = alloc.alloc(max(16 << priq_log2, 4096))
        self.priq_log2 = priq_log2
        if two_level:
            self.strtab = alloc.alloc(max(8 << max(sid_bits - split, 0), 64), 4096)
        else:
            self.strtab = alloc.alloc(max(64 << sid_bits, 4096), max(64 << sid_bits, 4096))
        self.l2: dict[int, int] = {}
        self.cmd_prod = 0
        self.evt_cons = 0
        self.pri_cons = 0

    # ------------------------------------------------------------ bring-up
    def enable(self, *, smmuen: bool = True, pri: bool = True, irqs: int = 0x7, atschk: bool = False) -> None:
        """The Linux sequence of reference §1.10 (without polling: ACK is immediate)."""
        s = self.smmu
        s.write_reg(R.CR0, 0)
        s.write_reg(R.CR2, R.CR2_PTM | R.CR2_RECINVSID)
        s.write_reg(R.STRTAB_BASE, self.strtab | R.Q_BASE_HINT, 8)
        fmt = R.STRTAB_FMT_2LEVEL if self.two_level else R.STRTAB_FMT_LINEAR
        s.write_reg(R.STRTAB_BASE_CFG, self.sid_bits | self.split << R.STRTAB_CFG_SPLIT_SHIFT
                    | fmt << R.STRTAB_CFG_FMT_SHIFT)
        s.write_reg(R.CMDQ_BASE, self.cmdq | self.cmdq_log2, 8)
        s.write_reg(R.CMDQ_PROD, 0)
        s.write_reg(R.CMDQ_CONS, 0)
        cr0 = R.Cr0.CMDQEN
        s.write_reg(R.CR0, cr0)
        s.write_reg(R.EVENTQ_BASE, self.eventq | self.eventq_log2, 8)
        s.write_reg(R.EVENTQ_PROD, 0)
        s.write_reg(R.EVENTQ_CONS, 0)
        cr0 |= R.Cr0.EVENTQEN
        s.write_reg(R.CR0, cr0)
        if pri:
            s.write_reg(R.PRIQ_BASE, self.priq | self.priq_log2, 8)
            s.write_reg(R.PRIQ_PROD, 0)
            s.write_reg(R.PRIQ_CONS, 0)
            cr0 |= R.Cr0.PRIQEN
            s.write_reg(R.CR0, cr0)
        if atschk:
            cr0 |= R.Cr0.ATSCHK
            s.write_reg(R.CR0, cr0)
        s.write_reg(R.IRQ_CTRL, irqs)
        if smmuen:
            cr0 |= R.Cr0.SMMUEN
            s.write_reg(R.CR0, cr0)

    # ------------------------------------------------------------ stream table
    def ste_addr(self, sid: int, span: int | None = None) -> int:
        if not self.two_level:
            return self.strtab + sid * rec.STE_SIZE
        l1 = sid >> self.split
        if l1 not in self.l2:
            span = span if span is not None else self.split + 1
            l2 = self.alloc.alloc(64 << (span - 1), max(64 << (span - 1), 64))
            self.l2[l1] = l2
            self.mem.write(self.strtab + l1 * 8, rec.L1STD.encode(Span=span, L2Ptr=l2))
        return self.l2[l1] + (sid & ((1 << self.split) - 1)) * rec.STE_SIZE

    def write_ste(self, sid: int, fields: dict[str, int]) -> int:
        addr = self.ste_addr(sid)
        self.mem.write(addr, rec.STE.encode(fields))
        return addr

    def write_cd(self, addr: int, fields: dict[str, int]) -> None:
        self.mem.write(addr, rec.CD.encode(fields))

    def new_cd_table(self, entries: int) -> int:
        size = max(entries * rec.CD_SIZE, 64)
        return self.alloc.alloc(size, size)

    # ------------------------------------------------------------ queues
    def cmd(self, opcode: Opcode, *, doorbell: bool = True, **fields: int) -> None:
        """Append one command and (by default) ring CMDQ_PROD."""
        n = 1 << self.cmdq_log2
        self.mem.write(self.cmdq + (self.cmd_prod & (n - 1)) * rec.CMD_SIZE, rec.encode_command(opcode, **fields))
        self.cmd_prod = (self.cmd_prod + 1) & ((n << 1) - 1)
        if doorbell:
            self.smmu.write_reg(R.CMDQ_PROD, self.cmd_prod)

    def raw_cmd(self, data: bytes, doorbell: bool = True) -> None:
        n = 1 << self.cmdq_log2
        self.mem.write(self.cmdq + (self.cmd_prod & (n - 1)) * rec.CMD_SIZE, data)
        self.cmd_prod = (self.cmd_prod + 1) & ((n << 1) - 1)
        if doorbell:
            self.smmu.write_reg(R.CMDQ_PROD, self.cmd_prod)

    def sync(self, **fields: int) -> None:
        self.cmd(Opcode.CMD_SYNC, **fields)

    def _drain(self, base: int, log2: int, size: int, prod_reg: int, cons_reg: int, layout,
               cons: int, ack: bool) -> tuple[list[Fields], int]:
        prod = self.smmu.read_reg(prod_reg)
        ovflg = prod & R.Q_OVFLG
        n = 1 << log2
        mask = (n << 1) - 1
        out = []
        while (cons & mask) != (prod & mask):
            out.append(layout.decode(self.mem.read(base + (cons & (n - 1)) * size, size)))
            cons = (cons + 1) & mask
        cur = self.smmu.read_reg(cons_reg) & R.Q_OVFLG
        self.smmu.write_reg(cons_reg, cons | (ovflg if ack else cur))
        return out, cons

    def events(self, ack_overflow: bool = True) -> list[Fields]:
        """Drain the Event queue (advancing CONS, copying OVFLG into OVACKFLG)."""
        out, self.evt_cons = self._drain(self.eventq, self.eventq_log2, rec.EVENT_SIZE, R.EVENTQ_PROD,
                                         R.EVENTQ_CONS, rec.EVENT, self.evt_cons, ack_overflow)
        return out

    def page_requests(self, ack_overflow: bool = True) -> list[Fields]:
        out, self.pri_cons = self._drain(self.priq, self.priq_log2, rec.PRI_SIZE, R.PRIQ_PROD,
                                         R.PRIQ_CONS, rec.PRI, self.pri_cons, ack_overflow)
        return out


@dataclass
class S1Stream:
    """A stage-1 stream built by :func:`make_s1_stream`: one page table per CD index."""

    sid: int
    cd_table: int
    tables: dict[int, PageTable]
    ste_addr: int

    def cd_addr(self, index: int) -> int:
        return self.cd_table + index * rec.CD_SIZE


def make_s1_stream(sw: SmmuSoftware, sid: int, *, ssids: tuple[int, ...] = (), s1cdmax: int = 0,
                   eats: int = rec.EATS_OFF, cd_extra: dict[str, int] | None = None,
                   ste_extra: dict[str, int] | None = None, s1dss: int = rec.S1DSS_SSID0) -> S1Stream:
    """STE (Config=S1) + linear CD table + one page table per CD (index 0 and ``ssids``)."""
    entries = 1 << s1cdmax
    table = sw.new_cd_table(entries)
    tables = {}
    for index in (0, *ssids):
        pt = PageTable(sw.mem, sw.alloc)
        tables[index] = pt
        sw.write_cd(table + index * rec.CD_SIZE, cd_fields(pt.root, asid=index + 1 + sid * 64,
                                                           **(cd_extra or {})))
    ste = ste_s1(table, s1cdmax=s1cdmax, eats=eats, s1dss=s1dss, **(ste_extra or {}))
    addr = sw.write_ste(sid, ste)
    return S1Stream(sid, table, tables, addr)


def make_world(profile=None, mem_size: int = 1 << 24, **sw_kwargs):
    """A ByteMemory, an allocator above the first page, an SMMUv3 and its software, enabled."""
    from devmodel.iommu.smmu import SMMUv3
    mem = ByteMemory(mem_size)
    alloc = Allocator(0x10000, mem_size // 2 - 0x10000)
    smmu = SMMUv3(mem, profile)
    sw = SmmuSoftware(smmu, mem, alloc, **sw_kwargs)
    return mem, alloc, smmu, sw
