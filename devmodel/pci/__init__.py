"""The PCI device framework: a function model served over vfio-user.

* :mod:`devmodel.pci.function` — :class:`PciFunction` (config space, BARs, interrupts,
  reset; implements :class:`vfio_user.device.VfioUserDevice`)
* :mod:`devmodel.pci.bar` — :class:`Bar` with MMIO handlers and memfd-backed RAM areas
* :mod:`devmodel.pci.config` — :class:`ConfigSpace` (write / W1C / preserve masks)
* capabilities, one module each: :mod:`~devmodel.pci.express`, :mod:`~devmodel.pci.msix`,
  :mod:`~devmodel.pci.msi`, :mod:`~devmodel.pci.ats`, :mod:`~devmodel.pci.pasid`,
  :mod:`~devmodel.pci.pri`
* :mod:`devmodel.pci.regs` — register offsets and field names
"""

from devmodel.pci.ats import AtsCapability
from devmodel.pci.bar import Bar, BarKind, MmioRegion, RamRegion
from devmodel.pci.capability import Capability, ExtendedCapability
from devmodel.pci.config import ConfigSpace
from devmodel.pci.express import PciExpressCapability
from devmodel.pci.function import BusMasterMemory, PciFunction
from devmodel.pci.msi import MsiCapability
from devmodel.pci.msix import MsixCapability
from devmodel.pci.pasid import PasidCapability
from devmodel.pci.pri import PriCapability

__all__ = [
    "AtsCapability", "Bar", "BarKind", "BusMasterMemory", "Capability", "ConfigSpace",
    "ExtendedCapability", "MmioRegion", "MsiCapability", "MsixCapability", "PasidCapability",
    "PciExpressCapability", "PciFunction", "PriCapability", "RamRegion",
]
