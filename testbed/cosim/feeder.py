"""The feeder as a HELICS federate, and the run's side of it.

`FeederFederate` runs the bundled pandapower feeder (`scenarios.phases.feeder.Feeder`)
in its own process: it is granted the time the run publishes the prosumers' measured
injections (`names.injections`, one JSON value, at t1 + dt/10), power-flows the feeder,
and publishes the check with the voltage at each prosumer's bus (`names.feeder_check`). `RemoteFeeder` is the run's feeder
phase when a federate does the power flow: same rows, same summary, so a run with the
feeder federate writes the store the in-process feeder would. Another grid simulator
(GridLAB-D, OpenDSS, ...) takes its place by implementing the same keys
(examples/feeder_federate.py is a minimal one).

    python -m testbed.cosim.feeder SITE --helics HOST:PORT [--background 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections.abc import Mapping
from typing import Any

from testbed.config import ConfigError, SiteConfig, load_site
from testbed.grid.limits import GridLimits
from testbed.scenarios.phases.feeder import Feeder, FeederStep, finite

from . import names
from .errors import CosimError, FederateLost
from .federate import MAXTIME, Federate


def feeder_time(t1: float, dt: float) -> float:
    """When the run reads the feeder's answer for the step ending at t1."""
    return t1 + 0.2 * dt


class FeederFederate:
    def __init__(self, site: SiteConfig, broker: str, background: float | None = None) -> None:
        from testbed.grid.feeder import checker_for

        self.site = site
        self.prosumers = [p.name for p in site.prosumers]
        self.feeder = Feeder(checker_for(site), site.grid.background if background is None
                             else background)
        self.fed = Federate("testbed-feeder", broker, interruptible=True)
        self.steps = 0

    async def serve(self) -> int:
        s, fed = self.site.name, self.fed
        key = names.injections(s)
        await fed.connect()
        try:
            fed.subscribe(key)
            fed.publish_to(names.feeder_check(s), "string")
            await fed.enter()
            while await fed.request(MAXTIME) < MAXTIME:
                if not fed.updated(key):
                    continue
                given = _injections(fed.text(key))
                if given is None:  # the run's end
                    break
                p_w, q_var = {}, {}
                for p, (w, q) in given.items():
                    if w is not None:
                        p_w[p], q_var[p] = float(w), float(q or 0.0)
                flow = self.feeder.step(0.0, 0.0, p_w, q_var)
                row = {k: v for k, v in flow.row.items() if k != "t"}
                fed.put(names.feeder_check(s), json.dumps(
                    {**row, "converged": bool(flow.report.converged),
                     "vm_pu": {p: v if math.isfinite(v := flow.vm_pu.get(p, math.nan)) else None
                               for p in self.prosumers}}))
                self.steps += 1
        finally:
            fed.close()
        return self.steps


def _injections(text: str | None) -> dict[str, tuple[float | None, float]] | None:
    """The run's injections value, checked; None for `{"end": true}`."""
    try:
        v = json.loads(text or "")
        if v.get("end") is True:
            return None
        out = {}
        for p, (w, q) in v["prosumers"].items():
            if w is not None and not isinstance(w, int | float):
                raise ValueError(f"{p}: P must be a number or null")
            out[p] = (w, float(q or 0.0))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CosimError(f"{names.injections('<site>')}: malformed ({exc})") from None
    return out


class RemoteFeeder:
    """The run's feeder phase over the federation (the same rows and summary as
    `Feeder`, whose bookkeeping it repeats on the federate's check)."""

    def __init__(self, fed: Federate, site: str, prosumers: list[str],
                 limits: GridLimits) -> None:
        self.fed, self.site_name, self.prosumers, self.limits = fed, site, prosumers, limits
        self.known = set(prosumers)
        self.rows = self.in_band = 0
        self.vm_min, self.vm_max = math.inf, -math.inf
        self.losses_wh = 0.0

    def register(self) -> None:
        self.fed.publish_to(names.injections(self.site_name), "string")
        self.fed.subscribe(names.feeder_check(self.site_name))

    async def step(self, t: float, dt: float, p_w: Mapping[str, float],
                   q_var: Mapping[str, float] | None = None) -> FeederStep:
        s, fed = self.site_name, self.fed
        q_var = q_var or {}
        fed.put(names.injections(s), json.dumps({"t": t, "prosumers": {
            p: [w if math.isfinite(w := p_w.get(p, math.nan)) else None, q_var.get(p, 0.0)]
            for p in self.prosumers}}))
        try:
            await fed.request(feeder_time(t, dt))
        except CosimError as exc:
            raise FederateLost(f"the feeder federate: {exc}", []) from None
        if not fed.updated(names.feeder_check(s)):
            raise FederateLost(f"the feeder federate published no check at t={t:g} s", [])
        check = _check(fed.text(names.feeder_check(s)))
        vm = {p: float(v) for p, v in (check.get("vm_pu") or {}).items()
              if p in self.known and v is not None}
        self.rows += 1
        lo, hi = check["vm_min_pu"], check["vm_max_pu"]
        if check["converged"] and lo is not None and hi is not None:
            if self.limits.vm_min_pu <= lo and hi <= self.limits.vm_max_pu:
                self.in_band += 1
            self.vm_min, self.vm_max = min(self.vm_min, lo), max(self.vm_max, hi)
            self.losses_wh += (check["losses_w"] or 0.0) * dt / 3600.0
        row = {"t": t, **{k: check[k] for k in ROW_KEYS}}
        return FeederStep(None, vm if check["converged"] else {}, row)

    def summary(self) -> dict[str, Any]:
        return {"steps": self.rows,
                "in_band_share": self.in_band / self.rows if self.rows else None,
                "vm_min_pu": finite(self.vm_min), "vm_max_pu": finite(self.vm_max),
                "losses_kwh": self.losses_wh / 1000}


ROW_KEYS = ("light", "vm_min_pu", "vm_max_pu", "max_line_pct", "max_trafo_pct", "losses_w",
            "import_w")


def _check(text: str | None) -> dict[str, Any]:
    """The feeder federate's check, validated (a malformed one ends the run, named)."""
    try:
        c = json.loads(text or "")
        if not isinstance(c, dict) or not isinstance(c.get("converged"), bool):
            raise ValueError("converged must be true or false")
        if c.get("light") not in ("green", "amber", "red"):
            raise ValueError("light must be green, amber or red")
        for k in ROW_KEYS[1:]:
            v = c.get(k)
            if v is not None and not (isinstance(v, int | float) and math.isfinite(v)):
                raise ValueError(f"{k} must be a finite number or null")
        vm = c.get("vm_pu") or {}
        if not isinstance(vm, dict) or not all(
                v is None or (isinstance(v, int | float) and math.isfinite(v))
                for v in vm.values()):
            raise ValueError("vm_pu must map prosumers to finite numbers or null")
    except (ValueError, TypeError) as exc:
        raise FederateLost(f"{names.feeder_check('<site>')}: {exc}", []) from None
    return c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.cosim.feeder",
                                 description="The bundled pandapower feeder as a HELICS "
                                             "federate.")
    ap.add_argument("site")
    ap.add_argument("--helics", required=True, metavar="HOST:PORT")
    ap.add_argument("--background", type=float, default=None)
    args = ap.parse_args(argv)
    try:
        fed = FeederFederate(load_site(args.site), args.helics, args.background)
        steps = asyncio.run(fed.serve())
    except (ConfigError, CosimError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    print(f"feeder federate: the run ended after {steps} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
