"""VFIO_USER_DEVICE_GET_INFO (QEMU needs the RESET flag or never sends DEVICE_RESET)."""

import errno

from vfio_user import protocol as P
from vfio_user.device import VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET
from vfio_user.protocol import Command


def test_device_info(client) -> None:
    info = client.device_info()
    assert info.argsz == 16
    assert info.flags == VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET
    assert (info.num_regions, info.num_irqs) == (9, 5)


def test_device_info_short_is_einval(client) -> None:
    assert client.request(Command.DEVICE_GET_INFO, b"\x10\0\0\0").error == errno.EINVAL
    assert client.request(Command.DEVICE_GET_INFO, P.DEVICE_INFO.pack(8, 0, 0, 0)).error == errno.EINVAL
