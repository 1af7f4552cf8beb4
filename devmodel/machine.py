"""The whole machine behind the vfio-user sockets: endpoint + SMMU + iommufd + vIOMMU.

This module is the VMM process's wiring, the only place that sees every layer:

* the *host* (:class:`~devmodel.host.machine.HostMachine`): emulated SMMUv3, simulated
  iommufd and the host SMMUv3 driver. Its "user memory" is guest RAM, reached through
  the vfio-user client's DMA (:class:`GuestRam`) at user VA ``USER_BASE + GPA``. One IOAS
  maps guest RAM (GPA ``[0, ram)``) there, as a VMM maps guest RAM for a passed-through
  device: once the client's DMA map covers it (IOAS_MAP pins, so RAM must exist), and it
  is unmapped when the client goes away;
* the *endpoint* (DMA engine) on the physical SMMU with the host StreamID
  :data:`HOST_SID` and an iommufd dev_id;
* the *vIOMMU* PCI function, which only holds iommufd ids and fds.

QEMU must place the functions at fixed slots of bus 0 (like the BDFs QEMU knows behind its
own vSMMU): the vIOMMU at :data:`VIOMMU_SLOT` and the endpoint at :data:`ENDPOINT_SLOT`, so
the endpoint's guest StreamID is its BDF, :data:`ENDPOINT_VSID`. Each model carries those
as ``qemu_properties``, and ``devmodel serve``/``run`` put them on the QEMU command line.

Deliberate simplification: the IOAS maps guest RAM as one range ``[0, ram)`` (the size
QEMU was given, below the q35 PCI hole) instead of mirroring each RAM section QEMU
announces; ranges inside it QEMU does not back (legacy VGA/BIOS holes) fault as external
aborts at the endpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from devmodel.devices.dma_engine_pci import DmaEngineFunction
from devmodel.host.machine import HostMachine
from devmodel.memory import BusError
from devmodel.pci.function import PciFunction
from devmodel.viommu.function import VIommuFunction
from vfio_user.device import MODEL_LOCK

log = logging.getLogger(__name__)

VIOMMU_SLOT = 3
ENDPOINT_SLOT = 4
ENDPOINT_VSID = ENDPOINT_SLOT << 3  # bus 0, function 0: the guest's StreamID = BDF
HOST_SID = 0x100  # the endpoint's physical StreamID (host BDF 01:00.0)
USER_BASE = 0x7F00_0000_0000
RAM_WINDOW = 4 << 30  # user VA window reserved for guest RAM
DEFAULT_RAM_MB = 1024
VEVENTQ_DEPTH = 64


class GuestRam:
    """Guest RAM at user VAs, through whichever machine function has a client attached.

    The SMMU reaches it through stage 2 (guest tables, DMA data); every access is a
    vfio-user DMA of the attached connection (direct through the shared memfd, or
    DMA_READ/WRITE messages). No client attached means no RAM: a BusError.
    """

    def __init__(self, functions: list[PciFunction], base: int = USER_BASE) -> None:
        self.functions = functions
        self.base = base

    def _dma(self, addr: int, size: int, write: bool):  # noqa: ANN202
        for f in self.functions:
            ctx = f.ctx
            if ctx is not None:
                return ctx.dma
        raise BusError(addr, size, write, "no vfio-user client attached (guest RAM unavailable)")

    def read(self, addr: int, size: int) -> bytes:
        return self._dma(addr, size, False).read(addr - self.base, size)

    def write(self, addr: int, data: bytes) -> None:
        self._dma(addr, len(data), True).write(addr - self.base, data)


@dataclass
class MachineFunction:
    """One PCI function of the machine and the bus-0 slot QEMU must give it."""

    name: str
    model: PciFunction
    slot: int


class Machine:
    """Builds and wires every layer; :attr:`functions` are what the server serves."""

    def __init__(self, ram_mb: int = DEFAULT_RAM_MB, veventq_depth: int = VEVENTQ_DEPTH) -> None:
        self.ram_size = min(ram_mb, 2048) << 20  # q35 keeps up to 2 GiB below the PCI hole
        self._ram_functions: list[PciFunction] = []
        self.ram = GuestRam(self._ram_functions)
        self.host = HostMachine(self.ram, USER_BASE, RAM_WINDOW, lock=MODEL_LOCK)
        ctx = self.host.ctx
        self.ioas_id = ctx.ioas_alloc()
        self.ram_mapped = False
        self.dev_id = self.host.bind(HOST_SID, "dma-engine", ats=True)
        self.endpoint = DmaEngineFunction(self.host.smmu, HOST_SID, self.host.memory.space)
        self.viommu = VIommuFunction(ctx, self.ioas_id, {ENDPOINT_VSID: self.dev_id},
                                     veventq_depth=veventq_depth)
        self._ram_functions += [self.endpoint, self.viommu]
        self.functions = [MachineFunction("viommu", self.viommu, VIOMMU_SLOT),
                          MachineFunction("dma_engine", self.endpoint, ENDPOINT_SLOT)]
        for f in self.functions:
            f.model.qemu_properties = {"addr": f"{f.slot:#x}.0"}
            self._watch_dma(f.model)
        log.info("machine: vIOMMU at 00:%02x.0, DMA engine at 00:%02x.0 (vSID %#x, host SID %#x, dev %d)",
                 VIOMMU_SLOT, ENDPOINT_SLOT, ENDPOINT_VSID, HOST_SID, self.dev_id)

    # --- guest RAM in the IOAS ---------------------------------------------------------
    def _watch_dma(self, model: PciFunction) -> None:
        """Follow the client's DMA map on ``model`` (the VMM's memory listener)."""
        def on_client(what: str) -> None:
            if what == "dma_changed" and not self.ram_mapped and model.ctx is not None:
                model.ctx.call_soon(self._map_ram)  # IOAS_MAP pins (touches RAM): not in the loop
            elif what == "detach" and self.ram_mapped and all(f.ctx is None for f in self._ram_functions):
                self._unmap_ram()
        model.add_client_listener(on_client)

    def _map_ram(self) -> None:
        with MODEL_LOCK:
            if self.ram_mapped:
                return
            try:
                self.host.ctx.ioas_map(self.ioas_id, USER_BASE, self.ram_size, iova=0)
            except OSError as exc:  # RAM not (fully) announced yet: try on the next DMA_MAP
                log.debug("guest RAM not mappable yet: %s", exc)
                return
            self.ram_mapped = True
            log.info("machine: guest RAM GPA 0+%#x mapped in IOAS %d", self.ram_size, self.ioas_id)

    def _unmap_ram(self) -> None:
        with MODEL_LOCK:
            self.host.ctx.ioas_unmap(self.ioas_id, 0, self.ram_size)
            self.ram_mapped = False
            log.info("machine: client gone, guest RAM unmapped from IOAS %d", self.ioas_id)

    def counters(self) -> dict[str, Any]:
        """Every layer's counters (the control socket's ``stats``)."""
        with MODEL_LOCK:
            from devmodel.devices.dma_engine_records import FaultCounter
            return {
                "endpoint": {c.name.lower(): self.endpoint.engine.count(c) for c in FaultCounter},
                "host": _plain(self.host.counters.snapshot()),
                "viommu": _plain(self.viommu.counters.snapshot()),
            }

    def close(self) -> None:
        with MODEL_LOCK:
            self.host.close()


def _plain(snapshot: Any) -> Any:
    if isinstance(snapshot, dict):
        return {str(k): _plain(v) for k, v in snapshot.items()}
    if hasattr(snapshot, "__dataclass_fields__"):
        return {k: _plain(getattr(snapshot, k)) for k in snapshot.__dataclass_fields__}
    return snapshot
