"""Guest boot time: QEMU start to the guest's ready marker, and to a powered-off guest.

Prints ``metric: value unit`` lines (median and spread of N boots) for make bench.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guest.harness import Guest  # noqa: E402
from images.accel import choose_accel  # noqa: E402

RUNS = 5


def main() -> None:
    ready, total = [], []
    for _ in range(RUNS):
        t0 = time.monotonic()
        with Guest() as guest:
            ready.append(guest.boot_seconds)
            guest.check("true")
        total.append(time.monotonic() - t0)
    accel = choose_accel()
    print(f"boot-to-ready-{accel}-median: {statistics.median(ready):.2f} s")
    print(f"boot-to-ready-{accel}-min-max: {min(ready):.2f}-{max(ready):.2f} s")
    print(f"boot-command-poweroff-{accel}-median: {statistics.median(total):.2f} s")


if __name__ == "__main__":
    main()
