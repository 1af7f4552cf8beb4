"""Where the NIC's frames come from and go to: the :class:`PacketBackend` protocol and
:class:`SocketPairBackend`, an in-process backend on real fds.

A backend is the NIC's wire. The NIC model reads it only when its fd is readable (from
the vfio-user event loop), one whole frame per :meth:`PacketBackend.recv`, and never
blocks on it: a backend that cannot take a frame says so (``send`` returns False) and the
NIC counts a drop, as a NIC whose wire is congested would. The TAP backend
(devmodel/net) implements the same protocol.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Protocol, runtime_checkable

from devmodel.devices.nic_records import MAX_FRAME

log = logging.getLogger(__name__)

#: Errors after which a frame is dropped but the backend stays usable.
TRANSIENT_ERRNOS = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.EIO)
#: Socket buffer for each end of a pair: room for a burst of full-size frames.
SOCKET_BUFFER = 1 << 20


@runtime_checkable
class PacketBackend(Protocol):
    """A non-blocking frame source/sink (Ethernet frames without FCS)."""

    def fileno(self) -> int:
        """A non-blocking fd, readable when a frame waits."""
        ...

    def recv(self) -> bytes | None:
        """One whole frame, or None when none waits (EAGAIN)."""
        ...

    def send(self, frame: bytes) -> bool:
        """Queue one frame; False when it was dropped (EAGAIN/ENOBUFS/EIO)."""
        ...

    def close(self) -> None:
        ...


class SocketPairBackend:
    """One end of an AF_UNIX SOCK_SEQPACKET pair: message boundaries are frame boundaries.

    The NIC gets this object; the test or benchmark keeps :attr:`peer`, the other end (a
    blocking-free socket too), and plays the network with :meth:`inject` / :meth:`collect`.
    """

    def __init__(self, bufsize: int = SOCKET_BUFFER) -> None:
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (self.sock, self.peer):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
        self.closed = False

    # --- PacketBackend (the NIC's side) ---------------------------------------------------
    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self) -> bytes | None:
        # One byte more than a frame may have: a longer message shows up as too long
        # (the NIC drops it as TOO_BIG) instead of being silently truncated to a valid size.
        try:
            data = self.sock.recv(MAX_FRAME + 1)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            log.warning("socket-pair backend: recv failed: %s", e)
            return None
        return data if data else None

    def send(self, frame: bytes) -> bool:
        try:
            self.sock.send(frame)
        except OSError as e:
            if e.errno in TRANSIENT_ERRNOS or isinstance(e, BlockingIOError):
                log.info("socket-pair backend: frame of %d bytes dropped: %s", len(frame), e)
                return False
            log.warning("socket-pair backend: send failed: %s", e)
            return False
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()
            self.peer.close()

    # --- the network's side ----------------------------------------------------------------
    def inject(self, frame: bytes) -> bool:
        """The network sends ``frame`` towards the NIC; False when the pair is full."""
        try:
            self.peer.send(frame)
        except BlockingIOError:
            return False
        return True

    def collect(self) -> list[bytes]:
        """Every frame the NIC has sent so far (non-blocking)."""
        out: list[bytes] = []
        while True:
            try:
                out.append(self.peer.recv(65536))
            except BlockingIOError:
                return out
