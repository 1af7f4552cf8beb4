"""Host-only backends: the agent's driver logic against the real hardware models.

Never shipped to the guest (it imports the emulated SMMUv3 and the DMA engine core).
It gives the tests, and anyone without QEMU, the agent over:

* :class:`SmmuRegs` — the register interface of ``devmodel.iommu.smmu.SMMUv3`` (the same
  map the vIOMMU's BAR0 exposes), profiled like the vIOMMU (S1 only, ATS, PRI,
  SIDSIZE 16, SSIDSIZE 20, queues up to 256 entries, wired outputs instead of MSIs);
* :class:`EngineRegs` — ``dma_engine_records.Reg`` over a ``DmaEngine`` core;
* :class:`EngineConfig` — a PCI function with PCIe, ATS, PASID and PRI capabilities
  (the real ``devmodel.pci`` capability models), whose PRI/ATS state the engine uses;
* :class:`HostIrqLine` — per-vector counts fed by the models' interrupt callbacks.

Run an agent on it: ``python -m devmodel_agent.hostsim --socket /tmp/dm.sock`` then
``DM_SOCKET=/tmp/dm.sock python -m devmodel_agent status``.
"""

from __future__ import annotations

import argparse
import threading
from dataclasses import dataclass

from devmodel.devices.dma_engine import DmaEngine
from devmodel.devices.dma_engine_records import (CTRL_ENABLE, ENGINE_ID, QCFG_LOG2SIZE_MASK, QCFG_PASID_EN,
                                                 QCFG_PASID_MASK, QCFG_PASID_SHIFT, STATUS_ENABLED, STATUS_HALTED,
                                                 STATUS_WAIT_PRG, FaultCounter, Reg)
from devmodel.iommu import registers as R
from devmodel.iommu.irq import IrqSource
from devmodel.iommu.smmu import SMMUv3
from devmodel.memory import ByteMemory
from devmodel.pci import (AtsCapability, PasidCapability, PciExpressCapability, PciFunction, PriCapability)
from devmodel.pci import regs as P
from vfio_user.device import PciRegion

from devmodel_agent.agent import Backends
from devmodel_agent.hw import Regs64Split

RESERVED_BASE = 0x2000_0000
RESERVED_SIZE = 16 << 20
ENGINE_VSID = 0x20  # 00:04.0
#: What the vIOMMU advertises (interfaces: ID registers of the vIOMMU PCI function).
VIOMMU_PROFILE = R.SmmuProfile(s2p=False, msi=False, cmdqs=8, eventqs=8, priqs=8)


class SmmuRegs(Regs64Split):
    """The emulated SMMUv3's MMIO interface as :class:`~devmodel_agent.hw.Regs`."""

    def __init__(self, smmu: SMMUv3) -> None:
        self.smmu = smmu

    def read32(self, offset: int) -> int:
        return self.smmu.read_reg(offset, 4)

    def write32(self, offset: int, value: int) -> None:
        self.smmu.write_reg(offset, value, 4)


class HostIrqLine:
    """Per-vector counts; ``fire`` is what the models' interrupt outputs call."""

    def __init__(self, nvec: int) -> None:
        self.nvec = nvec
        self.counts = [0] * nvec
        self._seen = list(self.counts)
        self._woken = False
        self._cond = threading.Condition()

    def fire(self, vector: int) -> None:
        with self._cond:
            self.counts[vector] += 1
            self._cond.notify_all()

    def wait(self, timeout: float | None) -> list[int] | None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.counts != self._seen or self._woken, timeout):
                return None
            if self._woken:
                self._woken = False
                return None
            self._seen = list(self.counts)
            return list(self.counts)

    def wake(self) -> None:
        """Return a blocked :meth:`wait` at once (shutdown)."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def close(self) -> None:
        self.wake()


class EngineRegs(Regs64Split):
    """BAR0 of the DMA engine over the engine core (ring registers applied on enable)."""

    def __init__(self, engine: DmaEngine) -> None:
        self.engine = engine
        self.base = 0
        self.cfg = 0

    def read32(self, offset: int) -> int:
        e = self.engine
        if offset == Reg.ID:
            return ENGINE_ID
        if offset == Reg.CTRL:
            return CTRL_ENABLE if e.enabled else 0
        if offset == Reg.STATUS:
            return ((STATUS_ENABLED if e.enabled else 0) | (STATUS_HALTED if e.halted else 0)
                    | (STATUS_WAIT_PRG if e.waiting_prg else 0))
        if offset in (Reg.QUEUE_BASE, Reg.QUEUE_BASE + 4):
            return (self.base >> (32 if offset & 4 else 0)) & 0xFFFF_FFFF
        if offset == Reg.QUEUE_CFG:
            return self.cfg
        if offset == Reg.QUEUE_TAIL:
            return e.tail
        if offset == Reg.QUEUE_HEAD:
            return e.head
        index = (offset - Reg.FAULTS) // 4
        if offset >= Reg.FAULTS and offset % 4 == 0 and index < len(FaultCounter):
            return e.count(FaultCounter(index))
        return 0

    def write32(self, offset: int, value: int) -> None:
        e = self.engine
        if offset == Reg.CTRL:
            on = bool(value & CTRL_ENABLE)
            if on and not e.enabled:
                pasid = (self.cfg >> QCFG_PASID_SHIFT) & QCFG_PASID_MASK if self.cfg & QCFG_PASID_EN else None
                e.configure(self.base, self.cfg & QCFG_LOG2SIZE_MASK, pasid)
            e.set_enabled(on)
        elif offset == Reg.QUEUE_BASE:
            self.base = (self.base & ~0xFFFF_FFFF) | value
        elif offset == Reg.QUEUE_BASE + 4:
            self.base = (self.base & 0xFFFF_FFFF) | value << 32
        elif offset == Reg.QUEUE_CFG:
            self.cfg = value
        elif offset == Reg.QUEUE_TAIL:
            e.doorbell(value)


class EngineFunction(PciFunction):
    """Config space of the DMA engine function: PCIe endpoint, ATS, PASID (20 bits), PRI."""

    vendor_id = 0x1AF4
    device_id = 0x10F2
    class_code = 0x088000
    interrupt_pin = 0

    def realize(self) -> None:
        self.add_capability(PciExpressCapability())
        self.ats = self.add_ext_capability(AtsCapability())
        self.pasid = self.add_ext_capability(PasidCapability())
        self.pri = self.add_ext_capability(PriCapability(capacity=32))


class EngineConfig:
    """:class:`~devmodel_agent.hw.PciConfig` over the function's config space."""

    def __init__(self, function: PciFunction) -> None:
        self.function = function

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.function.region_read(PciRegion.CONFIG, offset, size), "little")

    def write(self, offset: int, value: int, size: int) -> None:
        self.function.region_write(PciRegion.CONFIG, offset, value.to_bytes(size, "little"))


@dataclass
class HostWorld:
    """The simulated machine behind a :class:`Backends`: memory, SMMU, engine, config."""

    mem: ByteMemory
    smmu: SMMUv3
    engine: DmaEngine
    function: EngineFunction
    smmu_irq: HostIrqLine
    engine_irq: HostIrqLine
    backends: Backends


def build(vsid: int = ENGINE_VSID, profile: R.SmmuProfile = VIOMMU_PROFILE) -> HostWorld:
    """Reserved RAM at the guest's address, an SMMUv3 with the vIOMMU's profile, the engine."""
    mem = ByteMemory(RESERVED_SIZE, base=RESERVED_BASE)
    smmu = SMMUv3(mem, profile)
    smmu_irq = HostIrqLine(4)
    for vector, source in enumerate((IrqSource.EVENTQ, IrqSource.PRIQ, IrqSource.GERROR, IrqSource.CMD_SYNC)):
        smmu.connect_irq(source, lambda v=vector: smmu_irq.fire(v))
    function = EngineFunction()
    engine_irq = HostIrqLine(2)
    engine = DmaEngine(smmu, vsid, mem, pri=function.pri, ats=function.ats, interrupt=engine_irq.fire)
    backends = Backends(smmu_regs=SmmuRegs(smmu), smmu_irq=smmu_irq, mem=mem, reserved_base=RESERVED_BASE,
                        reserved_size=RESERVED_SIZE, vsid=vsid, engine_regs=EngineRegs(engine),
                        engine_irq=engine_irq, engine_cfg=EngineConfig(function))
    return HostWorld(mem, smmu, engine, function, smmu_irq, engine_irq, backends)


def main(argv: list[str] | None = None) -> int:
    """Serve an agent over the simulated machine on a UNIX socket (foreground)."""
    from devmodel_agent.cli import run_daemon
    from devmodel_agent.cliparse import up_options
    p = argparse.ArgumentParser(prog="python -m devmodel_agent.hostsim", description=main.__doc__)
    p.add_argument("--socket", required=True)
    up_options(p)
    args = p.parse_args(argv)
    return run_daemon(args, args.socket, build().backends)


if __name__ == "__main__":
    raise SystemExit(main())
