"""Fixtures for the PCI framework tests.

The framework is driven through its :class:`~vfio_user.device.VfioUserDevice` methods,
as a backend would. :class:`LoopbackContext` is a small but real
:class:`~vfio_user.device.DeviceContext`: DMA goes to a :class:`~devmodel.memory.ByteMemory`,
interrupts are real eventfds (one per vector, installed like SET_IRQS does), and
``call_soon`` work runs when the test calls :meth:`LoopbackContext.run_pending`, with
:data:`~vfio_user.device.MODEL_LOCK` held like a device worker.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devmodel.memory import ByteMemory
from vfio_user.loopback import LoopbackContext

GUEST_RAM_BASE = 0x4000_0000
GUEST_RAM_SIZE = 0x10000


@pytest.fixture
def guest_ram() -> ByteMemory:
    return ByteMemory(GUEST_RAM_SIZE, base=GUEST_RAM_BASE)


@pytest.fixture
def ctx(guest_ram: ByteMemory) -> Iterator[LoopbackContext]:
    context = LoopbackContext(guest_ram)
    yield context
    context.close()
