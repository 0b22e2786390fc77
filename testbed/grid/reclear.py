"""The re-clear loop: the aggregator curtails the awards the grid check blames and re-runs
the auction contract with those caps until the dispatch is acceptable or nothing is left.

Each round: clear (merit order, with the DSO caps so far) -> check -> for each enforced
violation, cut the blamed awards, the most effective first (largest contribution per
kWh), by the share that the linearised contribution says restores the limit, plus a
margin; capped volume goes to the next orders in merit order at the next clearing, which
the next check sees. Caps only ever fall, and every round either passes, lowers a cap, or
stops, so the loop ends. Every round is kept (clearing, report, caps in force) for the
ledger and the report, and the volume the grid cost the aggregator is stated, not hidden.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from testbed.ledger import messages
from testbed.ledger import transactions as T
from testbed.ledger.identity import KeyPair
from testbed.ledger.messages import SignedMessage
from testbed.market.auction import Clearing, clear
from testbed.market.orders import DEFAULT_RULES, MarketRules, Order, Pricing, Side
from testbed.market.units import MWH_PER_KWH, to_mwh
from testbed.steps import drive, run_steps

from .check import GridChecker, GridReport, Kind

MARGIN = 0.10
"""Cut 10 % more than the linearised estimate: voltage rise is convex in injection."""


@dataclass(frozen=True)
class Round:
    n: int
    caps: dict[str, float]
    """DSO caps (order_id -> kWh) this clearing honoured."""
    clearing: Clearing
    report: GridReport

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.n, "caps": dict(self.caps),
                "cleared_kwh": self.clearing.cleared_energy_kwh,
                "awards": {a.order_id: a.energy_kwh for a in self.clearing.awards},
                "grid": self.report.to_dict()}


@dataclass(frozen=True)
class Reclear:
    """The dispatch the DSO accepts, and how it was reached."""

    clearing: Clearing
    report: GridReport
    rounds: tuple[Round, ...]
    passed: bool
    """The final dispatch is acceptable to the grid check."""

    @property
    def requested_kwh(self) -> float:
        return self.clearing.request.energy_kwh

    @property
    def market_kwh(self) -> float:
        """What the market alone would have cleared (round 0)."""
        return self.rounds[0].clearing.cleared_energy_kwh

    @property
    def cleared_kwh(self) -> float:
        return self.clearing.cleared_energy_kwh

    @property
    def grid_curtailed_kwh(self) -> float:
        """Volume lost to the grid check (market clearing minus dispatch)."""
        return (to_mwh(self.market_kwh) - to_mwh(self.cleared_kwh)) / MWH_PER_KWH

    @property
    def shortfall_kwh(self) -> float:
        """The aggregator's uncovered volume after the grid check."""
        return (to_mwh(self.requested_kwh) - to_mwh(self.cleared_kwh)) / MWH_PER_KWH

    def grid_check(self, dso: KeyPair, auction_id: str, *, at: float) -> SignedMessage:
        """The DSO's signed verdict on this dispatch, a `grid-check` ledger transaction:
        the caps it imposes, its traffic light and rounds. An award with caps is valid on
        the ledger only with it (`state.LedgerState._dso_caps`)."""
        return messages.sign(dso, T.GRID_CHECK, {
            "auction": auction_id, "caps": dict(self.clearing.caps),
            "light": str(self.report.light), "rounds": len(self.rounds),
            "passed": self.passed}, at=at)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "requested_kwh": self.requested_kwh,
                "market_kwh": self.market_kwh, "cleared_kwh": self.cleared_kwh,
                "grid_curtailed_kwh": self.grid_curtailed_kwh,
                "shortfall_kwh": self.shortfall_kwh, "light": str(self.report.light),
                "caps": dict(self.clearing.caps),
                "rounds": [r.to_dict() for r in self.rounds]}


def award_power_w(side: Side, energy_kwh: float, interval_s: int) -> float:
    """Average injection (W, + = into the grid) of delivering an award over an interval:
    a seller's battery discharges, a buyer's charges."""
    w = energy_kwh * 3.6e6 / interval_s
    return w if side == Side.SELL else -w


def reclear(request: Order, orders: Iterable[Order], *, checker: GridChecker,
            locate: Mapping[str, str] | Callable[[str], str], base_w: Mapping[str, float],
            pricing: Pricing | None = None, rules: MarketRules = DEFAULT_RULES,
            background: float = 1.0, max_rounds: int = 50,
            base_q: Mapping[str, float] | None = None) -> Reclear:
    """Clear `orders` against `request`, check the dispatch on the feeder, curtail and
    re-clear until acceptable. `locate` maps an order id to its prosumer (the aggregator
    knows where its pseudonymous bidders are connected); `base_w` is the measured
    injection per prosumer before dispatch."""
    return run_steps(reclear_steps(request, orders, checker=checker, locate=locate,
                                   base_w=base_w, pricing=pricing, rules=rules,
                                   background=background, max_rounds=max_rounds,
                                   base_q=base_q))


async def reclear_async(request: Order, orders: Iterable[Order], *, slice_s: float = 0.002,
                        **kw: Any) -> Reclear:
    """`reclear` on a running event loop, in slices of about `slice_s` between which
    the loop runs whatever is due (a real-time run's ticks): with hundreds of bidders a
    re-clear is hundreds of power flows, a second and more of work in one piece. Same
    arguments, same result."""
    return await drive(reclear_steps(request, orders, **kw), slice_s)


def reclear_steps(request: Order, orders: Iterable[Order], *, checker: GridChecker,
                  locate: Mapping[str, str] | Callable[[str], str],
                  base_w: Mapping[str, float], pricing: Pricing | None = None,
                  rules: MarketRules = DEFAULT_RULES, background: float = 1.0,
                  max_rounds: int = 50, base_q: Mapping[str, float] | None = None
                  ) -> Generator[None, None, Reclear]:
    """`reclear` as a generator pausing after every power flow (`check_steps`)."""
    where = locate.__getitem__ if isinstance(locate, Mapping) else locate
    orders = list(orders)
    pricing = rules.pricing if pricing is None else pricing
    caps: dict[str, float] = {}
    rounds: list[Round] = []
    for n in range(max_rounds):
        clearing = clear(request, orders, pricing, rules=rules, caps=caps)
        awards = {a.order_id: (where(a.order_id), award_power_w(a.side, a.energy_kwh,
                                                                rules.interval_s))
                  for a in clearing.awards}
        report = yield from checker.check_steps(base_w, awards, background=background,
                                                base_q=base_q)
        rounds.append(Round(n, dict(caps), clearing, report))
        if report.acceptable or not clearing.awards:
            break
        new = _cuts(report, clearing)
        if not new:  # blamed on nobody we can cut: stop dispatching rather than guess
            new = {a.order_id: 0.0 for a in clearing.awards}
        caps.update(new)
    else:  # out of rounds: dispatch nothing rather than something unchecked
        clearing = clear(request, orders, pricing, rules=rules,
                         caps={str(o.order_id): 0.0 for o in orders})
        report = yield from checker.check_steps(base_w, {}, background=background,
                                                base_q=base_q)
        rounds.append(Round(max_rounds, dict(clearing.caps), clearing, report))
    last = rounds[-1]
    return Reclear(last.clearing, last.report, tuple(rounds), last.report.acceptable)


def _cuts(report: GridReport, clearing: Clearing) -> dict[str, float]:
    """New caps (kWh) for the blamed awards; each strictly below the award it caps.

    A linear programme solved greedily: each violation needs its excess (plus `MARGIN`)
    back; cutting a share s of award a gives back s x contribution(a, v) at *every*
    violation it contributes to. Violations are served worst first, each from the awards
    most effective for it (contribution per kWh), after counting what the cuts already
    made for other violations give it, so neighbouring buses over the limit do not each
    cut the same award again (over-curtailment is volume the aggregator loses)."""
    awarded = {a.order_id: a.energy_kwh for a in clearing.awards}
    open_ = [v for v in report.violations if not v.acceptable and v.causes]
    for v in open_:
        if v.kind == Kind.NO_SOLUTION:  # no flow to linearise: halve the biggest award
            c = v.causes[0]
            return {c.award: _floor_mwh(awarded[c.award] / 2)}
    share: dict[str, float] = {}
    for v in sorted(open_, key=lambda v: -v.excess):
        gives = {c.award: c.contribution for c in v.causes}
        need = v.excess * (1 + MARGIN) - sum(gives.get(a, 0.0) * s for a, s in share.items())
        for c in sorted(v.causes, key=lambda c: (-c.contribution / max(awarded[c.award], 1e-9),
                                                 c.award)):
            if need <= 0:
                break
            room = 1.0 - share.get(c.award, 0.0)
            if room <= 0:
                continue
            s = min(room, need / c.contribution)
            share[c.award] = share.get(c.award, 0.0) + s
            need -= c.contribution * s
    return {a: _floor_mwh(awarded[a] * (1 - s)) for a, s in share.items()}


def _floor_mwh(kwh: float) -> float:
    """Down to whole mWh (the market's quantum), so a cap is always below the award."""
    return max(0.0, math.floor(kwh * MWH_PER_KWH) / MWH_PER_KWH)
