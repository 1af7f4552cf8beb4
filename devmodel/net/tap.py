"""TAP packet backend: the NIC model's wire is a Linux tap device.

A tap file descriptor carries whole Ethernet frames (destination MAC first, no FCS, no
packet-information header because of ``IFF_NO_PI``): one ``read`` returns exactly one
frame the kernel transmitted on the tap interface, one ``write`` injects exactly one frame
the kernel then receives on it. That one-frame-per-syscall contract is what the
:class:`devmodel.devices.packet_backend.PacketBackend` protocol asks for, so the NIC model
needs no framing layer.

The descriptor is non-blocking because the NIC model only reads it from the vfio-user
event loop (``DeviceContext.add_reader``): ``recv`` says "nothing waits" with ``None``
and ``send`` says "the wire dropped it" with ``False`` (full queue, link down, a frame the
kernel refuses), the way a real PHY drops frames instead of stalling the bus master.

Closing a :class:`TapBackend` closes only its descriptor. A non-persistent tap vanishes
with its last descriptor; everything else (namespaces, addresses) belongs to
:mod:`devmodel.net.netns`.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from types import TracebackType

log = logging.getLogger(__name__)

TUN_PATH = "/dev/net/tun"
"""The tun/tap clone device (linux/if_tun.h users open it, then TUNSETIFF)."""

IFNAMSIZ = 16
"""Interface name buffer size, NUL included (linux/if.h)."""

IFF_TAP = 0x0002
"""TUNSETIFF flag: layer-2 device carrying Ethernet frames (linux/if_tun.h)."""

IFF_NO_PI = 0x1000
"""TUNSETIFF flag: no 4-byte packet-information prefix on each frame (linux/if_tun.h)."""

TUNSETIFF = 0x400454CA
"""_IOW('T', 202, int): attach the descriptor to a (new) tun/tap interface."""

TUNGETIFF = 0x800454D2
"""_IOR('T', 210, unsigned int): the attached interface's current name and flags."""

IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")
"""struct ifreq as TUNSETIFF/TUNGETIFF use it: ifr_name then ifr_flags (40 bytes in all)."""

MAX_FRAME = 65536
"""Read buffer size: larger than any frame a tap delivers (MTU up to 64 KiB, no GSO)."""

DROP_ERRNOS = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.EIO, errno.EINVAL, errno.EMSGSIZE})
"""Write errors that mean "the wire dropped this frame", never a model crash: queue full
(EAGAIN, ENOBUFS), interface down (EIO), a frame the kernel refuses as malformed, e.g.
shorter than an Ethernet header or longer than the MTU allows (EINVAL, EMSGSIZE)."""


class TapBackend:
    """One tap interface, as a non-blocking :class:`PacketBackend`.

    ``ifname`` is a name request ("" lets the kernel pick ``tapN``); the kernel's choice,
    and any later rename, is read back from the descriptor by :attr:`ifname`.
    """

    def __init__(self, ifname: str = "", *, tun_path: str = TUN_PATH) -> None:
        name = ifname.encode("ascii")
        if len(name) >= IFNAMSIZ:
            raise ValueError(f"interface name {ifname!r} longer than {IFNAMSIZ - 1} bytes")
        fd = os.open(tun_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, IFREQ.pack(name, IFF_TAP | IFF_NO_PI))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._buf = bytearray(MAX_FRAME)
        log.info("tap %s opened (fd %d)", self.ifname, fd)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran; a closed backend behaves like a dead link."""
        return self._fd < 0

    @property
    def ifname(self) -> str:
        """The interface's current name in whatever namespace it now lives in."""
        if self.closed:
            return ""
        raw = fcntl.ioctl(self._fd, TUNGETIFF, bytes(IFREQ.size))
        return IFREQ.unpack(raw)[0].rstrip(b"\0").decode("ascii")

    def fileno(self) -> int:
        """The non-blocking descriptor (readable when a frame waits); -1 once closed."""
        return self._fd

    def recv(self) -> bytes | None:
        """One whole frame the kernel sent out of the tap, or None when none waits."""
        if self.closed:
            return None
        try:
            n = os.readv(self._fd, [self._buf])
        except (BlockingIOError, InterruptedError):
            return None
        return bytes(memoryview(self._buf)[:n])

    def send(self, frame: bytes) -> bool:
        """Hand one frame to the kernel; False when it was dropped (see DROP_ERRNOS)."""
        if self.closed:
            return False
        try:
            written = os.write(self._fd, frame)
        except OSError as exc:
            if exc.errno in DROP_ERRNOS:
                log.debug("tap send dropped %d-byte frame: %s", len(frame), errno.errorcode.get(exc.errno, exc.errno))
                return False
            raise
        return written == len(frame)

    def close(self) -> None:
        """Close the descriptor (idempotent); a non-persistent tap disappears with it."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
            log.info("tap fd %d closed", fd)

    def __enter__(self) -> TapBackend:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TapBackend(fd={self._fd})"
