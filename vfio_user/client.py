"""A small pure-Python vfio-user client, for tests, benchmarks and ``devmodel inspect``.

It speaks the same declared layouts as the server (:mod:`vfio_user.protocol`), can send
raw bytes (malformed-message tests), keeps any number of requests in flight, and serves
the server's DMA_READ/DMA_WRITE messages from memory it offered with DMA_MAP (a memfd it
maps itself, passed with or without the fd). Single-threaded: incoming server requests
are handled whenever the client reads from the socket, or held for the caller when
``auto_dma`` is off (to answer late on purpose).
"""

from __future__ import annotations

import array
import errno
import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from vfio_user.protocol import (
    CAP_HEADER,
    DEVICE_INFO,
    DMA_ACCESS,
    DMA_FLAG_READ,
    DMA_FLAG_WRITE,
    DMA_MAP,
    DMA_UNMAP,
    HEADER_SIZE,
    IRQ_INFO,
    IRQ_SET,
    REGION_ACCESS,
    REGION_ACCESS_MSG,
    REGION_INFO,
    REGION_INFO_CAP_SPARSE_MMAP,
    SPARSE_AREA,
    SPARSE_MMAP,
    WRITE_MULTI,
    WRITE_MULTI_ENTRY,
    Capabilities,
    Command,
    FLAG_NO_REPLY,
    Message,
    MessageReader,
    MsgType,
    build_version,
    error_reply,
    pack_header,
    parse_version,
)

_ANC_SIZE = socket.CMSG_SPACE(253 * 4)
_RECV_SIZE = 256 * 1024
_RA = REGION_ACCESS.struct
_ACCESS_MSG = REGION_ACCESS_MSG
_ACCESS_MSG_SIZE = REGION_ACCESS_MSG.size
_READ = int(Command.REGION_READ)
_REPLY = int(MsgType.REPLY)
# Plain ints: an IntFlag operation costs an enum call per message.
_MSG_DONTWAIT = int(socket.MSG_DONTWAIT)


class VfioUserError(OSError):
    """The server answered a request with an error reply."""


@dataclass
class LocalMemory:
    """Client memory offered to the server with DMA_MAP."""

    addr: int
    size: int
    buf: memoryview
    fd: int | None
    flags: int
    mm: mmap.mmap | None = None

    def close(self) -> None:
        self.buf.release()
        if self.mm is not None:
            self.mm.close()
        if self.fd is not None:
            os.close(self.fd)


@dataclass
class RegionInfoReply:
    """A decoded DEVICE_GET_REGION_INFO reply."""

    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int
    sparse: list[tuple[int, int]]
    fds: list[int]


class Client:
    """One connection to a vfio-user server socket."""

    def __init__(self, path: str, *, timeout: float = 5.0, max_data_xfer_size: int = 1 << 20) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(path)
        self.set_timeout(timeout)
        self.max_data_xfer_size = max_data_xfer_size
        self.reader = MessageReader(HEADER_SIZE + 4096 + max(max_data_xfer_size, 1 << 20))
        self.replies: dict[int, Message] = {}
        self.dma_requests: list[Message] = []
        #: Answer the server's DMA_READ/WRITE as soon as they are read.
        self.auto_dma = True
        self.memory: list[LocalMemory] = []
        self.server_caps: Capabilities | None = None
        self._next_id = 0
        self._rbuf = bytearray(_RECV_SIZE)
        self._rview = memoryview(self._rbuf)
        self._rbufs = [self._rbuf]

    # -- plumbing -----------------------------------------------------------------------

    def set_timeout(self, timeout: float) -> None:
        """Kernel receive timeout (no Python-level polling on the fast path)."""
        sec = int(timeout)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                             struct.pack("ll", sec, int((timeout - sec) * 1e6)))

    def close(self) -> None:
        for m in self.memory:
            m.close()
        self.memory.clear()
        for msg in list(self.replies.values()) + self.dma_requests:
            for fd in msg.fds:
                os.close(fd)
        self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_id(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFF
        return self._next_id

    def send_raw(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Put bytes on the socket as they are (fds ride on the first byte)."""
        if not fds:
            self.sock.sendall(data)
            return
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = self.sock.sendmsg([data], anc)
        if sent < len(data):
            self.sock.sendall(memoryview(data)[sent:])

    def send(self, command: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
             flags: int = 0, msg_id: int | None = None) -> int:
        """Send one request without waiting; returns its message id."""
        mid = self.next_id() if msg_id is None else msg_id
        self.send_raw(pack_header(mid, command, len(payload), flags) + payload, fds)
        return mid

    def _read(self, block: bool) -> bool:
        """Read once; False when nothing was available (non-blocking) or on timeout."""
        try:
            nbytes, anc, _, _ = self.sock.recvmsg_into(self._rbufs, _ANC_SIZE,
                                                       0 if block else _MSG_DONTWAIT)
        except BlockingIOError:
            if block:
                raise TimeoutError("no reply from server") from None
            return False
        self._take(nbytes, anc)
        return True

    def _take(self, nbytes: int, anc: list[tuple[int, int, bytes]], start: int = 0) -> None:
        """Frame ``_rbuf[start:nbytes]`` (plus fds): store replies, serve or hold DMA requests."""
        if not nbytes:
            raise ConnectionError("server closed the connection")
        fds: list[int] = []
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(raw[: len(raw) - len(raw) % 4])
                fds.extend(a)
        for msg in self.reader.feed(self._rview[start:nbytes], fds):
            if msg.flags & 0xF == MsgType.REPLY:
                self.replies[msg.msg_id] = msg
            elif self.auto_dma:
                self.serve_dma(msg)
            else:
                self.dma_requests.append(msg)

    def poll(self) -> None:
        """Read whatever is available without blocking (serves DMA when auto_dma)."""
        while self._read(False):
            pass

    def serve_until(self, done: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Keep reading (serving DMA) until ``done()`` or ``timeout``; returns ``done()``."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if select.select([self.sock], [], [], min(left, 0.01))[0]:
                self.poll()
        return True

    def wait_reply(self, msg_id: int) -> Message:
        """Block until the reply to ``msg_id`` arrives."""
        while msg_id not in self.replies:
            self._read(True)
        return self.replies.pop(msg_id)

    def request(self, command: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
                flags: int = 0) -> Message:
        """Send and wait for the reply (error replies are returned, not raised)."""
        return self.wait_reply(self.send(command, payload, fds, flags))

    def call(self, command: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = ()) -> Message:
        """Send, wait, and raise :class:`VfioUserError` on an error reply."""
        r = self.request(command, payload, fds)
        if r.flags & 0x20:
            for fd in r.fds:
                os.close(fd)
            raise VfioUserError(r.error, f"{Command(command).name}: {os.strerror(r.error) if r.error else 'error'}")
        return r

    # -- commands -----------------------------------------------------------------------

    def negotiate(self, caps: Capabilities | None = None, major: int = 0, minor: int = 0) -> Capabilities:
        """VERSION: propose ``caps`` (QEMU-like defaults) and keep the server's answer."""
        if caps is None:
            caps = Capabilities(max_msg_fds=16, max_data_xfer_size=self.max_data_xfer_size,
                                write_multiple=True)
        r = self.call(Command.VERSION, build_version(major, minor, caps))
        _, _, self.server_caps = parse_version(r.payload)
        return self.server_caps

    def device_info(self) -> tuple:
        r = self.call(Command.DEVICE_GET_INFO, DEVICE_INFO.pack(DEVICE_INFO.size, 0, 0, 0))
        return DEVICE_INFO.unpack(r.payload)

    def region_info(self, index: int, argsz: int = 256) -> RegionInfoReply:
        """GET_REGION_INFO, decoding a sparse-mmap capability when present."""
        r = self.call(Command.DEVICE_GET_REGION_INFO, REGION_INFO.pack(argsz, 0, index, 0, 0, 0))
        info = REGION_INFO.unpack(r.payload)
        return RegionInfoReply(*info, sparse=parse_sparse(r.payload, info.cap_offset), fds=list(r.fds))

    def irq_info(self, index: int) -> tuple:
        r = self.call(Command.DEVICE_GET_IRQ_INFO, IRQ_INFO.pack(IRQ_INFO.size, 0, index, 0))
        return IRQ_INFO.unpack(r.payload)

    def set_irqs(self, index: int, flags: int, start: int, count: int,
                 fds: list[int] | tuple[int, ...] = (), data: bytes = b"") -> None:
        body = IRQ_SET.pack(IRQ_SET.size + len(data), flags, index, start, count) + data
        self.call(Command.DEVICE_SET_IRQS, body, fds)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """REGION_READ, raising :class:`VfioUserError` on an error reply.

        Fast path: when nothing else is buffered, the request goes out with one send and
        a reply that arrives alone is decoded straight from the receive buffer.
        """
        self._next_id = mid = (self._next_id + 1) & 0xFFFF
        self.sock.sendall(_ACCESS_MSG.pack(mid, _READ, _ACCESS_MSG_SIZE, 0, 0, offset, index, count))
        if not self.replies and not self.reader.buffered():
            try:
                nbytes, anc, _, _ = self.sock.recvmsg_into(self._rbufs, _ANC_SIZE)
            except BlockingIOError:
                raise TimeoutError("no reply from server") from None
            if not anc and nbytes >= _ACCESS_MSG_SIZE:
                rid, cmd, size, flags, _, _, _, _ = _ACCESS_MSG.unpack_from(self._rbuf)
                if rid == mid and cmd == _READ and flags == _REPLY and size == nbytes:
                    return bytes(self._rview[_ACCESS_MSG_SIZE:nbytes])
            self._take(nbytes, anc)
        r = self.wait_reply(mid)
        if r.flags & 0x20:
            raise VfioUserError(r.error, f"REGION_READ: {os.strerror(r.error) if r.error else 'error'}")
        return r.payload[REGION_ACCESS.size:]

    def region_read_many(self, accesses: list[tuple[int, int, int]]) -> list[bytes]:
        """Pipeline REGION_READs [(index, offset, count)] with one send; data in order.

        Replies are decoded in place as long as they come back in order with nothing
        else interleaved; anything unusual (DMA requests, fds, a reply to another request)
        falls back to the general framing path.
        """
        ids: list[int] = []
        msgs: list[bytes] = []
        pack = _ACCESS_MSG.pack
        for index, offset, count in accesses:
            self._next_id = mid = (self._next_id + 1) & 0xFFFF
            ids.append(mid)
            msgs.append(pack(mid, _READ, _ACCESS_MSG_SIZE, 0, 0, offset, index, count))
        self.sock.sendall(msgs[0] if len(msgs) == 1 else b"".join(msgs))
        out: list[bytes] = []
        buf, view, unpack = self._rbuf, self._rview, _ACCESS_MSG.unpack_from
        while len(out) < len(ids) and not self.replies and not self.reader.buffered():
            try:
                nbytes, anc, _, _ = self.sock.recvmsg_into(self._rbufs, _ANC_SIZE)
            except BlockingIOError:
                raise TimeoutError("no reply from server") from None
            pos = 0
            if not anc:
                while nbytes - pos >= _ACCESS_MSG_SIZE and len(out) < len(ids):
                    mid, cmd, size, flags, _, _, _, count = unpack(buf, pos)
                    if (mid != ids[len(out)] or cmd != _READ or flags != _REPLY
                            or size != _ACCESS_MSG_SIZE + count or nbytes - pos < size):
                        break
                    out.append(bytes(view[pos + _ACCESS_MSG_SIZE:pos + size]))
                    pos += size
            if pos < nbytes or anc:
                self._take(nbytes, anc, pos)
        rest = [self.wait_reply(mid) for mid in ids[len(out):]]  # collect all before raising
        for r in rest:
            if r.flags & 0x20:
                raise VfioUserError(r.error, f"REGION_READ: {os.strerror(r.error) if r.error else 'error'}")
            out.append(r.payload[REGION_ACCESS.size:])
        return out

    def region_write(self, index: int, offset: int, data: bytes, posted: bool = False) -> None:
        body = _RA.pack(offset, index, len(data)) + data
        if posted:
            self.send(Command.REGION_WRITE, body, flags=FLAG_NO_REPLY)
        else:
            self.call(Command.REGION_WRITE, body)

    def write_multi(self, writes: list[tuple[int, int, bytes]]) -> int:
        body = WRITE_MULTI.pack(len(writes)) + b"".join(
            WRITE_MULTI_ENTRY.pack(off, region, len(d), d) for region, off, d in writes)
        r = self.call(Command.REGION_WRITE_MULTI, body)
        return WRITE_MULTI.unpack(r.payload).wr_cnt

    def reset(self) -> None:
        self.call(Command.DEVICE_RESET)

    def dma_map(self, addr: int, size: int, flags: int = DMA_FLAG_READ | DMA_FLAG_WRITE,
                fd: int | None = None, offset: int = 0) -> None:
        self.call(Command.DMA_MAP, DMA_MAP.pack(DMA_MAP.size, flags, offset, addr, size),
                  [fd] if fd is not None else [])

    def dma_unmap(self, addr: int, size: int, flags: int = 0) -> bytes:
        r = self.call(Command.DMA_UNMAP, DMA_UNMAP.pack(DMA_UNMAP.size, flags, addr, size))
        for m in [m for m in self.memory if m.addr == addr and m.size == size]:
            self.memory.remove(m)
            m.close()
        return r.payload

    # -- local memory and server-to-client DMA -------------------------------------------

    def map_memory(self, addr: int, size: int, *, with_fd: bool = True,
                   flags: int = DMA_FLAG_READ | DMA_FLAG_WRITE) -> memoryview:
        """Create memfd-backed memory at ``addr`` and DMA_MAP it (with or without its fd)."""
        fd = os.memfd_create(f"vfu-client-{addr:#x}", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        mem = LocalMemory(addr, size, memoryview(mm), fd, flags, mm)
        self.memory.append(mem)
        self.dma_map(addr, size, flags, fd if with_fd else None)
        return mem.buf

    def _find(self, addr: int, count: int) -> tuple[LocalMemory, int] | None:
        for m in self.memory:
            if m.addr <= addr and addr + count <= m.addr + m.size:
                return m, addr - m.addr
        return None

    def serve_dma(self, msg: Message) -> None:
        """Answer one DMA_READ/DMA_WRITE from local memory (EFAULT when unmapped)."""
        for fd in msg.fds:
            os.close(fd)
        if msg.command not in (Command.DMA_READ, Command.DMA_WRITE) or len(msg.payload) < DMA_ACCESS.size:
            self.send_raw(error_reply(msg.msg_id, msg.command, errno.EINVAL))
            return
        req = DMA_ACCESS.unpack(msg.payload)
        if req.count > self.max_data_xfer_size:
            self.send_raw(error_reply(msg.msg_id, msg.command, errno.E2BIG))
            return
        hit = self._find(req.addr, req.count)
        if hit is None:
            self.send_raw(error_reply(msg.msg_id, msg.command, errno.EFAULT))
            return
        mem, off = hit
        if msg.command == Command.DMA_READ:
            body = msg.payload[:DMA_ACCESS.size] + bytes(mem.buf[off:off + req.count])
            self.send_raw(pack_header(msg.msg_id, msg.command, len(body), MsgType.REPLY) + body)
        else:
            data = msg.payload[DMA_ACCESS.size:]
            if len(data) != req.count:
                self.send_raw(error_reply(msg.msg_id, msg.command, errno.EINVAL))
                return
            mem.buf[off:off + req.count] = data
            # QEMU answers DMA_WRITE with a bare header.
            self.send_raw(pack_header(msg.msg_id, msg.command, 0, MsgType.REPLY))

    def serve_pending_dma(self) -> int:
        """Answer the DMA requests held while ``auto_dma`` was off; returns how many."""
        held, self.dma_requests = self.dma_requests, []
        for msg in held:
            self.serve_dma(msg)
        return len(held)

    def wait_dma_request(self) -> Message:
        """Block until the server sends a DMA request (``auto_dma`` off)."""
        while not self.dma_requests:
            self._read(True)
        return self.dma_requests[0]


def parse_sparse(payload: bytes, cap_offset: int) -> list[tuple[int, int]]:
    """Walk a region-info capability chain and return the sparse-mmap areas."""
    areas: list[tuple[int, int]] = []
    seen: set[int] = set()
    off = cap_offset
    while off and off not in seen and off + CAP_HEADER.size <= len(payload):
        seen.add(off)
        cap = CAP_HEADER.unpack(payload, off)
        if cap.id == REGION_INFO_CAP_SPARSE_MMAP and off + CAP_HEADER.size + SPARSE_MMAP.size <= len(payload):
            head = SPARSE_MMAP.unpack(payload, off + CAP_HEADER.size)
            base = off + CAP_HEADER.size + SPARSE_MMAP.size
            for i in range(head.nr_areas):
                pos = base + i * SPARSE_AREA.size
                if pos + SPARSE_AREA.size > len(payload):
                    break
                a = SPARSE_AREA.unpack(payload, pos)
                areas.append((a.offset, a.size))
        off = cap.next
    return areas
