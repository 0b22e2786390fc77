"""Node maps: how the neutral names of a `Reading` map onto a foreign OPC UA server's nodes.

Pure definitions shared by the site-file model (`testbed.config`) and the OPC UA driver:
the engineering unit each neutral name carries (from its suffix: `p_w` -> W), the units a
vendor may serve instead (kW, MWh, kV, a 0-1 fraction, ...) with their factor, and the
linear conversion `neutral = raw * scale + offset` a mapped point applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NAMESPACE_URI = "urn:testbed:devices"
"""Namespace URI of our own OPC UA information model (the default of a node map)."""

SUFFIX_UNITS = {"w": "W", "var": "var", "wh": "Wh", "pct": "%", "v": "V", "hz": "Hz", "a": "A",
                "c": "°C", "enabled": "1"}
"""Neutral name suffix -> engineering unit."""

UNIT_FACTORS: dict[str, tuple[str, float]] = {
    "W": ("W", 1.0), "kW": ("W", 1e3), "MW": ("W", 1e6),
    "var": ("var", 1.0), "kvar": ("var", 1e3), "Mvar": ("var", 1e6),
    "Wh": ("Wh", 1.0), "kWh": ("Wh", 1e3), "MWh": ("Wh", 1e6),
    "V": ("V", 1.0), "kV": ("V", 1e3), "mV": ("V", 1e-3),
    "A": ("A", 1.0), "kA": ("A", 1e3), "mA": ("A", 1e-3),
    "Hz": ("Hz", 1.0), "%": ("%", 1.0), "fraction": ("%", 100.0), "permille": ("%", 0.1),
    "°C": ("°C", 1.0), "1": ("1", 1.0),
}
"""A unit a server may publish -> (the neutral unit it converts to, factor to it)."""


def unit_of(point: str) -> str:
    """The engineering unit of a neutral name, from its suffix (p_w -> W, soc_pct -> %)."""
    return SUFFIX_UNITS[point.rsplit("_", 1)[-1]]


def check_unit(point: str, unit: str) -> None:
    """ValueError unless a server unit can stand for neutral point `point`."""
    if unit not in UNIT_FACTORS:
        raise ValueError(f"{point}: unknown unit {unit!r} (known: {', '.join(UNIT_FACTORS)})")
    want = unit_of(point)
    if UNIT_FACTORS[unit][0] != want:
        raise ValueError(f"{point}: unit {unit} does not convert to {want}")


@dataclass(frozen=True)
class Conversion:
    """neutral = raw * scale + offset (scale includes a unit's factor)."""

    scale: float = 1.0
    offset: float = 0.0

    @classmethod
    def of(cls, scale: float = 1.0, offset: float = 0.0, unit: str | None = None) -> Conversion:
        return cls(scale * (UNIT_FACTORS[unit][1] if unit else 1.0), offset)

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.offset == 0.0

    def to_neutral(self, raw: float) -> float:
        return raw * self.scale + self.offset

    def to_raw(self, value: float) -> float:
        return (value - self.offset) / self.scale

    def range_to_neutral(self, lo: float, hi: float) -> tuple[float, float]:
        a, b = self.to_neutral(lo), self.to_neutral(hi)
        return (min(a, b), max(a, b))


def within(value: float, lo: float, hi: float) -> bool:
    """A setpoint value inside its range, with a hair of tolerance for unit round trips."""
    tol = 1e-9 * max(1.0, abs(lo), abs(hi))
    return math.isfinite(value) and lo - tol <= value <= hi + tol
