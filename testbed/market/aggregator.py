"""VPP aggregator (paper V.C): day-ahead schedule, real-time deviation, auction requests.

Sign convention: the aggregate is *net import* (meter convention, + import / - export), in
kWh per settlement interval. A positive deviation (metered > scheduled) is a shortfall:
the aggregator BUYS energy from its prosumers (their batteries discharge). A negative
deviation is a surplus: it SELLS (their batteries charge).

Timing: the deviation of interval k is measured during k; the request asks for delivery
in interval k + `delivery_lag` (default 1), because a settlement can only verify energy
metered over a whole interval. `commit` adds cleared energy to the expected import of
the delivery interval, so the batteries' answer is not mistaken for a new deviation.

Everything is a pure function of explicit inputs: `day_ahead_schedule` of the site file
and the day, `Aggregator` of the observations it is fed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

from testbed.config import ProsumerConfig, SiteConfig
from testbed.physics.models import PVState, clear_sky_irradiance, household_load_w, pv_step

from .auction import Clearing
from .orders import DEFAULT_RULES, MarketRules, Order, Side, validate_order
from .units import to_kwh, to_mwh

DAY_S = 86400


@dataclass(frozen=True)
class Schedule:
    """Expected net import of the aggregate, kWh per settlement interval, for one day."""

    first_interval: int
    """Global index of the first interval (day x intervals per day)."""
    interval_s: int
    energy_kwh: tuple[float, ...]

    def intervals(self) -> range:
        return range(self.first_interval, self.first_interval + len(self.energy_kwh))

    def __getitem__(self, interval: int) -> float:
        i = interval - self.first_interval
        if not 0 <= i < len(self.energy_kwh):
            raise KeyError(f"interval {interval} is outside the schedule "
                           f"({self.first_interval}..{self.first_interval + len(self.energy_kwh) - 1})")
        return self.energy_kwh[i]


def expected_net_import_w(prosumer: ProsumerConfig, t_s: float) -> float:
    """A prosumer's forecast at t: noise-free household load minus clear-sky PV output.

    The battery is scheduled idle: it is the flexibility the market trades.
    """
    p = prosumer.physics(seed=0)
    load = household_load_w(replace(p.load, noise=0.0), t_s)
    pv = pv_step(p.pv, PVState(), clear_sky_irradiance(t_s), 1.0).ac_w if p.pv else 0.0
    return load - pv


def day_ahead_schedule(site: SiteConfig, day: int = 0, *,
                       interval_s: int = DEFAULT_RULES.interval_s,
                       sample_s: float = 60.0) -> Schedule:
    """Forecast of the site's aggregate net import for `day`, per settlement interval.

    Each interval's energy is the midpoint-rule integral of the expected power sampled
    every `sample_s` (60 s: the clear-sky and load curves are smooth at that scale).
    Time is seconds since midnight of day 0, as in `physics.models`.
    """
    if interval_s <= 0 or DAY_S % interval_s:
        raise ValueError(f"interval_s must divide a day (86400 s), got {interval_s}")
    if sample_s <= 0 or interval_s % sample_s:
        raise ValueError(f"sample_s must divide interval_s ({interval_s}), got {sample_s}")
    per_interval = round(interval_s / sample_s)
    n = DAY_S // interval_s
    physics = [(p.physics(seed=0), p) for p in site.prosumers]
    loads = [replace(ph.load, noise=0.0) for ph, _ in physics]
    pvs = [ph.pv for ph, _ in physics]
    fresh = PVState()
    energy = []
    t0 = day * DAY_S
    for k in range(n):
        wh = 0.0
        for s in range(per_interval):
            t = t0 + k * interval_s + (s + 0.5) * sample_s
            irr = clear_sky_irradiance(t)
            for load, pv in zip(loads, pvs, strict=True):
                w = household_load_w(load, t)
                if pv is not None:
                    w -= pv_step(pv, fresh, irr, 1.0).ac_w
                wh += w * sample_s / 3600.0
        energy.append(wh / 1000.0)
    return Schedule(first_interval=day * n, interval_s=interval_s, energy_kwh=tuple(energy))


class Aggregator:
    """Tracks metered vs scheduled energy and turns deviations into auction requests.

    Feed it `observe(t_s, net_import_w, dt_s)` (the aggregate over [t_s, t_s + dt_s));
    ask `request_for(interval)` whenever convenient: it returns a request only when the
    deviation not yet requested reaches `threshold_kwh`, and remembers what it asked.
    """

    def __init__(self, schedules: Schedule | Iterable[Schedule], *, address: str,
                 threshold_kwh: float = 0.5, buy_price: float = 0.30, sell_price: float = 0.05,
                 delivery_lag: int = 1, rules: MarketRules = DEFAULT_RULES) -> None:
        if isinstance(schedules, Schedule):
            schedules = [schedules]
        self.expected_kwh: dict[int, float] = {}
        self.interval_s = rules.interval_s
        for sch in schedules:
            if sch.interval_s != rules.interval_s:
                raise ValueError(f"schedule interval {sch.interval_s} s differs from the "
                                 f"market's {rules.interval_s} s")
            self.expected_kwh.update(zip(sch.intervals(), sch.energy_kwh, strict=True))
        if not threshold_kwh > 0 or not math.isfinite(threshold_kwh):
            raise ValueError(f"threshold_kwh must be > 0, got {threshold_kwh}")
        if delivery_lag < 0:
            raise ValueError(f"delivery_lag must be >= 0, got {delivery_lag}")
        self.address = address
        self.threshold_kwh = threshold_kwh
        self.buy_price = buy_price
        self.sell_price = sell_price
        self.delivery_lag = delivery_lag
        self.rules = rules
        self.metered_kwh: dict[int, float] = {}
        self.covered_s: dict[int, float] = {}
        self.requested_kwh: dict[int, float] = {}
        """Signed energy already requested per observed interval (+ bought, - sold)."""
        self.committed_kwh: dict[int, float] = {}
        """Change of expected import per delivery interval from cleared auctions."""
        self._sequence: dict[int, int] = {}

    # ------------------------------------------------------------------ observations

    def interval_of(self, t_s: float) -> int:
        return math.floor(t_s / self.interval_s)

    def observe(self, t_s: float, net_import_w: float, dt_s: float) -> None:
        """Accumulate metered energy; a period straddling a boundary is split pro rata."""
        if not (math.isfinite(t_s) and math.isfinite(net_import_w) and math.isfinite(dt_s)):
            raise ValueError(f"non-finite observation t={t_s}, P={net_import_w}, dt={dt_s}")
        if dt_s < 0:
            raise ValueError(f"dt_s must be >= 0, got {dt_s}")
        t, end = t_s, t_s + dt_s
        while t < end:
            k = self.interval_of(t)
            stop = min(end, (k + 1) * self.interval_s)
            if stop <= t:  # float edge at a boundary: move on to the next interval
                stop = min(end, math.nextafter(t, math.inf))
            span = stop - t
            self.metered_kwh[k] = self.metered_kwh.get(k, 0.0) + net_import_w * span / 3.6e6
            self.covered_s[k] = self.covered_s.get(k, 0.0) + span
            t = stop

    def scheduled_kwh(self, interval: int) -> float:
        """Expected net import: the day-ahead schedule plus committed market deliveries."""
        if interval not in self.expected_kwh:
            raise KeyError(f"no schedule for interval {interval}")
        return self.expected_kwh[interval] + self.committed_kwh.get(interval, 0.0)

    def deviation_kwh(self, interval: int) -> float:
        """Metered minus scheduled energy over the part of `interval` observed so far
        (the schedule pro rata): + shortfall, - surplus."""
        covered = min(self.covered_s.get(interval, 0.0), self.interval_s)
        return (self.metered_kwh.get(interval, 0.0)
                - self.scheduled_kwh(interval) * covered / self.interval_s)

    # ------------------------------------------------------------------ market

    def request_for(self, interval: int) -> Order | None:
        """A BUY bid for a shortfall, a SELL offer for a surplus, or None below threshold.

        The quantity is the deviation not yet requested, capped at the market's maximum
        order; the limit price is `buy_price` or `sell_price`. The order is for interval
        ``interval + delivery_lag`` and its id ``{address}/{interval}/{n}`` (n-th request
        about this interval), so repeated calls never repeat an id.
        """
        open_kwh = self.deviation_kwh(interval) - self.requested_kwh.get(interval, 0.0)
        if abs(open_kwh) < self.threshold_kwh:
            return None
        side = Side.BUY if open_kwh > 0 else Side.SELL
        energy = to_kwh(to_mwh(min(abs(open_kwh), self.rules.energy_max_kwh)))
        n = self._sequence.get(interval, 0)
        order = Order(order_id=f"{self.address}/{interval}/{n}", address=self.address,
                      side=side, energy_kwh=energy,
                      price=self.buy_price if side == Side.BUY else self.sell_price,
                      interval=interval + self.delivery_lag)
        validate_order(order, self.rules)
        self._sequence[interval] = n + 1
        self.requested_kwh[interval] = (self.requested_kwh.get(interval, 0.0)
                                        + (energy if side == Side.BUY else -energy))
        return order

    def commit(self, clearing: Clearing) -> None:
        """Expect the cleared energy in the delivery interval: bought energy (batteries
        discharge) lowers the expected import, sold energy (batteries charge) raises it."""
        iv = clearing.request.interval
        if iv is None or clearing.cleared_energy_kwh == 0:
            return
        sign = -1.0 if clearing.request.side == Side.BUY else 1.0
        self.committed_kwh[iv] = (self.committed_kwh.get(iv, 0.0)
                                  + sign * clearing.cleared_energy_kwh)
