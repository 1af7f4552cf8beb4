"""vfio-user backend on nutanix/libvfio-user, the C reference server library, via ctypes.

Why: users who trust the reference library can run our device models on it unchanged.
:class:`LibvfioUserServer` has the public API of :class:`vfio_user.server.Server` and
drives a :class:`vfio_user.device.VfioUserDevice` through the same
:class:`vfio_user.device.DeviceContext` contract. No compiled extension: the shared
library is found at run time (``LIBVFIO_USER`` = path to it, else the usual names); the
pure-Python server stays the default backend (see :mod:`vfio_user.backend`).

How the library is driven
-------------------------
- One context per socket, created with ``LIBVFIO_USER_FLAG_ATTACH_NB`` (the library's
  non-blocking mode), PCI Express (4 KiB config space). The model owns config space: the
  config region is registered with ``VFU_REGION_FLAG_ALWAYS_CB`` so every config access
  reaches the model (its ATS/PRI/PASID capabilities behave as on our server).
- ``vfu_get_poll_fd`` is watched by our epoll loop, next to the fds device models add.
  Before a client is attached it is the listening socket: readable means "call
  ``vfu_attach_ctx``". After, it is the connection: readable means "call ``vfu_run_ctx``"
  until it has nothing left. When the client goes away the library calls the reset
  callback with ``VFU_RESET_LOST_CONN``, the poll fd reverts to the listening socket and
  the next client needs ``vfu_attach_ctx`` again.
- The library is not thread-safe; every call into it on an attached context is made with
  :data:`MODEL_LOCK` held, which also satisfies the model's locking rule in callbacks.
- DMA: the register/unregister callbacks keep a Python copy of the client's DMA map. A
  device access is split per map entry: entries with a host mapping (the client passed
  an fd) are copied directly; the others go through ``vfu_addr_to_sgl`` +
  ``vfu_sgl_read``/``vfu_sgl_write`` (DMA_READ/DMA_WRITE messages, or file I/O).

Differences from the pure-Python server are listed in docs/backends.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from devmodel.memory import BusError
from vfio_user.dma import DmaPort
from vfio_user.loop import ContextReaders, EventLoop, Worker, remove_stale_socket
from vfio_user.device import (
    MODEL_LOCK,
    VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
    DmaError,
    DmaFromHandlerError,
    PciIrq,
    PciRegion,
    VfioUserDevice,
)

log = logging.getLogger(__name__)

#: Environment variable naming the shared library file to load.
LIB_ENV = "LIBVFIO_USER"
#: Names tried with the dynamic loader when LIBVFIO_USER is unset (soname first).
LIB_NAMES = ("libvfio-user.so.0", "libvfio-user.so")

# include/libvfio-user.h constants (the library's ABI, declared once here).
VFU_TRANS_SOCK = 0
VFU_DEV_TYPE_PCI = 0
LIBVFIO_USER_FLAG_ATTACH_NB = 1 << 0
VFU_PCI_TYPE_EXPRESS = 3
PCI_HEADER_TYPE_NORMAL = 0
VFU_REGION_FLAG_READ = 1 << 0
VFU_REGION_FLAG_WRITE = 1 << 1
VFU_REGION_FLAG_MEM = 1 << 2
VFU_REGION_FLAG_ALWAYS_CB = 1 << 3
VFU_RESET_DEVICE = 0
VFU_RESET_LOST_CONN = 1
VFU_RESET_PCI_FLR = 2
VFU_SGL_DIRECT_ACCESS = 1
VFU_PCI_DEV_NUM_REGIONS = 9
VFU_DEV_NUM_IRQS = 5
#: The library's limit for vfu_setup_device_dma (LIBVFIO_USER_MAX_DMA_REGIONS).
LIBVFIO_USER_MAX_DMA_REGIONS = 1000 * 1000

# syslog levels the library logs with, and what they become in Python logging.
LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG = 3, 4, 6, 7
_SYSLOG_TO_PY = {0: logging.CRITICAL, 1: logging.CRITICAL, 2: logging.CRITICAL,
                 LOG_ERR: logging.ERROR, LOG_WARNING: logging.WARNING, 5: logging.INFO,
                 LOG_INFO: logging.INFO, LOG_DEBUG: logging.DEBUG}

#: Requests served per readable event before other fds get a turn (level-triggered).
RUN_BATCH = 64
#: Seconds the worker waits for a client's DMA_READ/DMA_WRITE reply (socket timeout).
DMA_TIMEOUT = 10.0
_INTERRUPTS = (PciIrq.INTX, PciIrq.MSI, PciIrq.MSIX)


class LibraryNotFound(OSError):
    """libvfio-user could not be loaded; the message says what was tried and how to fix it."""


# ---------------------------------------------------------------------------------------
# The C ABI


class Iovec(ctypes.Structure):
    """struct iovec."""

    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class VfuDmaInfo(ctypes.Structure):
    """vfu_dma_info_t: one DMA region as the library hands it to the register callbacks."""

    _fields_ = [("iova", Iovec), ("vaddr", ctypes.c_void_p), ("mapping", Iovec),
                ("page_size", ctypes.c_size_t), ("prot", ctypes.c_uint32)]


_ctx_p = ctypes.c_void_p
LOG_CB = ctypes.CFUNCTYPE(None, _ctx_p, ctypes.c_int, ctypes.c_char_p)
REGION_CB = ctypes.CFUNCTYPE(ctypes.c_ssize_t, _ctx_p, ctypes.c_void_p, ctypes.c_size_t,
                             ctypes.c_int64, ctypes.c_bool, use_errno=True)
RESET_CB = ctypes.CFUNCTYPE(ctypes.c_int, _ctx_p, ctypes.c_int, use_errno=True)
QUIESCE_CB = ctypes.CFUNCTYPE(ctypes.c_int, _ctx_p, use_errno=True)
DMA_CB = ctypes.CFUNCTYPE(None, _ctx_p, ctypes.POINTER(VfuDmaInfo))
IRQ_STATE_CB = ctypes.CFUNCTYPE(None, _ctx_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_bool)

#: name -> (restype, argtypes) of every function used.
_PROTOTYPES: dict[str, tuple[object, list[object]]] = {
    "vfu_create_ctx": (_ctx_p, [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p,
                                ctypes.c_int]),
    "vfu_destroy_ctx": (None, [_ctx_p]),
    "vfu_setup_log": (ctypes.c_int, [_ctx_p, LOG_CB, ctypes.c_int]),
    "vfu_pci_init": (ctypes.c_int, [_ctx_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]),
    "vfu_setup_region": (ctypes.c_int, [_ctx_p, ctypes.c_int, ctypes.c_size_t, REGION_CB,
                                        ctypes.c_int, ctypes.POINTER(Iovec), ctypes.c_uint32,
                                        ctypes.c_int, ctypes.c_uint64]),
    "vfu_setup_device_reset_cb": (ctypes.c_int, [_ctx_p, RESET_CB]),
    "vfu_setup_device_quiesce_cb": (None, [_ctx_p, QUIESCE_CB]),
    "vfu_setup_device_dma": (ctypes.c_int, [_ctx_p, ctypes.c_size_t, DMA_CB, DMA_CB]),
    "vfu_setup_device_nr_irqs": (ctypes.c_int, [_ctx_p, ctypes.c_int, ctypes.c_uint32]),
    "vfu_setup_irq_state_callback": (ctypes.c_int, [_ctx_p, ctypes.c_int, IRQ_STATE_CB]),
    "vfu_realize_ctx": (ctypes.c_int, [_ctx_p]),
    "vfu_attach_ctx": (ctypes.c_int, [_ctx_p]),
    "vfu_get_poll_fd": (ctypes.c_int, [_ctx_p]),
    "vfu_run_ctx": (ctypes.c_int, [_ctx_p]),
    "vfu_irq_trigger": (ctypes.c_int, [_ctx_p, ctypes.c_uint32]),
    "dma_sg_size": (ctypes.c_size_t, []),
    "vfu_addr_to_sgl": (ctypes.c_int, [_ctx_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                       ctypes.c_size_t, ctypes.c_int]),
    "vfu_sgl_read": (ctypes.c_int, [_ctx_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                    ctypes.c_int]),
    "vfu_sgl_write": (ctypes.c_int, [_ctx_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                     ctypes.c_int]),
}


def library_candidates() -> list[str]:
    """What :func:`load_library` tries, in order (for error messages and tests)."""
    env = os.environ.get(LIB_ENV)
    if env:
        return [env]
    found = ctypes.util.find_library("vfio-user")
    names = [found] if found else []
    return names + [n for n in LIB_NAMES if n != found]


def _not_found_message(tried: list[tuple[str, str]]) -> str:
    lines = [f"  {name}: {why}" for name, why in tried]
    return ("libvfio-user (the nutanix/libvfio-user shared library) could not be loaded.\n"
            "Tried:\n" + "\n".join(lines) + "\n"
            f"Build the library and set {LIB_ENV}=/path/to/libvfio-user.so.0 "
            "(or install it where the dynamic loader finds it), or use the default "
            "'python' backend.")


_LIB: ctypes.CDLL | None = None
_LIB_LOCK = threading.Lock()


def load_library() -> ctypes.CDLL:
    """Load libvfio-user once and declare the prototypes; raises :class:`LibraryNotFound`."""
    global _LIB
    with _LIB_LOCK:
        if _LIB is not None:
            return _LIB
        tried: list[tuple[str, str]] = []
        for name in library_candidates():
            try:
                lib = ctypes.CDLL(name, use_errno=True)
            except OSError as exc:
                tried.append((name, str(exc)))
                continue
            missing = [fn for fn in _PROTOTYPES if not hasattr(lib, fn)]
            if missing:
                tried.append((name, f"not libvfio-user (missing {', '.join(missing)})"))
                continue
            for fn, (restype, argtypes) in _PROTOTYPES.items():
                f = getattr(lib, fn)
                f.restype = restype
                f.argtypes = argtypes
            log.info("loaded libvfio-user from %s", name)
            _LIB = lib
            return lib
        if not tried:
            tried.append(("(none)", "no candidate names"))
        raise LibraryNotFound(errno.ENOENT, _not_found_message(tried))


def is_available() -> bool:
    """True when the library can be loaded."""
    try:
        load_library()
    except LibraryNotFound:
        return False
    return True


def _check(rc: int, what: str) -> int:
    """Turn the library's ``-1`` + errno into OSError."""
    if rc < 0:
        err = ctypes.get_errno() or errno.EIO
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


# ---------------------------------------------------------------------------------------
# DMA


class LibvfuDmaError(BusError, DmaError):
    """A DMA the library could not serve: a :class:`BusError` carrying the errno."""

    def __init__(self, addr: int, size: int, write: bool, err: int, reason: str) -> None:
        BusError.__init__(self, addr, size, write, reason)
        self.errno = err
        self.strerror = reason

    def __str__(self) -> str:
        return BusError.__str__(self)


@dataclass
class DmaEntry:
    """One DMA_MAP as the register callback reported it."""

    iova: int
    size: int
    vaddr: int | None  # host address of iova (the client passed an fd), else None
    prot: int

    @property
    def end(self) -> int:
        return self.iova + self.size


class LibvfuMemory(DmaPort):
    """:class:`devmodel.memory.Memory` over the client's DMA map, through the library.

    Checks the whole range before touching anything (a BusError writes nothing), copies
    directly where the library mapped the client's fd, and uses ``vfu_addr_to_sgl`` +
    ``vfu_sgl_read``/``vfu_sgl_write`` elsewhere (messages to the client, which answers
    while the worker waits with :data:`MODEL_LOCK` held: the library owns one socket).
    """

    def __init__(self, ep: "_Endpoint") -> None:
        self._ep = ep

    def _access(self, addr: int, size: int, data: bytes | None) -> bytes:
        ep = self._ep
        write = data is not None
        if ep.server.in_serving_thread():
            raise DmaFromHandlerError("DMA from a request handler or fd callback; use ctx.call_soon()")
        with MODEL_LOCK:
            if not ep.attached:
                raise LibvfuDmaError(addr, size, write, errno.ENOTCONN, "client disconnected")
            pieces = ep.cover(addr, size)
            if pieces is None:
                raise BusError(addr, size, write, "not mapped")
            need = mmap.PROT_WRITE if write else mmap.PROT_READ
            if any(not (e.prot & need) for e, _, _ in pieces):
                raise BusError(addr, size, write, "DMA map forbids the access")
            out = ctypes.create_string_buffer(size) if not write else None
            src = ctypes.create_string_buffer(data, size) if write else None
            base = ctypes.addressof(src if write else out)  # type: ignore[arg-type]
            pos = 0
            for e, off, n in pieces:
                if e.vaddr is not None:
                    host = e.vaddr + off
                    if write:
                        ctypes.memmove(host, base + pos, n)
                    else:
                        ctypes.memmove(base + pos, host, n)
                else:
                    self._sgl(e.iova + off, n, base + pos, write)
                pos += n
        log.debug("%s: DMA %s %#x+%#x (%d pieces)", ep.path, "write" if write else "read",
                  addr, size, len(pieces))
        return b"" if write else out.raw  # type: ignore[union-attr]

    def _sgl(self, addr: int, n: int, host: int, write: bool) -> None:
        """One piece inside one map entry without a host mapping: let the library move it."""
        ep, lib = self._ep, self._ep.server.lib
        sgl = ctypes.create_string_buffer(ep.server.sg_size)
        prot = mmap.PROT_WRITE if write else mmap.PROT_READ
        rc = lib.vfu_addr_to_sgl(ep.ctx, addr, n, sgl, 1, prot)
        if rc != 1:
            err = ctypes.get_errno() or errno.EFAULT
            raise LibvfuDmaError(addr, n, write, err, f"vfu_addr_to_sgl: {os.strerror(err)}")
        fn = lib.vfu_sgl_write if write else lib.vfu_sgl_read
        if fn(ep.ctx, sgl, 1, host, VFU_SGL_DIRECT_ACCESS) < 0:
            err = ctypes.get_errno() or errno.EIO
            # The library resets the context itself when the client is gone.
            ep.server._call_in_loop(lambda: ep.server._resync(ep))
            raise LibvfuDmaError(addr, n, write, err,
                                 f"{'DMA_WRITE' if write else 'DMA_READ'} failed: "
                                 f"{errno.errorcode.get(err, err)}")


# ---------------------------------------------------------------------------------------
# Worker, context, endpoint


class _Context(ContextReaders):
    """The :class:`vfio_user.device.DeviceContext` of one attached client."""

    def __init__(self, ep: "_Endpoint") -> None:
        super().__init__(ep.server, ep.worker)
        self._ep = ep
        self.dma = LibvfuMemory(ep)
        self.closed = False

    def detached(self) -> bool:
        return self.closed

    def trigger_irq(self, index: int, subindex: int = 0) -> bool:
        """INTx/MSI/MSI-X through vfu_irq_trigger (which signals the enabled type)."""
        ep = self._ep
        with MODEL_LOCK:
            if self.closed or not ep.attached or index not in _INTERRUPTS:
                return False
            masks = ep.masked[index]
            if not 0 <= subindex < len(masks) or masks[subindex]:
                return False
            if ep.server.lib.vfu_irq_trigger(ep.ctx, subindex) < 0:
                log.debug("%s: IRQ %d/%d not delivered: %s", ep.path, index, subindex,
                          os.strerror(ctypes.get_errno() or errno.EIO))
                return False
        log.debug("%s: IRQ %d/%d triggered", ep.path, index, subindex)
        return True

    def close(self) -> None:
        self.closed = True
        self.drop_readers()


class _Endpoint:
    """One libvfio-user context: socket, device, callbacks, DMA map, IRQ masks."""

    def __init__(self, server: "LibvfioUserServer", path: str, device: VfioUserDevice) -> None:
        self.server = server
        self.path = path
        self.device = device
        self.ctx: int | None = None
        self.worker = Worker(os.path.basename(path))
        self.attached = False
        self.context: _Context | None = None
        self.poll_fd = -1
        self.dma: dict[int, DmaEntry] = {}
        self.irq_counts = [0] * VFU_DEV_NUM_IRQS
        self.masked: list[list[bool]] = [[] for _ in range(VFU_DEV_NUM_IRQS)]
        #: ctypes callback objects: the library keeps raw pointers to them.
        self.keep: list[object] = []

    def cover(self, addr: int, size: int) -> list[tuple[DmaEntry, int, int]] | None:
        """Split ``[addr, addr+size)`` into (entry, offset, length); None if a byte is unmapped."""
        if addr < 0 or size < 0:
            return None
        entries = sorted(self.dma.values(), key=lambda e: e.iova)
        pieces: list[tuple[DmaEntry, int, int]] = []
        cur, end = addr, addr + size
        if size == 0:
            return pieces if any(e.iova <= addr <= e.end for e in entries) else None
        for e in entries:
            if cur >= end:
                break
            if e.end <= cur:
                continue
            if e.iova > cur:
                return None
            n = min(end, e.end) - cur
            pieces.append((e, cur - e.iova, n))
            cur += n
        return pieces if cur >= end else None

    def reset_irq_state(self) -> None:
        self.masked = [[False] * n for n in self.irq_counts]


# ---------------------------------------------------------------------------------------
# The server


class LibvfioUserServer(EventLoop):
    """Serve vfio-user devices with libvfio-user; same public API as ``Server``.

    Usage: ``s = LibvfioUserServer(); s.add_device(path, dev); s.start_in_thread(); ...;
    s.stop()``. Options of ``Server`` that the library fixes itself (message fds, data
    transfer size, write_multiple) are accepted and ignored.
    """

    loop_name = "libvfio-user-loop"
    call_when_stopped = True  # library callbacks may arrive before the loop runs

    def __init__(self, *, max_msg_fds: int = 16, max_data_xfer_size: int = 1 << 20,
                 max_dma_maps: int = 65535, write_multiple: bool = True,
                 dma_timeout: float = DMA_TIMEOUT) -> None:
        self.lib = load_library()
        self.sg_size = int(self.lib.dma_sg_size())
        self.max_dma_maps = min(max(1, max_dma_maps), LIBVFIO_USER_MAX_DMA_REGIONS)
        self.dma_timeout = dma_timeout
        log.debug("libvfio-user negotiates its own max_msg_fds/max_data_xfer_size/"
                  "write_multiple (asked %d/%d/%s)", max_msg_fds, max_data_xfer_size,
                  write_multiple)
        super().__init__()
        self._endpoints: dict[str, _Endpoint] = {}
        self._log_cb = LOG_CB(self._on_log)

    # -- public API ---------------------------------------------------------------------

    def add_device(self, path: str, device: VfioUserDevice) -> None:
        """Listen on ``path`` (mode 0600) for clients of ``device``."""
        if self._closed:
            raise RuntimeError("server stopped")
        path = os.fspath(path)
        if path in self._endpoints:
            raise ValueError(f"{path} already served")
        remove_stale_socket(path)
        ep = _Endpoint(self, path, device)
        try:
            self._create(ep)
        except BaseException:
            ep.worker.stop()
            if ep.ctx:
                self.lib.vfu_destroy_ctx(ep.ctx)
            raise
        self._endpoints[path] = ep
        self._resync(ep)
        log.info("serving %s on %s (libvfio-user)", type(device).__name__, path)

    # -- context setup ------------------------------------------------------------------

    def _create(self, ep: _Endpoint) -> None:
        lib, dev = self.lib, ep.device
        old_umask = os.umask(0o177)  # the library binds the socket: make it 0600
        try:
            ctx = lib.vfu_create_ctx(VFU_TRANS_SOCK, ep.path.encode(), LIBVFIO_USER_FLAG_ATTACH_NB,
                                     None, VFU_DEV_TYPE_PCI)
        finally:
            os.umask(old_umask)
        if not ctx:
            err = ctypes.get_errno() or errno.EIO
            raise OSError(err, f"vfu_create_ctx: {os.strerror(err)}", ep.path)
        ep.ctx = ctx
        _check(lib.vfu_setup_log(ctx, self._log_cb, _syslog_level(log)), "vfu_setup_log")
        _check(lib.vfu_pci_init(ctx, VFU_PCI_TYPE_EXPRESS, PCI_HEADER_TYPE_NORMAL, 0), "vfu_pci_init")
        for index in range(min(dev.num_regions, VFU_PCI_DEV_NUM_REGIONS)):
            self._setup_region(ep, index)
        for index in range(min(dev.num_irqs, VFU_DEV_NUM_IRQS)):
            count = dev.irq_info(index).count
            ep.irq_counts[index] = count
            _check(lib.vfu_setup_device_nr_irqs(ctx, index, count), f"vfu_setup_device_nr_irqs({index})")
            if index in _INTERRUPTS:
                cb = IRQ_STATE_CB(self._irq_state_cb(ep, index))
                ep.keep.append(cb)
                _check(lib.vfu_setup_irq_state_callback(ctx, index, cb), "vfu_setup_irq_state_callback")
        ep.reset_irq_state()
        reg, unreg = DMA_CB(self._dma_register_cb(ep)), DMA_CB(self._dma_unregister_cb(ep))
        reset, quiesce = RESET_CB(self._reset_cb(ep)), QUIESCE_CB(self._quiesce_cb(ep))
        ep.keep += [reg, unreg, reset, quiesce]
        _check(lib.vfu_setup_device_dma(ctx, self.max_dma_maps, reg, unreg), "vfu_setup_device_dma")
        _check(lib.vfu_setup_device_reset_cb(ctx, reset), "vfu_setup_device_reset_cb")
        lib.vfu_setup_device_quiesce_cb(ctx, quiesce)
        _check(lib.vfu_realize_ctx(ctx), "vfu_realize_ctx")
        os.chmod(ep.path, 0o600)

    def _setup_region(self, ep: _Endpoint, index: int) -> None:
        info = ep.device.region_info(index)
        if info.size == 0:
            return
        flags = 0
        if info.flags & VFIO_REGION_INFO_FLAG_READ:
            flags |= VFU_REGION_FLAG_READ
        if info.flags & VFIO_REGION_INFO_FLAG_WRITE:
            flags |= VFU_REGION_FLAG_WRITE
        if index == PciRegion.CONFIG:
            # The model owns config space: every access reaches it, none the library's copy.
            flags = VFU_REGION_FLAG_READ | VFU_REGION_FLAG_WRITE | VFU_REGION_FLAG_ALWAYS_CB
        elif index <= PciRegion.BAR5:
            flags |= VFU_REGION_FLAG_MEM
        cb = REGION_CB(self._region_cb(ep, index))
        ep.keep.append(cb)
        areas, nr, fd = None, 0, -1
        if info.mmap_fd is not None:
            fd = info.mmap_fd
            if info.sparse:
                arr = (Iovec * len(info.sparse))(*[Iovec(off, size) for off, size in info.sparse])
                ep.keep.append(arr)
                areas, nr = arr, len(info.sparse)
        _check(self.lib.vfu_setup_region(ep.ctx, index, info.size, cb, flags, areas, nr, fd,
                                         info.mmap_offset), f"vfu_setup_region({index})")
        log.debug("%s: region %d size %#x flags %#x mmap fd %s sparse %s", ep.path, index,
                  info.size, flags, info.mmap_fd, info.sparse)

    # -- callbacks from the library (run with MODEL_LOCK held by the calling thread) -----

    def _on_log(self, _ctx: int, level: int, msg: bytes | None) -> None:
        log.log(_SYSLOG_TO_PY.get(level, logging.DEBUG), "libvfio-user: %s",
                (msg or b"").decode(errors="replace").rstrip())

    def _region_cb(self, ep: _Endpoint, index: int) -> Callable[..., int]:
        def cb(_ctx: int, buf: int, count: int, offset: int, is_write: bool) -> int:
            try:
                if is_write:
                    ep.device.region_write(index, offset, ctypes.string_at(buf, count))
                    return count
                data = ep.device.region_read(index, offset, count)
                if len(data) != count:
                    log.error("%s: region_read returned %d bytes for %d", ep.path, len(data), count)
                    return _fail(errno.EIO)
                ctypes.memmove(buf, data, count)
                return count
            except OSError as exc:
                return _fail(exc.errno or errno.EIO)
            except Exception:
                log.exception("%s: region %d access failed", ep.path, index)
                return _fail(errno.EIO)
        return cb

    def _reset_cb(self, ep: _Endpoint) -> Callable[[int, int], int]:
        def cb(_ctx: int, kind: int) -> int:
            try:
                if kind == VFU_RESET_LOST_CONN:
                    self._lost(ep)
                else:
                    log.info("%s: %s", ep.path, "DEVICE_RESET" if kind == VFU_RESET_DEVICE else "FLR")
                    ep.device.reset()
                return 0
            except Exception:
                log.exception("%s: reset failed", ep.path)
                return _fail(errno.EIO)
        return cb

    def _quiesce_cb(self, ep: _Endpoint) -> Callable[[int], int]:
        def cb(_ctx: int) -> int:
            # The caller holds MODEL_LOCK, so no device work is running: already quiet.
            log.debug("%s: quiesce", ep.path)
            return 0
        return cb

    def _dma_register_cb(self, ep: _Endpoint) -> Callable[..., None]:
        def cb(_ctx: int, info_p: "ctypes._Pointer[VfuDmaInfo]") -> None:
            info = info_p.contents
            iova = info.iova.iov_base or 0
            ep.dma[iova] = DmaEntry(iova, info.iova.iov_len, info.vaddr or None, info.prot)
            log.debug("%s: DMA_MAP %#x+%#x prot %#x %s", ep.path, iova, info.iova.iov_len,
                      info.prot, "mapped" if info.vaddr else "message")
            _device_call(ep, ep.device.dma_changed)
        return cb

    def _dma_unregister_cb(self, ep: _Endpoint) -> Callable[..., None]:
        def cb(_ctx: int, info_p: "ctypes._Pointer[VfuDmaInfo]") -> None:
            iova = info_p.contents.iova.iov_base or 0
            ep.dma.pop(iova, None)
            log.debug("%s: DMA_UNMAP %#x", ep.path, iova)
            if ep.attached:
                _device_call(ep, ep.device.dma_changed)
        return cb

    def _irq_state_cb(self, ep: _Endpoint, index: int) -> Callable[..., None]:
        def cb(_ctx: int, start: int, count: int, mask: bool) -> None:
            masks = ep.masked[index]
            for sub in range(start, min(start + count, len(masks))):
                masks[sub] = bool(mask)
            log.debug("%s: IRQ %d [%d, %d) %s", ep.path, index, start, start + count,
                      "masked" if mask else "unmasked")
            _device_call(ep, lambda: ep.device.irqs_changed(index))
        return cb

    # -- attach / run / detach ----------------------------------------------------------

    def _on_poll(self, ep: _Endpoint) -> None:
        if ep.attached:
            self._run(ep)
        else:
            self._attach(ep)
        self._resync(ep)

    def _attach(self, ep: _Endpoint) -> None:
        """The listening socket is readable: accept and negotiate VERSION (blocking)."""
        if self.lib.vfu_attach_ctx(ep.ctx) < 0:
            err = ctypes.get_errno()
            if err not in (errno.EAGAIN, errno.EWOULDBLOCK):
                log.warning("%s: client attach failed: %s", ep.path, os.strerror(err or errno.EIO))
            return
        _set_recv_timeout(self.lib.vfu_get_poll_fd(ep.ctx), self.dma_timeout)
        with MODEL_LOCK:
            ep.attached = True
            ep.reset_irq_state()
            ep.context = _Context(ep)
            log.info("%s: client attached", ep.path)
            ep.device.attach(ep.context)

    def _run(self, ep: _Endpoint) -> None:
        """The connection is readable: serve requests until none is left (or a batch)."""
        with MODEL_LOCK:
            for _ in range(RUN_BATCH):
                if not ep.attached:
                    return
                rc = self.lib.vfu_run_ctx(ep.ctx)
                if rc < 0:
                    err = ctypes.get_errno()
                    if err == errno.ENOTCONN:
                        self._lost(ep)
                    elif err not in (errno.EAGAIN, errno.EWOULDBLOCK):
                        log.debug("%s: vfu_run_ctx: %s", ep.path, os.strerror(err or errno.EIO))
                    return
                if rc == 0:
                    return

    def _lost(self, ep: _Endpoint) -> None:
        """The client went away (reset callback LOST_CONN): detach the model once."""
        with MODEL_LOCK:
            if not ep.attached:
                return
            ep.attached = False
            ep.dma.clear()
            ep.reset_irq_state()
            if ep.context is not None:
                ep.context.close()
                ep.context = None
            log.info("%s: client disconnected", ep.path)
            _device_call(ep, ep.device.detach)
        self._call_in_loop(lambda: self._resync(ep))

    def _resync(self, ep: _Endpoint) -> None:
        """Watch what vfu_get_poll_fd names now (listening socket or connection)."""
        if ep.ctx is None or self._closed:
            return
        fd = self.lib.vfu_get_poll_fd(ep.ctx)
        if fd == ep.poll_fd and fd in self._handlers:
            return
        if ep.poll_fd >= 0:
            self._unregister(ep.poll_fd)
        ep.poll_fd = fd
        if fd >= 0:
            self._handlers.pop(fd, None)
            self._register(fd, lambda: self._on_poll(ep), locked=False)

    # -- loop internals -----------------------------------------------------------------

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._flush_deferred()
        for ep in self._endpoints.values():
            ep.worker.stop()
            with MODEL_LOCK:
                if ep.poll_fd >= 0:
                    self._unregister(ep.poll_fd)
                if ep.ctx:
                    # Resets the context (LOST_CONN callback -> detach), closes fds,
                    # unlinks the socket file.
                    self.lib.vfu_destroy_ctx(ep.ctx)
                    ep.ctx = None
        for fd in list(self._handlers):
            self._unregister(fd)
        self._epoll.close()
        os.close(self._wake_fd)
        self._running.clear()
        log.info("libvfio-user server stopped")


# ---------------------------------------------------------------------------------------
# Helpers


def _fail(err: int) -> int:
    """Return -1 to the library with errno set (the callbacks use use_errno=True)."""
    ctypes.set_errno(err)
    return -1


def _device_call(ep: _Endpoint, fn: Callable[[], None]) -> None:
    """Call a device notification; a device bug must not unwind into C."""
    try:
        fn()
    except Exception:
        log.exception("%s: device callback %r failed", ep.path, fn)


def _syslog_level(logger: logging.Logger) -> int:
    """The library's log threshold matching the Python logger (debug logs cost per access)."""
    level = logger.getEffectiveLevel()
    if level <= logging.DEBUG:
        return LOG_DEBUG
    if level <= logging.INFO:
        return LOG_INFO
    if level <= logging.WARNING:
        return LOG_WARNING
    return LOG_ERR


def _set_recv_timeout(fd: int, timeout: float) -> None:
    """Bound the library's blocking reads (DMA replies, request bodies) on the connection."""
    if fd < 0 or timeout <= 0:
        return
    sec = int(timeout)
    s = socket.socket(fileno=os.dup(fd))
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                     struct.pack("ll", sec, int((timeout - sec) * 1e6)))
    finally:
        s.close()

