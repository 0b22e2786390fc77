"""The auction contract: hand-checked cases and properties (hypothesis)."""

from __future__ import annotations

import hashlib
import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.market.auction import (
    CONTRACT,
    Clearing,
    Outcome,
    Status,
    clear,
    clear_dict,
)
from testbed.market.orders import (
    MarketError,
    Order,
    OrderRejected,
    Pricing,
    Side,
    validate_order,
)
from testbed.market.units import to_mwh

S, B = Side.SELL, Side.BUY


def o(oid: str, side: Side, kwh: float, price: float, interval: int | None = 4,
      address: str | None = None) -> Order:
    return Order(oid, address or f"addr-{oid}", side, kwh, price, interval)


REQ_BUY = o("req", B, 3.0, 0.30, address="agg")
REQ_SELL = o("req", S, 3.0, 0.10, address="agg")


def statuses(c: Clearing) -> dict[str, tuple[str, float]]:
    return {n.order_id: (str(n.status), n.awarded_kwh) for n in c.notices}


# --------------------------------------------------------------------------- hand cases


def test_aggregator_bid_takes_cheapest_offers_first_last_one_partially() -> None:
    orders = [o("c", S, 1.0, 0.25), o("a", S, 1.0, 0.10), o("b", S, 1.5, 0.20),
              o("x", S, 5.0, 0.31)]
    c = clear(REQ_BUY, orders)
    assert [(a.order_id, a.energy_kwh, a.price) for a in c.awards] == [
        ("a", 1.0, 0.10), ("b", 1.5, 0.20), ("c", 0.5, 0.25)]
    assert [a.amount_eur for a in c.awards] == [0.1, 0.3, 0.125]
    assert c.outcome is Outcome.EXACT and c.cleared_energy_kwh == 3.0
    assert c.clearing_price == 0.25
    assert statuses(c) == {"a": ("accepted", 1.0), "b": ("accepted", 1.5),
                           "c": ("partial", 0.5), "x": ("rejected", 0.0)}
    assert "above the request's limit 0.3" in c.notices[-1].reason


def test_pay_as_clear_pays_everyone_the_marginal_price() -> None:
    orders = [o("a", S, 1.0, 0.10), o("b", S, 1.5, 0.20), o("c", S, 1.0, 0.25)]
    c = clear(REQ_BUY, orders, Pricing.PAY_AS_CLEAR)
    assert {a.price for a in c.awards} == {0.25}
    assert [a.amount_eur for a in c.awards] == [0.25, 0.375, 0.125]


def test_aggregator_offer_takes_highest_bids_first() -> None:
    orders = [o("a", B, 2.0, 0.12), o("b", B, 2.0, 0.20), o("c", B, 2.0, 0.09),
              o("d", S, 2.0, 0.50)]
    c = clear(REQ_SELL, orders)
    assert [(a.order_id, a.energy_kwh) for a in c.awards] == [("b", 2.0), ("a", 1.0)]
    assert all(a.side is B for a in c.awards)
    s = statuses(c)
    assert s["c"][0] == "rejected" and s["d"][0] == "rejected"
    reasons = {n.order_id: n.reason for n in c.notices}
    assert reasons["c"] == "price below the request's limit 0.1 EUR/kWh"
    assert reasons["d"] == "a sell order cannot answer a sell request"


def test_outcomes_no_match_partial_exact() -> None:
    assert clear(REQ_BUY, []).outcome is Outcome.NO_MATCH
    none = clear(REQ_BUY, [o("a", S, 1.0, 0.5)])
    assert none.outcome is Outcome.NO_MATCH and none.clearing_price is None
    assert none.cleared_energy_kwh == 0.0 and none.awards == ()
    part = clear(REQ_BUY, [o("a", S, 1.0, 0.2)])
    assert part.outcome is Outcome.PARTIAL and part.cleared_energy_kwh == 1.0
    assert clear(REQ_BUY, [o("a", S, 3.0, 0.2)]).outcome is Outcome.EXACT


def test_wrong_interval_own_address_and_invalid_orders_get_reasons_not_exceptions() -> None:
    orders = [o("a", S, 1.0, 0.1, interval=5), o("b", S, 1.0, 0.1, interval=None),
              o("c", S, 1.0, 0.1, address="agg"), o("d", S, -1.0, 0.1),
              o("e", S, math.nan, 0.1), o("f", S, 1.0, math.nan), o("g", S, 1.0, 0.1)]
    c = clear(REQ_BUY, orders)
    reasons = {n.order_id: n.reason for n in c.notices}
    assert reasons["a"] == reasons["b"] == "not for the auction's interval (4)"
    assert reasons["c"] == "the requester's own address cannot take part in its auction"
    assert reasons["d"] == "invalid energy_kwh: must be > 0 (got -1.0)"
    assert reasons["e"] == "invalid energy_kwh: must be a finite number (got nan)"
    assert reasons["f"] == "invalid price: must be a finite number (got nan)"
    assert [a.order_id for a in c.awards] == ["g"]


def test_duplicate_ids_are_all_rejected_whatever_the_order() -> None:
    orders = [o("a", S, 1.0, 0.1), o("a", S, 2.0, 0.05, address="other"), o("b", S, 1.0, 0.2),
              o("req", S, 1.0, 0.01)]
    c = clear(REQ_BUY, orders)
    assert [a.order_id for a in c.awards] == ["b"]
    dup = [n for n in c.notices if n.order_id in ("a", "req")]
    assert len(dup) == 3 and all(n.status is Status.REJECTED and "not unique" in n.reason
                                 for n in dup)
    assert clear(REQ_BUY, list(reversed(orders))) == c


def test_price_ties_break_by_hash_of_request_and_order_id() -> None:
    orders = [o(f"t{i}", S, 1.0, 0.2) for i in range(6)]
    c = clear(REQ_BUY, orders)

    def h(oid: str) -> bytes:
        return hashlib.blake2b(f"req\x00{oid}".encode(), digest_size=8).digest()

    expected = sorted((x.order_id for x in orders), key=lambda i: (h(i), i))[:3]
    assert [a.order_id for a in c.awards] == expected
    assert c.notices[0].order_id == "t0"  # notices stay sorted by id
    # the priority among equal prices follows the request id, not the order ids
    winners = {frozenset(a.order_id for a in clear(o(f"req-{k}", B, 3.0, 0.3, address="agg"),
                                                  orders).awards) for k in range(8)}
    assert len(winners) > 1


def test_energies_are_counted_in_mwh_so_nothing_exceeds_the_request() -> None:
    req = o("req", B, 0.3, 0.3, address="agg")
    c = clear(req, [o("a", S, 0.1, 0.1), o("b", S, 0.2, 0.2), o("c", S, 0.1, 0.25)])
    assert [a.energy_kwh for a in c.awards] == [0.1, 0.2]
    assert c.outcome is Outcome.EXACT and c.cleared_energy_kwh == 0.3


def test_an_invalid_request_is_a_malformed_call() -> None:
    with pytest.raises(OrderRejected, match="energy_kwh"):
        clear(o("req", B, -3.0, 0.3), [])
    with pytest.raises(OrderRejected, match="price"):
        clear(o("req", B, 3.0, 99.0), [])


def test_clear_dict_is_clear_in_json_and_rejects_malformed_calls() -> None:
    orders = [o("a", S, 1.0, 0.1), o("b", S, 2.5, 0.2), o("c", S, 1.0, 11.0)]
    params = {"request": REQ_BUY.to_dict(), "orders": [x.to_dict() for x in orders],
              "pricing": "pay_as_clear"}
    out = clear_dict(json.loads(json.dumps(params)))
    assert out == clear(REQ_BUY, orders, Pricing.PAY_AS_CLEAR).to_dict()
    assert out["contract"] == CONTRACT
    assert "outside the market's bounds" in out["notices"][2]["reason"]
    rules = {"price_max": 20.0, "pricing": "pay_as_bid"}
    out2 = clear_dict({**params, "pricing": None, "rules": rules})
    assert out2["pricing"] == "pay_as_bid"
    assert out2["notices"][2]["reason"] == "price above the request's limit 0.3 EUR/kWh"

    bad = json.loads(json.dumps(params))
    bad["orders"][1]["price"] = "0.2"
    with pytest.raises(OrderRejected) as exc:
        clear_dict(bad)
    assert exc.value.field == "orders[1].price"
    for broken, field in [([], "params"), ({"request": REQ_BUY.to_dict()}, "params"),
                          ({**params, "orders": {}}, "orders"),
                          ({**params, "extra": 1}, "params"),
                          ({**params, "pricing": "vickrey"}, "params.pricing")]:
        with pytest.raises(MarketError) as exc:
            clear_dict(broken)
        assert exc.value.field == field


def test_clearing_from_dict_rejects_malformed_results() -> None:
    d = clear(REQ_BUY, [o("a", S, 1.0, 0.1)]).to_dict()
    for mutate, field in [(lambda d: d.pop("awards"), "clearing"),
                          (lambda d: d.update(contract="x"), "contract"),
                          (lambda d: d["awards"][0].update(energy_kwh="1"), "awards[0].energy_kwh"),
                          (lambda d: d["notices"][0].update(status="won"), "notices[0].status"),
                          (lambda d: d.update(outcome=3), "clearing.outcome")]:
        broken = json.loads(json.dumps(d))
        mutate(broken)
        with pytest.raises(MarketError) as exc:
            Clearing.from_dict(broken)
        assert exc.value.field == field


# --------------------------------------------------------------------------- properties

IDS = st.sampled_from([f"o{i}" for i in range(40)])  # small pool: duplicates happen
PRICES = st.one_of(st.sampled_from([0.05, 0.1, 0.2, 0.3]),  # ties happen
                   st.floats(0.0, 10.0, allow_nan=False))
ENERGY = st.one_of(st.sampled_from([0.5, 1.0, 2.0]),
                   st.floats(0.001, 50.0, allow_nan=False))
BAD_ENERGY = st.one_of(ENERGY, ENERGY, ENERGY, st.sampled_from([-1.0, 0.0, math.nan, 1e9]))
ORDERS = st.lists(st.builds(Order, order_id=IDS,
                            address=st.sampled_from(["h1", "h2", "h3", "agg"]),
                            side=st.sampled_from(list(Side)), energy_kwh=BAD_ENERGY,
                            price=PRICES, interval=st.sampled_from([4, 4, 4, 5, None])),
                  max_size=40)
REQUESTS = st.builds(Order, order_id=st.sampled_from(["req", "o1"]), address=st.just("agg"),
                     side=st.sampled_from(list(Side)), energy_kwh=ENERGY, price=PRICES,
                     interval=st.just(4))
PRICING = st.sampled_from(list(Pricing))


def better_or_equal(request: Order, a: float, b: float) -> bool:
    """Is price a at least as good as b for the requester?"""
    return a <= b if request.side is B else a >= b


def valid(x: Order) -> bool:
    try:
        validate_order(x)
    except OrderRejected:
        return False
    return True


def candidates(request: Order, orders: list[Order]) -> list[Order]:
    """Orders that may compete: right side and interval, unique id, not the requester."""
    ids = [x.order_id for x in orders] + [request.order_id]
    return [x for x in orders if valid(x) and x.side is request.side.opposite
            and x.interval == request.interval and ids.count(x.order_id) == 1
            and x.address != request.address]


@settings(max_examples=300, deadline=None)
@given(REQUESTS, ORDERS, PRICING)
def test_properties_of_a_clearing(request: Order, orders: list[Order], pricing: Pricing) -> None:
    c = clear(request, orders, pricing)
    by_id = {x.order_id: x for x in candidates(request, orders)}

    # one notice per order, canonical order, statuses agree with awards
    assert len(c.notices) == len(orders)
    assert list(c.notices) == sorted(c.notices)
    awarded = {a.order_id: a for a in c.awards}
    assert len(awarded) == len(c.awards)
    for n in c.notices:
        if n.order_id in awarded:
            assert n.status in (Status.ACCEPTED, Status.PARTIAL)
            assert n.awarded_kwh == awarded[n.order_id].energy_kwh
        else:
            assert n.status is Status.REJECTED and n.awarded_kwh == 0.0

    # never more than asked, never beyond the requester's limit, never over an order
    total = sum(to_mwh(a.energy_kwh) for a in c.awards)
    assert total == to_mwh(c.cleared_energy_kwh) <= to_mwh(request.energy_kwh)
    for a in c.awards:
        mine = by_id[a.order_id]
        assert a.side is request.side.opposite and a.address == mine.address
        assert 0 < to_mwh(a.energy_kwh) <= to_mwh(mine.energy_kwh)
        assert better_or_equal(request, mine.price, request.price)
        assert better_or_equal(request, a.price, request.price)
        assert a.amount_eur == round(to_mwh(a.energy_kwh) * a.price) / 1e6
    assert sum(1 for n in c.notices if n.status is Status.PARTIAL) <= 1

    # merit order: every accepted order beats (or ties) every rejected competitor
    losers = [x for x in by_id.values() if x.order_id not in awarded]
    for a in c.awards:
        for r in losers:
            assert better_or_equal(request, by_id[a.order_id].price, r.price)
    # a priced-in competitor only loses when the request is full
    if any(better_or_equal(request, r.price, request.price) for r in losers):
        assert c.outcome is Outcome.EXACT
    if c.awards:
        assert [better_or_equal(request, by_id[x.order_id].price, by_id[y.order_id].price)
                for x, y in zip(c.awards, c.awards[1:], strict=False)] == [True] * (
            len(c.awards) - 1)

    # pricing
    if pricing is Pricing.PAY_AS_CLEAR:
        assert {a.price for a in c.awards} <= {c.clearing_price}
    else:
        assert all(a.price == by_id[a.order_id].price for a in c.awards)
    if c.awards:
        assert c.clearing_price == by_id[c.awards[-1].order_id].price

    # outcome type
    if not c.awards:
        assert c.outcome is Outcome.NO_MATCH and c.clearing_price is None
    elif total == to_mwh(request.energy_kwh):
        assert c.outcome is Outcome.EXACT
    else:
        assert c.outcome is Outcome.PARTIAL


@settings(max_examples=200, deadline=None)
@given(REQUESTS, ORDERS, PRICING, st.randoms(use_true_random=False))
def test_any_input_order_gives_identical_bytes(request: Order, orders: list[Order],
                                               pricing: Pricing, rnd: random.Random) -> None:
    c = clear(request, orders, pricing)
    shuffled = list(orders)
    rnd.shuffle(shuffled)
    again = clear(request, shuffled, pricing)
    assert again == c and again.to_json() == c.to_json()


@settings(max_examples=200, deadline=None)
@given(REQUESTS, ORDERS, PRICING)
def test_dict_round_trip_and_contract_entry_point(request: Order, orders: list[Order],
                                                  pricing: Pricing) -> None:
    c = clear(request, orders, pricing)
    wire = json.loads(c.to_json())
    assert wire == c.to_dict()
    back = Clearing.from_dict(wire)
    assert back == c and back.to_json() == c.to_json()
    params = json.loads(json.dumps({"request": request.to_dict(), "pricing": str(pricing),
                                    "orders": [x.to_dict() for x in orders]}))
    assert clear_dict(params) == wire


def test_in_process_garbage_becomes_notices_and_gc_state_is_restored() -> None:
    import gc

    weird = [o("g", S, 1.0, 0.1), Order(5, "h1", S, 1.0, 0.1, 4),  # type: ignore[arg-type]
             o("5", S, 1.0, 0.2), Order("p", "h2", S, "1", 0.1, 4),  # type: ignore[arg-type]
             Order("q", "h3", "offer", 1.0, 0.1, 4)]  # type: ignore[arg-type]
    assert gc.isenabled()
    c = clear(REQ_BUY, weird)
    assert gc.isenabled()
    assert clear(REQ_BUY, list(reversed(weird))) == c
    reasons = {n.order_id: n.reason for n in c.notices if n.status is Status.REJECTED}
    assert reasons["p"] == "invalid energy_kwh: must be a number (got str)"
    assert reasons["q"] == "invalid side: must be 'buy' or 'sell' (got 'offer')"
    assert any(n.reason == "invalid order_id: must be a string (got int)"
               for n in c.notices if n.order_id == "5")
    assert [a.order_id for a in c.awards] == ["g", "5"]


# --------------------------------------------------------------------------- DSO caps


def test_caps_limit_orders_and_pass_their_volume_down_the_merit_order() -> None:
    orders = [o("a", S, 1.0, 0.10), o("b", S, 1.5, 0.20), o("c", S, 2.0, 0.25)]
    c = clear(REQ_BUY, orders, caps={"a": 0.4, "b": 0.0})
    assert [(a.order_id, a.energy_kwh) for a in c.awards] == [("a", 0.4), ("c", 2.0)]
    assert c.cleared_energy_kwh == 2.4 and c.outcome is Outcome.PARTIAL
    notes = {n.order_id: n for n in c.notices}
    assert notes["a"].status is Status.PARTIAL and "grid check" in notes["a"].reason
    assert notes["b"].status is Status.REJECTED and "grid check" in notes["b"].reason
    assert notes["c"].status is Status.ACCEPTED
    assert c.caps == {"a": 0.4, "b": 0.0}
    # a cap above the order changes nothing; the result round-trips through the ledger form
    assert clear(REQ_BUY, orders, caps={"c": 9.0}).awards == clear(REQ_BUY, orders).awards
    again = Clearing.from_dict(json.loads(c.to_json()))
    assert again == c and again.to_json() == c.to_json()


def test_caps_go_through_the_contract_entry_point_and_bad_caps_are_named() -> None:
    params = {"request": REQ_BUY.to_dict(), "orders": [o("a", S, 3.0, 0.1).to_dict()],
              "caps": {"a": 1.25}}
    assert clear_dict(params)["cleared_energy_kwh"] == 1.25
    with pytest.raises(MarketError, match=r"caps\.a.*>= 0"):
        clear_dict({**params, "caps": {"a": -1.0}})
    with pytest.raises(MarketError, match=r"caps\.a.*finite"):
        clear_dict({**params, "caps": {"a": "lots"}})
