"""vfio-user transport benchmark: REGION_READ round trips, and a trapped BAR read in a guest.

The server runs in a child process (as it would beside QEMU) serving a minimal device;
this process is the client (its public ``region_read`` / ``region_read_many`` API). Metrics:

- ``vfio-user-region-read-serial``: one 4-byte request in flight at a time;
- ``vfio-user-region-read-32-inflight``: 32 requests sent with one send, then their
  replies read (the server answers what it read with one sendmsg);
- the same two with ``-same-cpu``: client and server pinned to one CPU, which removes the
  cross-CPU wakeup that dominates round trips on a 2-vCPU VM;
- ``guest-trapped-bar-read``: per-read cost of a trapped BAR0 register read inside the
  booted guest (bundled QEMU, test endpoint), minus the loop overhead, which is printed as
  ``guest-direct-bar-read`` (a read of the directly mapped BAR2 page); again with
  ``-same-cpu``, QEMU and the server confined to one CPU. A trapped read wakes a thread
  in the other process and one inside QEMU; across vCPUs of this kind of VM each such
  wakeup is expensive, so the pinned figure is typically less than half the other.

Reference points on this kind of 2-vCPU machine (project reference notes): the C
reference server does about 88k/s serially and 205k/s with 32 in flight; through QEMU a
trapped BAR read costs about 47 us, of which about 25 us is the vfio-user round trip.
The machine is shared and its speed drifts by 10-20 % within minutes, so compare servers
in the same run: ``--reference 'CMD {sock}'`` starts another server (for instance a
libvfio-user server built outside this tree that serves a BAR0 of at least 4 bytes) and
prints the same metrics for it, prefixed ``reference-``, with the same client and pinning.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

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


def serve(path: str, cpu: int | None) -> None:
    """Child process: serve NullDevice until stdin closes (pinned to ``cpu`` when given)."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # before the loop thread starts: it inherits this
    from vfio_user.server import Server
    server = Server()
    server.add_device(path, NullDevice())
    server.start_in_thread()
    print("ready", flush=True)
    sys.stdin.read()
    server.stop()


def bench_serial(client, duration: float) -> float:
    """One REGION_READ in flight at a time, through the client's public API."""
    n = 0
    read = client.region_read
    t0 = time.perf_counter()
    end = t0 + duration
    while True:
        for _ in range(1000):
            read(0, 0, 4)
        n += 1000
        now = time.perf_counter()
        if now >= end:
            return n / (now - t0)


def bench_pipelined(client, duration: float, inflight: int) -> float:
    """Keep ``inflight`` requests outstanding: send a batch with one send, collect its replies."""
    batch = [(0, 0, 4)] * inflight
    read_many = client.region_read_many
    n = 0
    t0 = time.perf_counter()
    end = t0 + duration
    while True:
        for _ in range(100):
            if len(read_many(batch)) != inflight:
                raise RuntimeError("short batch")
        n += 100 * inflight
        now = time.perf_counter()
        if now >= end:
            return n / (now - t0)


@contextlib.contextmanager
def served_reference(command: str, cpu: int | None) -> Iterator[str]:
    """Another vfio-user server, started from ``command`` with ``{sock}`` replaced."""
    d = tempfile.mkdtemp(prefix="vfuref")
    path = os.path.join(d, "ref.sock")
    argv = shlex.split(command.replace("{sock}", path))
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu)] + argv
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"reference server did not create {path}")
            time.sleep(0.02)
        time.sleep(0.2)  # the socket file appears at bind(), before listen()
        yield path
    finally:
        child.kill()
        child.wait(timeout=10)
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def served_null_device(cpu: int | None) -> Iterator[str]:
    """A NullDevice server in a child process (as it would run beside QEMU); yields its socket."""
    d = tempfile.mkdtemp(prefix="vfubench")
    path = os.path.join(d, "bench.sock")
    argv = [sys.executable, os.path.abspath(__file__), "--serve", path]
    if cpu is not None:
        argv.append(str(cpu))
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if child.stdout is None or child.stdout.readline().strip() != "ready":
            raise RuntimeError("server failed to start")
        yield path
    finally:
        if child.stdin:
            child.stdin.close()
        child.wait(timeout=10)
        shutil.rmtree(d, ignore_errors=True)


def transport_metrics(duration: float, same_cpu: bool, reference: str | None = None) -> None:
    """Serial and pipelined round trips; with ``same_cpu`` both processes share one CPU.

    Why both: on this kind of 2-vCPU VM a wakeup on the other vCPU costs several times a
    round trip (reference notes: pinning apart made round trips 3x slower), so the unpinned
    figure mostly measures where the scheduler put the two processes.
    """
    from vfio_user.client import Client

    suffix = "-same-cpu" if same_cpu else ""
    prefix = "reference-" if reference else ""
    cpu = min(os.sched_getaffinity(0)) if same_cpu else None
    saved = os.sched_getaffinity(0)
    served = served_reference(reference, cpu) if reference else served_null_device(cpu)
    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        with served as path, Client(path) as c:
            c.negotiate()
            bench_serial(c, 0.2)  # warm up
            print(f"{prefix}vfio-user-region-read-serial{suffix}: {bench_serial(c, duration):.0f} msgs/s",
                  flush=True)
            print(f"{prefix}vfio-user-region-read-{INFLIGHT}-inflight{suffix}: "
                  f"{bench_pipelined(c, duration, INFLIGHT):.0f} msgs/s", flush=True)
    finally:
        os.sched_setaffinity(0, saved)


GUEST_SCRIPT = """
import time
from devmodel_mmio import Bar
def per_read(read, off, n):
    t = time.perf_counter()
    for _ in range(n):
        read(off)
    return (time.perf_counter() - t) / n
with Bar("{bdf}", 0) as bar0, Bar("{bdf}", 2) as bar2:
    assert bar0.read32(0) == {magic}
    direct = min(per_read(bar2.read32, 0, {n_direct}) for _ in range(3))
    trapped = min(per_read(bar0.read32, {scratch}, {n_trapped}) for _ in range(3))
print("RESULT", trapped, direct)
"""


def guest_metrics(same_cpu: bool, n_trapped: int = 2000, n_direct: int = 20000) -> None:
    """Guest-visible cost of a trapped BAR0 read (a vfio-user round trip through QEMU).

    The guest times Python loops of 32-bit reads through sysfs resource mmaps: BAR0 is
    all trapped (each read is a REGION_READ), BAR2's first page is directly mapped
    (sparse mmap, no message): the latter is the loop's own cost, subtracted from the
    former.
    """
    from devmodel.commands.run import machine
    from devmodel.devices.testdev import TESTDEV_DEVICE_ID, TESTDEV_MAGIC, TESTDEV_VENDOR_ID

    saved = os.sched_getaffinity(0)
    if same_cpu:  # before the server's threads and QEMU start: they inherit it
        os.sched_setaffinity(0, {min(saved)})
    try:
        trapped, direct = _guest_reads(machine, TESTDEV_VENDOR_ID, TESTDEV_DEVICE_ID, TESTDEV_MAGIC,
                                       n_trapped, n_direct)
    finally:
        os.sched_setaffinity(0, saved)
    suffix = "-same-cpu" if same_cpu else ""
    print(f"guest-trapped-bar-read{suffix}: {(trapped - direct) * 1e6:.1f} us", flush=True)
    print(f"guest-direct-bar-read{suffix}: {direct * 1e6:.2f} us", flush=True)


def _guest_reads(machine, vendor: int, device: int, magic: int, n_trapped: int,
                 n_direct: int) -> tuple[float, float]:
    """Seconds per trapped BAR0 read and per direct BAR2 read, timed inside a booted guest."""
    with machine(["testdev"]) as (guest, _):
        bdf = guest.check(
            "for d in /sys/bus/pci/devices/*; do "
            f"[ $(cat $d/vendor) = {vendor:#06x} ] && [ $(cat $d/device) = {device:#06x} ] "
            "&& echo ${d##*/}; done; true").strip()
        if not bdf:
            raise RuntimeError("guest does not see the test endpoint")
        # Memory decode on (command register bit 1) so the BARs answer.
        guest.check(f"printf '\\002\\000' | dd of=/sys/bus/pci/devices/{bdf}/config bs=1 seek=4 "
                    "count=2 conv=notrunc 2>/dev/null")
        script = GUEST_SCRIPT.format(bdf=bdf, magic=magic, scratch=0x08,
                                     n_trapped=n_trapped, n_direct=n_direct)
        out = guest.check(f"python3 - <<'PYEOF'\n{script.strip()}\nPYEOF", timeout=120)
    fields = out.split("RESULT", 1)[1].split()
    return float(fields[0]), float(fields[1])


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=DURATION, help="seconds per transport metric")
    parser.add_argument("--no-guest", action="store_true", help="skip the booted-guest metric")
    parser.add_argument("--only-guest", action="store_true", help="only the booted-guest metric")
    parser.add_argument("--reference", metavar="CMD",
                        help="also measure this server ({sock} is replaced by its socket path)")
    args = parser.parse_args()
    if not args.only_guest:
        for same_cpu in (False, True):
            transport_metrics(args.duration, same_cpu)
            if args.reference:
                transport_metrics(args.duration, same_cpu, args.reference)
    if not args.no_guest:
        guest_metrics(same_cpu=False)
        guest_metrics(same_cpu=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
