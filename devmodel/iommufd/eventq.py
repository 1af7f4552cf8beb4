"""FAULT and vEVENTQ objects (``drivers/iommu/iommufd/eventq.c``) and their fds.

Each queue owns a real eventfd that user space polls. The eventfd counter is kept at 1
exactly while the kernel's poll would report EPOLLIN (FAULT: groups waiting to be read;
vEVENTQ: any entry, a lone lost-events header included) and at 0 otherwise, so
select/poll/epoll on it behave like on the kernel's anon-inode file. Data moves only through
``IommufdContext.read``/``write`` (never ``os.read`` the eventfd).
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from devmodel.iommufd.iopf import IopfGroup
from devmodel.trace import TRACER
from devmodel.iommufd.objects import IommufdObject, ObjType, fail
from devmodel.iommufd.uapi import (
    INT_MAX,
    IOMMU_PAGE_RESP_INVALID,
    IOMMU_VEVENTQ_FLAG_LOST_EVENTS,
    IOMMU_VEVENTQ_TYPE_DEFAULT,
    IOMMUFD_PAGE_RESP_INVALID,
    IOMMUFD_PAGE_RESP_SUCCESS,
    PAGE_RESPONSE_SIZE,
    PGFAULT_SIZE,
    U32_MAX,
    VEVENT_HEADER_SIZE,
    ffi,
    pack,
    new,
)

if TYPE_CHECKING:
    from devmodel.iommufd.device import AttachHandle
    from devmodel.iommufd.main import IommufdContext
    from devmodel.iommufd.viommu import Viommu

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")  # struct iommufd_vevent_header {flags, sequence}
_RESPONSE = struct.Struct("<II")  # struct iommu_hwpt_page_response {cookie, code}
assert _HEADER.size == VEVENT_HEADER_SIZE == ffi.sizeof("struct iommufd_vevent_header")
assert _RESPONSE.size == PAGE_RESPONSE_SIZE == ffi.sizeof("struct iommu_hwpt_page_response")


class ReadyFd:
    """An eventfd whose counter is 1 while the queue is readable and 0 otherwise.

    An eventfd is always writable, which is what a FAULT fd reports (EPOLLOUT always).
    """

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._raised = False

    def update(self, readable: bool) -> None:
        if readable and not self._raised:
            os.eventfd_write(self.fd, 1)
            self._raised = True
        elif not readable and self._raised:
            try:
                os.eventfd_read(self.fd)
            except BlockingIOError:  # someone drained it behind our back
                pass
            self._raised = False

    def close(self) -> None:
        os.close(self.fd)


class ReadOnlyReadyFd(ReadyFd):
    """The read end of a pipe holding one byte while readable: POLLIN only, never
    POLLOUT, like the vEVENTQ file (section 3.6)."""

    def __init__(self) -> None:
        self.fd, self._wr = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._raised = False

    def update(self, readable: bool) -> None:
        if readable and not self._raised:
            os.write(self._wr, b"\0")
            self._raised = True
        elif not readable and self._raised:
            try:
                os.read(self.fd, 1)
            except BlockingIOError:
                pass
            self._raised = False

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._wr)


class EventQueue(IommufdObject):
    """``struct iommufd_eventq``: the shared base, one fd whose open file holds a user ref."""

    file_class: type[ReadyFd] = ReadyFd

    def __init__(self, ctx: "IommufdContext") -> None:
        super().__init__()
        self.ctx = ctx
        self.file: ReadyFd | None = None

    def open_file(self) -> int:
        self.file = self.file_class()
        self.users += 1
        return self.file.fd

    def close_file(self) -> None:
        """fd close: drop the file's reference only; nothing queued is answered or freed."""
        if self.file is not None:
            self.file.close()
            self.file = None
            self.users -= 1

    def readable(self) -> bool:
        raise NotImplementedError

    def _signal(self) -> None:
        if self.file is not None:
            self.file.update(self.readable())

    def read(self, count: int, offset: int = 0) -> bytes:
        raise NotImplementedError

    def write(self, data: bytes, offset: int = 0) -> int:
        raise fail(errno.EINVAL, "this file has no write operation")


class _CookieAllocator:
    """The ``response`` xarray's ID space: lowest free in [1, U32_MAX]."""

    def __init__(self) -> None:
        self._free: list[int] = []
        self._high = 1

    def alloc(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        if self._high > U32_MAX:
            raise fail(errno.EBUSY, "cookies exhausted")
        self._high += 1
        return self._high - 1

    def release(self, cookie: int) -> None:
        heapq.heappush(self._free, cookie)


@dataclass
class ResponsePolicy:
    """Fault injection on the page-response path (not a kernel feature; see ``inject.host.response``).

    ``mode`` applies to the next ``remaining`` responses written to any FAULT fd: ``pass``
    delivers them, ``drop`` loses them after the write succeeded (the device's PRG stays
    outstanding, as with a lost PRG Response Message), ``hold`` keeps them until
    :meth:`release` delivers them in order (a slow path).
    """

    mode: str = "pass"
    remaining: int = 0
    held: list = field(default_factory=list)
    dropped: int = 0
    delayed: int = 0

    def take(self) -> str:
        if self.mode == "pass" or self.remaining <= 0:
            return "pass"
        self.remaining -= 1
        if self.mode == "drop":
            self.dropped += 1
        else:
            self.delayed += 1
        return self.mode

    def release(self) -> int:
        held, self.held = self.held, []
        for group, code in held:
            group.respond(code)
        return len(held)


class Fault(EventQueue):
    """``struct iommufd_fault``: page-request groups to user space, responses back.

    No depth limit and no overflow indication (PRI is flow-controlled by the device).
    """

    obj_type = ObjType.FAULT

    def __init__(self, ctx: "IommufdContext") -> None:
        super().__init__(ctx)
        self.deliver: deque[IopfGroup] = deque()
        self.response: dict[int, IopfGroup] = {}
        self._cookies = _CookieAllocator()

    def readable(self) -> bool:
        return bool(self.deliver)

    def handle_group(self, group: IopfGroup) -> None:
        """The domain's IOPF handler: queue the group and wake pollers (never fails)."""
        self.deliver.append(group)
        TRACER.hop(group.trace, "iommufd.fault", fault_obj=self.id, dev_id=group.device.id,
                   grpid=group.last.grpid, requests=len(group.requests))
        log.info("fault %d: queued group dev=%d grpid=%#x (%d requests)", self.id,
                 group.device.id, group.last.grpid, len(group.requests))
        self._signal()

    def _record(self, group: IopfGroup, req) -> bytes:  # noqa: ANN001
        rec = new("iommu_hwpt_pgfault", flags=req.flags, dev_id=group.device.id,
                  pasid=req.pasid, grpid=req.grpid, perm=req.perm, addr=req.addr,
                  length=0, cookie=group.cookie)
        return pack(rec)

    def read(self, count: int, offset: int = 0) -> bytes:
        """Whole groups of 40-byte records; a cookie per group; never blocks (section 2.3)."""
        if offset != 0 or count % PGFAULT_SIZE:
            raise fail(errno.ESPIPE, "fault reads are whole iommu_hwpt_pgfault records")
        out = bytearray()
        while self.deliver:
            group = self.deliver[0]
            if len(out) + len(group.requests) * PGFAULT_SIZE > count:
                break  # never split a group; it stays at the head
            self.deliver.popleft()
            group.cookie = self._cookies.alloc()
            self.response[group.cookie] = group
            TRACER.link(("fault", self.id, group.cookie), group.trace)
            for req in group.requests:
                out += self._record(group, req)
            log.info("fault %d: delivered grpid=%#x cookie=%d", self.id, group.last.grpid,
                     group.cookie)
        self._signal()
        return bytes(out)

    def write(self, data: bytes, offset: int = 0) -> int:
        """Responses ``{cookie, code}``; stops at the first bad entry (section 2.5)."""
        if offset != 0 or len(data) % PAGE_RESPONSE_SIZE:
            raise fail(errno.ESPIPE, "fault writes are whole iommu_hwpt_page_response records")
        done = 0
        error: OSError | None = None
        for pos in range(0, len(data), PAGE_RESPONSE_SIZE):
            cookie, code = _RESPONSE.unpack_from(data, pos)
            if code not in (IOMMUFD_PAGE_RESP_SUCCESS, IOMMUFD_PAGE_RESP_INVALID):
                error = fail(errno.EINVAL, f"response code {code}")
                break
            group = self.response.pop(cookie, None)
            if group is None:
                error = fail(errno.EINVAL, f"cookie {cookie} is not awaiting a response")
                break
            self._cookies.release(cookie)
            done += PAGE_RESPONSE_SIZE
            action = self.ctx.response_policy.take()
            TRACER.hop(group.trace, "iommufd.response", fault_obj=self.id, cookie=cookie, code=code,
                       **({"injected": action} if action != "pass" else {}))
            log.info("fault %d: response cookie=%d code=%d%s", self.id, cookie, code,
                     "" if action == "pass" else f" ({action}, injected)")
            if action == "drop":
                continue  # lost on the way to the device: its PRG stays outstanding
            if action == "hold":
                self.ctx.response_policy.held.append((group, code))
                continue
            group.respond(code)  # uAPI codes equal the kernel's SUCCESS/INVALID
        if done:
            return done
        if error is not None:
            raise error
        return 0

    def auto_respond(self, handle: "AttachHandle") -> int:
        """Answer INVALID every group of ``handle`` (detach/replace, section 2.8)."""
        n = 0
        for group in [g for g in self.deliver if g.handle is handle]:
            self.deliver.remove(group)
            TRACER.hop(group.trace, "iommufd.response", fault_obj=self.id, code=IOMMU_PAGE_RESP_INVALID,
                       auto=True)
            group.respond(IOMMU_PAGE_RESP_INVALID)
            n += 1
        for cookie, group in [(c, g) for c, g in self.response.items() if g.handle is handle]:
            del self.response[cookie]
            self._cookies.release(cookie)
            TRACER.take(("fault", self.id, cookie))  # the reader will never see this cookie again
            TRACER.hop(group.trace, "iommufd.response", fault_obj=self.id, cookie=cookie,
                       code=IOMMU_PAGE_RESP_INVALID, auto=True)
            group.respond(IOMMU_PAGE_RESP_INVALID)
            n += 1
        if n:
            log.info("fault %d: auto-responded INVALID to %d groups of %s", self.id, n, handle)
        self._signal()
        return n

    def destroy(self, ctx: "IommufdContext") -> None:
        for group in list(self.deliver) + list(self.response.values()):
            group.respond(IOMMU_PAGE_RESP_INVALID)
        self.deliver.clear()
        self.response.clear()
        self.close_file()


class _Vevent:
    """One queued event (or the queue's single static lost-events header)."""

    __slots__ = ("data", "sequence", "lost")

    def __init__(self, data: bytes, lost: bool = False) -> None:
        self.data = data
        self.sequence = 0
        self.lost = lost


class Veventq(EventQueue):
    """``struct iommufd_veventq``: at most ``depth`` events plus one trailing lost header."""

    obj_type = ObjType.VEVENTQ
    file_class = ReadOnlyReadyFd

    def __init__(self, ctx: "IommufdContext", viommu: "Viommu", qtype: int, depth: int) -> None:
        super().__init__(ctx)
        self.viommu = viommu
        self.type = qtype
        self.depth = depth
        self.entries: deque[_Vevent] = deque()
        self.num_events = 0
        self.sequence = 0
        self.lost_header = _Vevent(b"", lost=True)
        #: Fault injection: the next N reports fail their allocation (-ENOMEM, lost).
        self.fail_allocs = 0
        self.reported = 0
        self.lost_full = 0
        self.lost_nomem = 0

    def readable(self) -> bool:
        return bool(self.entries)

    def report(self, data: bytes, trace: int = 0) -> int:
        """The locked part of ``iommufd_viommu_report_event`` (section 3.3); 0 or -ENOMEM.
        ``trace`` (a fault id) is linked to the record's ``("veventq", id, sequence)``,
        lost events included (the reader accounts for them by sequence)."""
        self.reported += 1
        rc = 0
        if self.num_events == self.depth:
            ev, self.lost_full = self.lost_header, self.lost_full + 1
        elif self.fail_allocs > 0:
            self.fail_allocs -= 1
            ev, self.lost_nomem, rc = self.lost_header, self.lost_nomem + 1, -errno.ENOMEM
        else:
            ev = _Vevent(bytes(data))
            self.num_events += 1
        self._enqueue(ev)
        seq = (self.sequence - 1) & INT_MAX  # the number this report consumed
        if ev.lost:
            TRACER.hop(trace, "iommufd.lost", veventq=self.id, seq=seq,
                       reason="nomem" if rc else "full")
        else:
            TRACER.hop(trace, "iommufd.veventq", veventq=self.id, seq=seq)
        TRACER.link(("veventq", self.id, seq), trace)
        log.info("veventq %d: %s seq=%d", self.id, "LOST" if ev.lost else "event", seq)
        return rc

    def _enqueue(self, ev: _Vevent) -> None:
        if self.entries and self.entries[-1] is self.lost_header:
            self.entries.pop()
        self.entries.append(ev)
        ev.sequence = self.sequence
        self.sequence = (self.sequence + 1) & INT_MAX
        self._signal()

    def read(self, count: int, offset: int = 0) -> bytes:
        """Header+payload records, never split, lost header 8 bytes (section 3.5)."""
        if offset != 0:
            raise fail(errno.ESPIPE, "vEVENTQ reads start at offset 0")
        out = bytearray()
        while self.entries:
            ev = self.entries[0]
            room = count - len(out)
            if room < VEVENT_HEADER_SIZE:
                break
            if ev.lost:
                out += _HEADER.pack(IOMMU_VEVENTQ_FLAG_LOST_EVENTS, ev.sequence)
                self.entries.popleft()
                continue
            if room < VEVENT_HEADER_SIZE + len(ev.data):
                break
            out += _HEADER.pack(0, ev.sequence) + ev.data
            self.entries.popleft()
            self.num_events -= 1
        self._signal()
        return bytes(out)

    def destroy(self, ctx: "IommufdContext") -> None:
        self.entries.clear()
        self.num_events = 0
        if self.viommu.veventqs.get(self.type) is self:
            del self.viommu.veventqs[self.type]
        self.viommu.users -= 1
        self.close_file()


# --- ioctl handlers -------------------------------------------------------------------

def fault_alloc(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    """IOMMU_FAULT_QUEUE_ALLOC (section 1.5.3)."""
    if cmd.flags:
        raise fail(errno.EOPNOTSUPP, "fault flags")
    fault = Fault(ctx)
    ctx.table.alloc(fault)
    cmd.out_fault_id = fault.id
    cmd.out_fault_fd = ctx.install_file(fault)
    ctx.table.finalize(fault)
    log.info("fault %d allocated, fd %d", fault.id, cmd.out_fault_fd)


def veventq_alloc(ctx: "IommufdContext", cmd) -> None:  # noqa: ANN001
    """IOMMU_VEVENTQ_ALLOC, validation in the kernel's order (section 3.1)."""
    if cmd.flags or cmd.__reserved or cmd.type == IOMMU_VEVENTQ_TYPE_DEFAULT:
        raise fail(errno.EOPNOTSUPP, "veventq flags/type")
    if not cmd.veventq_depth:
        raise fail(errno.EINVAL, "veventq_depth 0")
    viommu = ctx.table.lookup(cmd.viommu_id, ObjType.VIOMMU)
    if cmd.type in viommu.veventqs:
        raise fail(errno.EEXIST, "one vEVENTQ per type per vIOMMU")
    q = Veventq(ctx, viommu, cmd.type, cmd.veventq_depth)
    ctx.table.alloc(q)
    viommu.users += 1
    viommu.veventqs[cmd.type] = q
    cmd.out_veventq_id = q.id
    cmd.out_veventq_fd = ctx.install_file(q)
    ctx.table.finalize(q)
    log.info("veventq %d (type %#x depth %d) on viommu %d, fd %d", q.id, q.type, q.depth,
             viommu.id, cmd.out_veventq_fd)


def viommu_report_event(viommu: "Viommu", qtype: int, data: bytes, trace: int = 0) -> int:
    """``iommufd_viommu_report_event``: 0 (queued or lost to a full queue), -ENOMEM
    (allocation failed, lost), -EOPNOTSUPP (no queue of that type), -EINVAL (no data)."""
    if not data:
        return -errno.EINVAL
    q = viommu.veventqs.get(qtype)
    if q is None:
        log.info("viommu %d: no vEVENTQ of type %#x, event dropped", viommu.id, qtype)
        return -errno.EOPNOTSUPP
    return q.report(data, trace)
