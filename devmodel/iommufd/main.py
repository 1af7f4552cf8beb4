"""The iommufd context (``main.c``): one dispatch table, the generic size rules, fds.

``IommufdContext.ioctl(request, buf)`` is the byte-level entry point: real request numbers
(``_IO(';', nr)``), real struct bytes in a ``bytearray`` that is updated in place like the
user's struct, OSError with the kernel's errno on failure. Pointers inside structs
(``data_uptr``, ``user_va``...) address the *user memory* given to the context (the VMM's
address space); an unbacked pointer gives EFAULT. Typed wrappers for the rest of the
project are in :mod:`devmodel.iommufd.api` (mixed into the context).
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
from dataclasses import dataclass
from typing import Callable

from devmodel.iommufd import device as devmod
from devmodel.iommufd import eventq, hw_pagetable, ioas, selftest, viommu
from devmodel.iommufd.api import IommufdApi
from devmodel.iommufd.driver import IommuDriver
from devmodel.iommufd.eventq import EventQueue, ResponsePolicy, Veventq, viommu_report_event
from devmodel.iommufd.iopf import PageRequest, ResponseCallback, report_device_fault
from devmodel.iommufd.objects import IommufdObject, ObjectTable, ObjType, fail
from devmodel.iommufd.uapi import IOMMUFD_TYPE, Cmd, end_of, sizeof, unpack, pack
from devmodel.memory import BusError, ByteMemory, Memory

log = logging.getLogger(__name__)

#: Where the typed wrappers stage their argument arrays: a kernel-half address no VMM
#: memory uses, so it never shadows the caller's memory.
SCRATCH_BASE = 0xFFFF_8000_0000_0000
SCRATCH_SIZE = 1 << 20


class _UserMemory:
    """The user address space: the wrappers' scratch window over the caller's memory."""

    def __init__(self, base: Memory | None) -> None:
        self.base = base
        self.scratch = ByteMemory(SCRATCH_SIZE, base=SCRATCH_BASE)

    def _target(self, addr: int, size: int) -> Memory:
        if self.scratch.contains(addr, size):
            return self.scratch
        if self.base is None:
            raise BusError(addr, size, False, "no user memory")
        return self.base

    def read(self, addr: int, size: int) -> bytes:
        return self._target(addr, size).read(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        self._target(addr, len(data)).write(addr, data)


@dataclass(frozen=True)
class Op:
    """One dispatch-table row: struct, last required field (min size), handler."""

    struct: str
    last_required: str
    handler: Callable

    @property
    def min_size(self) -> int:
        return end_of(self.struct, self.last_required)


def _destroy(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    """IOMMU_DESTROY: ENOENT (missing, reserved, tombstone), EBUSY (still used)."""
    obj = ctx.table.lookup(cmd.id)
    if obj.users > 0:
        raise fail(errno.EBUSY, f"object {cmd.id} has {obj.users} users")
    ctx.remove(obj)


def _get_hw_info(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    if cmd.flags & ~1 or any(cmd.__reserved):
        raise fail(errno.EOPNOTSUPP, "hw_info flags")
    idev = ctx.table.lookup(cmd.dev_id, ObjType.DEVICE)
    data = idev.driver.hw_info(idev)
    n = min(cmd.data_len, len(data))
    if cmd.data_len:
        ctx.write_user(cmd.data_uptr, data[:n] + bytes(cmd.data_len - n))
    cmd.data_len = n
    cmd.out_data_type = idev.driver.hw_info_type
    cmd.out_max_pasid_log2 = idev.max_pasid_log2
    cmd.out_capabilities = 0


def _hwpt_lookup_only(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    ctx.table.lookup(cmd.hwpt_id, ObjType.HWPT_PAGING)
    raise fail(errno.EOPNOTSUPP, "dirty tracking not modelled")


def _not_modelled(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    raise fail(errno.EOPNOTSUPP, "not modelled")


OPS: dict[int, Op] = {
    Cmd.DESTROY: Op("iommu_destroy", "id", _destroy),
    Cmd.IOAS_ALLOC: Op("iommu_ioas_alloc", "out_ioas_id", ioas.ioas_alloc),
    Cmd.IOAS_ALLOW_IOVAS: Op("iommu_ioas_allow_iovas", "allowed_iovas", ioas.ioas_lookup_only),
    Cmd.IOAS_COPY: Op("iommu_ioas_copy", "src_iova", ioas.ioas_lookup_only),
    Cmd.IOAS_IOVA_RANGES: Op("iommu_ioas_iova_ranges", "out_iova_alignment", ioas.ioas_iova_ranges),
    Cmd.IOAS_MAP: Op("iommu_ioas_map", "iova", ioas.ioas_map),
    Cmd.IOAS_UNMAP: Op("iommu_ioas_unmap", "length", ioas.ioas_unmap),
    Cmd.OPTION: Op("iommu_option", "val64", _not_modelled),
    Cmd.VFIO_IOAS: Op("iommu_vfio_ioas", "__reserved", _not_modelled),
    Cmd.HWPT_ALLOC: Op("iommu_hwpt_alloc", "__reserved", hw_pagetable.hwpt_alloc),
    Cmd.GET_HW_INFO: Op("iommu_hw_info", "__reserved", _get_hw_info),
    Cmd.HWPT_SET_DIRTY_TRACKING: Op("iommu_hwpt_set_dirty_tracking", "__reserved", _hwpt_lookup_only),
    Cmd.HWPT_GET_DIRTY_BITMAP: Op("iommu_hwpt_get_dirty_bitmap", "data", _hwpt_lookup_only),
    Cmd.HWPT_INVALIDATE: Op("iommu_hwpt_invalidate", "__reserved", hw_pagetable.hwpt_invalidate),
    Cmd.FAULT_QUEUE_ALLOC: Op("iommu_fault_alloc", "out_fault_fd", eventq.fault_alloc),
    Cmd.IOAS_MAP_FILE: Op("iommu_ioas_map_file", "iova", ioas.ioas_lookup_only),
    Cmd.VIOMMU_ALLOC: Op("iommu_viommu_alloc", "out_viommu_id", viommu.viommu_alloc),
    Cmd.VDEVICE_ALLOC: Op("iommu_vdevice_alloc", "virt_id", viommu.vdevice_alloc),
    Cmd.IOAS_CHANGE_PROCESS: Op("iommu_ioas_change_process", "__reserved", _not_modelled),
    Cmd.VEVENTQ_ALLOC: Op("iommu_veventq_alloc", "out_veventq_fd", eventq.veventq_alloc),
    Cmd.HW_QUEUE_ALLOC: Op("iommu_hw_queue_alloc", "length", viommu.hw_queue_alloc),
}
TEST_OP = Op("iommu_test_cmd", "last", selftest.test_cmd)


class IommufdContext(IommufdApi):
    """One open ``/dev/iommu``: objects, fds, and the producer side for host drivers.

    ``user_memory`` is the VMM's address space that struct pointers refer to.
    ``selftest`` enables IOMMU_TEST_CMD and the mock driver (``mock_driver``).
    ``lock`` is the one re-entrant lock every entry point takes: pass the process's model
    lock (``vfio_user.device.MODEL_LOCK``) so device callbacks and host handlers share a
    single lock and no lock-order inversion between them is possible.
    """

    def __init__(self, user_memory: Memory | None = None, selftest: bool = True,
                 lock: "threading.RLock | None" = None) -> None:
        self.table = ObjectTable()
        self.response_policy = ResponsePolicy()
        self.user = _UserMemory(user_memory)
        self.selftest = selftest
        self.mock_driver = selftest_driver() if selftest else None
        self.files: dict[int, EventQueue] = {}
        self.lock = lock if lock is not None else threading.RLock()
        self.closed = False

    # --- byte-level entry point -----------------------------------------------------
    def ioctl(self, request: int, buf: bytearray | None) -> int:
        """``ioctl(iommufd, request, buf)``: 0 or OSError(errno); ``buf`` updated in place."""
        with self.lock:
            op = self._op_for(request)
            if buf is None or len(buf) < 4:
                raise fail(errno.EFAULT, "argument pointer")
            (size,) = struct.unpack_from("<I", buf, 0)
            if size > len(buf):
                raise fail(errno.EFAULT, f"struct of {size} bytes beyond the buffer")
            if size < op.min_size:
                raise fail(errno.EINVAL, f"size {size} < {op.min_size}")
            ksize = sizeof(op.struct)
            if size > ksize and any(buf[ksize:size]):
                raise fail(errno.E2BIG, "non-zero bytes past the known struct")
            cmd = unpack(op.struct, buf[: min(size, ksize)])
            n = min(size, ksize)
            try:
                op.handler(self, cmd)
            except OSError as exc:
                if getattr(exc, "copy_back", False):
                    buf[:n] = pack(cmd)[:n]
                log.debug("ioctl %#x -> %s", request, exc)
                raise
            buf[:n] = pack(cmd)[:n]
            return 0

    def _op_for(self, request: int) -> Op:
        if request >> 8 != IOMMUFD_TYPE:
            raise fail(errno.ENOTTY, f"request {request:#x}")
        nr = request & 0xFF
        if nr == Cmd.TEST and self.selftest:
            return TEST_OP
        op = OPS.get(nr)
        if op is None:
            raise fail(errno.ENOTTY, f"request {request:#x}")
        return op

    # --- fds ------------------------------------------------------------------------
    def install_file(self, q: EventQueue) -> int:
        fd = q.open_file()
        self.files[fd] = q
        return fd

    def _file(self, fd: int) -> EventQueue:
        q = self.files.get(fd)
        if q is None:
            raise fail(errno.EBADF, f"fd {fd} is not an iommufd queue")
        return q

    def read(self, fd: int, count: int, offset: int = 0) -> bytes:
        """``read()``/``pread()`` on a FAULT or vEVENTQ fd (never blocks; poll first)."""
        with self.lock:
            return self._file(fd).read(count, offset)

    def write(self, fd: int, data: bytes, offset: int = 0) -> int:
        """``write()``/``pwrite()``: page responses on a FAULT fd; EINVAL on a vEVENTQ fd."""
        with self.lock:
            return self._file(fd).write(bytes(data), offset)

    def close_fd(self, fd: int) -> None:
        """``close()``: drops the file's reference; pending groups stay unanswered."""
        with self.lock:
            q = self.files.pop(fd, None)
            if q is None:
                raise fail(errno.EBADF, f"fd {fd}")
            q.close_file()

    # --- user memory ----------------------------------------------------------------
    def read_user(self, uptr: int, size: int) -> bytes:
        """copy_from_user: EFAULT for NULL or unbacked."""
        if size == 0:
            return b""
        if uptr == 0:
            raise fail(errno.EFAULT, "NULL user pointer")
        try:
            return self.user.read(uptr, size)
        except BusError:
            raise fail(errno.EFAULT, f"user pointer {uptr:#x}+{size}") from None

    def write_user(self, uptr: int, data: bytes) -> None:
        """copy_to_user: EFAULT for NULL or unbacked."""
        if not data:
            return
        if uptr == 0:
            raise fail(errno.EFAULT, "NULL user pointer")
        try:
            self.user.write(uptr, data)
        except BusError:
            raise fail(errno.EFAULT, f"user pointer {uptr:#x}+{len(data)}") from None

    # --- object lifetime ------------------------------------------------------------
    def remove(self, obj: IommufdObject) -> None:
        """Destroy ``obj`` (its users are already zero) and free its ID."""
        log.info("destroy %s", obj)
        obj.destroy(self)
        self.table.release(obj.id)

    def abort(self, obj: IommufdObject) -> None:
        """Undo a reserved, never finalized object."""
        obj.destroy(self)
        self.table.release(obj.id)

    def try_destroy(self, obj: IommufdObject) -> None:
        if obj.users == 0:
            self.remove(obj)

    def close(self) -> None:
        """Process exit: fds closed, devices unbound, objects destroyed leaf-first."""
        with self.lock:
            if self.closed:
                return
            for fd in list(self.files):
                self.close_fd(fd)
            for dev in [o for o in self.table.objects() if o.obj_type is ObjType.DEVICE]:
                if not dev.unbinding:
                    devmod.unbind(self, dev)
            while True:
                leaves = [o for o in self.table.objects() if o.users == 0]
                if not leaves:
                    break
                for obj in leaves:
                    self.remove(obj)
            self.table.clear()
            self.closed = True

    # --- devices (the VFIO side: bind / attach) -------------------------------------
    def bind_device(self, driver: IommuDriver, name: str = "", sid: int = 0,
                    page_response: ResponseCallback | None = None,
                    max_pasid_log2: int = 20) -> devmod.Device:
        """``iommufd_device_bind``: a new idev; ``.id`` is the dev_id for every ioctl."""
        with self.lock:
            dev = devmod.Device(driver, name, sid, page_response, max_pasid_log2)
            self.table.alloc(dev)
            dev.users += 1  # the binder's pin: IOMMU_DESTROY gives EBUSY
            self.table.finalize(dev)
            log.info("bound device %d (%s, sid %#x)", dev.id, name, sid)
            return dev

    def unbind_device(self, dev_id: int) -> None:
        with self.lock:
            devmod.unbind(self, self.table.lookup(dev_id, ObjType.DEVICE))

    def attach(self, dev_id: int, pt_id: int, pasid: int = 0) -> int:
        """VFIO_DEVICE_ATTACH_IOMMUFD_PT (RID, or a PASID): returns the HWPT id."""
        with self.lock:
            dev = self.table.lookup(dev_id, ObjType.DEVICE)
            return devmod.change_pt(self, dev, pasid, pt_id, replace=False)

    def replace(self, dev_id: int, pt_id: int, pasid: int = 0) -> int:
        """Replace an attachment; the old handle's pending groups are answered INVALID."""
        with self.lock:
            dev = self.table.lookup(dev_id, ObjType.DEVICE)
            return devmod.change_pt(self, dev, pasid, pt_id, replace=True)

    def detach(self, dev_id: int, pasid: int = 0) -> None:
        with self.lock:
            devmod.detach(self, self.table.lookup(dev_id, ObjType.DEVICE), pasid)

    def device(self, dev_id: int) -> devmod.Device:
        return self.table.lookup(dev_id, ObjType.DEVICE)

    # --- producer side for host drivers ---------------------------------------------
    def report_iopf(self, dev_id: int, req: PageRequest,
                    on_response: ResponseCallback | None = None) -> int:
        """A driver's page request (io-pgfault): grouped by grpid until LAST_PAGE, queued
        on the FAULT of the handling attachment; ``on_response`` (default: the device's
        ``page_response``) gets the group's single response. 0 or negative errno."""
        with self.lock:
            dev = self.table.lookup(dev_id, ObjType.DEVICE)
            return report_device_fault(dev, req, on_response or dev.page_response)

    def viommu_report_event(self, viommu_id: int, qtype: int, data: bytes, trace: int = 0) -> int:
        """``iommufd_viommu_report_event``: 0 (queued, or lost to a full queue), -ENOMEM
        (injected allocation failure: lost), -EOPNOTSUPP (no queue of that type).
        ``trace`` is the fault id the record carries in the tracer (0: untraced)."""
        with self.lock:
            return viommu_report_event(self.table.lookup(viommu_id, ObjType.VIOMMU), qtype, data, trace)

    def veventq(self, veventq_id: int) -> Veventq:
        """The queue object (counters ``reported``/``lost_full``/``lost_nomem``)."""
        return self.table.lookup(veventq_id, ObjType.VEVENTQ)

    def inject_vevent_alloc_failures(self, veventq_id: int, count: int) -> None:
        """Make the next ``count`` reports to this queue fail their allocation."""
        with self.lock:
            self.veventq(veventq_id).fail_allocs = count


def selftest_driver() -> IommuDriver:
    return selftest.MockDriver()
