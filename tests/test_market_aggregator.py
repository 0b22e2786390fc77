"""Aggregator: day-ahead schedule of a small site, deviation accounting, requests."""

from __future__ import annotations

import math

import pytest

from testbed.config import SiteConfig
from testbed.market.aggregator import Aggregator, day_ahead_schedule, expected_net_import_w
from testbed.market.auction import clear
from testbed.market.orders import MarketRules, Order, Side


def small_site(pv: bool = True) -> SiteConfig:
    """One prosumer: a flat 500 W load and a 5 kW PV inverter (5.5 kWp array, 96 %)."""
    devices = [{"name": "bat", "kind": "battery", "port": 0, "unit": 2},
               {"name": "meter", "kind": "meter", "port": 0, "unit": 3}]
    if pv:
        devices.append({"name": "pv", "kind": "pv", "port": 0, "unit": 1,
                        "params": {"rating_w": 5000, "efficiency": 0.96}})
    return SiteConfig.model_validate({
        "name": "small", "prosumers": [{
            "name": "p1", "load": {"base_w": 500, "peak_w": 500, "noise": 0.2},
            "devices": devices}]})


def test_schedule_numbers_for_a_small_site() -> None:
    sch = day_ahead_schedule(small_site())
    assert len(sch.energy_kwh) == 96 and sch.first_interval == 0 and sch.interval_s == 900
    # night: 500 W for 15 min = 0.125 kWh import (the forecast ignores the load's noise)
    assert sch[0] == pytest.approx(0.125)
    assert sch[95] == pytest.approx(0.125)
    # 12:00-12:15: the array gives 5500 W x 0.97 x 0.96 > 5000 W, so the inverter is at its
    # rating all interval: (500 - 5000) W x 0.25 h = -1.125 kWh
    assert sch[48] == pytest.approx(-1.125)
    # 08:00-08:15 by hand: midpoint rule over 15 one-minute samples of the clear-sky arch
    wh = 0.0
    for s in range(15):
        h = 8.0 + (s + 0.5) / 60
        irr = 1000 * math.sin(math.pi * (h - 6) / 14) ** 1.2
        wh += (500 - min(5500 * irr / 1000 * 0.96, 5000)) / 60
    assert sch[32] == pytest.approx(wh / 1000, rel=1e-9)
    assert sch[32] == pytest.approx(sum(expected_net_import_w(small_site().prosumers[0],
                                                               8 * 3600 + (s + 0.5) * 60)
                                        for s in range(15)) / 60 / 1000)


def test_schedule_is_pure_and_per_day() -> None:
    a, b = day_ahead_schedule(small_site(), 0), day_ahead_schedule(small_site(), 0)
    assert a == b
    d1 = day_ahead_schedule(small_site(), 1)
    assert d1.first_interval == 96 and d1[96] == pytest.approx(a[0])
    hourly = day_ahead_schedule(small_site(pv=False), interval_s=3600)
    assert hourly.energy_kwh == pytest.approx((0.5,) * 24)
    with pytest.raises(ValueError, match="divide a day"):
        day_ahead_schedule(small_site(), interval_s=700)
    with pytest.raises(KeyError, match="outside the schedule"):
        a[96]


def agg(threshold: float = 0.5) -> Aggregator:
    return Aggregator(day_ahead_schedule(small_site()), address="agg", threshold_kwh=threshold,
                      buy_price=0.30, sell_price=0.05)


def feed(a: Aggregator, start_s: float, seconds: float, watts: float, step: float = 60.0) -> None:
    t = start_s
    while t < start_s + seconds:
        a.observe(t, watts, step)
        t += step


def test_on_schedule_nothing_is_requested() -> None:
    a = agg()
    feed(a, 0, 900, 500.0)
    assert a.deviation_kwh(0) == pytest.approx(0.0, abs=1e-12)
    assert a.request_for(0) is None


def test_shortfall_above_threshold_gives_a_buy_bid_for_the_next_interval() -> None:
    a = agg()
    feed(a, 0, 300, 3500.0)  # 5 min: metered 0.2917, scheduled 0.0417 -> 0.25 kWh short
    assert a.deviation_kwh(0) == pytest.approx(0.25)
    assert a.request_for(0) is None  # below 0.5 kWh
    feed(a, 300, 600, 3500.0)  # whole interval: 0.875 - 0.125 = 0.75 kWh short
    req = a.request_for(0)
    assert req == Order("agg/0/0", "agg", Side.BUY, 0.75, 0.30, 1)
    assert a.request_for(0) is None  # already asked for
    assert a.requested_kwh[0] == pytest.approx(0.75)


def test_surplus_gives_a_sell_offer() -> None:
    a = agg(threshold=0.3)
    feed(a, 900, 900, -1500.0)  # metered -0.375 vs scheduled 0.125: 0.5 kWh surplus
    req = a.request_for(1)
    assert req is not None and req.side is Side.SELL and req.price == 0.05
    assert req.energy_kwh == pytest.approx(0.5) and req.interval == 2
    assert req.order_id == "agg/1/0"


def test_threshold_is_inclusive_and_further_drift_makes_a_second_request() -> None:
    a = agg(threshold=0.25)
    feed(a, 0, 300, 3500.0)
    first = a.request_for(0)
    assert first is not None and first.energy_kwh == pytest.approx(0.25)
    feed(a, 300, 300, 3500.0)
    second = a.request_for(0)
    assert second is not None and second.order_id == "agg/0/1"
    assert second.energy_kwh == pytest.approx(0.25)


def test_observations_straddling_a_boundary_are_split() -> None:
    a = agg()
    a.observe(850.0, 3600.0, 100.0)  # 50 s in interval 0, 50 s in interval 1
    assert a.metered_kwh[0] == pytest.approx(0.05) and a.metered_kwh[1] == pytest.approx(0.05)
    assert a.covered_s == {0: pytest.approx(50.0), 1: pytest.approx(50.0)}
    with pytest.raises(ValueError, match="non-finite"):
        a.observe(0.0, math.nan, 1.0)
    with pytest.raises(ValueError, match="dt_s"):
        a.observe(0.0, 1.0, -1.0)


def test_commit_moves_the_expected_import_of_the_delivery_interval() -> None:
    a = agg()
    feed(a, 0, 900, 3500.0)
    req = a.request_for(0)
    offers = [Order("h1-offer", "h1", Side.SELL, 0.5, 0.2, 1)]
    a.commit(clear(req, offers))
    assert a.scheduled_kwh(1) == pytest.approx(0.125 - 0.5)
    # batteries delivering as awarded are not a new deviation
    feed(a, 900, 900, 500.0 - 2000.0)
    assert a.deviation_kwh(1) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(KeyError):
        a.scheduled_kwh(500)


def test_schedule_and_market_interval_must_agree() -> None:
    with pytest.raises(ValueError, match="differs"):
        Aggregator(day_ahead_schedule(small_site(), interval_s=3600), address="agg")
    hourly = MarketRules(interval_s=3600)
    a = Aggregator(day_ahead_schedule(small_site(), interval_s=3600), address="agg",
                   rules=hourly)
    assert a.interval_of(3599.0) == 0 and a.interval_of(3600.0) == 1
