"""Fixtures for the DMA engine PCI function tests.

The function is driven only through its vfio-user entry points (``region_read`` /
``region_write`` of config space, BAR0 and BAR2), as a backend would drive it. Its DMA
goes through a real SMMUv3 whose tables and queues live in a ByteMemory, built by
``devmodel.iommu.builder`` playing the host driver. :class:`LocalContext` is a small real
``DeviceContext``: real eventfds for interrupts, and ``call_soon`` work that runs when
the test calls :meth:`LocalContext.run_pending` (with MODEL_LOCK held, like the worker).
No client is involved here; the vfio-user path is tested elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from devmodel.devices.dma_engine_pci import DmaEngineFunction
from devmodel.devices.dma_engine_records import (COMPLETION, COMPLETION_SIZE, CTRL_ENABLE, DESC_SIZE, DESCRIPTOR,
                                                 QCFG_PASID_EN, QCFG_PASID_SHIFT, DescFlags, FaultCounter, Reg)
from devmodel.iommu import records as rec
from devmodel.iommu.builder import make_s1_stream, make_world
from devmodel.iommu.records import Opcode
from devmodel.pci import regs
from devmodel.trace import HOPS, TRACER
from vfio_user.device import PciIrq, PciRegion
from vfio_user.loopback import LoopbackContext

SID = 0x20
PASID = 5
RING, COMPL, SRC, DST = 0x100000, 0x200000, 0x300000, 0x400000  # IOVAs in PASID 5
DATA_PA = 0x800000  # data pages are allocated from here
RING_LOG2 = 4


LocalContext = LoopbackContext  # the shared in-process DeviceContext


class RegionAccess:
    """Config-space and BAR0 accessors over whatever serves the function's regions: the
    model itself (``region_read``/``region_write``, as a backend drives it) or a vfio-user
    client (same signatures). Subclasses set :attr:`regions`."""

    regions: Any

    def cfg(self, offset: int, size: int) -> int:
        return int.from_bytes(self.regions.region_read(PciRegion.CONFIG, offset, size), "little")

    def set_cfg(self, offset: int, size: int, value: int) -> None:
        self.regions.region_write(PciRegion.CONFIG, offset, value.to_bytes(size, "little"))

    def reg(self, offset: int, size: int = 4) -> int:
        return int.from_bytes(self.regions.region_read(PciRegion.BAR0, offset, size), "little")

    def set_reg(self, offset: int, value: int, size: int = 4) -> None:
        self.regions.region_write(PciRegion.BAR0, offset, value.to_bytes(size, "little"))


class Rig(RegionAccess):
    """SMMU world + DMA engine function + the test playing host driver and guest driver."""

    def __init__(self) -> None:
        self.mem, self.alloc, self.smmu, self.sw = make_world()
        self.sw.enable()
        self.stream = make_s1_stream(self.sw, SID, ssids=(PASID,), s1cdmax=3, eats=rec.EATS_FULL)
        self.pt = self.stream.tables[PASID]
        self.next_pa = DATA_PA
        self.dev = DmaEngineFunction(self.smmu, SID, self.mem)
        self.regions = self.dev
        self.ctx = LocalContext(self.mem)
        for vector in range(2):
            self.ctx.install_eventfd(PciIrq.MSIX, vector)
        self.dev.attach(self.ctx)
        self.slot = 0
        self.map(RING)
        self.map(COMPL)

    # --- config space / BAR access ------------------------------------------------------
    def fault_counter(self, which: FaultCounter) -> int:
        return self.reg(Reg.FAULTS + 4 * which)

    # --- guest driver --------------------------------------------------------------------
    def bring_up(self, *, msix: bool = True, ats: bool = False, pri: bool = False, allocation: int = 32) -> None:
        """Memory + Bus Master, MSI-X, optional ATS/PRI, ring programmed and engine enabled."""
        self.set_cfg(regs.PCI_COMMAND, 2, regs.Command.MEMORY | regs.Command.MASTER)
        if msix:
            self.set_cfg(self.dev.msix.offset + regs.PCI_MSIX_FLAGS, 2, regs.PCI_MSIX_FLAGS_ENABLE)
        if ats:
            self.set_cfg(self.dev.ats.offset + regs.PCI_ATS_CTRL, 2, regs.PCI_ATS_CTRL_ENABLE)
        if pri:
            self.enable_pri(allocation)
        self.set_reg(Reg.QUEUE_BASE, RING, 8)
        self.set_reg(Reg.QUEUE_CFG, RING_LOG2 | PASID << QCFG_PASID_SHIFT | QCFG_PASID_EN)
        self.set_reg(Reg.CTRL, CTRL_ENABLE)

    def enable_pri(self, allocation: int = 32) -> None:
        o = self.dev.pri.offset
        self.set_cfg(o + regs.PCI_PRI_ALLOC_REQ, 4, allocation)
        self.set_cfg(o + regs.PCI_PRI_CTRL, 2, regs.PCI_PRI_CTRL_ENABLE)

    def pri_status(self) -> int:
        return self.cfg(self.dev.pri.offset + regs.PCI_PRI_STATUS, 2)

    def map(self, va: int, write: bool = True) -> int:
        pa = self.next_pa
        self.next_pa += 0x1000
        self.pt.map(va, pa, write=write)
        return pa

    def pa_of(self, va: int) -> int:
        r = self.smmu.translate(SID, PASID, va)
        assert r.ok, r.fault
        return r.pa

    def submit(self, opcode: int, src: int, dst: int, length: int,
               flags: int = DescFlags.RCR | DescFlags.RCI, run: bool = True) -> None:
        """Write a descriptor into the ring, ring the doorbell, and (by default) let the engine run."""
        desc = DESCRIPTOR.encode(Opcode=opcode, Flags=int(flags), PASID_EN=1, PASID=PASID,
                                 CompletionAddr=COMPL + self.slot * COMPLETION_SIZE, Src=src, Dst=dst, Length=length)
        self.mem.write(self.pa_of(RING + self.slot * DESC_SIZE), desc)
        self.slot += 1
        self.set_reg(Reg.QUEUE_TAIL, self.slot)
        if run:
            self.ctx.run_pending()

    def completion(self, slot: int | None = None):
        slot = self.slot - 1 if slot is None else slot
        return COMPLETION.decode(self.mem.read(self.pa_of(COMPL + slot * COMPLETION_SIZE), COMPLETION_SIZE))

    # --- host driver ---------------------------------------------------------------------
    def respond(self, req, code: int) -> None:
        """CMD_PRI_RESP for a drained PRIQ record; the engine handles it on its worker."""
        self.sw.cmd(Opcode.CMD_PRI_RESP, StreamID=SID, SSV=req.SSV, SubstreamID=req.SubstreamID,
                    PRGIndex=req.PRGIndex, Resp=code)
        self.ctx.run_pending()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.ctx.close()
    r.dev.close()


# --- fault traces (devmodel.trace): shared by the engine and NIC trace tests -------------

@pytest.fixture
def t0() -> int:
    """The trace clock before the test acts: faults born after it are this test's."""
    assert TRACER.enabled
    return TRACER.clock()


def only_fault(t0: int) -> int:
    faults = TRACER.faults(since=t0)
    assert len(faults) == 1, [TRACER.events(f) for f in faults]
    return faults[0]


def hops(fid: int) -> list[str]:
    evs = TRACER.events(fid)
    assert all(e.hop in HOPS for e in evs)
    return [e.hop for e in evs]


def detail(fid: int, hop: str) -> dict:
    (ev,) = [e for e in TRACER.events(fid) if e.hop == hop]
    return ev.detail
