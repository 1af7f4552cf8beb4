"""VFIO_USER_DMA_MAP (spec "VFIO_USER_DMA_MAP"; reference "Error behaviour")."""

import errno
import mmap
import os

from vfio_user import protocol as P
from vfio_user.protocol import Command

RW = P.DMA_FLAG_READ | P.DMA_FLAG_WRITE


def _map(c, addr, size, flags=RW, fds=(), offset=0, argsz=P.DMA_MAP.size):
    return c.request(Command.DMA_MAP, P.DMA_MAP.pack(argsz, flags, offset, addr, size), list(fds))


def _memfd(size):
    fd = os.memfd_create("t")
    os.ftruncate(fd, size)
    return fd


def _run_copy(client, dev, tdev, src, dst, n):
    for off, v in ((tdev.REG_DMA_SRC, src), (tdev.REG_DMA_DST, dst), (tdev.REG_DMA_LEN, n),
                   (tdev.REG_DMA_CMD, tdev.DMA_CMD_COPY)):
        client.region_write(0, off, v.to_bytes(8, "little"))
    assert dev.dma_done.wait(5)


def test_fd_backed_map_is_shared_with_the_device(client, vfu, tdev) -> None:
    """The server mmaps MAP_SHARED: device writes are visible in the client's memory."""
    mem = client.map_memory(0x100000, 0x4000)
    mem[0x10:0x18] = b"ABCDEFGH"
    _run_copy(client, vfu.device, tdev, 0x100010, 0x102000, 8)
    assert bytes(mem[0x2000:0x2008]) == b"ABCDEFGH"
    assert vfu.device.dma_changes >= 1
    assert vfu.device.reg(tdev.REG_DMA_STATUS) == tdev.DMA_STATUS_DONE


def test_dma_across_two_adjacent_maps(client, vfu, tdev) -> None:
    a = client.map_memory(0x10000, 0x1000)
    b = client.map_memory(0x11000, 0x1000)
    a[0xFFC:0x1000] = b"1234"
    b[0:4] = b"5678"
    _run_copy(client, vfu.device, tdev, 0x10FFC, 0x11800, 8)
    assert bytes(b[0x800:0x808]) == b"12345678"


def test_overlap_is_einval_identical_remap_accepted(client) -> None:
    client.map_memory(0x200000, 0x2000)
    assert _map(client, 0x201000, 0x2000).error == errno.EINVAL
    assert _map(client, 0x1FF000, 0x2000).error == errno.EINVAL
    r = _map(client, 0x200000, 0x2000)
    assert not r.is_error


def test_unknown_flags_are_einval(client) -> None:
    assert _map(client, 0x1000, 0x1000, flags=RW | 0x4).error == errno.EINVAL


def test_short_payload_and_small_argsz_are_einval(client) -> None:
    r = client.request(Command.DMA_MAP, P.DMA_MAP.pack(32, RW, 0, 0x1000, 0x1000)[:24])
    assert r.error == errno.EINVAL
    assert _map(client, 0x1000, 0x1000, argsz=16).error == errno.EINVAL


def test_zero_size_is_einval(client) -> None:
    assert _map(client, 0x1000, 0).error == errno.EINVAL


def test_fd_smaller_than_map_is_einval(client) -> None:
    """Mapping past the end of the file would SIGBUS the server later."""
    fd = _memfd(0x1000)
    assert _map(client, 0x1000, 0x2000, fds=[fd]).error == errno.EINVAL
    os.close(fd)


def test_two_fds_einval_and_both_closed(client, tdev) -> None:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    r = _map(client, 0x1000, 0x1000, fds=[w1, w2])
    os.close(w1)
    os.close(w2)
    assert r.error == errno.EINVAL
    assert tdev.fd_closed_by_peer(r1) and tdev.fd_closed_by_peer(r2)
    for fd in (r1, r2):
        os.close(fd)


def test_map_without_fd_is_accepted(client) -> None:
    assert not _map(client, 0x300000, 0x1000).is_error


def test_server_closes_passed_fd_after_mapping(client, tdev) -> None:
    """Nothing leaks: after the unmap the process holds no more fds than before the map.

    (Python's mmap keeps one dup of the fd while mapped; the received fd is closed.)
    """
    fd = _memfd(0x1000)
    before = len(os.listdir("/proc/self/fd"))
    assert not _map(client, 0x400000, 0x1000, fds=[fd]).is_error
    os.close(fd)
    assert len(os.listdir("/proc/self/fd")) == before
    client.dma_unmap(0x400000, 0x1000)
    assert len(os.listdir("/proc/self/fd")) == before - 1


def test_read_only_map_refuses_device_writes(client, vfu, tdev) -> None:
    fd = _memfd(0x2000)
    mm = mmap.mmap(fd, 0x2000)
    mm[0:4] = b"ro!!"
    assert not _map(client, 0x500000, 0x1000, flags=P.DMA_FLAG_READ, fds=[fd]).is_error
    client.map_memory(0x600000, 0x1000)
    _run_copy(client, vfu.device, tdev, 0x600000, 0x500000, 4)
    assert vfu.device.reg(tdev.REG_DMA_STATUS) == tdev.DMA_STATUS_BUS_ERROR
    assert mm[0:4] == b"ro!!"
    mm.close()
    os.close(fd)


def test_unmapped_address_gives_bus_error(client, vfu, tdev) -> None:
    _run_copy(client, vfu.device, tdev, 0xDEAD0000, 0xDEAD1000, 4)
    assert vfu.device.reg(tdev.REG_DMA_STATUS) == tdev.DMA_STATUS_BUS_ERROR
