"""Host-only backends: the agent's driver logic against the real hardware models.

Never shipped to the guest (it imports the emulated SMMUv3 and the DMA engine core).
It gives the tests, and anyone without QEMU, the agent over:

* :class:`SmmuRegs` — the register interface of ``devmodel.iommu.smmu.SMMUv3`` (the same
  map the vIOMMU's BAR0 exposes), profiled like the vIOMMU (S1 only, ATS, PRI,
  SIDSIZE 16, SSIDSIZE 20, queues up to 256 entries, wired outputs instead of MSIs);
* :class:`EngineRegs` — ``dma_engine_records.Reg`` over a ``DmaEngine`` core;
* :class:`EngineConfig` — a PCI function with PCIe, ATS, PASID and PRI capabilities
  (the real ``devmodel.pci`` capability models), whose PRI/ATS state the engine uses;
* :class:`HostIrqLine` — per-vector counts fed by the models' interrupt callbacks;
* the NIC — the real ``NicFunction`` on a :class:`HostContext` (an in-process
  DeviceContext: one loop thread runs its backend reader and scheduled work under
  MODEL_LOCK) with a :class:`SocketPairBackend` wire whose peer the tests keep;
* hot-removal — :meth:`HostWorld.remove` makes an endpoint vanish the way a guest sees it
  (interrupt line hung up, registers gone: any later MMIO is counted as the SIGBUS it
  would be), :meth:`HostWorld.plug` brings one back, possibly at another vSID.

Every model entry point takes ``vfio_user.device.MODEL_LOCK`` (the one concurrency rule of
vfio_user/device.py): the agent's register accesses and the NIC's loop thread both reach
the SMMU model.

Run an agent on it: ``python -m devmodel_agent.hostsim --socket /tmp/dm.sock`` then
``DM_SOCKET=/tmp/dm.sock python -m devmodel_agent status``.
"""

from __future__ import annotations

import argparse
import collections
import errno
import logging
import os
import select
import threading
from typing import Callable

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
from vfio_user.device import MODEL_LOCK, PciIrq, PciRegion

from devmodel_agent.agent import Backends
from devmodel_agent.hw import Endpoint, Regs64Split

log = logging.getLogger(__name__)

RESERVED_BASE = 0x2000_0000
RESERVED_SIZE = 16 << 20
ENGINE_VSID = 0x20  # 00:04.0
NIC_VSID = 0x28  # 00:05.0
HOTPLUG_VSID = 0x100  # 01:00.0: behind a root port
#: What the vIOMMU advertises (interfaces: ID registers of the vIOMMU PCI function).
VIOMMU_PROFILE = R.SmmuProfile(s2p=False, msi=False, cmdqs=8, eventqs=8, priqs=8)


class SmmuRegs(Regs64Split):
    """The emulated SMMUv3's MMIO interface as :class:`~devmodel_agent.hw.Regs`."""

    def __init__(self, smmu: SMMUv3) -> None:
        self.smmu = smmu

    def read32(self, offset: int) -> int:
        with MODEL_LOCK:
            return self.smmu.read_reg(offset, 4)

    def write32(self, offset: int, value: int) -> None:
        with MODEL_LOCK:
            self.smmu.write_reg(offset, value, 4)


class HostIrqLine:
    """Per-vector counts; ``fire`` is what the models' interrupt outputs call.

    :meth:`hangup` is what a guest's devmodel_uirq file does when the function is
    unbound for removal: every wait from then on fails with ENODEV.
    """

    def __init__(self, nvec: int) -> None:
        self.nvec = nvec
        self.counts = [0] * nvec
        self._seen = list(self.counts)
        self._woken = False
        self._hung_up = False
        self._cond = threading.Condition()

    def fire(self, vector: int) -> None:
        with self._cond:
            self.counts[vector] += 1
            self._cond.notify_all()

    def wait(self, timeout: float | None) -> list[int] | None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.counts != self._seen or self._woken or self._hung_up, timeout):
                return None
            if self._hung_up:
                raise OSError(errno.ENODEV, "function was unbound (removed)")
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

    def hangup(self) -> None:
        with self._cond:
            self._hung_up = True
            self._cond.notify_all()

    def close(self) -> None:
        self.wake()


class MmioAfterRemoval(RuntimeError):
    """A register access to a removed function: in a guest, SIGBUS kills the agent."""


class RemovableRegs(Regs64Split):
    """Registers that vanish with the function; later accesses are counted and raise."""

    def __init__(self, regs, world: "HostWorld", what: str) -> None:
        self.regs = regs
        self.world = world
        self.what = what
        self.removed = False

    def _check(self, offset: int) -> None:
        if self.removed:
            self.world.mmio_after_removal += 1
            raise MmioAfterRemoval(f"{self.what}: MMIO at {offset:#x} after removal (SIGBUS in a guest)")

    def read32(self, offset: int) -> int:
        self._check(offset)
        return self.regs.read32(offset)

    def write32(self, offset: int, value: int) -> None:
        self._check(offset)
        self.regs.write32(offset, value)


class EngineRegs(Regs64Split):
    """BAR0 of the DMA engine over the engine core (ring registers applied on enable)."""

    def __init__(self, engine: DmaEngine) -> None:
        self.engine = engine
        self.base = 0
        self.cfg = 0

    def read32(self, offset: int) -> int:
        with MODEL_LOCK:
            return self._read32(offset)

    def write32(self, offset: int, value: int) -> None:
        with MODEL_LOCK:
            self._write32(offset, value)

    def _read32(self, offset: int) -> int:
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

    def _write32(self, offset: int, value: int) -> None:
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


class FunctionRegs(Regs64Split):
    """A PCI function's BAR through its region interface, as the vfio-user loop would call it."""

    def __init__(self, function: PciFunction, bar: int = 0) -> None:
        self.function = function
        self.region = PciRegion(bar)

    def read32(self, offset: int) -> int:
        with MODEL_LOCK:
            return int.from_bytes(self.function.region_read(self.region, offset, 4), "little")

    def write32(self, offset: int, value: int) -> None:
        with MODEL_LOCK:
            self.function.region_write(self.region, offset, value.to_bytes(4, "little"))


class HostContext:
    """An in-process DeviceContext: MSI-X to a :class:`HostIrqLine`, DMA to memory, and one
    loop thread that runs fd readers and ``call_soon`` work, each with MODEL_LOCK held."""

    def __init__(self, memory, irq: HostIrqLine, name: str = "hostctx") -> None:
        self.dma = memory
        self.irq = irq
        self._queue: collections.deque[Callable[[], None]] = collections.deque()
        self._readers: dict[int, Callable[[], None]] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # --- DeviceContext ---------------------------------------------------------------------
    def trigger_irq(self, index: int, subindex: int = 0) -> bool:
        if index != PciIrq.MSIX or not 0 <= subindex < self.irq.nvec:
            return False
        self.irq.fire(subindex)
        return True

    def call_soon(self, fn: Callable[[], None]) -> None:
        self._queue.append(fn)
        self._wake()

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        with self._lock:
            self._readers[fd] = callback
        self._wake()

    def remove_reader(self, fd: int) -> None:
        with self._lock:
            self._readers.pop(fd, None)
        self._wake()

    # --- loop --------------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _loop(self) -> None:
        while not self._stop:
            with self._lock:
                readers = dict(self._readers)
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            for fd in readers:
                poller.register(fd, select.POLLIN)
            try:
                events = poller.poll(None if not self._queue else 0)
            except OSError as e:
                log.warning("host context poll: %s", e)
                events = []
            for fd, _mask in events:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                cb = readers.get(fd)
                if cb is not None and fd in self._readers:
                    self._run(cb)
            while self._queue and not self._stop:
                self._run(self._queue.popleft())

    @staticmethod
    def _run(fn: Callable[[], None]) -> None:
        try:
            with MODEL_LOCK:
                fn()
        except Exception:  # noqa: BLE001 - a model bug must not end the loop
            log.exception("host context: device work failed")

    def close(self) -> None:
        self._stop = True
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=2)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


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
        with MODEL_LOCK:
            return int.from_bytes(self.function.region_read(PciRegion.CONFIG, offset, size), "little")

    def write(self, offset: int, value: int, size: int) -> None:
        with MODEL_LOCK:
            self.function.region_write(PciRegion.CONFIG, offset, value.to_bytes(size, "little"))


class RemovableConfig:
    """Config space that reads all-ones once the function is gone (a master abort)."""

    def __init__(self, cfg: EngineConfig, regs: RemovableRegs) -> None:
        self.cfg = cfg
        self.regs = regs

    def read(self, offset: int, size: int) -> int:
        if self.regs.removed:
            return (1 << (8 * size)) - 1
        return self.cfg.read(offset, size)

    def write(self, offset: int, value: int, size: int) -> None:
        if not self.regs.removed:
            self.cfg.write(offset, value, size)


def bdf_of(vsid: int) -> str:
    """The sysfs name of the function whose StreamID (= BDF) is ``vsid``."""
    return f"0000:{vsid >> 8:02x}:{(vsid >> 3) & 0x1F:02x}.{vsid & 7}"


class HostWorld:
    """The simulated machine behind a :class:`Backends`: memory, SMMU, endpoints, the wire."""

    def __init__(self, profile: R.SmmuProfile = VIOMMU_PROFILE) -> None:
        self.mem = ByteMemory(RESERVED_SIZE, base=RESERVED_BASE)
        self.smmu = SMMUv3(self.mem, profile)
        self.smmu_irq = HostIrqLine(4)
        for vector, source in enumerate((IrqSource.EVENTQ, IrqSource.PRIQ, IrqSource.GERROR, IrqSource.CMD_SYNC)):
            self.smmu.connect_irq(source, lambda v=vector: self.smmu_irq.fire(v))
        self.endpoints: dict[str, Endpoint] = {}
        self._removable: dict[str, RemovableRegs] = {}
        self.contexts: list[HostContext] = []
        self.mmio_after_removal = 0
        self.engine: DmaEngine | None = None
        self.function: EngineFunction | None = None
        self.engine_irq: HostIrqLine | None = None
        self.nic_function = None
        self.wire = None  # the NIC's SocketPairBackend; tests play the network on its peer
        self.backends: Backends | None = None

    # --- endpoints ------------------------------------------------------------------------
    def plug(self, kind: str, vsid: int | None = None) -> Endpoint:
        """Put a fresh ``kind`` function on the bus at ``vsid`` (default: its fixed slot)."""
        if kind == "engine":
            ep = self._engine(ENGINE_VSID if vsid is None else vsid)
        elif kind == "nic":
            ep = self._nic(NIC_VSID if vsid is None else vsid)
        else:
            raise ValueError(f"no endpoint kind {kind!r}")
        self.endpoints[kind] = ep
        log.info("hostsim: %s plugged at %s (vSID %#x)", kind, ep.bdf, ep.vsid)
        return ep

    def remove(self, kind: str) -> None:
        """Hot-remove ``kind``: its interrupt line hangs up and its registers vanish."""
        ep = self.endpoints.pop(kind)
        self._removable.pop(kind).removed = True
        ep.irq.hangup()
        if kind == "nic" and self.nic_function is not None:
            # Off the bus: the function no longer sees the wire, its loop thread ends.
            self.nic_function.set_backend(None)
            ctx = self.nic_function.ctx
            with MODEL_LOCK:
                self.nic_function.detach()
            if ctx in self.contexts:
                self.contexts.remove(ctx)
                ctx.close()
        log.info("hostsim: %s at %s removed", kind, ep.bdf)

    def discover(self, kind: str) -> Endpoint | None:
        return self.endpoints.get(kind)

    def _wrap(self, kind: str, vsid: int, regs, irq: HostIrqLine, cfg, on_close=lambda: None) -> Endpoint:
        bdf = bdf_of(vsid)
        removable = RemovableRegs(regs, self, f"{kind} {bdf}")
        self._removable[kind] = removable
        return Endpoint(kind, bdf, vsid, removable, irq, RemovableConfig(cfg, removable),
                        present=lambda: not removable.removed, close=on_close)

    def _engine(self, vsid: int) -> Endpoint:
        function = EngineFunction()
        irq = HostIrqLine(2)
        engine = DmaEngine(self.smmu, vsid, self.mem, pri=function.pri, ats=function.ats, interrupt=irq.fire)
        self.engine, self.function, self.engine_irq = engine, function, irq
        return self._wrap("engine", vsid, EngineRegs(engine), irq, EngineConfig(function))

    def _nic(self, vsid: int) -> Endpoint:
        from devmodel.devices.nic_pci import NicFunction
        from devmodel.devices.packet_backend import SocketPairBackend
        if self.wire is None:
            self.wire = SocketPairBackend()
        irq = HostIrqLine(3)
        ctx = HostContext(self.mem, irq, name=f"nic-{vsid:#x}")
        self.contexts.append(ctx)
        with MODEL_LOCK:
            function = NicFunction(self.smmu, vsid, self.mem, backend=self.wire)
            # What the guest kernel's devmodel_uirq does at bind: MSI-X on (pci_alloc_irq_vectors).
            flags = function.msix.offset + P.PCI_MSIX_FLAGS
            ctl = int.from_bytes(function.region_read(PciRegion.CONFIG, flags, 2), "little")
            function.region_write(PciRegion.CONFIG, flags, (ctl | P.PCI_MSIX_FLAGS_ENABLE).to_bytes(2, "little"))
            function.attach(ctx)
        self.nic_function = function
        return self._wrap("nic", vsid, FunctionRegs(function, 0), irq, EngineConfig(function))

    def close(self) -> None:
        for ctx in self.contexts:
            ctx.close()
        self.contexts.clear()
        if self.wire is not None:
            self.wire.close()


def build(vsid: int = ENGINE_VSID, profile: R.SmmuProfile = VIOMMU_PROFILE, nic: bool = True) -> HostWorld:
    """Reserved RAM at the guest's address, an SMMUv3 with the vIOMMU's profile, the engine
    and (``nic``) the NIC at their fixed slots."""
    world = HostWorld(profile)
    engine = world.plug("engine", vsid)
    nic_ep = world.plug("nic") if nic else None
    world.backends = Backends(smmu_regs=SmmuRegs(world.smmu), smmu_irq=world.smmu_irq, mem=world.mem,
                              reserved_base=RESERVED_BASE, reserved_size=RESERVED_SIZE, engine=engine, nic=nic_ep,
                              discover=world.discover, close=world.close)
    return world


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
