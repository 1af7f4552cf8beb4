"""Base classes for standard and extended capabilities.

A capability owns a byte range of config space. The function places it (``offset``),
links it into the right list and then calls :meth:`Capability.install`, where the
capability writes its registers' reset values and declares their write/W1C masks. After
every guest config write that touches the range the function calls
:meth:`Capability.config_written` with the range's previous bytes so the capability can
apply side effects that masks alone cannot express (enable transitions, self-clearing
bits). :meth:`Capability.reset` runs after the function restored config defaults.

Other models react to capability changes through listeners (``add_listener``), called
with the capability after each guest write that changed its registers and after reset.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from devmodel.pci import regs

if TYPE_CHECKING:
    from devmodel.pci.config import ConfigSpace
    from devmodel.pci.function import PciFunction

log = logging.getLogger(__name__)


class Capability:
    """A standard (linked from 0x34) capability; subclasses set ``cap_id`` and ``size``."""

    cap_id: int = 0
    size: int = 0
    extended: bool = False

    def __init__(self) -> None:
        self.offset: int = 0
        self.function: PciFunction | None = None
        self._listeners: list[Callable[[Capability], None]] = []

    # --- placement ----------------------------------------------------------------------
    def bind(self, function: PciFunction, offset: int) -> None:
        """Called by the function when the capability is placed at ``offset``."""
        self.function = function
        self.offset = offset
        self.install()

    def install(self) -> None:
        """Write reset values and masks of the capability's registers (after the header)."""

    # --- register helpers (offsets are relative to the capability) --------------------
    @property
    def config(self) -> ConfigSpace:
        assert self.function is not None, "capability not added to a function"
        return self.function.config

    def get(self, rel: int, size: int) -> int:
        return self.config.get(self.offset + rel, size)

    def set(self, rel: int, size: int, value: int) -> None:
        self.config.set(self.offset + rel, size, value)

    def set_masks(self, rel: int, size: int, wmask: int = 0, w1c: int = 0, preserve: int = 0) -> None:
        self.config.set_masks(self.offset + rel, size, wmask=wmask, w1c=w1c, preserve=preserve)

    def old_value(self, old: bytes, rel: int, size: int) -> int:
        """Value of a register in the ``old`` bytes handed to :meth:`config_written`."""
        return int.from_bytes(old[rel:rel + size], "little")

    def contains(self, offset: int, count: int) -> bool:
        """True when a config access ``[offset, offset+count)`` overlaps this capability."""
        return offset < self.offset + self.size and self.offset < offset + count

    # --- behaviour hooks ---------------------------------------------------------------
    def config_written(self, old: bytes) -> None:
        """A guest write touched this capability; ``old`` is its previous ``size`` bytes."""

    def reset(self) -> None:
        """Function reset: config is already back to defaults; drop internal state."""

    # --- listeners -----------------------------------------------------------------------
    def add_listener(self, callback: Callable[[Capability], None]) -> None:
        """Call ``callback(cap)`` after guest writes that change the capability and after reset."""
        self._listeners.append(callback)

    def notify_listeners(self) -> None:
        for callback in list(self._listeners):
            callback(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(offset={self.offset:#x})"


class ExtendedCapability(Capability):
    """A PCIe extended capability (32-bit header, list starts at 0x100)."""

    extended = True
    version: int = 1

    @property
    def header_size(self) -> int:
        return 4


def standard_header_size() -> int:
    """Bytes taken by a standard capability header (ID + Next)."""
    return regs.CAP_NEXT_OFFSET + 1
