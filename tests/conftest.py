"""Shared fixtures: booting guests that are always shut down."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Callable

import pytest

from guest.harness import Guest, GuestConfig


@pytest.fixture
def boot_guest(request: pytest.FixtureRequest) -> Iterator[Callable[..., Guest]]:
    """Factory: ``boot_guest(**GuestConfig fields)`` starts a guest; all are closed at teardown.

    On failure the console log of every guest is attached to the test report.
    """
    guests: list[Guest] = []

    def factory(config: GuestConfig | None = None, **overrides: object) -> Guest:
        guest = Guest(config, **overrides)
        guests.append(guest)
        return guest.start()

    yield factory
    for i, guest in enumerate(guests):
        if request.node.stash.get(_FAILED, False):
            request.node.add_report_section("call", f"guest {i} console", guest.console[-20000:])
        guest.close()


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True
    return report
