"""Aggregator accounting (pure): metered energy per prosumer and interval, the deviation
from the day-ahead schedule, and the CPF evidence each meter certifies.

Inputs are one step's measured powers; outputs are numbers. Nothing here does I/O, so
every figure of a run's deviation and self-consumption can be checked by hand."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from testbed.ledger.election import cpf
from testbed.market.aggregator import Schedule

INTERVAL_KEYS = ("pv_wh", "import_wh", "export_wh", "dis_wh", "ch_wh")
TOTAL_KEYS = (*INTERVAL_KEYS, "load_wh", "pv_local_wh", "load_local_wh")


@dataclass(frozen=True)
class Metered:
    """One prosumer's measured powers in one step (W): meter + import / - export, PV
    output, battery + discharge / - charge, reactive power + into the grid."""

    import_w: float = 0.0
    pv_w: float = 0.0
    battery_w: float = 0.0
    q_var: float = 0.0
    has_meter: bool = True
    """False: no meter reading (none installed, or none yet); the feeder then takes what
    the inverters put out (the household load is not measured)."""

    @property
    def injection_w(self) -> float:
        """Net export at the connection point."""
        return -self.import_w if self.has_meter else self.pv_w + self.battery_w


_NOTHING = Metered()
"""A prosumer with no reading this step."""


@dataclass(frozen=True)
class Certified:
    """What a meter signs for an interval (paper eq. 9 evidence)."""

    prosumer: str
    production_kwh: float
    consumption_kwh: float

    @property
    def cpf(self) -> float:
        return cpf(self.production_kwh, self.consumption_kwh)


@dataclass(frozen=True)
class IntervalClose:
    """The books of one closed interval."""

    interval: int
    energy: Mapping[str, Mapping[str, float]]
    """prosumer -> interval energies (Wh): pv, import, export, discharge, charge."""
    certified: tuple[Certified, ...]
    row: dict[str, Any] | None
    """The previous interval's deviation row, now that its delivery is metered."""


@dataclass
class _Books:
    interval: dict[str, float] = field(default_factory=lambda: dict.fromkeys(INTERVAL_KEYS, 0.0))
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TOTAL_KEYS, 0.0))


class Accounting:
    """Metered vs scheduled energy; `covered` is filled in when the delivery that answers an
    interval's deviation has been metered (in the interval after its auction)."""

    def __init__(self, prosumers: Iterable[str], schedule: Schedule, interval_s: int) -> None:
        self.books = {p: _Books() for p in prosumers}
        self.schedule = schedule
        self.interval_s = interval_s
        self.stats: dict[int, dict[str, float]] = {}
        self.covered: dict[int, float] = {}

    def step(self, t: float, dt: float, metered: Mapping[str, Metered]) -> float:
        """Integrate one step; returns the aggregate net import (W) the aggregator sees."""
        wh = dt / 3600.0
        net_import = 0.0
        for name, b in self.books.items():
            m = metered.get(name, _NOTHING)
            imp, pv, bat = m.import_w, m.pv_w, m.battery_w
            # each energy once, added to the interval's and the run's books (locals, not a
            # dict of parts per prosumer per step: the same floats, half the time)
            pv_wh, imp_wh = max(0.0, pv) * wh, max(0.0, imp) * wh
            exp_wh, dis_wh, ch_wh = max(0.0, -imp) * wh, max(0.0, bat) * wh, max(0.0, -bat) * wh
            bi, bt = b.interval, b.totals
            bi["pv_wh"] += pv_wh
            bt["pv_wh"] += pv_wh
            bi["import_wh"] += imp_wh
            bt["import_wh"] += imp_wh
            bi["export_wh"] += exp_wh
            bt["export_wh"] += exp_wh
            bi["dis_wh"] += dis_wh
            bt["dis_wh"] += dis_wh
            bi["ch_wh"] += ch_wh
            bt["ch_wh"] += ch_wh
            load = max(0.0, pv + imp + bat)  # what the house drew: every flow balanced
            charge, discharge = max(0.0, -bat), max(0.0, bat)
            bt["load_wh"] += load * wh
            bt["pv_local_wh"] += min(max(0.0, pv), load + charge) * wh
            bt["load_local_wh"] += min(load, max(0.0, pv) + discharge) * wh
            net_import += imp
        return net_import

    def interval_end(self, interval: int, t: float, *, delivered: bool,
                     requested_kwh: Mapping[int, float]) -> IntervalClose:
        """Close `interval`: its energies, the meters' certified readings, and the row of
        the interval before it. `delivered`: the previous interval's auction awarded energy,
        delivered in this one."""
        energy = {n: dict(b.interval) for n, b in self.books.items()}
        certified = tuple(
            Certified(n, e["pv_wh"] / 1000.0,
                      max(0.0, (e["pv_wh"] + e["import_wh"] - e["export_wh"]) / 1000.0))
            for n, e in energy.items())
        metered = sum((e["import_wh"] - e["export_wh"]) / 1000.0 for e in energy.values())
        market = -sum((e["dis_wh"] - e["ch_wh"]) / 1000.0 for e in energy.values()) \
            if delivered else 0.0
        schedule = self.schedule[interval] if interval in self.schedule.intervals() else 0.0
        raw = metered - market - schedule
        self.stats[interval] = {"start": interval * self.interval_s, "schedule": schedule,
                                "metered": metered, "market": market, "raw": raw}
        row = None
        prev = interval - 1
        if prev in self.stats:
            st = self.stats[prev]
            cov = -market  # delivery in this interval answers the previous one's deviation
            self.covered[prev] = cov
            row = {"interval": prev, "start": st["start"], "schedule_kwh": st["schedule"],
                   "metered_kwh": st["metered"], "market_kwh": st["market"],
                   "raw_deviation_kwh": st["raw"], "requested_kwh": requested_kwh.get(prev, 0.0),
                   "covered_kwh": cov, "residual_kwh": st["raw"] - cov}
        for b in self.books.values():
            b.interval = dict.fromkeys(INTERVAL_KEYS, 0.0)
        return IntervalClose(interval, energy, certified, row)

    def deviation(self) -> dict[str, Any]:
        before = sum(abs(s["raw"]) for k, s in self.stats.items() if k in self.covered)
        after = sum(abs(s["raw"] - self.covered[k]) for k, s in self.stats.items()
                    if k in self.covered)
        return {"before_kwh": before, "after_kwh": after,
                "covered_share": None if before <= 0 else 1 - after / before}

    def prosumer(self, name: str) -> dict[str, Any]:
        tot = self.books[name].totals
        pv, exp, imp, load = tot["pv_wh"], tot["export_wh"], tot["import_wh"], tot["load_wh"]
        return {"pv_kwh": pv / 1000, "load_kwh": load / 1000, "import_kwh": imp / 1000,
                "export_kwh": exp / 1000,
                # PV used on site (by the house or its battery) / PV; load met on site
                # (by PV or the battery) / load
                "self_consumption": None if pv <= 0 else tot["pv_local_wh"] / pv,
                "self_sufficiency": None if load <= 0 else tot["load_local_wh"] / load}
