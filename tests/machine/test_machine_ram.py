"""The machine's memory listener: guest RAM enters the IOAS when the client's DMA map covers
it (IOAS_MAP pins, so RAM must exist first) and leaves it when the client goes away.
Real server, real client, a real memfd as guest RAM."""

from __future__ import annotations

import os
import time

from devmodel.machine import Machine
from vfio_user.client import Client
from vfio_user.server import Server

from .conftest import wait_until

RAM_MB = 4


def test_guest_ram_mapped_on_dma_map_and_unmapped_when_the_client_leaves(tmp_path):
    m = Machine(ram_mb=RAM_MB)
    server = Server()
    path = str(tmp_path / "viommu.sock")
    server.add_device(path, m.viommu)
    server.start_in_thread()
    try:
        client = Client(path)
        client.negotiate()
        assert not m.ram_mapped  # nothing to pin yet: IOAS_MAP would fail with EFAULT
        low = client.map_memory(0, (RAM_MB << 20) // 2)
        time.sleep(0.2)
        assert not m.ram_mapped  # half the RAM announced: still not mappable
        client.map_memory((RAM_MB << 20) // 2, (RAM_MB << 20) // 2)
        assert wait_until(lambda: m.ram_mapped)
        # the IOAS really reaches guest RAM: a write through it lands in the client's memfd
        m.ram.write(m.ram.base + 0x1000, b"\xa5" * 4)
        assert bytes(low[0x1000:0x1004]) == b"\xa5" * 4
        client.close()
        assert wait_until(lambda: not m.ram_mapped)
    finally:
        server.stop()
        m.close()
