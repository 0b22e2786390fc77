"""Orders (bids and offers), market rules and order validation.

An order is what one participant, or the aggregator, puts into an auction. It is stored
on the ledger as JSON, so it has a strict dict form: `Order.from_dict` accepts exactly
what `Order.to_dict` produces and rejects anything else with `OrderRejected` naming the
field, never a KeyError or TypeError that a validator would have to interpret.

Vocabulary (from the order owner's point of view): a *bid* is a BUY order (the owner takes
energy: a battery charges), an *offer* is a SELL order (the owner delivers energy: a
battery discharges). Prices are EUR/kWh, energies kWh.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@+=-]{0,255}")
"""Order ids and addresses: 1-256 printable ASCII characters, no spaces, so they are safe
as keys, in topics and in log lines (long enough for a 64-hex message id, a slash and a
64-hex address, as `tcr.respond` composes them)."""
ID_RULE = "1-256 characters from A-Z a-z 0-9 _ . : / @ + = -, starting with a letter or digit"


class Side(StrEnum):
    """Direction from the order owner's point of view."""

    BUY = "buy"
    SELL = "sell"

    @property
    def opposite(self) -> Side:
        return Side.SELL if self is Side.BUY else Side.BUY


class Pricing(StrEnum):
    PAY_AS_BID = "pay_as_bid"
    """Each accepted order is paid its own price (the paper's rule)."""
    PAY_AS_CLEAR = "pay_as_clear"
    """Every accepted order is paid the marginal (last accepted) order's price."""


class MarketError(ValueError):
    """Malformed market data; `reason` is for people, `field` names the culprit."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.reason = reason
        self.field = field


class OrderRejected(MarketError):
    """An order (or an order dict) that the market refuses to take."""


@dataclass(frozen=True)
class MarketRules:
    """The market's parameters, agreed between aggregator and prosumers (paper V.C).

    Defaults: prices 0..10 EUR/kWh (10 EUR/kWh = the EU intraday harmonised price cap of
    ~10,000 EUR/MWh), orders from 1 Wh (a meter's resolution) to 1 MWh, 15-minute
    settlement intervals (the usual real-time/intraday gate), pay-as-bid, and a shortfall
    penalty of 0.10 EUR/kWh for awarded energy not delivered.
    """

    price_min: float = 0.0
    price_max: float = 10.0
    energy_min_kwh: float = 0.001
    energy_max_kwh: float = 1000.0
    interval_s: int = 900
    pricing: Pricing = Pricing.PAY_AS_BID
    shortfall_penalty_eur_per_kwh: float = 0.10

    def __post_init__(self) -> None:
        for name in ("price_min", "price_max", "energy_min_kwh", "energy_max_kwh",
                     "shortfall_penalty_eur_per_kwh"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise MarketError(f"must be a finite number (got {v!r})", name)
        if self.price_min >= self.price_max:
            raise MarketError(f"price_min ({self.price_min}) must be below price_max "
                              f"({self.price_max})", "price_min")
        if not 1e-6 <= self.energy_min_kwh <= self.energy_max_kwh:
            raise MarketError(f"need 1e-6 (1 mWh) <= energy_min_kwh <= energy_max_kwh (got "
                              f"{self.energy_min_kwh}, {self.energy_max_kwh})", "energy_min_kwh")
        if isinstance(self.interval_s, bool) or not isinstance(self.interval_s, int) \
                or self.interval_s <= 0:
            raise MarketError(f"must be a whole number of seconds > 0 (got {self.interval_s!r})",
                              "interval_s")
        if self.pricing not in _PRICINGS:
            raise MarketError(f"must be one of {sorted(_PRICINGS)} (got {self.pricing!r})",
                              "pricing")
        if self.shortfall_penalty_eur_per_kwh < 0:
            raise MarketError("must be >= 0", "shortfall_penalty_eur_per_kwh")
        object.__setattr__(self, "pricing", Pricing(self.pricing))

    def to_dict(self) -> dict[str, Any]:
        return {"price_min": float(self.price_min), "price_max": float(self.price_max),
                "energy_min_kwh": float(self.energy_min_kwh),
                "energy_max_kwh": float(self.energy_max_kwh), "interval_s": self.interval_s,
                "pricing": str(self.pricing),
                "shortfall_penalty_eur_per_kwh": float(self.shortfall_penalty_eur_per_kwh)}

    @classmethod
    def from_dict(cls, data: Any) -> MarketRules:
        if not isinstance(data, Mapping):
            raise MarketError(f"expected an object, got {type(data).__name__}", "rules")
        unknown = sorted(set(data) - _RULE_FIELDS)
        if unknown:
            raise MarketError(f"unknown field(s) {', '.join(map(str, unknown))}", "rules")
        return cls(**{k: data[k] for k in data})


_PRICINGS = frozenset(Pricing)
_RULE_FIELDS = frozenset(MarketRules.__dataclass_fields__)
DEFAULT_RULES = MarketRules()


@dataclass(frozen=True, slots=True)
class Order:
    """One bid or offer. Construction does not validate (it is on the hot path of the
    auction, which checks every order itself); `validate_order` and `from_dict` do."""

    order_id: str
    address: str
    """Pseudonymous address of the owner (paper V.E: public channels carry no identities)."""
    side: Side
    energy_kwh: float
    price: float
    """EUR/kWh: the highest a buyer pays, the lowest a seller accepts."""
    interval: int | None = field(default=None)
    """Settlement interval index (start time = interval x MarketRules.interval_s)."""

    def to_dict(self) -> dict[str, Any]:
        return {"order_id": self.order_id, "address": self.address, "side": str(self.side),
                "energy_kwh": float(self.energy_kwh), "price": float(self.price),
                "interval": self.interval}

    @classmethod
    def from_dict(cls, data: Any, rules: MarketRules | None = DEFAULT_RULES, *,
                  where: str = "") -> Order:
        """Parse and validate a stored order; `where` prefixes field names in errors
        (e.g. ``orders[3].``). With ``rules=None`` only the shape (fields and types) is
        checked: the auction judges the values and answers with a notice."""
        if not isinstance(data, Mapping):
            raise OrderRejected(f"expected an order object, got {type(data).__name__}",
                                where.rstrip(".") or None)
        unknown = sorted(str(k) for k in set(data) - _ORDER_FIELDS)
        if unknown:
            raise OrderRejected(f"unknown field(s) {', '.join(unknown)}", where.rstrip(".") or None)
        for name in ("order_id", "address", "side", "energy_kwh", "price"):
            if name not in data:
                raise OrderRejected("missing", where + name)
        for name in ("order_id", "address", "side"):
            if not isinstance(data[name], str):
                raise OrderRejected(f"must be a string (got {type(data[name]).__name__})",
                                    where + name)
        for name in ("energy_kwh", "price"):
            v = data[name]
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise OrderRejected(f"must be a number (got {type(v).__name__})", where + name)
        interval = data.get("interval")
        if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int)):
            raise OrderRejected(f"must be an integer or null (got {type(interval).__name__})",
                                where + "interval")
        side = data["side"]
        if side not in _SIDES:
            raise OrderRejected(f"must be 'buy' or 'sell' (got {side!r})", where + "side")
        try:
            energy, price = float(data["energy_kwh"]), float(data["price"])
        except OverflowError:
            raise OrderRejected("number too large", where + "energy_kwh/price") from None
        order = cls(data["order_id"], data["address"], Side(side), energy, price, interval)
        if rules is not None:
            try:
                validate_order(order, rules)
            except OrderRejected as exc:
                raise OrderRejected(exc.reason, where + (exc.field or "")) from None
        return order


_ORDER_FIELDS = frozenset(Order.__dataclass_fields__)
_SIDES = frozenset(Side)


def _check_id(value: Any, name: str) -> None:
    if not isinstance(value, str):
        raise OrderRejected(f"must be a string (got {type(value).__name__})", name)
    if not ID_RE.fullmatch(value):
        raise OrderRejected(f"must be {ID_RULE} (got {value[:40]!r})", name)


def _check_number(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OrderRejected(f"must be a number (got {type(value).__name__})", name)
    if not math.isfinite(value):
        raise OrderRejected(f"must be a finite number (got {value!r})", name)


def validate_order(order: Order, rules: MarketRules = DEFAULT_RULES) -> None:
    """Raise `OrderRejected` with the first problem found, checked field by field in a
    fixed order so the same bad order always gets the same message."""
    _check_id(order.order_id, "order_id")
    _check_id(order.address, "address")
    if order.side not in _SIDES:
        raise OrderRejected(f"must be 'buy' or 'sell' (got {order.side!r})", "side")
    e = order.energy_kwh
    _check_number(e, "energy_kwh")
    if e <= 0:
        raise OrderRejected(f"must be > 0 (got {e!r})", "energy_kwh")
    if e < rules.energy_min_kwh:
        raise OrderRejected(f"{e!r} kWh is below the minimum order of {rules.energy_min_kwh!r} "
                            "kWh", "energy_kwh")
    if e > rules.energy_max_kwh:
        raise OrderRejected(f"{e!r} kWh is above the maximum order of {rules.energy_max_kwh!r} "
                            "kWh", "energy_kwh")
    p = order.price
    _check_number(p, "price")
    if not rules.price_min <= p <= rules.price_max:
        raise OrderRejected(f"{p!r} EUR/kWh is outside the market's bounds "
                            f"[{rules.price_min!r}, {rules.price_max!r}] EUR/kWh", "price")
    iv = order.interval
    if iv is not None and (isinstance(iv, bool) or not isinstance(iv, int) or iv < 0):
        raise OrderRejected(f"must be an integer >= 0 or None (got {iv!r})", "interval")
