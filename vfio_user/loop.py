"""The event loop and device workers shared by both vfio-user backends.

One epoll loop per server watches the listening sockets (or libvfio-user's poll fds) and
any fd a device model registers. Callbacks run in the loop thread, with MODEL_LOCK held
when registered ``locked``. A backend may also serve an attached client from a thread of
its own (the Python server does: see :mod:`vfio_user.server`); such a thread is a
*serving thread* like the loop thread. Device work scheduled with ``call_soon`` from a
serving thread is deferred until that thread has sent its replies (a reply must never
wait behind device work), then handed to the device's :class:`Worker`.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import select
import socket
import stat
import threading
from collections.abc import Callable

from vfio_user.device import MODEL_LOCK

log = logging.getLogger(__name__)


class Worker:
    """A device's worker thread: runs call_soon() work with MODEL_LOCK held."""

    def __init__(self, name: str) -> None:
        self.queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"vfu-worker-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            fn = self.queue.get()
            if fn is None:
                return
            try:
                with MODEL_LOCK:
                    fn()
            except Exception:  # a device bug must not kill the worker
                log.exception("device work %r failed", fn)

    def stop(self) -> None:
        self.queue.put(None)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=5)


class ContextReaders:
    """The ``call_soon``/``add_reader``/``remove_reader`` half of a backend's DeviceContext.

    Both backends keep the fds a model watches per attached client, so detaching the client
    drops exactly those (:meth:`drop_readers`); a detached context refuses new ones.
    """

    def __init__(self, loop: "EventLoop", worker: Worker) -> None:
        self._loop = loop
        self._worker = worker
        self._readers: set[int] = set()

    def detached(self) -> bool:
        raise NotImplementedError

    def call_soon(self, fn: Callable[[], None]) -> None:
        self._loop._schedule(self._worker, fn)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        if self.detached():
            raise RuntimeError("device context is detached")
        self._readers.add(fd)
        self._loop.add_reader(fd, callback)

    def remove_reader(self, fd: int) -> None:
        if fd in self._readers:
            self._readers.discard(fd)
            self._loop.remove_reader(fd)

    def drop_readers(self) -> None:
        for fd in list(self._readers):
            self.remove_reader(fd)


class EventLoop:
    """The loop half of a server; subclasses add devices and implement :meth:`_shutdown`."""

    #: Name of the loop thread started by :meth:`start_in_thread`.
    loop_name = "vfio-user-loop"
    #: Run loop calls at once while the loop is not running (nothing else could run them).
    call_when_stopped = False

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, tuple[Callable[[], None], bool]] = {}
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        #: Per serving thread: ``deferred``, the call_soon work held until its replies are sent.
        self._local = threading.local()
        self._register(self._wake_fd, self._on_wake, locked=False)
        self._stopping = False
        self._closed = False
        self._loop_ident: int | None = None
        self._thread: threading.Thread | None = None
        self._running = threading.Event()

    # -- public API ---------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Run the loop in this thread until :meth:`stop`."""
        self._loop_ident = threading.get_ident()
        self.begin_serving()
        deferred = self._local.deferred
        self._running.set()
        try:
            while not self._stopping:
                try:
                    events = self._epoll.poll()
                except InterruptedError:
                    continue
                for fd, _ in events:
                    entry = self._handlers.get(fd)
                    if entry is None:
                        continue
                    cb, locked = entry
                    try:
                        if locked:
                            with MODEL_LOCK:
                                # A request served in another thread (under MODEL_LOCK) may
                                # have removed this reader, and closed its fd, meanwhile.
                                if self._handlers.get(fd) is entry:
                                    cb()
                        else:
                            cb()
                    except Exception:
                        log.exception("event-loop callback for fd %d failed", fd)
                if deferred:
                    self._flush_deferred()
        finally:
            self._shutdown()
            self.end_serving()

    def start_in_thread(self) -> threading.Thread:
        """Run :meth:`serve_forever` in a daemon thread; returns once the loop runs."""
        t = threading.Thread(target=self.serve_forever, name=self.loop_name, daemon=True)
        self._thread = t
        t.start()
        self._running.wait(5)
        return t

    def stop(self) -> None:
        """Stop the loop and release everything (:meth:`_shutdown`); thread-safe."""
        self._stopping = True
        if not self._running.is_set():
            self._shutdown()
            return
        self._wake()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=10)

    def add_reader(self, fd: int, cb: Callable[[], None]) -> None:
        """Watch ``fd``; ``cb()`` runs in the loop thread with MODEL_LOCK held."""
        self._register(fd, cb, locked=True)

    def remove_reader(self, fd: int) -> None:
        self._unregister(fd)

    def in_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_ident

    def in_serving_thread(self) -> bool:
        """True in the loop thread and in a backend's per-client thread: where requests
        and fd callbacks run, so where a DMA would stall the protocol."""
        return getattr(self._local, "deferred", None) is not None

    def begin_serving(self) -> None:
        """Mark the calling thread as a serving thread (see :meth:`in_serving_thread`)."""
        self._local.deferred = []

    def end_serving(self) -> None:
        """Hand this thread's held work to the workers and unmark it."""
        self._flush_deferred()
        self._local.deferred = None

    # -- internals ----------------------------------------------------------------------
    def _shutdown(self) -> None:
        raise NotImplementedError

    def _register(self, fd: int, cb: Callable[[], None], locked: bool) -> None:
        known = fd in self._handlers
        self._handlers[fd] = (cb, locked)
        if known:
            return
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:  # an fd number reused after a close epoll never saw
            self._epoll.modify(fd, select.EPOLLIN)

    def _unregister(self, fd: int) -> None:
        self._handlers.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # already closed: epoll dropped it itself

    def _wake(self) -> None:
        try:
            os.eventfd_write(self._wake_fd, 1)
        except OSError:
            pass

    def _on_wake(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except OSError:
            pass
        while True:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                break
            try:
                fn()
            except Exception:
                log.exception("loop call failed")

    def _call_in_loop(self, fn: Callable[[], None]) -> None:
        if self.in_loop_thread() or (self.call_when_stopped and not self._running.is_set()):
            fn()
        else:
            self._calls.put(fn)
            self._wake()

    def _schedule(self, worker: Worker, fn: Callable[[], None]) -> None:
        """call_soon: from a serving thread, wait until its current replies are sent."""
        deferred = getattr(self._local, "deferred", None)
        if deferred is not None:
            deferred.append((worker, fn))
        else:
            worker.queue.put(fn)

    def _flush_deferred(self) -> None:
        """Hand the calling serving thread's held work to the workers."""
        held = getattr(self._local, "deferred", None)
        if not held:
            return
        items = held[:]
        held.clear()  # in place: a serving thread may keep a reference to its list
        for worker, fn in items:
            worker.queue.put(fn)


def remove_stale_socket(path: str) -> None:
    """Remove a leftover socket file before listening on ``path`` (both backends); refuse
    to touch a live socket or anything that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "not a socket, not removing", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        log.info("removed stale socket %s", path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "a server is already listening", path)
