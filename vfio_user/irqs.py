"""Interrupt state of one connection: eventfds and masks per IRQ index (SET_IRQS).

Validation follows Linux ``vfio_set_irqs_validate_and_prepare`` plus the vfio-user spec:
exactly one data type and one action; ``start``/``count`` inside the index's vector
count (an index with zero vectors is EINVAL); ``count == 0`` only as DATA_NONE + TRIGGER,
which disables the index; ERR and REQ take TRIGGER only; INTx, MSI and MSI-X are mutually
exclusive while enabled. DATA_EVENTFD must carry ``count`` fds, or none at all, which
de-assigns the vectors (QEMU enables MSI-X that way with every vector masked).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

from vfio_user.device import VFIO_IRQ_INFO_AUTOMASKED, IrqInfo, PciIrq
from vfio_user.protocol import (
    IRQ_SET,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_TYPE_MASK,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    IRQ_SET_DATA_TYPE_MASK,
    ProtocolError,
)

log = logging.getLogger(__name__)

_EXCLUSIVE = (PciIrq.INTX, PciIrq.MSI, PciIrq.MSIX)
#: What a write to an eventfd adds: a host-endian u64.
_EVENTFD_ONE = (1).to_bytes(8, sys.byteorder)


def _close(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass
class IrqIndexState:
    """Eventfds and mask bits of one IRQ index."""

    info: IrqInfo
    trigger: list[int | None] = field(default_factory=list)
    masked: list[bool] = field(default_factory=list)
    #: Eventfds the client asked to be signalled on mask / unmask (or, for UNMASK, the
    #: resample fd QEMU writes to unmask INTx under KVM).
    mask_fd: list[int | None] = field(default_factory=list)
    unmask_fd: list[int | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.info.count
        self.trigger = [None] * n
        self.masked = [False] * n
        self.mask_fd = [None] * n
        self.unmask_fd = [None] * n

    def close_all(self) -> list[int]:
        """Close every fd; returns the unmask fds that were being watched."""
        watched = [fd for fd in self.unmask_fd if fd is not None]
        for lst in (self.trigger, self.mask_fd, self.unmask_fd):
            for i, fd in enumerate(lst):
                _close(fd)
                lst[i] = None
        return watched


class IrqState:
    """All IRQ indexes of one connection."""

    def __init__(self, infos: list[IrqInfo], watch: Callable[[int, Callable[[], None]], None],
                 unwatch: Callable[[int], None]) -> None:
        self.indexes = [IrqIndexState(info) for info in infos]
        self.active: int | None = None  # which of INTx/MSI/MSI-X is enabled
        self._watch = watch
        self._unwatch = unwatch

    # -- server side --------------------------------------------------------------------

    def trigger(self, index: int, sub: int) -> bool:
        """Signal vector ``sub``; False if no eventfd, masked, or out of range."""
        if not 0 <= index < len(self.indexes):
            return False
        st = self.indexes[index]
        if not 0 <= sub < len(st.trigger):
            return False
        fd = st.trigger[sub]
        if fd is None or st.masked[sub]:
            return False
        try:
            os.write(fd, _EVENTFD_ONE)
        except OSError as exc:
            log.warning("IRQ %d/%d eventfd write failed: %s", index, sub, exc)
            return False
        if st.info.flags & VFIO_IRQ_INFO_AUTOMASKED:
            self._set_mask(index, sub, True)
        log.debug("IRQ %d/%d triggered", index, sub)
        return True

    def close_all(self) -> None:
        for st in self.indexes:
            for fd in st.close_all():
                self._unwatch(fd)
        self.active = None

    # -- SET_IRQS -----------------------------------------------------------------------

    def set_irqs(self, payload: bytes, fds: list[int]) -> int:
        """Apply one SET_IRQS request; returns the index changed.

        On success the fds are owned here; on ProtocolError the caller still owns them.
        """
        if len(payload) < IRQ_SET.size:
            raise ProtocolError(errno.EINVAL, "SET_IRQS payload too short")
        req = IRQ_SET.unpack(payload)
        if req.argsz < IRQ_SET.size or req.argsz != len(payload):
            raise ProtocolError(errno.EINVAL, f"SET_IRQS argsz {req.argsz} vs payload {len(payload)}")
        if req.flags & ~(IRQ_SET_DATA_TYPE_MASK | IRQ_SET_ACTION_TYPE_MASK):
            raise ProtocolError(errno.EINVAL, f"SET_IRQS unknown flags {req.flags:#x}")
        data_type = req.flags & IRQ_SET_DATA_TYPE_MASK
        action = req.flags & IRQ_SET_ACTION_TYPE_MASK
        if data_type not in (IRQ_SET_DATA_NONE, IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD):
            raise ProtocolError(errno.EINVAL, f"SET_IRQS data type {data_type:#x}")
        if action not in (IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_UNMASK, IRQ_SET_ACTION_TRIGGER):
            raise ProtocolError(errno.EINVAL, f"SET_IRQS action {action:#x}")
        if req.index >= len(self.indexes):
            raise ProtocolError(errno.EINVAL, f"SET_IRQS index {req.index}")
        st = self.indexes[req.index]
        nvec = st.info.count
        if nvec == 0 or req.start >= nvec or req.start + req.count > nvec:
            raise ProtocolError(errno.EINVAL, f"SET_IRQS start {req.start} count {req.count} "
                                              f"outside {nvec} vectors")
        if req.index in (PciIrq.ERR, PciIrq.REQ) and action != IRQ_SET_ACTION_TRIGGER:
            raise ProtocolError(errno.EINVAL, "ERR/REQ take TRIGGER only")
        if req.count == 0 and (action != IRQ_SET_ACTION_TRIGGER or data_type != IRQ_SET_DATA_NONE):
            raise ProtocolError(errno.EINVAL, "count 0 needs DATA_NONE|ACTION_TRIGGER")
        data = payload[IRQ_SET.size:]
        if data_type == IRQ_SET_DATA_BOOL and len(data) < req.count:
            raise ProtocolError(errno.EINVAL, "SET_IRQS bool data shorter than count")
        if data_type == IRQ_SET_DATA_EVENTFD:
            if fds and len(fds) != req.count:
                raise ProtocolError(errno.EINVAL, f"SET_IRQS {len(fds)} fds for count {req.count}")
        elif fds:
            raise ProtocolError(errno.EINVAL, "SET_IRQS fds without DATA_EVENTFD")
        if (req.count and action == IRQ_SET_ACTION_TRIGGER and req.index in _EXCLUSIVE
                and self.active is not None and self.active != req.index):
            raise ProtocolError(errno.EINVAL, f"IRQ index {self.active} is enabled, not {req.index}")

        if req.count == 0:
            self._disable(req.index)
            return req.index
        selected = [req.start + i for i in range(req.count)
                    if data_type != IRQ_SET_DATA_BOOL or data[i]]
        if data_type == IRQ_SET_DATA_EVENTFD:
            self._assign(req.index, action, req.start, fds if fds else [None] * req.count)
            if action == IRQ_SET_ACTION_TRIGGER and req.index in _EXCLUSIVE:
                self.active = req.index
        elif action == IRQ_SET_ACTION_TRIGGER:
            for sub in selected:
                self._signal(st.trigger[sub])
        else:
            for sub in selected:
                self._set_mask(req.index, sub, action == IRQ_SET_ACTION_MASK)
        log.debug("SET_IRQS index %d flags %#x start %d count %d fds %d", req.index, req.flags,
                  req.start, req.count, len(fds))
        return req.index

    def _disable(self, index: int) -> None:
        st = self.indexes[index]
        for fd in st.close_all():
            self._unwatch(fd)
        st.masked = [False] * st.info.count
        if self.active == index:
            self.active = None
        log.debug("IRQ index %d disabled", index)

    def _assign(self, index: int, action: int, start: int, new: list[int | None]) -> None:
        st = self.indexes[index]
        target = {IRQ_SET_ACTION_TRIGGER: st.trigger, IRQ_SET_ACTION_MASK: st.mask_fd,
                  IRQ_SET_ACTION_UNMASK: st.unmask_fd}[action]
        for i, fd in enumerate(new):
            sub = start + i
            old = target[sub]
            if old is not None:
                if action == IRQ_SET_ACTION_UNMASK:
                    self._unwatch(old)
                _close(old)
            target[sub] = fd
            if fd is not None and action == IRQ_SET_ACTION_UNMASK:
                self._watch(fd, self._unmask_cb(index, sub, fd))

    def _unmask_cb(self, index: int, sub: int, fd: int) -> Callable[[], None]:
        """The client writes this eventfd to unmask (INTx resample under KVM)."""
        def cb() -> None:
            try:
                os.read(fd, 8)
            except OSError:
                return
            self.indexes[index].masked[sub] = False
            log.debug("IRQ %d/%d unmasked by eventfd", index, sub)
        return cb

    def _set_mask(self, index: int, sub: int, masked: bool) -> None:
        st = self.indexes[index]
        if st.masked[sub] == masked:
            return
        st.masked[sub] = masked
        self._signal(st.mask_fd[sub] if masked else None)
        log.debug("IRQ %d/%d %s", index, sub, "masked" if masked else "unmasked")

    @staticmethod
    def _signal(fd: int | None) -> None:
        if fd is not None:
            try:
                os.write(fd, _EVENTFD_ONE)
            except OSError as exc:
                log.warning("eventfd write failed: %s", exc)
