"""Transactive controller: hand-computed quantities (eq. 6) and prices (eqs. 7-8)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from testbed.market.orders import MarketRules, Order, Side, validate_order
from testbed.market.tcr import Mode, TCRParams, quote, respond
from testbed.physics.models import BatteryParams, BatteryState, battery_command, battery_step

BAT = BatteryParams(capacity_wh=10000, soc_min=0.1, soc_max=0.95, max_charge_w=4000,
                    max_discharge_w=5000, eta_ch=0.95, eta_dis=0.9)
TCR = TCRParams()  # C_d = 6000 EUR / 50000 kWh = 0.12 EUR/kWh
DT = 900.0


def q(soc: float, params: TCRParams = TCR, mode: Mode = Mode.TE, **kw: object):
    return quote(params, BAT, soc, DT, mode, address="h1", interval=7, **kw)


def test_degradation_cost_is_capital_over_lifetime_throughput() -> None:
    assert TCR.degradation_cost == pytest.approx(0.12)


def test_empty_battery_offers_nothing_full_battery_bids_nothing() -> None:
    empty, full = q(BAT.soc_min), q(BAT.soc_max)
    assert empty.offer is None and empty.bid is not None
    assert full.bid is None and full.offer is not None


def test_offer_quantity_follows_eq6_with_efficiency() -> None:
    # rate-limited: 5000 W x 0.25 h = 1.25 kWh < (0.5 - 0.1) x 10 kWh x 0.9 = 3.6 kWh
    assert q(0.5).offer.energy_kwh == pytest.approx(1.25)
    # SOC-limited: (0.15 - 0.1) x 10 kWh x 0.9 = 0.45 kWh < 1.25 kWh
    assert q(0.15).offer.energy_kwh == pytest.approx(0.45, abs=1e-6)
    # a reserve of 0.3 SOC: (0.35 - 0.3) x 10 x 0.9 = 0.45 kWh
    reserve = TCRParams(reserve_soc=0.3)
    assert q(0.35, reserve).offer.energy_kwh == pytest.approx(0.45, abs=1e-6)
    assert q(0.3, reserve).offer is None
    # half of it when the prosumer shares half
    assert q(0.15, TCRParams(share=0.5)).offer.energy_kwh == pytest.approx(0.225, abs=1e-6)


def test_bid_quantity_follows_eq6_with_efficiency() -> None:
    # SOC-limited: (0.95 - 0.9) x 10 kWh / 0.95 = 0.526315... kWh < 4000 W x 0.25 h = 1 kWh
    bid = q(0.9).bid
    assert bid.energy_kwh == pytest.approx(0.05 * 10 / 0.95, abs=1e-6)
    assert bid.energy_kwh <= 0.05 * 10 / 0.95  # rounded down, never above the room
    assert q(0.5).bid.energy_kwh == pytest.approx(1.0)  # rate-limited


def test_awarded_offer_is_physically_deliverable() -> None:
    for soc in (0.12, 0.15, 0.3, 0.9):
        offer = q(soc).offer
        s = battery_command(BatteryState(soc=soc), offer.energy_kwh * 3.6e6 / DT)
        s = battery_step(BAT, s, DT)
        assert not s.clamped and s.soc >= BAT.soc_min - 1e-12
    for soc in (0.2, 0.9, 0.94):
        bid = q(soc).bid
        s = battery_step(BAT, battery_command(BatteryState(soc=soc), -bid.energy_kwh * 3.6e6 / DT),
                         DT)
        assert not s.clamped and s.soc <= BAT.soc_max + 1e-12


def test_prices_follow_the_curves_by_hand() -> None:
    # x = (0.525 - 0.1) / 0.85 = 0.5: offer 0.40 - 0.25 x 0.5, bid 0.25 - 0.20 x 0.5
    mid = q(0.525)
    assert mid.offer.price == pytest.approx(0.275)
    assert mid.bid.price == pytest.approx(0.15)
    assert q(BAT.soc_max).offer.price == pytest.approx(0.15)  # offer_price_low
    assert q(BAT.soc_min).bid.price == pytest.approx(0.25)  # bid_price_high


def test_offer_price_never_below_degradation_cost() -> None:
    dear = TCRParams(battery_cost_eur=9000, lifetime_throughput_kwh=30000)  # C_d = 0.30
    for i in range(0, 101):
        soc = BAT.soc_min + (BAT.soc_max - BAT.soc_min) * i / 100
        offer = q(soc, dear).offer
        if offer is not None:
            assert offer.price >= dear.degradation_cost
    assert q(0.9, dear).offer.price == pytest.approx(0.30)
    # wear dearer than the market's price cap: no offer at all
    assert q(0.9, TCRParams(battery_cost_eur=1e6, lifetime_throughput_kwh=1.0)).offer is None


def test_curves_are_monotonic_in_soc() -> None:
    socs = [BAT.soc_min + (BAT.soc_max - BAT.soc_min) * i / 200 for i in range(201)]
    quotes = [q(s) for s in socs]

    def qty(o: Order | None) -> float:
        return 0.0 if o is None else o.energy_kwh

    offers = [qty(x.offer) for x in quotes]
    bids = [qty(x.bid) for x in quotes]
    assert offers == sorted(offers) and offers[0] == 0 and offers[-1] > 0
    assert bids == sorted(bids, reverse=True) and bids[-1] == 0 and bids[0] > 0
    offer_prices = [x.offer.price for x in quotes if x.offer]
    bid_prices = [x.bid.price for x in quotes if x.bid]
    assert offer_prices == sorted(offer_prices, reverse=True)  # falls as SOC rises
    assert bid_prices == sorted(bid_prices, reverse=True)  # rises as SOC falls
    assert offer_prices[0] > offer_prices[-1] and bid_prices[0] > bid_prices[-1]


def test_quotes_are_valid_orders_with_deterministic_ids() -> None:
    qt = q(0.5)
    assert qt.offer.order_id == "h1/7/sell" and qt.bid.order_id == "h1/7/buy"
    assert qt.offer.side is Side.SELL and qt.bid.side is Side.BUY and qt.offer.interval == 7
    validate_order(qt.offer)
    validate_order(qt.bid)
    assert quote(TCR, BAT, BatteryState(soc=0.5), DT, address="h1", interval=7) == qt
    small = MarketRules(energy_max_kwh=0.2)
    assert q(0.5, rules=small).offer.energy_kwh == 0.2


def test_participation_modes() -> None:
    assert q(0.5, mode=Mode.RE).offer is None and q(0.5, mode=Mode.RE).bid is None
    assert q(0.5, mode=Mode.RE_TE) == q(0.5, mode=Mode.TE)


def test_respond_to_aggregator_requests() -> None:
    # SOC 0.525: offer 1.25 kWh at 0.275, bid 1.0 kWh at 0.15
    need = Order("agg/3/0", "agg", Side.BUY, 0.8, 0.30, 4)
    ans = respond(need, TCR, BAT, 0.525, address="h1")
    assert ans == Order("agg/3/0/h1", "h1", Side.SELL, 0.8, ans.price, 4)
    assert ans.price == pytest.approx(0.275)
    assert respond(Order("agg/3/0", "agg", Side.BUY, 0.8, 0.20, 4), TCR, BAT, 0.525,
                   address="h1") is None  # too cheap for this battery
    surplus = Order("agg/3/1", "agg", Side.SELL, 5.0, 0.10, 4)
    bid = respond(surplus, TCR, BAT, 0.525, address="h1")
    assert bid.side is Side.BUY and bid.energy_kwh == pytest.approx(1.0)
    assert bid.price >= surplus.price
    assert respond(Order("agg/3/1", "agg", Side.SELL, 5.0, 0.20, 4), TCR, BAT, 0.525,
                   address="h1") is None
    assert respond(need, TCR, BAT, BAT.soc_min, address="h1") is None  # nothing to give
    assert respond(need, TCR, BAT, 0.525, Mode.RE, address="h1") is None


def test_params_are_validated() -> None:
    with pytest.raises(ValidationError, match="offer_price_low"):
        TCRParams(offer_price_low=0.5, offer_price_high=0.4)
    with pytest.raises(ValidationError):
        TCRParams(lifetime_throughput_kwh=0)
    with pytest.raises(ValidationError):
        TCRParams(colour="red")
