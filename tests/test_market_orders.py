"""Orders: validation messages and the strict dict form the ledger stores."""

from __future__ import annotations

import math

import pytest

from testbed.market.orders import (
    DEFAULT_RULES,
    MarketError,
    MarketRules,
    Order,
    OrderRejected,
    Side,
    validate_order,
)


def order(**kw: object) -> Order:
    base: dict[str, object] = {"order_id": "o-1", "address": "addr1", "side": Side.SELL,
                               "energy_kwh": 1.5, "price": 0.2, "interval": 3}
    base.update(kw)
    return Order(**base)  # type: ignore[arg-type]


def test_a_good_order_passes_and_round_trips() -> None:
    o = order()
    validate_order(o)
    d = o.to_dict()
    assert d == {"order_id": "o-1", "address": "addr1", "side": "sell", "energy_kwh": 1.5,
                 "price": 0.2, "interval": 3}
    assert Order.from_dict(d) == o
    assert type(Order.from_dict(d).side) is Side


@pytest.mark.parametrize(("kw", "field", "text"), [
    ({"energy_kwh": -1.0}, "energy_kwh", "must be > 0 (got -1.0)"),
    ({"energy_kwh": 0.0}, "energy_kwh", "must be > 0 (got 0.0)"),
    ({"energy_kwh": math.nan}, "energy_kwh", "must be a finite number (got nan)"),
    ({"energy_kwh": math.inf}, "energy_kwh", "must be a finite number (got inf)"),
    ({"energy_kwh": 0.0005}, "energy_kwh", "below the minimum order of 0.001 kWh"),
    ({"energy_kwh": 5000.0}, "energy_kwh", "above the maximum order of 1000.0 kWh"),
    ({"energy_kwh": True}, "energy_kwh", "must be a number (got bool)"),
    ({"price": 10.5}, "price", "10.5 EUR/kWh is outside the market's bounds [0.0, 10.0]"),
    ({"price": -0.01}, "price", "outside the market's bounds"),
    ({"price": math.nan}, "price", "must be a finite number (got nan)"),
    ({"side": "bid"}, "side", "must be 'buy' or 'sell' (got 'bid')"),
    ({"order_id": ""}, "order_id", "must be 1-256 characters"),
    ({"order_id": "has space"}, "order_id", "must be 1-256 characters"),
    ({"order_id": "x" * 257}, "order_id", "must be 1-256 characters"),
    ({"order_id": 7}, "order_id", "must be a string (got int)"),
    ({"address": "-leading-dash"}, "address", "starting with a letter or digit"),
    ({"interval": -1}, "interval", "must be an integer >= 0 or None (got -1)"),
])
def test_bad_orders_are_rejected_with_a_specific_message(kw: dict[str, object], field: str,
                                                         text: str) -> None:
    with pytest.raises(OrderRejected) as exc:
        validate_order(order(**kw))
    assert exc.value.field == field
    assert text in exc.value.reason
    assert str(exc.value).startswith(f"{field}: ")


def test_rules_bounds_are_configurable() -> None:
    rules = MarketRules(price_min=-0.5, price_max=0.5, energy_min_kwh=0.1, energy_max_kwh=2.0)
    validate_order(order(price=-0.2), rules)
    with pytest.raises(OrderRejected, match="outside the market's bounds"):
        validate_order(order(price=0.6), rules)
    with pytest.raises(OrderRejected, match="above the maximum order of 2.0"):
        validate_order(order(energy_kwh=2.5), rules)


@pytest.mark.parametrize(("data", "field", "text"), [
    ([1, 2], None, "expected an order object, got list"),
    ("order", None, "expected an order object, got str"),
    ({"order_id": "a", "address": "b", "side": "sell", "price": 0.2}, "energy_kwh", "missing"),
    ({"order_id": "a", "address": "b", "side": "sell", "energy_kwh": "1.0", "price": 0.2},
     "energy_kwh", "must be a number (got str)"),
    ({"order_id": "a", "address": "b", "side": "sell", "energy_kwh": None, "price": 0.2},
     "energy_kwh", "must be a number (got NoneType)"),
    ({"order_id": "a", "address": "b", "side": 1, "energy_kwh": 1.0, "price": 0.2},
     "side", "must be a string (got int)"),
    ({"order_id": "a", "address": "b", "side": "BUY", "energy_kwh": 1.0, "price": 0.2},
     "side", "must be 'buy' or 'sell'"),
    ({"order_id": "a", "address": "b", "side": "buy", "energy_kwh": 1.0, "price": 0.2,
      "interval": 1.5}, "interval", "must be an integer or null (got float)"),
    ({"order_id": "a", "address": "b", "side": "buy", "energy_kwh": 1.0, "price": 0.2,
      "colour": "red"}, None, "unknown field(s) colour"),
    ({"order_id": "a", "address": "b", "side": "buy", "energy_kwh": -2, "price": 0.2},
     "energy_kwh", "must be > 0"),
    ({"order_id": "a", "address": "b", "side": "buy", "energy_kwh": 10**400, "price": 0.2},
     "energy_kwh/price", "number too large"),
])
def test_malformed_dicts_raise_order_rejected(data: object, field: str | None,
                                              text: str) -> None:
    with pytest.raises(OrderRejected) as exc:
        Order.from_dict(data)
    assert exc.value.field == field
    assert text in exc.value.reason


def test_from_dict_prefixes_the_field_path_and_accepts_integers() -> None:
    d = {"order_id": "a", "address": "b", "side": "buy", "energy_kwh": 2, "price": 11}
    with pytest.raises(OrderRejected) as exc:
        Order.from_dict(d, where="orders[3].")
    assert exc.value.field == "orders[3].price"
    o = Order.from_dict(d, None)  # shape only
    assert o.energy_kwh == 2.0 and type(o.energy_kwh) is float and o.interval is None


def test_market_rules_validate_and_round_trip() -> None:
    assert MarketRules.from_dict(DEFAULT_RULES.to_dict()) == DEFAULT_RULES
    with pytest.raises(MarketError, match="price_min"):
        MarketRules(price_min=1.0, price_max=1.0)
    with pytest.raises(MarketError, match="pricing"):
        MarketRules.from_dict({"pricing": "vickrey"})
    with pytest.raises(MarketError, match="unknown field"):
        MarketRules.from_dict({"gate": 1})
    with pytest.raises(MarketError, match="interval_s"):
        MarketRules(interval_s=0)
