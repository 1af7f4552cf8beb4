"""The message order QEMU 11.1 really sends (reference "What the client sends, in order")."""

import os

from vfio_user import protocol as P
from vfio_user.device import PciIrq
from vfio_user.protocol import Command

RW = P.DMA_FLAG_READ | P.DMA_FLAG_WRITE
EVENTFD_TRIGGER = P.IRQ_SET_DATA_EVENTFD | P.IRQ_SET_ACTION_TRIGGER


def test_qemu_like_session(vfu, tdev) -> None:
    c = vfu.client(negotiate=False)
    # 1. VERSION with QEMU's capabilities (incl. migration object)
    caps = P.Capabilities(max_msg_fds=16, write_multiple=True, extra={"migration": {"pgsize": 4096, "max_bitmap_size": 1 << 20}})
    c.negotiate(caps)
    # 2. DMA_MAPs sent without waiting, before GET_INFO; with and without fds; churn
    fd = os.memfd_create("ram")
    os.ftruncate(fd, 0x100000)
    ids = [c.send(Command.DMA_MAP, P.DMA_MAP.pack(32, RW, 0, 0, 0xA0000), [fd]),
           c.send(Command.DMA_MAP, P.DMA_MAP.pack(32, P.DMA_FLAG_READ, 0, 0xC0000, 0x20000)),
           c.send(Command.DMA_MAP, P.DMA_MAP.pack(32, RW, 0xE0000, 0xE0000, 0x20000), [fd]),
           c.send(Command.DMA_UNMAP, P.DMA_UNMAP.pack(24, 0, 0xC0000, 0x20000)),
           c.send(Command.DMA_MAP, P.DMA_MAP.pack(32, RW, 0, 0xFEB00000, 0x2000))]  # a BAR, no fd
    os.close(fd)
    # 3. GET_INFO pipelined behind the maps
    ids.append(c.send(Command.DEVICE_GET_INFO, P.DEVICE_INFO.pack(16, 0, 0, 0)))
    replies = [c.wait_reply(i) for i in ids]
    assert [r.error for r in replies] == [0] * 6
    # 4. region info 0-5 and 7; the sparse region asked twice
    for i in (0, 1, 2, 3, 4, 5, 7):
        r = c.region_info(i, argsz=32)
        if r.argsz > 32:
            full = c.region_info(i, argsz=r.argsz)
            assert full.sparse and full.fds
            for f in full.fds:
                os.close(f)
    # 5. IRQ info ERR and MSI-X
    assert c.irq_info(PciIrq.ERR).count == 1 and c.irq_info(PciIrq.MSIX).count == 4
    # 6. config space: 256-byte read, ROM BAR sizing, small accesses
    assert len(c.region_read(7, 0, 256)) == 256
    c.region_write(7, 0x30, b"\xfe\xf8\xff\xff")
    c.region_read(7, 0x30, 4)
    # 7. SET_IRQS: INTx, ERR, then MSI-X enable with no fd, vector unmask, disable
    intx = os.eventfd(0, os.EFD_NONBLOCK)
    c.set_irqs(PciIrq.INTX, EVENTFD_TRIGGER, 0, 1, [intx])
    c.set_irqs(PciIrq.ERR, EVENTFD_TRIGGER, 0, 1, [intx])
    c.set_irqs(PciIrq.INTX, P.IRQ_SET_DATA_NONE | P.IRQ_SET_ACTION_TRIGGER, 0, 0)
    c.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, 1)
    c.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 1, 1, [intx])
    # 8. BAR accesses: posted writes then a read; 8-byte accesses
    c.region_write(0, tdev.REG_SCRATCH, b"\x01" * 8, posted=True)
    assert c.region_read(0, tdev.REG_SCRATCH, 8) == b"\x01" * 8
    # 9. DEVICE_RESET
    c.reset()
    assert vfu.device.resets == 1
    c.set_irqs(PciIrq.MSIX, P.IRQ_SET_DATA_NONE | P.IRQ_SET_ACTION_TRIGGER, 0, 0)
    os.close(intx)
    # 10. the socket just closes; a new client can attach
    c.close()
    c2 = vfu.client()
    assert c2.device_info().num_regions == 9
    c2.close()
