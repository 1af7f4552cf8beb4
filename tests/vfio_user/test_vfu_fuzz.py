"""A bounded burst of random malformed messages never kills the server."""

import random
import struct

from vfio_user import protocol as P
from vfio_user.protocol import Command

BURST = 2000


def _random_message(rng: random.Random) -> bytes:
    """Framing stays consistent (size == bytes sent) except deliberate bad sizes."""
    kind = rng.random()
    cmd = rng.choice([c.value for c in Command] + [0, 19, rng.randrange(0x10000)])
    if cmd == Command.VERSION:
        cmd = Command.DEVICE_GET_INFO
    if kind < 0.1:
        return P.HEADER.pack(rng.randrange(0x10000), cmd, rng.choice([0, 1, 15]), 0, 0)
    if kind < 0.15:
        return P.HEADER.pack(rng.randrange(0x10000), cmd, rng.randrange(1 << 25, 1 << 32), 0, 0)
    payload = rng.randbytes(rng.choice([0, 1, 4, 8, 12, 16, 20, 24, 31, 32, 40, 64, 100]))
    if cmd == Command.DMA_MAP and len(payload) >= 32:
        # keep the fuzzer from mapping huge fd-less windows forever: random but bounded
        payload = struct.pack("=IIQQQ", 32, rng.randrange(8), 0, rng.randrange(1 << 40), rng.randrange(1 << 20)) + payload[32:]
    flags = rng.choice([0, 0, 0, 1, 2, 0x10, 0x20, rng.randrange(1 << 32)])
    return P.pack_header(rng.randrange(0x10000), cmd, len(payload), flags, rng.randrange(2)) + payload


def test_fuzz_burst_then_well_formed_request(client) -> None:
    rng = random.Random(1234)
    client.set_timeout(10)
    blob = b"".join(_random_message(rng) for _ in range(BURST))
    client.send_raw(blob)
    # Replies (mostly errors) pile up; a fresh request still gets its answer.
    info = client.device_info()
    assert (info.num_regions, info.num_irqs) == (9, 5)
    assert client.region_read(7, 0, 2) == b"\xe5\x1d"
    assert len(client.replies) > BURST // 2
