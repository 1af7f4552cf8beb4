"""Guest side of the devmodel_uirq kernel module: bind a PCI function, wait for its interrupts.

The module (guest/kmod/devmodel_uirq.c) enables a function, allocates all its MSI-X
vectors (else MSI, else INTx) and exposes ``/dev/devmodel-uirq-<BDF>``: a read returns one
native u64 count per vector and blocks until a count changed since the file's last read.
This wrapper is what the guest agent uses, and ``python3 -m devmodel_uirq`` gives the same
from a shell (bind / info / wait).
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import struct
import sys
import time
from pathlib import Path

DRIVER = "devmodel_uirq"
PCI_DEVICES = Path("/sys/bus/pci/devices")
PCI_DRIVERS_PROBE = Path("/sys/bus/pci/drivers_probe")
MISC_CLASS = Path("/sys/class/misc")
NODE_PREFIX = "devmodel-uirq-"
COUNT = struct.Struct("=Q")


class UirqError(OSError):
    """Binding or reading failed; carries the errno the kernel gave."""


def node_name(bdf: str) -> str:
    """The misc device name of a bound function, e.g. devmodel-uirq-0000:00:05.0."""
    return NODE_PREFIX + bdf


def bind(bdf: str, timeout: float = 5.0) -> "Uirq":
    """Bind ``bdf`` to devmodel_uirq (driver_override + drivers_probe) and open its node.

    A driver already bound is unbound first, so a device Linux claimed can be taken over.
    """
    dev = PCI_DEVICES / bdf
    if not dev.exists():
        raise UirqError(errno.ENODEV, f"no PCI function {bdf}")
    current = dev / "driver"
    if current.exists():
        if os.path.basename(os.readlink(current)) == DRIVER:
            return Uirq(bdf)
        (current / "unbind").write_text(bdf)
    (dev / "driver_override").write_text(DRIVER)
    PCI_DRIVERS_PROBE.write_text(bdf)
    deadline = time.monotonic() + timeout
    while not (MISC_CLASS / node_name(bdf)).exists():
        if time.monotonic() > deadline:
            raise UirqError(errno.ETIMEDOUT, f"{DRIVER} did not bind {bdf} (see dmesg)")
        time.sleep(0.01)
    return Uirq(bdf)


def unbind(bdf: str) -> None:
    """Release ``bdf`` from devmodel_uirq and clear its driver_override."""
    dev = PCI_DEVICES / bdf
    if (dev / "driver").exists() and os.path.basename(os.readlink(dev / "driver")) == DRIVER:
        (dev / "driver" / "unbind").write_text(bdf)
    (dev / "driver_override").write_text("\n")


class Uirq:
    """One bound function's interrupt counters (``/dev/devmodel-uirq-<BDF>``)."""

    def __init__(self, bdf: str) -> None:
        self.bdf = bdf
        self.sysfs = MISC_CLASS / node_name(bdf)
        self.nvec = int((self.sysfs / "nvec").read_text())
        self.mode = (self.sysfs / "mode").read_text().strip()
        self.fd = os.open(f"/dev/{node_name(bdf)}", os.O_RDONLY | os.O_NONBLOCK)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Uirq":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def snapshot(self) -> list[int]:
        """Current counts without consuming the change token (sysfs)."""
        return [int(x) for x in (self.sysfs / "counts").read_text().split()]

    def poll(self) -> list[int] | None:
        """Counts if any changed since this file's last read, else None (never blocks)."""
        try:
            data = os.read(self.fd, COUNT.size * self.nvec)
        except BlockingIOError:
            return None
        return [COUNT.unpack_from(data, i * COUNT.size)[0] for i in range(self.nvec)]

    def wait(self, timeout: float | None = None) -> list[int] | None:
        """Block (poll(2)) until a count changes; counts, or None on timeout."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        events = poller.poll(None if timeout is None else int(timeout * 1000))
        for _, mask in events:
            if mask & (select.POLLHUP | select.POLLERR):
                raise UirqError(errno.ENODEV, f"{self.bdf} was unbound")
        return self.poll() if events else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devmodel_uirq", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("bind", "unbind", "info"):
        sub.add_parser(name).add_argument("bdf")
    w = sub.add_parser("wait")
    w.add_argument("bdf")
    w.add_argument("--timeout", type=float, default=None)
    args = parser.parse_args(argv)
    if args.cmd == "unbind":
        unbind(args.bdf)
        return 0
    with (bind(args.bdf) if args.cmd == "bind" else Uirq(args.bdf)) as u:
        if args.cmd == "wait":
            counts = u.wait(args.timeout)
            if counts is None:
                print("timeout", file=sys.stderr)
                return 1
        else:
            counts = u.snapshot()
        print(f"{u.bdf} mode={u.mode} nvec={u.nvec} counts={' '.join(map(str, counts))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
