"""vfio-user transport benchmark: 4-byte REGION_READ round trips per second.

The server runs in a child process (as it would beside QEMU) serving a minimal device;
this process is the client. Metrics:

- ``vfio-user-region-read-serial``: one request in flight at a time;
- ``vfio-user-region-read-32-inflight``: 32 requests sent with one send, then their
  replies read (the server answers what it read with one sendmsg).

Reference points on this kind of 2-vCPU machine (project reference notes): the C
reference server does about 88k/s serially and 205k/s with 32 in flight.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from vfio_user.device import (
    VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
    IrqInfo,
    RegionInfo,
    VfioUserDevice,
)

DURATION = 2.0
INFLIGHT = 32


class NullDevice(VfioUserDevice):
    """BAR0 of 4 KiB of registers that read back what was written."""

    def __init__(self) -> None:
        self.bar = bytearray(4096)

    def region_info(self, index: int) -> RegionInfo:
        if index == 0:
            return RegionInfo(size=len(self.bar), flags=VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE)
        return RegionInfo()

    def irq_info(self, index: int) -> IrqInfo:
        return IrqInfo(count=0)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        return bytes(self.bar[offset:offset + count])

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self.bar[offset:offset + len(data)] = data


def serve(path: str) -> None:
    """Child process: serve NullDevice until stdin closes."""
    from vfio_user.server import Server
    server = Server()
    server.add_device(path, NullDevice())
    server.start_in_thread()
    print("ready", flush=True)
    sys.stdin.read()
    server.stop()


def bench_serial(client, duration: float) -> float:
    from vfio_user.protocol import Command
    import struct
    body = struct.pack("=QII", 0, 0, 4)
    n = 0
    t0 = time.perf_counter()
    end = t0 + duration
    while True:
        for _ in range(1000):
            client.request(Command.REGION_READ, body)
        n += 1000
        now = time.perf_counter()
        if now >= end:
            return n / (now - t0)


def bench_pipelined(client, duration: float, inflight: int) -> float:
    """Keep ``inflight`` requests outstanding: send a batch, collect its replies."""
    from vfio_user.protocol import Command, pack_header
    import struct
    body = struct.pack("=QII", 0, 0, 4)
    n = 0
    t0 = time.perf_counter()
    end = t0 + duration
    while True:
        for _ in range(100):
            ids = [client.next_id() for _ in range(inflight)]
            client.send_raw(b"".join(pack_header(i, Command.REGION_READ, len(body)) + body for i in ids))
            for i in ids:
                r = client.wait_reply(i)
                if r.flags & 0x20:
                    raise RuntimeError("error reply")
        n += 100 * inflight
        now = time.perf_counter()
        if now >= end:
            return n / (now - t0)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(sys.argv[2])
        return 0
    from vfio_user.client import Client
    d = tempfile.mkdtemp(prefix="vfubench")
    path = os.path.join(d, "bench.sock")
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", path],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if child.stdout is None or child.stdout.readline().strip() != "ready":
            print("server failed to start", file=sys.stderr)
            return 1
        with Client(path) as c:
            c.negotiate()
            bench_serial(c, 0.2)  # warm up
            print(f"vfio-user-region-read-serial: {bench_serial(c, DURATION):.0f} msgs/s")
            print(f"vfio-user-region-read-{INFLIGHT}-inflight: "
                  f"{bench_pipelined(c, DURATION, INFLIGHT):.0f} msgs/s")
    finally:
        if child.stdin:
            child.stdin.close()
        child.wait(timeout=10)
        os.rmdir(d) if os.path.isdir(d) and not os.listdir(d) else None
    return 0


if __name__ == "__main__":
    sys.exit(main())
