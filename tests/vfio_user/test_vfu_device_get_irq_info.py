"""VFIO_USER_DEVICE_GET_IRQ_INFO (QEMU asks ERR at realize and MSI-X when the cap exists)."""

import errno

from vfio_user import protocol as P
from vfio_user.device import VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE, PciIrq
from vfio_user.protocol import Command


def test_irq_info(client, tdev) -> None:
    assert client.irq_info(PciIrq.MSIX) == (16, VFIO_IRQ_INFO_EVENTFD, PciIrq.MSIX, tdev.MSIX_COUNT)
    assert client.irq_info(PciIrq.ERR).count == 1
    assert client.irq_info(PciIrq.MSI).count == 0
    assert client.irq_info(PciIrq.INTX).flags == VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE


def test_irq_info_errors(client) -> None:
    assert client.request(Command.DEVICE_GET_IRQ_INFO, P.IRQ_INFO.pack(16, 0, 5, 0)).error == errno.EINVAL
    assert client.request(Command.DEVICE_GET_IRQ_INFO, P.IRQ_INFO.pack(8, 0, 0, 0)).error == errno.EINVAL
    assert client.request(Command.DEVICE_GET_IRQ_INFO, b"\x10\0\0\0").error == errno.EINVAL
