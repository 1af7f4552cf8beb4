"""devmodel: an IOMMU fault-path workbench.

Four layers, each its own package area (see README.md):

* hardware: :mod:`devmodel.pci`, :mod:`devmodel.iommu`, :mod:`devmodel.devices`
* host kernel: :mod:`devmodel.iommufd`, :mod:`devmodel.host`
* VMM: :mod:`devmodel.viommu`
* guest: the :mod:`guest` package (agent and harness)

The vfio-user transport lives in the top-level :mod:`vfio_user` package.
"""

__version__ = "0.1.0"
