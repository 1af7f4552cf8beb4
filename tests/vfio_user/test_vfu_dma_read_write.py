"""Server-to-client VFIO_USER_DMA_READ / DMA_WRITE for memory mapped without an fd.

Reference "Server-to-client DMA": reply first, DMA after; keep serving requests while a
DMA reply is outstanding; chunk by the client's max_data_xfer_size.
"""

import errno

import pytest

from vfio_user import protocol as P
from vfio_user.device import DmaFromHandlerError, DmaError
from vfio_user.protocol import Command


def _program(client, tdev, src, dst, n, posted=False):
    for off, v in ((tdev.REG_DMA_SRC, src), (tdev.REG_DMA_DST, dst), (tdev.REG_DMA_LEN, n),
                   (tdev.REG_DMA_CMD, tdev.DMA_CMD_COPY)):
        client.region_write(0, off, v.to_bytes(8, "little"), posted=posted)


def test_fd_less_copy_served_by_messages(client, vfu, tdev) -> None:
    src = client.map_memory(0x10000, 0x1000, with_fd=False)
    dst = client.map_memory(0x20000, 0x1000, with_fd=False)
    src[0:16] = b"0123456789abcdef"
    _program(client, tdev, 0x10000, 0x20800, 16)
    assert client.serve_until(vfu.device.dma_done.is_set)  # serves DMA_READ, then DMA_WRITE
    assert bytes(dst[0x800:0x810]) == b"0123456789abcdef"
    assert vfu.device.reg(tdev.REG_DMA_STATUS) == tdev.DMA_STATUS_DONE


def test_late_dma_answer_while_requests_continue(client, vfu, tdev) -> None:
    """The client holds the DMA_READ, keeps sending requests that get answered, then serves it."""
    client.auto_dma = False
    src = client.map_memory(0x10000, 0x1000, with_fd=False)
    client.map_memory(0x20000, 0x1000)  # destination with fd
    src[0:4] = b"late"
    _program(client, tdev, 0x10000, 0x20000, 4)
    req = client.wait_dma_request()
    assert req.command == Command.DMA_READ and P.DMA_ACCESS.unpack(req.payload) == (0x10000, 4)
    for i in range(20):  # the loop keeps serving while the worker waits for us
        client.region_write(0, tdev.REG_SCRATCH, bytes([i]) * 4)
        assert client.region_read(0, tdev.REG_SCRATCH, 4) == bytes([i]) * 4
    assert not vfu.device.dma_done.is_set()
    assert client.serve_pending_dma() == 1
    assert vfu.device.dma_done.wait(5)
    assert bytes(client.memory[1].buf[0:4]) == b"late"


def test_dma_is_sent_only_after_the_doorbell_reply(client, vfu, tdev) -> None:
    """The doorbell's reply must precede the DMA_READ it triggers on the stream."""
    client.auto_dma = False
    client.map_memory(0x10000, 0x1000, with_fd=False)
    client.map_memory(0x20000, 0x1000)
    for off, v in ((tdev.REG_DMA_SRC, 0x10000), (tdev.REG_DMA_DST, 0x20000), (tdev.REG_DMA_LEN, 4)):
        client.region_write(0, off, v.to_bytes(8, "little"))
    mid = client.send(Command.REGION_WRITE, P.REGION_ACCESS.pack(tdev.REG_DMA_CMD, 0, 8) + (1).to_bytes(8, "little"))
    client._read(True)
    assert mid in client.replies  # the reply came first (or together, ahead of the DMA)
    client.wait_reply(mid)
    client.wait_dma_request()
    client.serve_pending_dma()
    assert vfu.device.dma_done.wait(5)


def test_chunked_by_client_max_data_xfer_size(vfu, tdev) -> None:
    c = vfu.client(negotiate=False, max_data_xfer_size=4096)
    c.negotiate(P.Capabilities(max_msg_fds=16, max_data_xfer_size=4096))
    c.auto_dma = False
    src = c.map_memory(0x100000, 0x4000, with_fd=False)
    c.map_memory(0x200000, 0x4000)
    src[:] = bytes(range(256)) * 64
    _program(c, tdev, 0x100000, 0x200000, 10000)
    c.wait_dma_request()
    while len(c.dma_requests) < 3:
        c._read(True)
    counts = [P.DMA_ACCESS.unpack(m.payload).count for m in c.dma_requests]
    assert counts == [4096, 4096, 1808]
    c.serve_pending_dma()
    assert vfu.device.dma_done.wait(5)
    assert bytes(c.memory[1].buf[:10000]) == bytes(src[:10000])
    c.close()


def test_client_error_reply_becomes_bus_error(client, vfu, tdev) -> None:
    client.auto_dma = False
    client.map_memory(0x10000, 0x1000, with_fd=False)
    client.map_memory(0x20000, 0x1000)
    _program(client, tdev, 0x10000, 0x20000, 4)
    req = client.wait_dma_request()
    client.dma_requests.clear()
    client.send_raw(P.error_reply(req.msg_id, req.command, errno.EFAULT))
    assert vfu.device.dma_done.wait(5)
    assert vfu.device.reg(tdev.REG_DMA_STATUS) == tdev.DMA_STATUS_BUS_ERROR
    err = vfu.device.dma_error
    assert isinstance(err, DmaError) and err.errno == errno.EFAULT


def test_disconnect_fails_waiting_dma(vfu, tdev) -> None:
    c = vfu.client()
    c.auto_dma = False
    c.map_memory(0x10000, 0x1000, with_fd=False)
    c.map_memory(0x20000, 0x1000)
    _program(c, tdev, 0x10000, 0x20000, 4)
    c.wait_dma_request()
    c.close()
    assert vfu.device.dma_done.wait(5)
    assert vfu.device.reg(tdev.REG_DMA_STATUS) == tdev.DMA_STATUS_BUS_ERROR


def test_dma_from_handler_refused(client, vfu, tdev) -> None:
    """DMA inside a region-access callback would deadlock QEMU: DmaFromHandlerError."""
    client.map_memory(0x10000, 0x1000)
    client.region_write(0, tdev.REG_DMA_SRC, (0x10000).to_bytes(8, "little"))
    client.region_write(0, tdev.REG_DMA_CMD, tdev.DMA_CMD_IN_HANDLER.to_bytes(8, "little"))
    assert vfu.device.reg(tdev.REG_DMA_STATUS) == tdev.DMA_STATUS_REFUSED
    assert isinstance(vfu.device.dma_error, DmaFromHandlerError)


def test_unexpected_dma_reply_is_einval(client) -> None:
    """A reply matching no outstanding DMA is a reply-type message from the client: EINVAL."""
    client.send_raw(P.pack_header(77, Command.DMA_READ, 16, P.MsgType.REPLY) + P.DMA_ACCESS.pack(0, 0))
    r = client.wait_reply(77)
    assert r.error == errno.EINVAL
