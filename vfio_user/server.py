"""Pure-Python vfio-user server: one event loop for every device socket.

One :class:`Server` owns one epoll loop that serves any number of listening UNIX sockets
(one per PCI function) and the extra fds that device models watch. Each attached client
gets a reader thread of its own that blocks in ``recvmsg`` on the connection: a serial
round trip then costs the server one ``recvmsg`` and one ``send``, without an
``epoll_wait`` and the loop's dispatch on top, which were about a fifth of the serial
rate (``benchmarks/bench_vfio_user.py``; docs/backends.md). Requests are
answered with :data:`MODEL_LOCK` held, exactly like the loop's callbacks, so a device
model still sees one request or callback at a time. Every byte that was readable is
parsed and all replies of the batch go out in one ``send`` (a Python server is only fast
when it amortises system calls).

Server-to-client DMA (DMA_READ/DMA_WRITE messages, for client memory mapped without an
fd) is only ever sent by a device worker thread, after the replies of the batch that
scheduled the work went out, and the loop keeps serving requests while such a DMA waits
for its reply: QEMU serves those messages from its main loop and drops the device when a
reply arrives late (see the project's vfio-user reference notes).
"""

from __future__ import annotations

import array
import errno
import logging
import os
import select
import socket
import stat
import struct
import threading
from collections.abc import Callable
from typing import Any

from devmodel.memory import BusError
from vfio_user.device import (
    MODEL_LOCK,
    VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_MMAP,
    DmaError,
    DmaFromHandlerError,
    RegionInfo,
    VfioUserDevice,
)
from vfio_user.dma import DmaMap, DmaPort
from vfio_user.loop import ContextReaders, EventLoop, Worker, remove_stale_socket
from vfio_user.irqs import IrqState
from vfio_user.protocol import (
    CAP_HEADER,
    DEVICE_FEATURE,
    DEVICE_INFO,
    DMA_ACCESS,
    DMA_MAP,
    DMA_MAP_FLAGS_VALID,
    DMA_UNMAP,
    DMA_UNMAP_FLAG_ALL,
    FLAG_NO_REPLY,
    HEADER,
    HEADER_SIZE,
    IRQ_INFO,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    REGION_ACCESS,
    REGION_ACCESS_MSG,
    REGION_ACCESS_MSG_SIZE,
    REGION_INFO,
    REGION_INFO_CAP_SPARSE_MMAP,
    REGION_IO_FDS,
    SPARSE_AREA,
    SPARSE_MMAP,
    SPARSE_MMAP_CAP_VERSION,
    WRITE_MULTI,
    WRITE_MULTI_DATA_MAX,
    WRITE_MULTI_ENTRY,
    WRITE_MULTI_MAX,
    Capabilities,
    Command,
    Message,
    MessageReader,
    MsgType,
    ProtocolError,
    build_version,
    error_reply,
    pack_header,
    parse_version,
)

log = logging.getLogger(__name__)

#: Bytes read per recvmsg: enough for hundreds of pipelined small requests.
RECV_SIZE = 256 * 1024
#: Ancillary buffer: room for the kernel's per-message maximum so excess fds are seen.
ANC_SIZE = socket.CMSG_SPACE(253 * 4)
#: Seconds a blocked send may take before the client is considered dead.
SEND_TIMEOUT = 10.0
#: Seconds a worker waits for the client's answer to a DMA_READ/DMA_WRITE message.
DMA_TIMEOUT = 10.0

_REPLY = int(MsgType.REPLY)
#: Requests whose fds the handler keeps (any other request's fds are closed).
_FD_CONSUMERS = frozenset({Command.DMA_MAP, Command.DEVICE_SET_IRQS})
_HDR = HEADER.struct
_ACCESS_MSG = REGION_ACCESS_MSG
_ACCESS_MSG_SIZE = REGION_ACCESS_MSG_SIZE
_READ = int(Command.REGION_READ)
_WRITE = int(Command.REGION_WRITE)
_NO_REPLY = FLAG_NO_REPLY
# Plain ints: testing an IntFlag member costs an enum call per message.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)


class MessageDmaError(BusError, DmaError):
    """A message DMA failed: the client answered with an error, late, or went away.

    It is a :class:`BusError` (what bus masters catch) and a :class:`DmaError` carrying the
    errno (what the device contract names).
    """

    def __init__(self, addr: int, size: int, write: bool, err: int, reason: str) -> None:
        BusError.__init__(self, addr, size, write, reason)
        self.errno = err
        self.strerror = reason

    def __str__(self) -> str:
        return BusError.__str__(self)


# ---------------------------------------------------------------------------------------
# Device workers and the context handed to devices


class _DmaWaiter:
    """One outstanding DMA_READ/DMA_WRITE message."""

    __slots__ = ("command", "addr", "count", "event", "error", "data")

    def __init__(self, command: int, addr: int, count: int) -> None:
        self.command = command
        self.addr = addr
        self.count = count
        self.event = threading.Event()
        self.error = 0
        self.data = b""


class ClientMemory(DmaPort):
    """:class:`devmodel.memory.Memory` over the client's DMA map.

    Mmapped windows are copied directly; fd-less windows are reached with DMA_READ /
    DMA_WRITE messages, chunked by the client's ``max_data_xfer_size``, while the calling
    worker releases MODEL_LOCK. Unmapped bytes raise BusError before anything is written.
    """

    def __init__(self, conn: "_Connection") -> None:
        self._conn = conn

    def _access(self, addr: int, size: int, data: bytes | None) -> bytes:
        conn = self._conn
        write = data is not None
        if conn.server.in_serving_thread():
            raise DmaFromHandlerError("DMA from a request handler or fd callback; use ctx.call_soon()")
        if conn.closed:
            raise MessageDmaError(addr, size, write, errno.ENOTCONN, "client disconnected")
        need = 2 if write else 1  # DMA_FLAG_WRITE / DMA_FLAG_READ
        out = bytearray()
        remote: list[tuple[int, int, int]] = []  # (addr, length, offset in data/out)
        with conn.dma.lock:
            pieces = conn.dma.cover(addr, size)
            if pieces is None:
                raise BusError(addr, size, write, "not mapped")
            if any(not (w.flags & need) for w, _, _ in pieces):
                raise BusError(addr, size, write, "DMA map forbids the access")
            pos = 0
            for w, off, n in pieces:
                if w.view is not None:
                    if write:
                        w.view[off:off + n] = data[pos:pos + n]  # type: ignore[index]
                    else:
                        out += w.view[off:off + n]
                else:
                    remote.append((w.addr + off, n, pos))
                    if not write:
                        out += bytes(n)
                pos += n
        if remote:
            conn.message_dma(remote, data, out)
        log.debug("DMA %s %#x+%#x (%d message pieces)", "write" if write else "read", addr, size, len(remote))
        return bytes(out)


class _Context(ContextReaders):
    """The :class:`vfio_user.device.DeviceContext` of one connection."""

    def __init__(self, conn: "_Connection") -> None:
        super().__init__(conn.server, conn.endpoint.worker)
        self._conn = conn
        self.dma = ClientMemory(conn)

    def detached(self) -> bool:
        return self._conn.closed

    def trigger_irq(self, index: int, subindex: int = 0) -> bool:
        with MODEL_LOCK:
            if self._conn.closed or self._conn.irqs is None:
                return False
            return self._conn.irqs.trigger(index, subindex)


# ---------------------------------------------------------------------------------------
# Endpoints and connections


class _Endpoint:
    """One listening socket, its device and at most one attached client."""

    def __init__(self, path: str, device: VfioUserDevice, sock: socket.socket) -> None:
        self.path = path
        self.device = device
        self.sock = sock
        self.worker = Worker(os.path.basename(path))
        self.conn: _Connection | None = None


class _Connection:
    """One client: protocol state, DMA map, IRQ eventfds."""

    def __init__(self, server: "Server", endpoint: _Endpoint, sock: socket.socket) -> None:
        self.server = server
        self.endpoint = endpoint
        self.device = endpoint.device
        self.sock = sock
        self.reader = MessageReader(server.max_msg_size)
        # A preallocated receive buffer: a fresh 256 KiB bytes per recvmsg would cost an
        # mmap/munmap pair per message and halve the round-trip rate.
        self.rbuf = bytearray(RECV_SIZE)
        self.rview = memoryview(self.rbuf)
        self._rbufs = [self.rbuf]
        self.negotiated = False
        self.closed = False
        self.client_caps = Capabilities()
        self.server_caps: Capabilities | None = None
        self.dma = DmaMap(server.max_dma_maps)
        self.irqs: IrqState | None = None
        self.num_regions = 0
        self.regions: dict[int, RegionInfo] = {}
        #: Sizes of non-empty regions already described: what the fast path range-checks.
        self.region_sizes: dict[int, int] = {}
        self.ctx = _Context(self)
        self.send_lock = threading.Lock()
        self._close_lock = threading.Lock()
        #: The reader thread (:meth:`serve`); it closes the socket when it ends.
        self.thread: threading.Thread | None = None
        self.pending: dict[int, _DmaWaiter] = {}
        self._next_id = 0
        self._id_lock = threading.Lock()
        self.handlers: dict[int, Callable[[Message], tuple[bytes, list[int]]]] = {
            Command.VERSION: self._version,
            Command.DMA_MAP: self._dma_map,
            Command.DMA_UNMAP: self._dma_unmap,
            Command.DEVICE_GET_INFO: self._get_info,
            Command.DEVICE_GET_REGION_INFO: self._get_region_info,
            Command.DEVICE_GET_REGION_IO_FDS: self._get_region_io_fds,
            Command.DEVICE_GET_IRQ_INFO: self._get_irq_info,
            Command.DEVICE_SET_IRQS: self._set_irqs,
            Command.REGION_READ: self._region_read,
            Command.REGION_WRITE: self._region_write,
            Command.DEVICE_RESET: self._reset,
            Command.REGION_WRITE_MULTI: self._write_multi,
            Command.DEVICE_FEATURE: self._device_feature,
        }

    # -- I/O ----------------------------------------------------------------------------

    def start(self) -> None:
        name = f"vfu-conn-{os.path.basename(self.endpoint.path)}"
        self.thread = threading.Thread(target=self.serve, name=name, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        """The reader thread: receive and answer until the client goes or :meth:`close`."""
        server = self.server
        server.begin_serving()
        deferred = server._local.deferred
        try:
            while not self.closed:
                self.receive()
                if deferred:
                    server._flush_deferred()
        except Exception:  # a server bug: drop this client, never leave it hanging
            log.exception("%s: serving the client failed; closing the connection", self.endpoint.path)
            self.close()
        finally:
            server.end_serving()
            try:
                self.sock.close()
            except OSError:
                pass

    def peer_gone(self) -> bool:
        """Whether the client has shut its end (its remaining bytes may still be unread)."""
        try:
            p = select.poll()
            p.register(self.sock, select.POLLRDHUP)
            return bool(p.poll(0))
        except (OSError, ValueError):  # already closed here
            return True

    def wait_finished(self, timeout: float) -> None:
        """Wait until the reader thread has served everything and closed the connection."""
        t = self.thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    def receive(self) -> None:
        """Wait for bytes, answer every complete request, send the replies at once.

        The common case (no fds, no partial message left over, negotiated) decodes REGION_READ
        and REGION_WRITE requests straight from the receive buffer with one precompiled
        struct; anything else from the first unusual message on goes through the framing
        reader and :meth:`handle`, in order.
        """
        try:
            nbytes, anc, flags, _ = self.sock.recvmsg_into(self._rbufs, ANC_SIZE)
        except InterruptedError:
            return
        except OSError as exc:
            if not self.closed:
                log.info("%s: receive failed: %s", self.endpoint.path, exc)
            self.close()
            return
        if anc or flags & _MSG_CTRUNC or not nbytes or not self.negotiated or self.reader.buffered():
            self._on_data_slow(nbytes, anc, flags)
            return
        out: list[bytes] = []
        with MODEL_LOCK:
            pos = self._fast_path(nbytes, out)
            if pos < nbytes:
                msgs = self.reader.feed(self.rview[pos:nbytes])
                if not self._dispatch(msgs, out):
                    return
        if out and not self.closed:
            data = out[0] if len(out) == 1 else b"".join(out)
            try:
                with self.send_lock:  # uncontended unless a worker is sending a DMA message
                    sent = self.sock.send(data)
                    if sent < len(data):
                        self.sock.sendall(memoryview(data)[sent:])
            except OSError as exc:
                log.info("%s: send failed: %s", self.endpoint.path, exc)
                self.close()

    def _on_data_slow(self, nbytes: int, anc: list[tuple[int, int, bytes]], flags: int) -> None:
        """Bytes with fds, a truncated fd list, EOF, or before VERSION: the general path."""
        fds = _fds_from_ancillary(anc)
        if flags & _MSG_CTRUNC:
            fds.append(-1)  # marks the message as having lost fds: it will be rejected
        if not nbytes:
            _close_fds(fds)
            log.info("%s: client disconnected", self.endpoint.path)
            self.close()
            return
        msgs = self.reader.feed(self.rview[:nbytes], fds)
        if not msgs:
            return
        out: list[bytes] = []
        with MODEL_LOCK:
            if not self._dispatch(msgs, out):
                return
        if out:
            self._send(out[0] if len(out) == 1 else b"".join(out), [])

    def _fast_path(self, nbytes: int, out: list[bytes]) -> int:
        """Serve leading well-formed REGION_READ/WRITE requests in ``rbuf[:nbytes]``.

        Returns the offset of the first byte not consumed. A request stops the fast path
        (and is left to :meth:`handle`, which gives the architectural error) when it is
        not a plain command, is out of the region's range, has count 0, or is incomplete.
        MODEL_LOCK is held by the caller.
        """
        buf = self.rbuf
        unpack = _ACCESS_MSG.unpack_from
        pack = _ACCESS_MSG.pack
        sizes = self.region_sizes
        max_xfer = self.server.max_data_xfer_size
        dev = self.device
        debug = log.isEnabledFor(logging.DEBUG)
        pos = 0
        while nbytes - pos >= _ACCESS_MSG_SIZE:
            msg_id, cmd, size, mflags, _, offset, region, count = unpack(buf, pos)
            limit = sizes.get(region, 0)
            if not 0 < count <= max_xfer or offset + count > limit:
                break
            if cmd == _READ and size == _ACCESS_MSG_SIZE and mflags == 0:
                if debug:
                    log.debug("%s: <- REGION_READ id=%d region %d %#x+%d", self.endpoint.path,
                              msg_id, region, offset, count)
                try:
                    data = dev.region_read(region, offset, count)
                    if len(data) != count:
                        raise ProtocolError(errno.EIO, "device returned a short read")
                except Exception as exc:
                    reply = self._handler_failed(self._message_at(pos, size), exc)[0]
                    if reply is not None:
                        out.append(reply)
                else:
                    out.append(pack(msg_id, cmd, _ACCESS_MSG_SIZE + count, _REPLY, 0, offset, region, count) + data)
            elif (cmd == _WRITE and size == _ACCESS_MSG_SIZE + count and not mflags & ~_NO_REPLY
                  and nbytes - pos >= size):
                if debug:
                    log.debug("%s: <- REGION_WRITE id=%d region %d %#x+%d%s", self.endpoint.path,
                              msg_id, region, offset, count, " posted" if mflags else "")
                try:
                    dev.region_write(region, offset, bytes(self.rview[pos + _ACCESS_MSG_SIZE:pos + size]))
                except Exception as exc:
                    reply = self._handler_failed(self._message_at(pos, size), exc)[0]
                    if reply is not None:
                        out.append(reply)
                else:
                    if not mflags:
                        out.append(pack(msg_id, cmd, _ACCESS_MSG_SIZE, _REPLY, 0, offset, region, count))
            else:
                break
            pos += size
        return pos

    def _message_at(self, pos: int, size: int) -> Message:
        """The request at ``rbuf[pos:pos+size]`` as a :class:`Message` (error paths only)."""
        msg_id, cmd, _, mflags, err = _HDR.unpack_from(self.rbuf, pos)
        return Message(msg_id, cmd, mflags, err, bytes(self.rbuf[pos + HEADER_SIZE:pos + size]), [])

    def _dispatch(self, msgs: list[Message], out: list[bytes]) -> bool:
        """Handle framed messages in order, appending replies to ``out``; False once closed.

        A reply carrying fds flushes ``out`` first and goes in its own sendmsg, because fds
        travel with the first byte of the call that carries them. MODEL_LOCK is held.
        """
        debug = log.isEnabledFor(logging.DEBUG)
        for m in msgs:
            if debug:
                log.debug("%s: <- %s id=%d flags=%#x size=%d fds=%d", self.endpoint.path,
                          m.command_name(), m.msg_id, m.flags, len(m.payload), len(m.fds))
            reply, reply_fds = self.handle(m)
            if reply is not None:
                if reply_fds:
                    self._send(b"".join(out), [])
                    out.clear()
                    self._send(reply, reply_fds)
                else:
                    out.append(reply)
            if self.closed:
                return False
        return True

    def _send(self, data: bytes, fds: list[int]) -> None:
        if not data or self.closed:
            return
        try:
            with self.send_lock:
                _send_all(self.sock, data, fds)
        except OSError as exc:
            log.info("%s: send failed: %s", self.endpoint.path, exc)
            self.server._call_in_loop(self.close)

    def close(self) -> None:
        """Client gone: unmap all, close eventfds, detach the device, keep its state.

        Any thread may call this. The socket is shut down here, which wakes the reader
        thread; that thread closes the descriptor on its way out, so no thread can be left
        in a system call on a descriptor number that was reused meanwhile.
        """
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with MODEL_LOCK:
            self.ctx.drop_readers()
            if self.negotiated:
                try:
                    self.device.detach()
                except Exception:
                    log.exception("%s: device.detach failed", self.endpoint.path)
            if self.irqs is not None:
                self.irqs.close_all()
            self.dma.clear()
        for w in list(self.pending.values()):
            w.error = errno.ENOTCONN
            w.event.set()
        self.pending.clear()
        _close_fds(self.reader.pending_fds())
        if self.thread is None:
            self.sock.close()
        if self.endpoint.conn is self:
            self.endpoint.conn = None
        log.info("%s: connection closed, device detached", self.endpoint.path)

    # -- dispatch -----------------------------------------------------------------------

    def handle(self, m: Message) -> tuple[bytes | None, list[int]]:
        """Handle one message; returns (reply bytes or None, fds to pass with it)."""
        if m.bad_size:
            return self._reject(m, errno.EINVAL, "bad message_size")
        mtype = m.flags & 0xF
        if mtype == _REPLY:
            if self._complete_dma(m):
                return None, []
            return self._reject(m, errno.EINVAL, "unexpected reply")
        if mtype != MsgType.COMMAND:
            return self._reject(m, errno.EINVAL, f"bad message type {mtype}")
        if -1 in m.fds:
            return self._reject(m, errno.EINVAL, "fds truncated")
        if not self.negotiated and m.command != Command.VERSION:
            return self._reject(m, errno.EINVAL, "request before VERSION")
        handler = self.handlers.get(m.command)
        if handler is None:
            return self._reject(m, errno.EINVAL, "unknown or unsupported command")
        try:
            payload, fds = handler(m)
        except Exception as exc:
            return self._handler_failed(m, exc)
        if m.fds and m.command not in _FD_CONSUMERS:
            log.warning("%s: closing %d stray fds sent with %s", self.endpoint.path, len(m.fds),
                        m.command_name())
            _close_fds(m.fds)
        if m.flags & 0x10:  # FLAG_NO_REPLY: processed, nothing sent
            return None, []
        return pack_header(m.msg_id, m.command, len(payload), _REPLY) + payload, fds

    def _handler_failed(self, m: Message, exc: Exception) -> tuple[bytes | None, list[int]]:
        """The error reply for a request whose handler raised (shared by both paths)."""
        if isinstance(exc, ProtocolError):
            return self._reject(m, exc.errno, exc.reason)
        if isinstance(exc, DmaFromHandlerError):
            log.error("%s: device did DMA inside a %s handler", self.endpoint.path, m.command_name())
            return self._reject(m, errno.EIO, "DMA from handler")
        if isinstance(exc, OSError):
            return self._reject(m, exc.errno or errno.EIO, f"device: {exc}")
        log.error("%s: device failed on %s", self.endpoint.path, m.command_name(), exc_info=exc)
        return self._reject(m, errno.EIO, "device exception")

    def _reject(self, m: Message, err: int, reason: str) -> tuple[bytes | None, list[int]]:
        _close_fds(m.fds)
        log.info("%s: %s id=%d rejected with %s: %s", self.endpoint.path, m.command_name(), m.msg_id,
                 errno.errorcode.get(err, err), reason)
        if m.flags & 0x10 and not m.bad_size:
            return None, []
        return error_reply(m.msg_id, m.command, err), []

    # -- VERSION ------------------------------------------------------------------------

    def _version(self, m: Message) -> tuple[bytes, list[int]]:
        if self.negotiated:
            raise ProtocolError(errno.EINVAL, "second VERSION")
        if m.fds:
            raise ProtocolError(errno.EINVAL, "VERSION carries fds")
        major, minor, caps = parse_version(m.payload)
        if major != PROTOCOL_MAJOR:
            raise ProtocolError(errno.EINVAL, f"unsupported major {major}")
        srv = self.server
        self.client_caps = caps
        self.server_caps = Capabilities(max_msg_fds=srv.max_msg_fds,
                                        max_data_xfer_size=srv.max_data_xfer_size,
                                        max_dma_maps=srv.max_dma_maps,
                                        write_multiple=srv.write_multiple and caps.write_multiple)
        dev = self.device
        self.num_regions = dev.num_regions
        self.irqs = IrqState([dev.irq_info(i) for i in range(dev.num_irqs)],
                             srv.add_reader, srv.remove_reader)
        self.negotiated = True
        dev.attach(self.ctx)
        log.info("%s: client negotiated version %d.%d caps %s", self.endpoint.path, major,
                 minor, caps.to_json()["capabilities"])
        return build_version(PROTOCOL_MAJOR, min(minor, PROTOCOL_MINOR), self.server_caps), []

    # -- DMA map ------------------------------------------------------------------------

    def _dma_map(self, m: Message) -> tuple[bytes, list[int]]:
        p = m.payload
        if len(p) < DMA_MAP.size:
            raise ProtocolError(errno.EINVAL, "DMA_MAP payload too short")
        req = DMA_MAP.unpack(p)
        if req.argsz < DMA_MAP.size:
            raise ProtocolError(errno.EINVAL, f"DMA_MAP argsz {req.argsz}")
        if req.flags & ~DMA_MAP_FLAGS_VALID:
            raise ProtocolError(errno.EINVAL, f"DMA_MAP unknown flags {req.flags:#x}")
        if len(m.fds) > 1:
            raise ProtocolError(errno.EINVAL, f"DMA_MAP with {len(m.fds)} fds")
        fd = m.fds[0] if m.fds else None
        added = self.dma.add(req.addr, req.size, req.flags, fd, req.offset)
        _close_fds(m.fds)  # the mmap keeps its own reference
        log.debug("DMA_MAP %#x+%#x flags %#x %s", req.addr, req.size, req.flags,
                  "fd" if fd is not None else "no fd")
        if added:
            self.device.dma_changed()
        return b"", []

    def _dma_unmap(self, m: Message) -> tuple[bytes, list[int]]:
        p = m.payload
        if len(p) < DMA_UNMAP.size:
            raise ProtocolError(errno.EINVAL, "DMA_UNMAP payload too short")
        req = DMA_UNMAP.unpack(p)
        if req.argsz < DMA_UNMAP.size:
            raise ProtocolError(errno.EINVAL, f"DMA_UNMAP argsz {req.argsz}")
        if m.fds:
            raise ProtocolError(errno.EINVAL, "DMA_UNMAP carries fds")
        if req.flags == DMA_UNMAP_FLAG_ALL:
            if req.addr or req.size:
                raise ProtocolError(errno.EINVAL, "DMA_UNMAP all with a range")
            self.dma.clear()
        elif req.flags:
            raise ProtocolError(errno.EINVAL, f"DMA_UNMAP unsupported flags {req.flags:#x}")
        else:
            self.dma.remove(req.addr, req.size)
        log.debug("DMA_UNMAP %#x+%#x flags %#x", req.addr, req.size, req.flags)
        self.device.dma_changed()
        return bytes(p[:DMA_UNMAP.size]), []

    # -- device info --------------------------------------------------------------------

    def _get_info(self, m: Message) -> tuple[bytes, list[int]]:
        if len(m.payload) < DEVICE_INFO.size or DEVICE_INFO.unpack(m.payload).argsz < DEVICE_INFO.size:
            raise ProtocolError(errno.EINVAL, "DEVICE_GET_INFO too short")
        dev = self.device
        return DEVICE_INFO.pack(DEVICE_INFO.size, dev.device_flags, self.num_regions, dev.num_irqs), []

    def _region(self, index: int) -> RegionInfo:
        info = self.regions.get(index)
        if info is None:
            if not 0 <= index < self.num_regions:
                raise ProtocolError(errno.EINVAL, f"region index {index} out of range")
            info = self.device.region_info(index)
            self.regions[index] = info
            if info.size:
                self.region_sizes[index] = info.size
        return info

    def _get_region_info(self, m: Message) -> tuple[bytes, list[int]]:
        if len(m.payload) < REGION_INFO.size:
            raise ProtocolError(errno.EINVAL, "GET_REGION_INFO payload too short")
        req = REGION_INFO.unpack(m.payload)
        if req.argsz < REGION_INFO.size:
            raise ProtocolError(errno.EINVAL, f"GET_REGION_INFO argsz {req.argsz}")
        info = self._region(req.index)
        flags = info.flags & ~(VFIO_REGION_INFO_FLAG_MMAP | VFIO_REGION_INFO_FLAG_CAPS)
        caps = b""
        if info.mmap_fd is not None:
            flags |= VFIO_REGION_INFO_FLAG_MMAP
            if info.sparse:
                flags |= VFIO_REGION_INFO_FLAG_CAPS
                caps = (CAP_HEADER.pack(REGION_INFO_CAP_SPARSE_MMAP, SPARSE_MMAP_CAP_VERSION, 0)
                        + SPARSE_MMAP.pack(len(info.sparse), 0)
                        + b"".join(SPARSE_AREA.pack(o, s) for o, s in info.sparse))
        needed = REGION_INFO.size + len(caps)
        fds: list[int] = []
        if caps and req.argsz >= needed:
            body = REGION_INFO.pack(needed, flags, req.index, REGION_INFO.size, info.size,
                                    info.mmap_offset) + caps
            fds = [info.mmap_fd]  # type: ignore[list-item]
        else:
            # Too small for the capability chain: report the size needed and leave CAPS
            # clear. QEMU (>= 11.1) rejects CAPS with cap_offset 0 as EINVAL; it asks again
            # whenever the returned argsz exceeds what it sent.
            body = REGION_INFO.pack(needed, flags & ~VFIO_REGION_INFO_FLAG_CAPS, req.index, 0,
                                    info.size, info.mmap_offset)
            if info.mmap_fd is not None and not caps:
                fds = [info.mmap_fd]
        return body, fds

    def _get_region_io_fds(self, m: Message) -> tuple[bytes, list[int]]:
        if len(m.payload) < REGION_IO_FDS.size:
            raise ProtocolError(errno.EINVAL, "GET_REGION_IO_FDS payload too short")
        req = REGION_IO_FDS.unpack(m.payload)
        if req.argsz < REGION_IO_FDS.size or req.flags:
            raise ProtocolError(errno.EINVAL, "GET_REGION_IO_FDS bad argsz or flags")
        self._region(req.index)
        # No region has ioeventfds: an empty sub-region list.
        return REGION_IO_FDS.pack(REGION_IO_FDS.size, 0, req.index, 0), []

    def _get_irq_info(self, m: Message) -> tuple[bytes, list[int]]:
        if len(m.payload) < IRQ_INFO.size:
            raise ProtocolError(errno.EINVAL, "GET_IRQ_INFO payload too short")
        req = IRQ_INFO.unpack(m.payload)
        assert self.irqs is not None
        if req.argsz < IRQ_INFO.size or not 0 <= req.index < len(self.irqs.indexes):
            raise ProtocolError(errno.EINVAL, f"GET_IRQ_INFO argsz {req.argsz} index {req.index}")
        info = self.irqs.indexes[req.index].info
        return IRQ_INFO.pack(IRQ_INFO.size, info.flags, req.index, info.count), []

    def _set_irqs(self, m: Message) -> tuple[bytes, list[int]]:
        assert self.irqs is not None
        index = self.irqs.set_irqs(m.payload, m.fds)
        self.device.irqs_changed(index)
        return b"", []

    # -- region access ------------------------------------------------------------------

    def _check_access(self, region: int, offset: int, count: int) -> None:
        info = self._region(region)
        if info.size == 0:
            raise ProtocolError(errno.EINVAL, f"region {region} has no size")
        if count > self.server.max_data_xfer_size:
            raise ProtocolError(errno.EINVAL, f"count {count} above max_data_xfer_size")
        if offset + count > info.size:
            raise ProtocolError(errno.EINVAL, f"region {region} access {offset:#x}+{count:#x} "
                                              f"beyond {info.size:#x}")

    def _region_read(self, m: Message) -> tuple[bytes, list[int]]:
        p = m.payload
        if len(p) < 16:
            raise ProtocolError(errno.EINVAL, "REGION_READ payload too short")
        offset, region, count = REGION_ACCESS.struct.unpack_from(p)
        self._check_access(region, offset, count)
        data = self.device.region_read(region, offset, count) if count else b""
        if len(data) != count:
            log.error("%s: region_read returned %d bytes for %d", self.endpoint.path, len(data), count)
            raise ProtocolError(errno.EIO, "device returned a short read")
        return p[:16] + data, []

    def _region_write(self, m: Message) -> tuple[bytes, list[int]]:
        p = m.payload
        if len(p) < 16:
            raise ProtocolError(errno.EINVAL, "REGION_WRITE payload too short")
        offset, region, count = REGION_ACCESS.struct.unpack_from(p)
        if len(p) - 16 != count:
            raise ProtocolError(errno.EINVAL, f"REGION_WRITE count {count} vs {len(p) - 16} data bytes")
        self._check_access(region, offset, count)
        if count:
            self.device.region_write(region, offset, p[16:])
        return p[:16], []

    def _write_multi(self, m: Message) -> tuple[bytes, list[int]]:
        assert self.server_caps is not None
        if not self.server_caps.write_multiple:
            raise ProtocolError(errno.EINVAL, "write_multiple was not negotiated")
        p = m.payload
        if len(p) < WRITE_MULTI.size:
            raise ProtocolError(errno.EINVAL, "REGION_WRITE_MULTI payload too short")
        (n,) = WRITE_MULTI.struct.unpack_from(p)
        if n == 0 or n > WRITE_MULTI_MAX or len(p) != WRITE_MULTI.size + n * WRITE_MULTI_ENTRY.size:
            raise ProtocolError(errno.EINVAL, f"REGION_WRITE_MULTI wr_cnt {n} vs {len(p)} bytes")
        entries = [WRITE_MULTI_ENTRY.unpack(p, WRITE_MULTI.size + i * WRITE_MULTI_ENTRY.size)
                   for i in range(n)]
        for e in entries:
            if e.count > WRITE_MULTI_DATA_MAX:
                raise ProtocolError(errno.EINVAL, f"REGION_WRITE_MULTI count {e.count}")
            self._check_access(e.region, e.offset, e.count)
        for e in entries:
            if e.count:
                self.device.region_write(e.region, e.offset, e.data[:e.count])
        return WRITE_MULTI.pack(n), []

    def _reset(self, m: Message) -> tuple[bytes, list[int]]:
        if m.fds:
            raise ProtocolError(errno.EINVAL, "DEVICE_RESET carries fds")
        log.info("%s: DEVICE_RESET", self.endpoint.path)
        self.device.reset()
        return b"", []

    def _device_feature(self, m: Message) -> tuple[bytes, list[int]]:
        if len(m.payload) < DEVICE_FEATURE.size or DEVICE_FEATURE.unpack(m.payload).argsz < DEVICE_FEATURE.size:
            raise ProtocolError(errno.EINVAL, "DEVICE_FEATURE too short")
        raise ProtocolError(errno.ENOTSUP, "no device features (no migration)")

    # -- server-to-client DMA -----------------------------------------------------------

    def _alloc_id(self) -> int:
        with self._id_lock:
            for _ in range(0x10000):
                self._next_id = (self._next_id + 1) & 0xFFFF
                if self._next_id not in self.pending:
                    return self._next_id
        raise MessageDmaError(0, 0, False, errno.EBUSY, "no free message id")

    def message_dma(self, pieces: list[tuple[int, int, int]], data: bytes | None,
                    out: bytearray) -> None:
        """Serve fd-less pieces with DMA_READ/DMA_WRITE messages, from a worker thread."""
        write = data is not None
        chunk = max(1, min(self.client_caps.max_data_xfer_size, self.server.max_data_xfer_size))
        cmd = Command.DMA_WRITE if write else Command.DMA_READ
        waiters: list[tuple[_DmaWaiter, int]] = []
        msgs: list[bytes] = []
        for addr, length, pos in pieces:
            for off in range(0, length, chunk):
                n = min(chunk, length - off)
                w = _DmaWaiter(cmd, addr + off, n)
                msg_id = self._alloc_id()
                self.pending[msg_id] = w
                waiters.append((w, pos + off))
                body = DMA_ACCESS.pack(addr + off, n)
                if write:
                    body += data[pos + off:pos + off + n]  # type: ignore[index]
                msgs.append(pack_header(msg_id, cmd, len(body)) + body)
        if self.closed:
            raise MessageDmaError(pieces[0][0], len(out), write, errno.ENOTCONN, "client disconnected")
        self._send(b"".join(msgs), [])
        log.debug("%s: -> %d %s message(s)", self.endpoint.path, len(msgs), cmd.name)
        owned = MODEL_LOCK._is_owned()  # type: ignore[attr-defined]
        state = MODEL_LOCK._release_save() if owned else None  # type: ignore[attr-defined]
        try:
            for w, _ in waiters:
                if not w.event.wait(self.server.dma_timeout):
                    w.error = errno.ETIMEDOUT
        finally:
            if owned:
                MODEL_LOCK._acquire_restore(state)  # type: ignore[attr-defined]
        for w, pos in waiters:
            if w.error:
                for mid, pw in list(self.pending.items()):
                    if pw is w:
                        self.pending.pop(mid, None)
                raise MessageDmaError(w.addr, w.count, write, w.error,
                                      f"{cmd.name} failed: {errno.errorcode.get(w.error, w.error)}")
            if not write:
                out[pos:pos + w.count] = w.data

    def _complete_dma(self, m: Message) -> bool:
        """A reply from the client: match it to an outstanding DMA message."""
        w = self.pending.get(m.msg_id)
        if w is None or w.command != m.command:
            return False
        del self.pending[m.msg_id]
        _close_fds(m.fds)
        if m.flags & 0x20:  # FLAG_ERROR
            w.error = m.error or errno.EIO
        elif w.command == Command.DMA_READ:
            p = m.payload
            if len(p) < DMA_ACCESS.size or len(p) - DMA_ACCESS.size != w.count:
                w.error = errno.EIO
            else:
                w.data = p[DMA_ACCESS.size:]
        log.debug("%s: <- %s reply id=%d error=%d", self.endpoint.path, m.command_name(), m.msg_id, w.error)
        w.event.set()
        return True


# ---------------------------------------------------------------------------------------
# The server


class Server(EventLoop):
    """One event loop (listeners, model fds) and a reader thread per client, serving
    vfio-user devices on UNIX sockets.

    Usage: ``s = Server(); s.add_device(path, dev); s.start_in_thread(); ...; s.stop()``.
    """

    def __init__(self, *, max_msg_fds: int = 16, max_data_xfer_size: int = 1 << 20,
                 max_dma_maps: int = 65535, write_multiple: bool = True,
                 dma_timeout: float = DMA_TIMEOUT) -> None:
        self.max_msg_fds = max_msg_fds
        self.max_data_xfer_size = max_data_xfer_size
        self.max_dma_maps = max_dma_maps
        self.write_multiple = write_multiple
        self.dma_timeout = dma_timeout
        #: Largest message accepted: a full data transfer plus headers.
        self.max_msg_size = HEADER_SIZE + 4096 + max_data_xfer_size
        super().__init__()
        self._endpoints: dict[str, _Endpoint] = {}
        self._listeners: dict[int, _Endpoint] = {}
        #: Connection reader threads, joined by stop() (a closing one may outlive ep.conn).
        self._readers: list[threading.Thread] = []

    # -- public API ---------------------------------------------------------------------

    def add_device(self, path: str, device: VfioUserDevice) -> None:
        """Listen on ``path`` (mode 0600) for clients of ``device``."""
        if self._closed:
            raise RuntimeError("server stopped")
        path = os.fspath(path)
        if path in self._endpoints:
            raise ValueError(f"{path} already served")
        remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(4)
        sock.setblocking(False)
        ep = _Endpoint(path, device, sock)
        self._endpoints[path] = ep
        self._listeners[sock.fileno()] = ep
        self._register(sock.fileno(), lambda: self._accept(ep), locked=False)
        log.info("serving %s on %s", type(device).__name__, path)

    def _accept(self, ep: _Endpoint) -> None:
        try:
            sock, _ = ep.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        old = ep.conn
        if old is not None and old.peer_gone():
            # The previous client hung up but its reader thread may not have reached the
            # end of what it sent (posted writes count): let it finish, as one loop would.
            old.wait_finished(SEND_TIMEOUT)
        if ep.conn is not None:
            log.warning("%s: a client is already attached; refusing another", ep.path)
            sock.close()
            return
        sock.setblocking(True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", int(SEND_TIMEOUT), 0))
        conn = _Connection(self, ep, sock)
        ep.conn = conn
        conn.start()
        self._readers = [t for t in self._readers if t.is_alive()] + [conn.thread]
        log.info("%s: client connected", ep.path)

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._flush_deferred()
        for ep in self._endpoints.values():
            if ep.conn is not None:
                ep.conn.close()
        # Readers hand their last deferred work to the workers on the way out: before those stop.
        for t in self._readers:
            if t is not threading.current_thread():
                t.join(timeout=10)
        for ep in self._endpoints.values():
            self._unregister(ep.sock.fileno())
            ep.sock.close()
            try:
                if stat.S_ISSOCK(os.lstat(ep.path).st_mode):
                    os.unlink(ep.path)
            except OSError:
                pass
            ep.worker.stop()
        for fd in list(self._handlers):
            self._unregister(fd)
        self._epoll.close()
        os.close(self._wake_fd)
        self._running.clear()
        log.info("server stopped")


# ---------------------------------------------------------------------------------------
# Helpers


def _fds_from_ancillary(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def _send_all(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send a whole buffer; fds ride on the first sendmsg."""
    if not fds:
        sock.sendall(data)
        return
    anc: list[Any] = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])

