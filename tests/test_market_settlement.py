"""Settlement: payments for delivered energy and penalties for shortfall, in micro-euros."""

from __future__ import annotations

import math

import pytest

from testbed.market.auction import clear
from testbed.market.orders import MarketRules, Order, Pricing, Side
from testbed.market.settlement import TransferKind, settle, settle_clearing
from testbed.market.units import amount_ueur

REQ = Order("req", "agg", Side.BUY, 3.0, 0.30, 5)
ORDERS = [Order("a", "h1", Side.SELL, 2.0, 0.25, 5), Order("b", "h2", Side.SELL, 2.0, 0.215, 5)]
RULES = MarketRules(shortfall_penalty_eur_per_kwh=0.10)


def awards() -> dict[str, object]:
    return clear(REQ, ORDERS).awarded


def test_full_delivery_pays_the_award_amount() -> None:
    b = awards()["b"]  # 2.0 kWh at 0.215
    s = settle(b, REQ, 2.0, rules=RULES)
    assert (s.awarded_kwh, s.paid_kwh, s.shortfall_kwh) == (2.0, 2.0, 0.0)
    assert len(s.transfers) == 1
    t = s.transfers[0]
    assert (t.payer, t.payee, t.kind, t.interval) == ("agg", "h2", TransferKind.ENERGY, 5)
    assert t.amount_ueur == 430_000 == b.amount_ueur  # 2 kWh x 0.215 EUR/kWh = 0.43 EUR


def test_shortfall_is_paid_pro_rata_and_penalised() -> None:
    a = awards()["a"]  # partial: 1.0 kWh at 0.25
    assert a.energy_kwh == 1.0
    s = settle(a, REQ, 0.6, rules=RULES)
    assert s.paid_kwh == 0.6 and s.shortfall_kwh == pytest.approx(0.4)
    energy, penalty = s.transfers
    assert (energy.payer, energy.payee, energy.amount_ueur) == ("agg", "h1", 150_000)
    assert (penalty.payer, penalty.payee, penalty.kind) == ("h1", "agg", TransferKind.PENALTY)
    assert penalty.amount_ueur == 40_000  # 0.4 kWh x 0.10 EUR/kWh
    nothing = settle(a, REQ, -0.3, rules=RULES)  # moved the wrong way: nothing delivered
    assert [t.kind for t in nothing.transfers] == [TransferKind.PENALTY]
    assert nothing.transfers[0].amount_ueur == 100_000


def test_over_delivery_is_capped_at_the_award() -> None:
    b = awards()["b"]
    s = settle(b, REQ, 3.7, rules=RULES)
    assert s.paid_kwh == 2.0 and s.shortfall_kwh == 0.0 and s.delivered_kwh == 3.7
    assert [t.amount_ueur for t in s.transfers] == [430_000]


def test_a_buyer_pays_the_aggregator() -> None:
    req = Order("req2", "agg", Side.SELL, 1.0, 0.05, 6)
    c = clear(req, [Order("c", "h3", Side.BUY, 1.0, 0.12, 6)], Pricing.PAY_AS_CLEAR)
    s = settle(c.awards[0], req, 1.0, rules=RULES)
    assert [(t.payer, t.payee, t.amount_ueur) for t in s.transfers] == [("h3", "agg", 120_000)]


def test_negative_prices_flow_back_and_no_zero_transfers() -> None:
    rules = MarketRules(price_min=-1.0, shortfall_penalty_eur_per_kwh=0.0)
    req = Order("req3", "agg", Side.BUY, 1.0, 0.0, 1)
    c = clear(req, [Order("n", "h4", Side.SELL, 1.0, -0.05, 1)], rules=rules)
    s = settle(c.awards[0], req, 0.5, rules=rules)
    assert [(t.payer, t.payee, t.amount_ueur) for t in s.transfers] == [("h4", "agg", 25_000)]


def test_settle_clearing_and_rounding() -> None:
    c = clear(REQ, ORDERS)
    out = settle_clearing(c, {"b": 2.0}, rules=RULES)
    assert [s.order_id for s in out] == ["a", "b"]
    assert out[0].paid_kwh == 0.0 and out[0].transfers[0].kind is TransferKind.PENALTY
    # one rounding rule: mWh x EUR/kWh, half to even, to the micro-euro
    assert amount_ueur(0.0000005, 1.0) == 0 and amount_ueur(0.0000015, 1.0) == 2
    assert amount_ueur(1.0, 0.0000005) == 0 and amount_ueur(3.0, 0.0000005) == 2
    assert amount_ueur(1 / 3, 0.3) == 100_000
    with pytest.raises(ValueError, match="finite"):
        settle(c.awards[0], REQ, math.nan)
    d = out[1].to_dict()
    assert d["transfers"][0] == {"payer": "agg", "payee": "h2", "amount_ueur": 430_000,
                                 "kind": "energy", "order_id": "b", "interval": 5,
                                 "energy_kwh": 2.0}
