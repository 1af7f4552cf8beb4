"""Shared helpers of the machine tests (real server, real clients, in-process)."""

from __future__ import annotations

import time


def wait_until(cond, timeout: float = 5.0) -> bool:
    """Poll ``cond`` until true (the machine reacts on its loop and worker threads)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
