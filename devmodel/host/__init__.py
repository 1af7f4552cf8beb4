"""The host kernel's SMMUv3 driver glue between the emulated SMMUv3 and iommufd.

Public entry points: :class:`HostMachine` (memory + SMMU + iommufd + driver, brought up;
``bind(sid, name) -> dev_id``, ``counters``, ``service``/``irq_fd``), :class:`HostCounters`,
and :func:`devmodel.host.scenario.make_nested_master` for a ready nested master.
Modules are named after what they drive: ``arm_smmu_v3`` (probe, bring-up, stream
table, interrupts), ``cmdq``/``eventq``/``priq``/``queue`` (the queues), ``ste``,
``stage2``, ``iommufd_driver`` (the IommuDriver iommufd calls), ``irq``, ``physmem``.
"""

from devmodel.host.arm_smmu_v3 import ArmSmmuV3, ProbeError, QueueSizes
from devmodel.host.counters import HostCounters
from devmodel.host.iommufd_driver import HostSmmuv3Driver
from devmodel.host.machine import HostMachine

__all__ = ["ArmSmmuV3", "HostCounters", "HostMachine", "HostSmmuv3Driver", "ProbeError",
           "QueueSizes"]
