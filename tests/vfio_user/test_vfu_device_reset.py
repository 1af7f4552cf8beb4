"""VFIO_USER_DEVICE_RESET: no payload either way; the device returns to power-on state."""

from vfio_user.protocol import Command


def test_reset(client, vfu, tdev) -> None:
    client.region_write(0, tdev.REG_SCRATCH, b"\xff" * 8)
    r = client.request(Command.DEVICE_RESET)
    assert not r.is_error and r.payload == b""
    assert vfu.device.resets == 1
    assert client.region_read(0, tdev.REG_SCRATCH, 8) == bytes(8)
    assert client.region_read(0, tdev.REG_RESETS, 1) == b"\1"
