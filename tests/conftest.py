"""Shared fixtures: booting guests that are always shut down."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Callable

import pytest

from guest.harness import Guest, GuestConfig

_GUESTS = pytest.StashKey[list]()


@pytest.fixture
def boot_guest(request: pytest.FixtureRequest) -> Iterator[Callable[..., Guest]]:
    """Factory: ``boot_guest(**GuestConfig fields)`` starts a guest; all are closed at teardown.

    When the test fails, every guest's console tail is attached to the failure report.
    """
    guests: list[Guest] = []
    request.node.stash[_GUESTS] = guests

    def factory(config: GuestConfig | None = None, **overrides: object) -> Guest:
        guest = Guest(config, **overrides)
        guests.append(guest)
        return guest.start()

    yield factory
    for guest in guests:
        guest.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.when == "call" and report.failed:
        for i, guest in enumerate(item.stash.get(_GUESTS, [])):
            report.sections.append((f"guest {i} console", guest.console[-6000:].replace("\r", "")))
    return report
