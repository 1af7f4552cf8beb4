"""A tiny declarative bit-field record codec (stdlib only).

Every SMMUv3 in-memory structure (STE, CD, queue records, commands) is a little-endian
record whose fields sit at absolute bit positions. Declaring each layout once as a
:class:`RecordLayout` lets the hardware model, the host driver, the VMM and the guest
agent share one definition, and lets tests check sizes and positions in one place.

Address fields are declared with ``scale``: the stored bits are address bits
``[lsb_addr + width - 1 : lsb_addr]`` so callers pass and receive byte addresses, and
misaligned addresses are rejected instead of silently truncated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping


@dataclass(frozen=True)
class BitField:
    """Bits ``[msb:lsb]`` of a record. ``scale`` > 0 marks an address field (value << scale)."""

    name: str
    msb: int
    lsb: int
    scale: int = 0

    @property
    def width(self) -> int:
        return self.msb - self.lsb + 1

    @property
    def mask(self) -> int:
        return (1 << self.width) - 1

    def get(self, raw: int) -> int:
        """Extract the field (as an address when scaled) from the record integer."""
        return ((raw >> self.lsb) & self.mask) << self.scale

    def put(self, value: int) -> int:
        """Return the record bits for ``value``; ValueError when it does not fit."""
        if value < 0:
            raise ValueError(f"{self.name}: negative value {value}")
        if self.scale and value & ((1 << self.scale) - 1):
            raise ValueError(f"{self.name}: {value:#x} not aligned to {1 << self.scale}")
        v = value >> self.scale
        if v > self.mask:
            raise ValueError(f"{self.name}: {value:#x} does not fit bits [{self.msb}:{self.lsb}]")
        return v << self.lsb


def bits(name: str, msb: int, lsb: int | None = None, scale: int = 0) -> BitField:
    """Shorthand: ``bits("V", 0)`` is a one-bit field, ``bits("Config", 3, 1)`` a range."""
    return BitField(name, msb, msb if lsb is None else lsb, scale)


class Fields(dict):
    """Decoded fields with attribute access (``ste.Config``)."""

    def __getattr__(self, name: str) -> int:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class RecordLayout:
    """A fixed-size little-endian record made of named :class:`BitField` s.

    Fields may overlap only where the spec itself overlays them (e.g. IPA and FetchAddr
    in event records); encode() rejects setting two overlapping fields at once.
    """

    def __init__(self, name: str, size: int, fields: Iterable[BitField]) -> None:
        self.name = name
        self.size = size
        self.fields: dict[str, BitField] = {}
        for f in fields:
            if f.msb >= size * 8 or f.lsb > f.msb:
                raise ValueError(f"{name}.{f.name}: bits [{f.msb}:{f.lsb}] outside {size} bytes")
            if f.name in self.fields:
                raise ValueError(f"{name}: duplicate field {f.name}")
            self.fields[f.name] = f

    def __repr__(self) -> str:
        return f"RecordLayout({self.name}, {self.size} bytes, {len(self.fields)} fields)"

    def pack(self, values: Mapping[str, int] | None = None, **kw: int) -> int:
        """Return the record as an integer; unknown names raise KeyError."""
        merged = dict(values or {}, **kw)
        raw = 0
        used = 0
        for name, value in merged.items():
            f = self.fields[name]
            span = f.mask << f.lsb
            if value and used & span:
                raise ValueError(f"{self.name}.{name} overlaps another field that was set")
            if value:
                used |= span
            raw |= f.put(int(value))
        return raw

    def encode(self, values: Mapping[str, int] | None = None, **kw: int) -> bytes:
        """Return the ``size``-byte little-endian record."""
        return self.pack(values, **kw).to_bytes(self.size, "little")

    def unpack(self, raw: int) -> Fields:
        """Decode every field of a record integer."""
        return Fields((name, f.get(raw)) for name, f in self.fields.items())

    def decode(self, data: bytes) -> Fields:
        """Decode a ``size``-byte record; ValueError on a wrong length."""
        if len(data) != self.size:
            raise ValueError(f"{self.name}: need {self.size} bytes, got {len(data)}")
        return self.unpack(int.from_bytes(data, "little"))

    def get(self, raw: int, name: str) -> int:
        """One field of a record integer (fast path for hot code)."""
        return self.fields[name].get(raw)
