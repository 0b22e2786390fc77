"""The DSO's feasibility check on a pandapower feeder (DESIGN.md, data flow step 6).

- `network`    bundled feeders and the user's pandapower JSON; prosumer -> bus mapping
- `limits`     GridLimits: hard and planning voltage bands, loading limits
- `powerflow`  FastFlow (Ybus built once, lightsim2grid Newton-Raphson) and ReferenceFlow
               (plain pandapower.runpp): the same interface, the same answers
- `check`      GridChecker -> GridReport: voltages, loadings, losses, violations and the
               awards that cause them, a green/amber/red light
- `reclear`    the aggregator's loop: curtail the blamed awards, re-clear, re-check
- `feeder`     build a GridChecker from a site file's `grid:` block

pandapower and numpy load only when a network is built (`from testbed.grid import
GridChecker` is lazy), so site files load without them.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .limits import GridLimits
from .network import FEEDERS, GridError

_LAZY = {
    "GridChecker": "check", "GridReport": "check", "Light": "check", "Violation": "check",
    "Kind": "check", "FastFlow": "powerflow", "ReferenceFlow": "powerflow",
    "FlowResult": "powerflow", "Reclear": "reclear", "reclear": "reclear",
    "award_power_w": "reclear", "checker_for": "feeder",
}

__all__ = ["FEEDERS", "GridError", "GridLimits", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
