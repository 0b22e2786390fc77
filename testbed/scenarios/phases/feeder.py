"""The feeder, every step: a power flow with every prosumer's measured P and Q, the run's
feeder statistics, and the voltage at each prosumer's bus for its emulated devices.

Pure apart from the run store row it returns: the power flow is a function of its
injections (`grid.powerflow`), so the voltages fed back replay exactly."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from testbed.grid.check import GridChecker, GridReport


@dataclass(frozen=True)
class FeederStep:
    report: GridReport | None
    """None when a feeder federate did the power flow (`cosim.feeder`)."""
    vm_pu: Mapping[str, float]
    """Voltage (p.u.) at each prosumer's connection bus; empty when the flow failed."""
    row: dict[str, Any]


def finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


class Feeder:
    def __init__(self, checker: GridChecker, background: float = 1.0) -> None:
        self.checker = checker
        self.background = background
        self.rows = 0
        self.in_band = 0
        self.vm_min = math.inf
        self.vm_max = -math.inf
        self.losses_wh = 0.0

    def step(self, t: float, dt: float, p_w: Mapping[str, float],
             q_var: Mapping[str, float] | None = None) -> FeederStep:
        """Power flow with injections `p_w` / `q_var` (+ = into the grid)."""
        r = self.checker.check(p_w, background=self.background, base_q=q_var)
        self.rows += 1
        lim = self.checker.limits
        if r.converged and lim.vm_min_pu <= r.vm_min_pu and r.vm_max_pu <= lim.vm_max_pu:
            self.in_band += 1
        vm: dict[str, float] = {}
        if r.converged:
            self.vm_min, self.vm_max = min(self.vm_min, r.vm_min_pu), max(self.vm_max,
                                                                          r.vm_max_pu)
            self.losses_wh += r.losses_w * dt / 3600.0
            vm = self.checker.prosumer_vm(r)
        row = {"t": t, "light": str(r.light), "vm_min_pu": finite(r.vm_min_pu),
               "vm_max_pu": finite(r.vm_max_pu), "max_line_pct": finite(r.max_line_pct),
               "max_trafo_pct": finite(r.max_trafo_pct), "losses_w": finite(r.losses_w),
               "import_w": finite(r.import_w)}
        return FeederStep(r, vm, row)

    def summary(self) -> dict[str, Any]:
        return {"steps": self.rows,
                "in_band_share": self.in_band / self.rows if self.rows else None,
                "vm_min_pu": finite(self.vm_min), "vm_max_pu": finite(self.vm_max),
                "losses_kwh": self.losses_wh / 1000}
