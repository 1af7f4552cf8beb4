"""Object base, errno helper and the ID table (the kernel's per-context xarray).

IDs are allocated lowest-free in [1, INT_MAX] like ``xa_alloc`` with ``XA_FLAGS_ALLOC1``;
an object is reserved (its ID taken, lookups see ENOENT) until it is finalized, and a
vDEVICE whose device went away leaves a tombstone that keeps its ID until the context
closes (reference section 1.3 and 1.5.5).
"""

from __future__ import annotations

import enum
import errno
import heapq
import logging
import os
from typing import TypeVar

from devmodel.iommufd.uapi import INT_MAX

log = logging.getLogger(__name__)


def fail(err: int, why: str = "") -> OSError:
    """An OSError carrying the kernel's errno (raise the result)."""
    exc = OSError(err, os.strerror(err) + (f": {why}" if why else ""))
    return exc


class ObjType(enum.Enum):
    """``enum iommufd_object_type`` (the subset the model has)."""
    IOAS = "ioas"
    HWPT_PAGING = "hwpt_paging"
    HWPT_NESTED = "hwpt_nested"
    DEVICE = "device"
    FAULT = "fault"
    VIOMMU = "viommu"
    VDEVICE = "vdevice"
    VEVENTQ = "veventq"
    SELFTEST = "selftest"


class IommufdObject:
    """Base of every object in the table.

    ``users`` is the long-term reference count: dependent objects, attached devices and
    open fds each hold one, and IOMMU_DESTROY refuses (EBUSY) while it is non-zero.
    """

    obj_type: ObjType

    def __init__(self) -> None:
        self.id = 0
        self.users = 0
        self.finalized = False

    def destroy(self, ctx) -> None:  # noqa: ANN001 - the context type would be circular
        """Release what this object holds (references on others, queued data)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id={self.id}>"


class _Tombstone:
    """The ID of a vDEVICE destroyed with its device: not reusable until context close."""


TOMBSTONE = _Tombstone()

T = TypeVar("T", bound=IommufdObject)


class ObjectTable:
    """The context's xarray: ID allocation, reservation, lookup, removal."""

    def __init__(self) -> None:
        self._slots: dict[int, IommufdObject | _Tombstone] = {}
        self._free: list[int] = []  # min-heap of released IDs below _high
        self._high = 1  # lowest ID never handed out

    def alloc(self, obj: IommufdObject) -> int:
        """Reserve the lowest free ID for ``obj`` (not yet visible to lookups)."""
        if self._free:
            new_id = heapq.heappop(self._free)
        elif self._high <= INT_MAX:
            new_id = self._high
            self._high += 1
        else:
            raise fail(errno.ENOSPC, "object IDs exhausted")
        obj.id = new_id
        self._slots[new_id] = obj
        return new_id

    def finalize(self, obj: IommufdObject) -> None:
        obj.finalized = True
        log.debug("object %s finalized", obj)

    def release(self, obj_id: int) -> None:
        """Free an ID (abort of a reserved object, or destroy)."""
        if self._slots.pop(obj_id, None) is not None:
            heapq.heappush(self._free, obj_id)

    def tombstone(self, obj_id: int) -> None:
        self._slots[obj_id] = TOMBSTONE

    def lookup(self, obj_id: int, *types: ObjType) -> IommufdObject:
        """A finalized object of one of ``types`` (any type if none given), else ENOENT."""
        obj = self._slots.get(obj_id)
        if not isinstance(obj, IommufdObject) or not obj.finalized:
            raise fail(errno.ENOENT, f"no object {obj_id}")
        if types and obj.obj_type not in types:
            raise fail(errno.ENOENT, f"object {obj_id} is a {obj.obj_type.value}")
        return obj

    def objects(self) -> list[IommufdObject]:
        return [o for o in self._slots.values() if isinstance(o, IommufdObject)]

    def clear(self) -> None:
        self._slots.clear()
        self._free.clear()
        self._high = 1
