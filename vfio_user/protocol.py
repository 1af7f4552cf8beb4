"""vfio-user wire format: header, commands, payload layouts, capability negotiation.

Every record the protocol puts on the socket is declared here once, as a :class:`Layout`
(a ``struct`` format plus field names), and imported by the server, the client, the
inspector and the tests. Sizes are checked by ``tests/vfio_user/test_vfu_layouts.py``.

The spec (QEMU ``docs/interop/vfio-user.rst``) says all data is in the host's byte order,
so layouts use ``=`` (native order, standard sizes, no padding).
"""

from __future__ import annotations

import enum
import errno
import json
import struct
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Any, NamedTuple

# ---------------------------------------------------------------------------------------
# Layouts


class Layout:
    """One fixed-size record: pack from / unpack to a named tuple.

    Declaring each record as (name, format) pairs keeps field names next to their sizes,
    so a record is never re-spelled with magic offsets elsewhere.
    """

    def __init__(self, name: str, fields: list[tuple[str, str]]) -> None:
        self.name = name
        self.struct = struct.Struct("=" + "".join(fmt for _, fmt in fields))
        self.tuple = namedtuple(name, [n for n, _ in fields])  # type: ignore[misc]
        self.size = self.struct.size
        self.fields = [n for n, _ in fields]

    def pack(self, *args: int, **kwargs: int) -> bytes:
        """Pack positional values, or keyword fields (missing ones are zero)."""
        if kwargs:
            return self.struct.pack(*[kwargs.get(n, 0) for n in self.fields])
        return self.struct.pack(*args)

    def unpack(self, buf: bytes | bytearray | memoryview, offset: int = 0) -> Any:
        """Unpack from ``buf`` at ``offset``; the caller has checked the length."""
        return self.tuple._make(self.struct.unpack_from(buf, offset))


#: Message header (spec "Header").
HEADER = Layout("Header", [("msg_id", "H"), ("command", "H"), ("message_size", "I"),
                           ("flags", "I"), ("error", "I")])
HEADER_SIZE = HEADER.size

#: VFIO_USER_VERSION payload before the optional NUL-terminated JSON.
VERSION = Layout("Version", [("major", "H"), ("minor", "H")])

#: VFIO_USER_DMA_MAP request.
DMA_MAP = Layout("DmaMap", [("argsz", "I"), ("flags", "I"), ("offset", "Q"),
                            ("addr", "Q"), ("size", "Q")])

#: VFIO_USER_DMA_UNMAP request and reply.
DMA_UNMAP = Layout("DmaUnmap", [("argsz", "I"), ("flags", "I"), ("addr", "Q"), ("size", "Q")])

#: VFIO_USER_DEVICE_GET_INFO request and reply (struct vfio_device_info).
DEVICE_INFO = Layout("DeviceInfo", [("argsz", "I"), ("flags", "I"), ("num_regions", "I"),
                                    ("num_irqs", "I")])

#: VFIO_USER_DEVICE_GET_REGION_INFO request and reply (struct vfio_region_info).
REGION_INFO = Layout("RegionInfo", [("argsz", "I"), ("flags", "I"), ("index", "I"),
                                    ("cap_offset", "I"), ("size", "Q"), ("offset", "Q")])

#: struct vfio_info_cap_header.
CAP_HEADER = Layout("CapHeader", [("id", "H"), ("version", "H"), ("next", "I")])

#: struct vfio_region_info_cap_sparse_mmap, after its cap header.
SPARSE_MMAP = Layout("SparseMmap", [("nr_areas", "I"), ("reserved", "I")])

#: struct vfio_region_sparse_mmap_area.
SPARSE_AREA = Layout("SparseArea", [("offset", "Q"), ("size", "Q")])

#: VFIO_USER_DEVICE_GET_REGION_IO_FDS request and reply head.
REGION_IO_FDS = Layout("RegionIoFds", [("argsz", "I"), ("flags", "I"), ("index", "I"),
                                       ("count", "I")])

#: One sub-region of a GET_REGION_IO_FDS reply (ioeventfd or ioregionfd form).
SUB_REGION_IO_FD = Layout("SubRegionIoFd", [("offset", "Q"), ("size", "Q"), ("fd_index", "I"),
                                            ("type", "I"), ("flags", "I"), ("padding", "I"),
                                            ("datamatch", "Q")])

#: VFIO_USER_DEVICE_GET_IRQ_INFO request and reply (struct vfio_irq_info).
IRQ_INFO = Layout("IrqInfo", [("argsz", "I"), ("flags", "I"), ("index", "I"), ("count", "I")])

#: VFIO_USER_DEVICE_SET_IRQS request head (struct vfio_irq_set), data follows.
IRQ_SET = Layout("IrqSet", [("argsz", "I"), ("flags", "I"), ("index", "I"), ("start", "I"),
                            ("count", "I")])

#: VFIO_USER_REGION_READ/WRITE head, data follows.
REGION_ACCESS = Layout("RegionAccess", [("offset", "Q"), ("region", "I"), ("count", "I")])

#: A whole REGION_READ/WRITE message head (header then REGION_ACCESS) in one struct, so
#: the hot path decodes and encodes a region access with one call (composed from the two
#: declared layouts, not re-spelled).
REGION_ACCESS_MSG = struct.Struct("=" + HEADER.struct.format.lstrip("=")
                                  + REGION_ACCESS.struct.format.lstrip("="))
REGION_ACCESS_MSG_SIZE = REGION_ACCESS_MSG.size

#: VFIO_USER_DMA_READ/WRITE head, data follows.
DMA_ACCESS = Layout("DmaAccess", [("addr", "Q"), ("count", "Q")])

#: VFIO_USER_REGION_WRITE_MULTI head and one entry.
WRITE_MULTI = Layout("WriteMulti", [("wr_cnt", "Q")])
WRITE_MULTI_ENTRY = Layout("WriteMultiEntry", [("offset", "Q"), ("region", "I"), ("count", "I"),
                                               ("data", "8s")])
#: QEMU's bound on entries per WRITE_MULTI message.
WRITE_MULTI_MAX = 200
WRITE_MULTI_DATA_MAX = 8

#: VFIO_USER_DEVICE_FEATURE head, data follows.
DEVICE_FEATURE = Layout("DeviceFeature", [("argsz", "I"), ("flags", "I")])

#: VFIO_USER_MIG_DATA_READ/WRITE head.
MIG_DATA = Layout("MigData", [("argsz", "I"), ("size", "I")])

# ---------------------------------------------------------------------------------------
# Commands and flags


class Command(enum.IntEnum):
    """Message commands (spec "Commands"); 14 is the retired DIRTY_PAGES."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class MsgType(enum.IntEnum):
    """Header flags bits 0-3."""

    COMMAND = 0
    REPLY = 1


FLAGS_TYPE_MASK = 0xF
FLAG_NO_REPLY = 1 << 4
FLAG_ERROR = 1 << 5

# DMA_MAP flags.
DMA_FLAG_READ = 1 << 0
DMA_FLAG_WRITE = 1 << 1
DMA_MAP_FLAGS_VALID = DMA_FLAG_READ | DMA_FLAG_WRITE

# DMA_UNMAP flags (linux/vfio.h VFIO_DMA_UNMAP_FLAG_*).
DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
DMA_UNMAP_FLAG_ALL = 1 << 1

# Region capability ids (linux/vfio.h VFIO_REGION_INFO_CAP_*).
REGION_INFO_CAP_SPARSE_MMAP = 1
REGION_INFO_CAP_TYPE = 2
SPARSE_MMAP_CAP_VERSION = 1

# SET_IRQS flags (linux/vfio.h VFIO_IRQ_SET_*).
IRQ_SET_DATA_NONE = 1 << 0
IRQ_SET_DATA_BOOL = 1 << 1
IRQ_SET_DATA_EVENTFD = 1 << 2
IRQ_SET_ACTION_MASK = 1 << 3
IRQ_SET_ACTION_UNMASK = 1 << 4
IRQ_SET_ACTION_TRIGGER = 1 << 5
IRQ_SET_DATA_TYPE_MASK = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD
IRQ_SET_ACTION_TYPE_MASK = IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER

# DEVICE_FEATURE flags.
DEVICE_FEATURE_MASK = 0xFFFF
DEVICE_FEATURE_GET = 1 << 16
DEVICE_FEATURE_SET = 1 << 17
DEVICE_FEATURE_PROBE = 1 << 18

# ---------------------------------------------------------------------------------------
# Capabilities (VERSION JSON)

PROTOCOL_MAJOR = 0
PROTOCOL_MINOR = 0
DEFAULT_MAX_MSG_FDS = 1
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
DEFAULT_MAX_DMA_MAPS = 65535
DEFAULT_PGSIZES = 4096
#: Upper bound we accept for a peer's max_msg_fds (the reference library's limit).
MAX_MSG_FDS_LIMIT = 1024
#: Largest fd count the kernel passes in one SCM_RIGHTS message (SCM_MAX_FD).
SCM_MAX_FD = 253
#: Largest max_data_xfer_size we accept from a peer.
MAX_DATA_XFER_LIMIT = 1 << 30


class ProtocolError(Exception):
    """A message we must reject; ``errno`` is what goes in the error reply."""

    def __init__(self, err: int, reason: str) -> None:
        super().__init__(f"{errno.errorcode.get(err, err)}: {reason}")
        self.errno = err
        self.reason = reason


@dataclass
class Capabilities:
    """The negotiated capability set of one side."""

    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    pgsizes: int = DEFAULT_PGSIZES
    write_multiple: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        caps: dict[str, Any] = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
            "max_dma_maps": self.max_dma_maps,
            "pgsizes": self.pgsizes,
        }
        if self.write_multiple:
            caps["write_multiple"] = True
        caps.update(self.extra)
        return {"capabilities": caps}


def _cap_int(caps: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    """Read one numeric capability, EINVAL when it is not an integer in [lo, hi]."""
    if name not in caps:
        return default
    value = caps[name]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError(errno.EINVAL, f"bad capability {name}={value!r}")
    return value


def parse_version(payload: bytes | memoryview) -> tuple[int, int, Capabilities]:
    """Decode a VERSION payload into (major, minor, capabilities).

    Follows the reference library: the JSON is optional but, when present, must be
    NUL-terminated UTF-8 holding an object; known numeric capabilities are range-checked.
    """
    if len(payload) < VERSION.size:
        raise ProtocolError(errno.EINVAL, "VERSION payload too short")
    ver = VERSION.unpack(payload)
    caps = Capabilities()
    data = bytes(payload[VERSION.size:])
    if data:
        if data[-1] != 0:
            raise ProtocolError(errno.EINVAL, "VERSION JSON not NUL-terminated")
        try:
            doc = json.loads(data[:-1].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(errno.EINVAL, f"VERSION JSON invalid: {exc}") from None
        if not isinstance(doc, dict):
            raise ProtocolError(errno.EINVAL, "VERSION JSON is not an object")
        raw = doc.get("capabilities", {})
        if not isinstance(raw, dict):
            raise ProtocolError(errno.EINVAL, "capabilities is not an object")
        caps.max_msg_fds = _cap_int(raw, "max_msg_fds", DEFAULT_MAX_MSG_FDS, 1, MAX_MSG_FDS_LIMIT)
        caps.max_data_xfer_size = _cap_int(raw, "max_data_xfer_size", DEFAULT_MAX_DATA_XFER_SIZE,
                                           1, MAX_DATA_XFER_LIMIT)
        caps.max_dma_maps = _cap_int(raw, "max_dma_maps", DEFAULT_MAX_DMA_MAPS, 1, 1 << 31)
        caps.pgsizes = _cap_int(raw, "pgsizes", DEFAULT_PGSIZES, 1, (1 << 64) - 1)
        wm = raw.get("write_multiple", False)
        if not isinstance(wm, bool):
            raise ProtocolError(errno.EINVAL, f"bad capability write_multiple={wm!r}")
        caps.write_multiple = wm
        known = {"max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes", "write_multiple"}
        caps.extra = {k: v for k, v in raw.items() if k not in known}
    return ver.major, ver.minor, caps


def build_version(major: int, minor: int, caps: Capabilities | None) -> bytes:
    """Encode a VERSION payload (JSON NUL-terminated, as QEMU requires)."""
    head = VERSION.pack(major, minor)
    if caps is None:
        return head
    return head + json.dumps(caps.to_json(), separators=(",", ":")).encode() + b"\0"


# ---------------------------------------------------------------------------------------
# Messages and framing


def pack_header(msg_id: int, command: int, payload_len: int, flags: int = 0, error: int = 0) -> bytes:
    """Header for a message whose payload is ``payload_len`` bytes."""
    return HEADER.struct.pack(msg_id & 0xFFFF, command, HEADER_SIZE + payload_len, flags, error)


def error_reply(msg_id: int, command: int, err: int) -> bytes:
    """A header-only reply carrying ``err`` (spec: an error reply has no payload)."""
    return HEADER.struct.pack(msg_id, command & 0xFFFF, HEADER_SIZE,
                              MsgType.REPLY | FLAG_ERROR, err)


class Message(NamedTuple):
    """One received message (header fields, payload and the fds that came with it)."""

    msg_id: int
    command: int
    flags: int
    error: int
    payload: bytes
    fds: list[int]
    #: True when the header's message_size was unusable (< 16 or above the maximum).
    bad_size: bool = False

    @property
    def type(self) -> int:
        return self.flags & FLAGS_TYPE_MASK

    @property
    def is_reply(self) -> bool:
        return self.type == MsgType.REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    def command_name(self) -> str:
        try:
            return Command(self.command).name
        except ValueError:
            return f"#{self.command}"


class MessageReader:
    """Splits a byte stream (plus SCM_RIGHTS fds) into :class:`Message` records.

    A header whose ``message_size`` is below 16 or above ``max_size`` cannot be framed;
    such a header is consumed alone (16 bytes) and reported with ``bad_size`` so the
    receiver can answer EINVAL and carry on with the next bytes.

    Linux delivers the fds of one ``sendmsg`` together with the bytes of that call and
    stops a ``recvmsg`` right after them, so fds received with a chunk belong to the last
    message that starts inside that chunk.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._pos = 0
        self._fd_slots: dict[int, list[int]] = {}  # stream offset of a message -> its fds
        self._base = 0  # stream offset of _buf[0]

    def feed(self, data: bytes, fds: list[int] | None = None) -> list[Message]:
        """Add received bytes (and fds) and return every complete message."""
        start = self._base + len(self._buf)
        self._buf += data
        if fds:
            self._attach_fds(start, fds)
        return self._parse()

    def _frame_len(self, pos: int) -> int | None:
        """Bytes the message at buffer offset ``pos`` occupies, None if header incomplete."""
        if len(self._buf) - pos < HEADER_SIZE:
            return None
        size = HEADER.struct.unpack_from(self._buf, pos)[2]
        if size < HEADER_SIZE or size > self.max_size:
            return HEADER_SIZE
        return size

    def _attach_fds(self, stream_start: int, fds: list[int]) -> None:
        pos = self._pos
        target = None
        while pos < len(self._buf):
            if self._base + pos >= stream_start:
                target = pos
            n = self._frame_len(pos)
            if n is None:
                break
            pos += n
        if target is None:
            target = self._pos
        self._fd_slots.setdefault(self._base + target, []).extend(fds)

    def _parse(self) -> list[Message]:
        out: list[Message] = []
        buf = self._buf
        pos = self._pos
        unpack = HEADER.struct.unpack_from
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            msg_id, command, size, flags, err = unpack(buf, pos)
            bad = size < HEADER_SIZE or size > self.max_size
            n = HEADER_SIZE if bad else size
            if end - pos < n:
                break
            fds = self._fd_slots.pop(self._base + pos, []) if self._fd_slots else []
            out.append(Message(msg_id, command, flags, err, bytes(buf[pos + HEADER_SIZE:pos + n]), fds, bad))
            pos += n
        if pos == end:
            self._base += end
            buf.clear()
            self._pos = 0
        elif pos > 65536:
            self._base += pos
            del buf[:pos]
            self._pos = 0
        else:
            self._pos = pos
        return out

    def buffered(self) -> bool:
        """True while part of a message waits for more bytes (the fast path must not skip it)."""
        return bool(self._buf)

    def pending_fds(self) -> list[int]:
        """Fds received for messages not yet complete (to close on disconnect)."""
        return [fd for fds in self._fd_slots.values() for fd in fds]
