"""VFIO_USER_DEVICE_GET_REGION_INFO (spec "Message sizes" argsz rules, sparse-mmap cap)."""

import errno
import mmap
import os

from vfio_user import protocol as P
from vfio_user.device import (
    VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
)
from vfio_user.protocol import Command


def test_config_region(client, tdev) -> None:
    info = client.region_info(7)
    assert info.size == tdev.CONFIG_SIZE and info.argsz == 32 and not info.fds
    assert info.flags == VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE


def test_sparse_region_asked_twice_like_qemu(client, tdev) -> None:
    """First argsz 32: argsz says what is needed, no cap, no CAPS flag, no fd. Then the cap and the fd."""
    short = client.region_info(0, argsz=32)
    needed = 32 + P.CAP_HEADER.size + P.SPARSE_MMAP.size + P.SPARSE_AREA.size
    assert short.argsz == needed and short.cap_offset == 0 and short.fds == []
    # QEMU 11.1 rejects CAPS with cap_offset 0 (EINVAL: the device is not realized), so
    # CAPS is announced only by the reply that carries the chain.
    assert not short.flags & VFIO_REGION_INFO_FLAG_CAPS and short.flags & VFIO_REGION_INFO_FLAG_MMAP
    full = client.region_info(0, argsz=short.argsz)
    assert full.cap_offset == 32
    assert full.sparse == [(tdev.BAR0_MMAP_OFFSET, tdev.BAR0_MMAP_SIZE)]
    assert len(full.fds) == 1
    # The fd maps the same memory the device serves through REGION_READ.
    mm = mmap.mmap(full.fds[0], tdev.BAR0_SIZE, offset=full.offset)
    mm[tdev.BAR0_MMAP_OFFSET:tdev.BAR0_MMAP_OFFSET + 4] = b"mmio"
    assert client.region_read(0, tdev.BAR0_MMAP_OFFSET, 4) == b"mmio"
    mm.close()
    os.close(full.fds[0])


def test_qemu_argsz_64_gets_cap(client) -> None:
    info = client.region_info(0, argsz=64)
    assert info.argsz == 64 and info.sparse and len(info.fds) == 1
    os.close(info.fds[0])


def test_unused_region_has_size_zero(client) -> None:
    assert client.region_info(6).size == 0  # ROM
    assert client.region_info(8).size == 0  # VGA


def test_bad_index_einval(client) -> None:
    r = client.request(Command.DEVICE_GET_REGION_INFO, P.REGION_INFO.pack(32, 0, 9, 0, 0, 0))
    assert r.error == errno.EINVAL
    r = client.request(Command.DEVICE_GET_REGION_INFO, P.REGION_INFO.pack(32, 0, 0xFFFFFFFF, 0, 0, 0))
    assert r.error == errno.EINVAL


def test_small_argsz_and_short_payload_einval(client) -> None:
    r = client.request(Command.DEVICE_GET_REGION_INFO, P.REGION_INFO.pack(16, 0, 7, 0, 0, 0))
    assert r.error == errno.EINVAL
    r = client.request(Command.DEVICE_GET_REGION_INFO, P.REGION_INFO.pack(32, 0, 7, 0, 0, 0)[:12])
    assert r.error == errno.EINVAL
