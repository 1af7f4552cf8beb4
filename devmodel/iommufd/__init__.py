"""Simulated host iommufd: the kernel's object model behind real ioctl bytes and real fds.

Public entry points: :class:`IommufdContext` (byte-level ``ioctl``/``read``/``write``,
typed wrappers, device binding, producer API for host drivers), :class:`PageRequest`,
:class:`IommuDriver` (what a host IOMMU driver plugs in) and :mod:`.uapi` (layouts).
"""

from devmodel.iommufd.driver import IommuDriver, UserArray, UserData
from devmodel.iommufd.iopf import PageRequest
from devmodel.iommufd.main import IommufdContext

__all__ = ["IommufdContext", "IommuDriver", "PageRequest", "UserArray", "UserData"]
