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
* the *NIC* (devmodel.devices.nic_pci) at slot :data:`NIC_SLOT` (vSID :data:`NIC_VSID`,
  host StreamID :data:`NIC_HOST_SID`), behind the same vIOMMU; its packet backend is
  attached at run time with :meth:`Machine.set_nic_backend` (link down until then);
* the *vIOMMU* PCI function, which only holds iommufd ids and fds.

QEMU must place the functions at fixed slots of bus 0 (like the BDFs QEMU knows behind its
own vSMMU): the vIOMMU at :data:`VIOMMU_SLOT` and the endpoint at :data:`ENDPOINT_SLOT`, so
the endpoint's guest StreamID is its BDF, :data:`ENDPOINT_VSID`. Each model carries those
as ``qemu_properties``, and ``devmodel serve``/``run`` put them on the QEMU command line
(with :attr:`Machine.qemu_args` first).

Hot-plug (``Machine(hotplug=True)``, served as ``machine-hotplug``): the endpoint sits
behind a PCIe root port (:data:`HOTPLUG_PORT` at :data:`HOTPLUG_PORT_SLOT`), so QEMU can
``device_del``/``device_add`` it; its BDF, hence its vSID, is then 01:00.0 =
:data:`HOTPLUG_VSID`, and it signals with MSI instead of MSI-X (QEMU 11.1 aborts when it
unplugs a vfio-user function with MSI-X; see ``dma_engine_pci``).

The endpoint's client is the device's presence, in both layouts: when it goes away (QEMU
unplugged the device, or quit) the VMM does what QEMU does for a departing passthrough
device: the vIOMMU detaches it and destroys its vDEVICE (the kernel answers INVALID for
every page request still outstanding) and the VFIO device is unbound; the endpoint itself
is reset, as a removed card loses its state. When a client attaches again the device is
bound anew (a new dev_id) and plugged into the vIOMMU at the same vSID.

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
from devmodel.devices.nic_pci import NicFunction
from devmodel.devices.packet_backend import PacketBackend
from devmodel.host.machine import HostMachine
from devmodel.memory import BusError
from devmodel.pci.function import PciFunction
from devmodel.viommu.function import VIommuFunction
from vfio_user.device import MODEL_LOCK

log = logging.getLogger(__name__)

VIOMMU_SLOT = 3
ENDPOINT_SLOT = 4
ENDPOINT_VSID = ENDPOINT_SLOT << 3  # bus 0, function 0: the guest's StreamID = BDF
HOTPLUG_PORT = "hp0"  # QEMU id of the root port the hot-pluggable endpoint sits behind
HOTPLUG_PORT_SLOT = 6
HOTPLUG_VSID = 1 << 8  # bus 1 (the root port's secondary bus), device 0, function 0
HOST_SID = 0x100  # the endpoint's physical StreamID (host BDF 01:00.0)
NIC_SLOT = 5
NIC_VSID = NIC_SLOT << 3
NIC_HOST_SID = 0x108  # the NIC's physical StreamID (host BDF 01:01.0)
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

    def __init__(self, ram_mb: int = DEFAULT_RAM_MB, veventq_depth: int = VEVENTQ_DEPTH,
                 hotplug: bool = False) -> None:
        self.ram_size = min(ram_mb, 2048) << 20  # q35 keeps up to 2 GiB below the PCI hole
        self._ram_functions: list[PciFunction] = []
        self.ram = GuestRam(self._ram_functions)
        self.host = HostMachine(self.ram, USER_BASE, RAM_WINDOW, lock=MODEL_LOCK)
        ctx = self.host.ctx
        self.ioas_id = ctx.ioas_alloc()
        self.ram_mapped = False
        self.hotplug = hotplug
        self.endpoint_vsid = HOTPLUG_VSID if hotplug else ENDPOINT_VSID
        self.dev_id: int | None = self.host.bind(HOST_SID, "dma-engine", ats=True)
        self.endpoint = DmaEngineFunction(self.host.smmu, HOST_SID, self.host.memory.space,
                                          irq="msi" if hotplug else "msix")
        self.nic_dev_id = self.host.bind(NIC_HOST_SID, "nic", ats=True)
        self.nic = NicFunction(self.host.smmu, NIC_HOST_SID, self.host.memory.space)
        self.viommu = VIommuFunction(ctx, self.ioas_id, {self.endpoint_vsid: self.dev_id,
                                                         NIC_VSID: self.nic_dev_id},
                                     veventq_depth=veventq_depth)
        self._ram_functions += [self.endpoint, self.viommu, self.nic]
        self.functions = [MachineFunction("viommu", self.viommu, VIOMMU_SLOT),
                          MachineFunction("dma_engine", self.endpoint, ENDPOINT_SLOT),
                          MachineFunction("nic", self.nic, NIC_SLOT)]
        #: QEMU arguments that must precede the functions' ``-device`` (the root port).
        self.qemu_args: list[str] = []
        for f in self.functions:
            f.model.qemu_properties = {"addr": f"{f.slot:#x}.0"}
            self._watch_dma(f.model)
        if hotplug:
            self.qemu_args = ["-device", f"pcie-root-port,id={HOTPLUG_PORT},bus=pcie.0,chassis=1,"
                                         f"addr={HOTPLUG_PORT_SLOT:#x}.0"]
            self.endpoint.qemu_properties = {"bus": HOTPLUG_PORT, "addr": "0x0.0"}
        self.endpoint.add_client_listener(self._endpoint_presence)
        log.info("machine: vIOMMU at 00:%02x.0, DMA engine at %s (vSID %#x, host SID %#x, dev %d)",
                 VIOMMU_SLOT, "01:00.0 behind a root port" if hotplug else f"00:{ENDPOINT_SLOT:02x}.0",
                 self.endpoint_vsid, HOST_SID, self.dev_id)

    def set_nic_backend(self, backend: PacketBackend | None) -> None:
        """Plug the NIC's cable into ``backend`` (e.g. devmodel.net's TapBackend), or pull it
        (None). The caller keeps owning the backend and closes it after pulling it."""
        with MODEL_LOCK:
            self.nic.set_backend(backend)

    # --- endpoint presence (hot-plug) -------------------------------------------------
    def _endpoint_presence(self, what: str) -> None:
        """The endpoint's client is the device's presence (loop thread: no DMA here)."""
        if what == "detach":
            self._endpoint_gone()
        elif what == "attach" and self.dev_id is None and self.endpoint.ctx is not None:
            self.endpoint.ctx.call_soon(self._endpoint_back)  # reads the guest STE: worker

    def _endpoint_gone(self) -> None:
        """Unplug as QEMU does it for a passthrough device: the vIOMMU detaches it (INVALID
        for its outstanding page requests) and destroys its vDEVICE, the device leaves the
        bus (its state is lost) and the VFIO device is unbound."""
        with MODEL_LOCK:
            if self.dev_id is None:
                return
            # Detach first: the kernel's INVALID auto-responses still find the departing
            # device's page request groups; then the device loses its state.
            abandoned = self.viommu.unplug(self.endpoint_vsid)
            self.endpoint.function_reset()
            self.host.unbind(self.dev_id)
            log.info("machine: endpoint unplugged (dev %d unbound, %d guest-visible groups abandoned)",
                     self.dev_id, abandoned)
            self.dev_id = None

    def _endpoint_back(self) -> None:
        with MODEL_LOCK:
            if self.dev_id is not None or self.endpoint.ctx is None:
                return
            self.dev_id = self.host.bind(HOST_SID, "dma-engine", ats=True)
            self.viommu.plug(self.endpoint_vsid, self.dev_id)
            log.info("machine: endpoint plugged again as dev %d at vSID %#x", self.dev_id,
                     self.endpoint_vsid)

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
                "endpoint": {**{c.name.lower(): self.endpoint.engine.count(c) for c in FaultCounter},
                             # a gauge: page request groups sent and not answered yet
                             "pri_outstanding": self.endpoint.engine.pri_outstanding},
                "nic": self.nic.counters(),
                "vmm": {"plugs": self.viommu.counters.plugs, "unplugs": self.viommu.counters.unplugs,
                        "endpoint_present": self.dev_id is not None},
                "host": _plain(self.host.counters.snapshot()),
                # a gauge too: page requests the guest was given and has not answered
                "viommu": {**_plain(self.viommu.counters.snapshot()),
                           "prgs_outstanding": self.viommu.pending.outstanding()},
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
