"""Every wire record is declared once in vfio_user.protocol; its size must match the spec."""

import pytest

from vfio_user import protocol as P


@pytest.mark.parametrize("layout,size", [
    (P.HEADER, 16),            # spec "Header": 16 bytes
    (P.VERSION, 4),            # major u16, minor u16
    (P.DMA_MAP, 32),           # "This structure is 32 bytes in size"
    (P.DMA_UNMAP, 24),         # argsz, flags, addr, size
    (P.DEVICE_INFO, 16),       # struct vfio_device_info
    (P.REGION_INFO, 32),       # struct vfio_region_info
    (P.CAP_HEADER, 8),         # struct vfio_info_cap_header
    (P.SPARSE_MMAP, 8),        # nr_areas, reserved
    (P.SPARSE_AREA, 16),       # offset, size
    (P.REGION_IO_FDS, 16),
    (P.SUB_REGION_IO_FD, 40),  # "currently this is 40 bytes for both IO FD types"
    (P.IRQ_INFO, 16),          # struct vfio_irq_info
    (P.IRQ_SET, 20),           # struct vfio_irq_set without data
    (P.REGION_ACCESS, 16),     # offset u64, region u32, count u32
    (P.DMA_ACCESS, 16),        # address u64, count u64
    (P.WRITE_MULTI, 8),
    (P.WRITE_MULTI_ENTRY, 24),  # offset, region, count, data[8]
    (P.DEVICE_FEATURE, 8),
    (P.MIG_DATA, 8),
])
def test_layout_size(layout: P.Layout, size: int) -> None:
    assert layout.size == size


def test_command_numbers_match_spec_table() -> None:
    """Spec "Commands" table, 1..18 (14 is the retired DIRTY_PAGES)."""
    assert [c.value for c in P.Command] == list(range(1, 19))
    assert P.Command.REGION_WRITE_MULTI == 15 and P.Command.MIG_DATA_WRITE == 18


def test_header_flag_bits() -> None:
    """Spec "Header": type in bits 0-3, No_reply bit 4, Error bit 5."""
    assert (P.FLAGS_TYPE_MASK, P.FLAG_NO_REPLY, P.FLAG_ERROR) == (0xF, 0x10, 0x20)
    hdr = P.HEADER.unpack(P.error_reply(7, P.Command.DMA_MAP, 22))
    assert hdr == (7, 2, 16, P.MsgType.REPLY | P.FLAG_ERROR, 22)


def test_layout_round_trip_by_name() -> None:
    raw = P.REGION_INFO.pack(argsz=64, index=3, size=0x2000)
    info = P.REGION_INFO.unpack(raw)
    assert (info.argsz, info.index, info.size, info.flags) == (64, 3, 0x2000, 0)


def test_reader_splits_stream_and_attaches_fds_to_last_message() -> None:
    """Several messages in one chunk: fds belong to the last one starting in it."""
    r = P.MessageReader(4096)
    a = P.pack_header(1, 9, 0)
    b = P.pack_header(2, 2, 4) + b"abcd"
    msgs = r.feed(a + b[:10], [5])
    assert [m.msg_id for m in msgs] == [1]
    msgs = r.feed(b[10:])
    assert msgs[0].msg_id == 2 and msgs[0].fds == [5] and msgs[0].payload == b"abcd"


def test_reader_consumes_only_header_of_unframeable_message() -> None:
    r = P.MessageReader(4096)
    bad = P.HEADER.pack(1, 9, 8, 0, 0)       # message_size < 16
    huge = P.HEADER.pack(2, 9, 1 << 30, 0, 0)  # beyond the maximum
    good = P.pack_header(3, 4, 0)
    msgs = r.feed(bad + huge + good)
    assert [(m.msg_id, m.bad_size) for m in msgs] == [(1, True), (2, True), (3, False)]
