"""VFIO_USER_DMA_UNMAP (spec: must match a previous mapping exactly; reply echoes the struct)."""

import errno

from vfio_user import protocol as P
from vfio_user.protocol import Command


def _unmap(c, addr, size, flags=0, argsz=P.DMA_UNMAP.size):
    return c.request(Command.DMA_UNMAP, P.DMA_UNMAP.pack(argsz, flags, addr, size))


def test_unmap_echoes_24_byte_struct(client) -> None:
    client.dma_map(0x10000, 0x2000)
    r = _unmap(client, 0x10000, 0x2000)
    assert not r.is_error
    assert r.payload == P.DMA_UNMAP.pack(24, 0, 0x10000, 0x2000)


def test_unmap_not_exactly_mapped_is_enoent(client) -> None:
    client.dma_map(0x10000, 0x2000)
    assert _unmap(client, 0x10000, 0x1000).error == errno.ENOENT   # sub-range
    assert _unmap(client, 0x11000, 0x1000).error == errno.ENOENT
    assert _unmap(client, 0x80000, 0x1000).error == errno.ENOENT   # nothing there
    assert not _unmap(client, 0x10000, 0x2000).is_error
    assert _unmap(client, 0x10000, 0x2000).error == errno.ENOENT   # already gone


def test_unmap_unknown_flags_einval(client) -> None:
    client.dma_map(0x10000, 0x1000)
    assert _unmap(client, 0x10000, 0x1000, flags=0x8).error == errno.EINVAL
    assert _unmap(client, 0x10000, 0x1000, flags=P.DMA_UNMAP_FLAG_GET_DIRTY_BITMAP).error == errno.EINVAL


def test_unmap_short_payload_einval(client) -> None:
    r = client.request(Command.DMA_UNMAP, P.DMA_UNMAP.pack(24, 0, 0, 0x1000)[:16])
    assert r.error == errno.EINVAL
    assert _unmap(client, 0, 0x1000, argsz=8).error == errno.EINVAL


def test_unmap_all(client, vfu, tdev) -> None:
    client.dma_map(0x10000, 0x1000)
    client.dma_map(0x20000, 0x1000)
    assert not _unmap(client, 0, 0, flags=P.DMA_UNMAP_FLAG_ALL).is_error
    assert _unmap(client, 0x10000, 0x1000).error == errno.ENOENT
    assert _unmap(client, 0, 0x1000, flags=P.DMA_UNMAP_FLAG_ALL).error == errno.EINVAL


def test_device_dma_fails_after_unmap(client, vfu, tdev) -> None:
    """Spec: after the reply the server holds no reference to the region."""
    client.map_memory(0x10000, 0x2000)
    client.dma_unmap(0x10000, 0x2000)
    dev = vfu.device
    for off, v in ((tdev.REG_DMA_SRC, 0x10000), (tdev.REG_DMA_DST, 0x11000), (tdev.REG_DMA_LEN, 4),
                   (tdev.REG_DMA_CMD, 1)):
        client.region_write(0, off, v.to_bytes(8, "little"))
    assert dev.dma_done.wait(5)
    assert dev.reg(tdev.REG_DMA_STATUS) == tdev.DMA_STATUS_BUS_ERROR
