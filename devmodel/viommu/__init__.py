"""The VMM's guest-visible vIOMMU (an SMMUv3 register interface in a PCI function).

Public entry point: :class:`VIommuFunction` (``devmodel.viommu.function``). One module
per object or queue: ``registers`` (register file, ID profile, IMPDEF counters),
``strtab`` (guest stream table and STE judgement), ``cmdq`` (guest command queue),
``eventq`` / ``priq`` / ``outq`` (guest output queues), ``veventq`` / ``fault`` (the
host's fds), ``counters``.
"""

from devmodel.viommu.counters import VIommuCounters
from devmodel.viommu.function import VIommuFunction
from devmodel.viommu.registers import (VIOMMU_EVTQ_LOST, VIOMMU_PRIQ_LOST, VIOMMU_PROFILE,
                                       VIOMMU_VEVENTQ_LOST, MsixVector)

__all__ = ["MsixVector", "VIOMMU_EVTQ_LOST", "VIOMMU_PRIQ_LOST", "VIOMMU_PROFILE",
           "VIOMMU_VEVENTQ_LOST", "VIommuCounters", "VIommuFunction"]
