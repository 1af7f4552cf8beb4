"""``HostMachine``: the host in one object, for the layers above.

It owns the SMMU's bus (host-private RAM, the user memory, the MSI doorbell), the emulated
SMMUv3, the iommufd context and the host driver, and brings the SMMU up at construction.
The VMM layer uses ``ctx`` (iommufd objects and fds) and ``bind``; endpoints use ``smmu``
(``translate``, ``page_request``, ``register_endpoint``); nobody else touches the driver.

Interrupts: ``threaded_irqs=False`` handles each SMMU interrupt inside the SMMU's MSI
write (a fault is in the vEVENTQ / FAULT fd when ``translate`` / ``page_request``
returns). With ``threaded_irqs=True`` interrupts only mark work pending and raise
``irq_fd`` (an eventfd); the owner's event loop polls it and calls :meth:`service`.
"""

from __future__ import annotations

import logging
import threading

from devmodel.host.arm_smmu_v3 import ArmSmmuV3, QueueSizes
from devmodel.host.counters import HostCounters
from devmodel.host.iommufd_driver import HostSmmuv3Driver
from devmodel.host.irq import DOORBELL_SIZE, MsiDoorbell, Vector
from devmodel.host.physmem import HOST_PRIV_BASE, HOST_PRIV_SIZE, PAGE_SIZE, HostPhysicalMemory
from devmodel.iommu.irq import IrqSource
from devmodel.iommu.registers import SmmuProfile
from devmodel.iommu.smmu import SMMUv3
from devmodel.iommufd import IommufdContext
from devmodel.memory import ByteMemory, Memory

log = logging.getLogger(__name__)

_WIRES = {Vector.EVTQ: IrqSource.EVENTQ, Vector.PRIQ: IrqSource.PRIQ,
          Vector.GERROR: IrqSource.GERROR}


class HostMachine:
    """Memory + SMMUv3 + iommufd + host SMMUv3 driver, brought up and wired together.

    ``user_memory`` is the VMM's memory (guest RAM) at user VAs ``[user_base,
    +user_size)``; a :class:`ByteMemory` supplies both itself. The same memory is the
    iommufd context's user memory, so ``IOMMU_IOAS_MAP`` of a user VA is what the SMMU
    reaches through stage 2. ``lock`` (default: a private RLock) is the one lock the
    iommufd context and the host driver take; pass ``vfio_user.device.MODEL_LOCK`` when
    device models call in, so there is a single lock and no ordering between two.
    """

    def __init__(self, user_memory: Memory | None = None, user_base: int | None = None,
                 user_size: int | None = None, *, profile: SmmuProfile | None = None,
                 host_base: int = HOST_PRIV_BASE, host_size: int = HOST_PRIV_SIZE,
                 threaded_irqs: bool = False, sizes: QueueSizes = QueueSizes(),
                 use_msi: bool = True, selftest: bool = False,
                 lock: "threading.RLock | None" = None) -> None:
        if isinstance(user_memory, ByteMemory):
            user_base = user_memory.base if user_base is None else user_base
            user_size = user_memory.size if user_size is None else user_size
        self.memory = HostPhysicalMemory(host_base, host_size)
        if user_memory is not None:
            if user_base is None or user_size is None:
                raise ValueError("user_base and user_size are needed for this memory")
            self.memory.map_user(user_base, user_size, user_memory)
        self.doorbell_base = (host_base + host_size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        self.memory.map_mmio(self.doorbell_base, DOORBELL_SIZE,
                             MsiDoorbell(self.doorbell_base, self._deliver_msi))
        self.smmu = SMMUv3(self.memory.space, profile)
        self.ctx = IommufdContext(user_memory, selftest=selftest, lock=lock)
        self.lock = self.ctx.lock
        self.hw = ArmSmmuV3(self.smmu, self.memory, self.ctx, self.smmu.set_stage2,
                            threaded_irqs=threaded_irqs, sizes=sizes,
                            doorbell_base=self.doorbell_base if use_msi else None,
                            wire_irq=self._wire)
        self.hw.reset()
        self.driver = HostSmmuv3Driver(self.hw)
        log.info("host machine up: SMMU %s, user memory %s", "MSI" if self.hw.msi else "wired",
                 f"{user_base:#x}+{user_size:#x}" if user_memory is not None else "none")

    def _deliver_msi(self, vector: int) -> None:
        self.hw.irqs.raise_irq(vector)

    def _wire(self, vector: Vector, handler) -> None:  # noqa: ANN001
        self.smmu.connect_irq(_WIRES[vector], handler)

    # --- devices ------------------------------------------------------------------
    def bind(self, endpoint_sid: int, name: str = "", ats: bool = False,
             max_pasid_log2: int = 20) -> int:
        """VFIO bind of the endpoint with StreamID ``endpoint_sid``: its dev_id."""
        with self.lock:
            master = self.hw.add_master(endpoint_sid, ats)
            dev = self.ctx.bind_device(self.driver, name, endpoint_sid,
                                       max_pasid_log2=max_pasid_log2)
            master.device = dev
            log.info("bound %s (sid %#x) as dev %d", name or "endpoint", endpoint_sid, dev.id)
            return dev.id

    def unbind(self, dev_id: int) -> None:
        """VFIO unbind: iommufd detaches (blocked STE, INVALID for pending groups)."""
        with self.lock:
            sid = self.ctx.device(dev_id).sid
            self.ctx.unbind_device(dev_id)
            self.hw.remove_master(sid)

    def flush_ioas(self, ioas_id: int) -> int:
        """Drop cached translations of every VMID whose stage 2 is that IOAS; how many.
        IOMMU_IOAS_UNMAP already does this through the driver's ``ioas_unmapped`` hook;
        kept for callers that change an IOAS behind iommufd's back."""
        with self.lock:
            vmids = [v for v, s2 in self.hw.stage2.items() if s2.ioas.id == ioas_id]
            for vmid in vmids:
                self.hw.flush_vmid(vmid)
            return len(vmids)

    # --- interrupts / status --------------------------------------------------------
    @property
    def irq_fd(self) -> int:
        """Readable when threaded interrupt work is pending (-1 in immediate mode)."""
        return self.hw.irqs.fd

    def service(self) -> int:
        """Run pending threaded interrupt handlers; how many ran."""
        with self.lock:
            return self.hw.irqs.service()

    @property
    def counters(self) -> HostCounters:
        return self.hw.counters

    def close(self) -> None:
        """Close the iommufd context (detaching everything), then disable the SMMU."""
        with self.lock:
            self.ctx.close()
            self.hw.shutdown()
