"""Transactive controller (TCR, paper V.D): a battery's offer and bid from its state.

Quantities (Figs. 4-5, eqs. 1-6): the offer is the AC energy the battery can deliver in
the interval without leaving [SOC_min, SOC_max] or exceeding its rate limits, the bid the
AC energy it can absorb; both come from `physics.models.battery_power_limits`, which
applies eq. (6) with the efficiencies:

    deliverable = min(r_dis_max * dt, (SOC - SOC_min) * Cap * eta_dis)
    absorbable  = min(r_ch_max * dt,  (SOC_max - SOC) * Cap / eta_ch)

so the offer grows with SOC and the bid shrinks with it. Quantities are rounded *down* to
the market's mWh quantum: an award never asks for more than the battery can do.

Prices (Figs. 4-5 shapes, eqs. 7-8): linear in the normalised SOC x = (SOC - SOC_min) /
(SOC_max - SOC_min). The offer price falls from `offer_price_high` (x = 0) to
`offer_price_low` (x = 1) and never goes below the degradation cost C_d = C_battery / L_ET
(a discharge must pay for the wear it causes). The bid price falls from `bid_price_high`
(x = 0, an empty battery values energy most) to `bid_price_low` (x = 1).

The TCR is truthful: it quotes its reservation prices; the auction decides.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from testbed.physics.models import BatteryParams, BatteryState, battery_power_limits

from .orders import DEFAULT_RULES, MarketRules, Order, Side
from .units import floor_mwh, to_kwh


class Mode(StrEnum):
    """Participation options of paper V.E."""

    TE = "te"
    """Transactive energy: the TCR trades."""
    RE = "re"
    """Rewards for self-consumption only: the TCR does not trade."""
    RE_TE = "re+te"
    """Both: trades and takes part in the self-consumption incentive."""


class TCRParams(BaseModel):
    """A prosumer's trading parameters (EUR, kWh); validated like the site file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    battery_cost_eur: Annotated[float, Field(gt=0)] = 6000.0
    """C_battery: capital cost of the battery (eq. 8)."""
    lifetime_throughput_kwh: Annotated[float, Field(gt=0)] = 50000.0
    """L_ET: energy the battery delivers over its life for this cycling regime (eq. 8);
    ~10 kWh x 5,000 full cycles."""
    offer_price_high: Annotated[float, Field(ge=0)] = 0.40
    """Offer price at SOC_min (EUR/kWh): a nearly empty battery sells dear."""
    offer_price_low: Annotated[float, Field(ge=0)] = 0.15
    """Offer price at SOC_max (still floored at C_d)."""
    bid_price_high: Annotated[float, Field(ge=0)] = 0.25
    """Bid price at SOC_min: a nearly empty battery pays most to charge."""
    bid_price_low: Annotated[float, Field(ge=0)] = 0.05
    """Bid price at SOC_max."""
    reserve_soc: Annotated[float, Field(ge=0, le=1)] = 0.0
    """SOC kept for the household (backup, evening self-consumption): the TCR never offers
    energy that would take the battery below max(SOC_min, reserve_soc)."""
    share: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Fraction of the feasible energy put on the market."""

    @model_validator(mode="after")
    def _curves(self) -> Self:
        if self.offer_price_low > self.offer_price_high:
            raise ValueError(f"offer_price_low ({self.offer_price_low}) must be <= "
                             f"offer_price_high ({self.offer_price_high})")
        if self.bid_price_low > self.bid_price_high:
            raise ValueError(f"bid_price_low ({self.bid_price_low}) must be <= "
                             f"bid_price_high ({self.bid_price_high})")
        return self

    @property
    def degradation_cost(self) -> float:
        """C_d = C_battery / L_ET, EUR per kWh discharged (eq. 8)."""
        return self.battery_cost_eur / self.lifetime_throughput_kwh


@dataclass(frozen=True)
class Quote:
    offer: Order | None
    """SELL: discharge the battery."""
    bid: Order | None
    """BUY: charge the battery."""


def _soc(state: BatteryState | float) -> float:
    return state.soc if isinstance(state, BatteryState) else float(state)


def _x(battery: BatteryParams, soc: float) -> float:
    """Normalised SOC in [0, 1]."""
    x = (soc - battery.soc_min) / (battery.soc_max - battery.soc_min)
    return min(1.0, max(0.0, x))


def deliverable_kwh(params: TCRParams, battery: BatteryParams, soc: float,
                    interval_s: float) -> float:
    """AC energy the battery can discharge over the interval (eqs. 1, 3, 5, 6), above the
    reserve, times `share`, rounded down to the mWh."""
    floor = max(battery.soc_min, params.reserve_soc)
    if soc <= floor or floor >= battery.soc_max:
        return 0.0
    limits = battery if floor == battery.soc_min else replace(battery, soc_min=floor,
                                                              soc_init=battery.soc_max)
    _, max_dis_w = battery_power_limits(limits, soc, interval_s)
    return to_kwh(floor_mwh(params.share * max_dis_w * interval_s / 3.6e6))


def absorbable_kwh(params: TCRParams, battery: BatteryParams, soc: float,
                   interval_s: float) -> float:
    """AC energy the battery can take in over the interval (eqs. 1, 2, 4, 6), times
    `share`, rounded down to the mWh."""
    max_ch_w, _ = battery_power_limits(battery, soc, interval_s)
    return to_kwh(floor_mwh(params.share * max_ch_w * interval_s / 3.6e6))


def offer_price(params: TCRParams, battery: BatteryParams, soc: float) -> float:
    """Falls as SOC rises; never below C_d (eqs. 7-8)."""
    x = _x(battery, soc)
    curve = params.offer_price_high - (params.offer_price_high - params.offer_price_low) * x
    return max(params.degradation_cost, curve)


def bid_price(params: TCRParams, battery: BatteryParams, soc: float) -> float:
    """Rises as SOC falls."""
    x = _x(battery, soc)
    return params.bid_price_high - (params.bid_price_high - params.bid_price_low) * x


def quote(params: TCRParams, battery: BatteryParams, state: BatteryState | float,
          interval_s: float, mode: Mode = Mode.TE, *, address: str,
          interval: int | None = None, order_id: str | None = None,
          rules: MarketRules = DEFAULT_RULES) -> Quote:
    """The TCR's standing offer (discharge) and bid (charge) for one interval.

    Either side is None when the battery cannot move at least the market's minimum
    energy that way, or when its price falls outside the market's bounds (e.g. C_d above
    `price_max`: selling would lose money on wear). In RE mode the TCR does not trade.
    Order ids are ``{order_id}/sell`` and ``{order_id}/buy``; `order_id` defaults to
    ``{address}/{interval}``.
    """
    if mode == Mode.RE:
        return Quote(None, None)
    if interval_s <= 0:
        raise ValueError(f"interval_s must be > 0, got {interval_s}")
    soc = _soc(state)
    base = order_id if order_id is not None else f"{address}/{interval}"

    def make(side: Side, energy: float, price: float) -> Order | None:
        energy = min(energy, rules.energy_max_kwh)
        if energy < rules.energy_min_kwh or not rules.price_min <= price <= rules.price_max:
            return None
        return Order(f"{base}/{side}", address, side, energy, price, interval)

    return Quote(
        offer=make(Side.SELL, deliverable_kwh(params, battery, soc, interval_s),
                   offer_price(params, battery, soc)),
        bid=make(Side.BUY, absorbable_kwh(params, battery, soc, interval_s),
                 bid_price(params, battery, soc)),
    )


def respond(request: Order, params: TCRParams, battery: BatteryParams,
            state: BatteryState | float, mode: Mode = Mode.TE, *, address: str,
            interval_s: float | None = None, rules: MarketRules = DEFAULT_RULES
            ) -> Order | None:
    """The TCR's answer to an aggregator request, or None when it has nothing acceptable.

    The aggregator bids (buys) -> the TCR offers to discharge, if its offer price is at
    most the request's price; the aggregator offers (sells) -> the TCR bids to charge, if
    its bid price is at least the request's price. The quantity is capped at the
    request's; the order id is ``{request.order_id}/{address}`` and the interval the
    request's, so the answer is unique per participant and auction.
    """
    q = quote(params, battery, state, interval_s or rules.interval_s, mode, address=address,
              interval=request.interval, order_id=f"{request.order_id}/{address}", rules=rules)
    if request.side == Side.BUY:
        mine = q.offer
        if mine is None or mine.price > request.price:
            return None
    else:
        mine = q.bid
        if mine is None or mine.price < request.price:
            return None
    return replace(mine, order_id=f"{request.order_id}/{address}",
                   energy_kwh=min(mine.energy_kwh, request.energy_kwh))
