"""The auction contract (paper V.C): merit-order clearing of one aggregator request.

When the aggregator BIDS (buys) Q kWh at limit price p, prosumer SELL offers priced <= p
are accepted in increasing price order until Q is covered, the last one partially. When
the aggregator OFFERS (sells) Q kWh at p, prosumer BUY bids priced >= p are accepted in
decreasing price order. Everything else is rejected with a reason, never an exception:
a contract's answer to a bad order is a notice that the order's owner can read.

Determinism (validators re-execute this function and compare canonical bytes):

- Energies are counted in whole mWh (`units`), so sums are exact and no award exceeds
  the request by even one float ulp. Money is rounded once, by `units.amount_ueur`.
- Merit order = (price, better first; then blake2b-64 of ``request_id + "\\x00" +
  order_id``; then order_id). The hash breaks price ties fairly: the priority among equal
  prices changes from auction to auction and cannot be gamed by choosing a small id
  before the request id is known; the order_id is the last resort (hash collision).
- Order ids must be unique within an auction (including the request's own id): every
  copy of a duplicated id is rejected, so the outcome does not depend on which copy came
  first.
- Output lists are canonical: awards in merit order, notices sorted by order_id (then by
  all their fields). Shuffling the input changes nothing.

Performance (100,000 orders in < 0.5 s, bench/market.py): one pass over the orders with
local names only; one sort on a float key (CPython's fast path), hashing only the price
ties the walk reaches; awards and notices as NamedTuples, which are cheap to build by the
hundred thousand and whose tuple ordering is the canonical sort; the cyclic garbage
collector paused while they are built.
"""

from __future__ import annotations

import gc
import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from operator import itemgetter
from typing import Any, NamedTuple, TypeVar

from testbed.ledger import canonical

from .orders import (
    DEFAULT_RULES,
    ID_RE,
    MarketError,
    MarketRules,
    Order,
    OrderRejected,
    Pricing,
    Side,
    validate_order,
)
from .units import MWH_PER_KWH, UEUR_PER_EUR, eur_to_ueur, to_mwh

CONTRACT = "market/merit-order-v1"
"""Versioned name of this rule set: a change of rules is a new name, old blocks re-verify."""


class Outcome(StrEnum):
    NO_MATCH = "no_match"
    """Nothing awarded."""
    PARTIAL = "partial"
    """Something awarded, less than requested."""
    EXACT = "exact"
    """The request is fully covered."""


class Status(StrEnum):
    ACCEPTED = "accepted"
    PARTIAL = "partial"
    REJECTED = "rejected"


class Award(NamedTuple):
    """An accepted (possibly partially) participant order."""

    order_id: str
    address: str
    side: Side
    """The participant's side (the opposite of the request's)."""
    energy_kwh: float
    price: float
    """EUR/kWh paid: the order's own price (pay-as-bid) or the clearing price."""
    amount_eur: float
    """energy x price, rounded to the micro-euro by `units.amount_ueur`."""

    @property
    def amount_ueur(self) -> int:
        return eur_to_ueur(self.amount_eur)

    def to_dict(self) -> dict[str, Any]:
        return {"order_id": self.order_id, "address": self.address, "side": str(self.side),
                "energy_kwh": self.energy_kwh, "price": self.price,
                "amount_eur": self.amount_eur}


class Notice(NamedTuple):
    """What the auction tells one participant order (winners and losers alike)."""

    order_id: str
    address: str
    status: Status
    awarded_kwh: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"order_id": self.order_id, "address": self.address, "status": str(self.status),
                "awarded_kwh": self.awarded_kwh, "reason": self.reason}


@dataclass(frozen=True)
class Clearing:
    """The result of one auction, as stored on the ledger."""

    request: Order
    pricing: Pricing
    outcome: Outcome
    awards: tuple[Award, ...]
    """In merit order (best first)."""
    cleared_energy_kwh: float
    clearing_price: float | None
    """Price of the marginal (last) accepted order, whatever the pricing; None if no match."""
    notices: tuple[Notice, ...]
    """One per participant order, sorted by order_id."""
    caps: Mapping[str, float] = field(default_factory=dict)
    """Grid caps the clearing honoured (order_id -> most kWh the DSO allows), see `clear`."""

    @property
    def awarded(self) -> dict[str, Award]:
        return {a.order_id: a for a in self.awards}

    def to_dict(self) -> dict[str, Any]:
        return {
            "contract": CONTRACT,
            "request": self.request.to_dict(),
            "pricing": str(self.pricing),
            "outcome": str(self.outcome),
            "cleared_energy_kwh": self.cleared_energy_kwh,
            "clearing_price": self.clearing_price,
            "awards": [a.to_dict() for a in self.awards],
            "notices": [n.to_dict() for n in self.notices],
            "caps": dict(self.caps),
        }

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace, no NaN): what validators compare."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any) -> Clearing:
        """Parse a stored clearing; raises `MarketError` (naming the field) when malformed."""
        d = _mapping(data, "clearing")
        _keys(d, {"contract", "request", "pricing", "outcome", "cleared_energy_kwh",
                  "clearing_price", "awards", "notices", "caps"}, "clearing",
              required={"contract", "request", "pricing", "outcome", "cleared_energy_kwh",
                        "clearing_price", "awards", "notices"})
        if d["contract"] != CONTRACT:
            raise MarketError(f"unknown contract {d['contract']!r} (expected {CONTRACT!r})",
                              "contract")
        request = Order.from_dict(d["request"], where="request.")
        awards = []
        for i, a in enumerate(_list(d["awards"], "awards")):
            where = f"awards[{i}]"
            a = _mapping(a, where)
            _keys(a, {"order_id", "address", "side", "energy_kwh", "price", "amount_eur"}, where)
            awards.append(Award(_str(a, "order_id", where), _str(a, "address", where),
                                _enum(Side, a, "side", where), _num(a, "energy_kwh", where),
                                _num(a, "price", where), _num(a, "amount_eur", where)))
        notices = []
        for i, n in enumerate(_list(d["notices"], "notices")):
            where = f"notices[{i}]"
            n = _mapping(n, where)
            _keys(n, {"order_id", "address", "status", "awarded_kwh", "reason"}, where)
            notices.append(Notice(_str(n, "order_id", where), _str(n, "address", where),
                                  _enum(Status, n, "status", where),
                                  _num(n, "awarded_kwh", where), _str(n, "reason", where)))
        price = d["clearing_price"]
        return cls(request=request, pricing=_enum(Pricing, d, "pricing", "clearing"),
                   outcome=_enum(Outcome, d, "outcome", "clearing"), awards=tuple(awards),
                   cleared_energy_kwh=_num(d, "cleared_energy_kwh", "clearing"),
                   clearing_price=None if price is None else _num(d, "clearing_price",
                                                                  "clearing"),
                   notices=tuple(notices), caps=_caps(d.get("caps"), "caps"))


def canonical_json(obj: Any) -> str:
    """The ledger's encoding: sorted keys, no whitespace, UTF-8, NaN/Infinity refused."""
    return canonical.encode(obj).decode()


# --------------------------------------------------------------------------- reasons

first = itemgetter(0)
R_ACCEPTED = "accepted in merit order"
R_OUTBID = "not needed: the request was covered by better-priced orders"
R_DUPLICATE = "order_id is not unique in this auction (every copy is rejected)"
R_OWN = "the requester's own address cannot take part in its auction"
R_CAPPED_OUT = "curtailed to 0 kWh by the grid check (DSO cap)"


def _invalid_reason(order: Order, rules: MarketRules) -> str:
    try:
        validate_order(order, rules)
    except OrderRejected as exc:
        return f"invalid {exc.field}: {exc.reason}"
    return "invalid order"  # pragma: no cover - the fast check and validate_order agree


# --------------------------------------------------------------------------- clearing


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a clearing allocates ~3 tuples per order.

    Those allocations trigger repeated full collections that scan every live object
    (the input orders included): 40 % of the time for 100,000 orders. Nothing built
    here forms a cycle, so pausing loses nothing; the previous state is restored.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def clear(request: Order, orders: Iterable[Order], pricing: Pricing = Pricing.PAY_AS_BID,
          *, rules: MarketRules = DEFAULT_RULES,
          caps: Mapping[str, float] | None = None) -> Clearing:
    """Clear `orders` against the aggregator's `request` (merit order, paper V.C).

    The request must be valid (`OrderRejected` otherwise: a malformed contract call);
    participant orders that are invalid, duplicated, on the wrong side, for another
    interval or priced out are rejected in their notice.

    `caps` (order_id -> kWh >= 0) are the DSO's limits from the grid check
    (`testbed.grid.reclear`): a capped order takes part with at most its cap, and the
    volume it cannot take goes to the next orders in merit order, so a re-clear is this
    same contract with caps, re-executable by every validator.
    """
    validate_order(request, rules)
    pricing = Pricing(pricing)
    caps = _caps(caps, "caps")
    with _gc_paused():
        return _clear(request, list(orders), pricing, rules, caps)


def _caps(caps: Any, where: str) -> dict[str, float]:
    if caps is None:
        return {}
    caps = _mapping(caps, where)
    out: dict[str, float] = {}
    for oid in sorted(caps):
        v = _num(caps, oid, where)
        if v < 0:
            raise MarketError(f"must be >= 0 kWh (got {v!r})", f"{where}.{oid}")
        out[str(oid)] = v
    return out


def _clear(request: Order, orders: list[Order], pricing: Pricing,
           rules: MarketRules, caps: dict[str, float]) -> Clearing:
    req_id, req_addr, req_iv, limit = (request.order_id, request.address, request.interval,
                                       request.price)
    buying = request.side == Side.BUY
    want = Side.SELL if buying else Side.BUY
    try:
        counts = Counter([o.order_id for o in orders])
    except TypeError:  # an unhashable id (only possible in-process): count by text
        counts = Counter([str(o.order_id) for o in orders])
    counts[req_id] += 1
    lo, hi, emin, emax = rules.price_min, rules.price_max, rules.energy_min_kwh, rules.energy_max_kwh
    valid_id = ID_RE.fullmatch
    blake = hashlib.blake2b
    prefix = req_id + "\x00"
    str_ = str
    rejected: list[Notice] = []
    reject = rejected.append
    eligible: list[tuple[float, str, Order]] = []
    keep = eligible.append
    REJECTED = Status.REJECTED
    odd_ids = False  # a non-str id (in-process only): its notice shows str(id)
    # reasons are built once per auction, not once per order (float repr is slow)
    r_side = f"a {want.opposite} order cannot answer a {request.side} request"
    r_interval = f"not for the auction's interval ({req_iv!r})"
    r_price = (f"price {'above' if buying else 'below'} the request's limit {limit!r} EUR/kWh")
    for o in orders:
        oid, addr, price, energy, side = o.order_id, o.address, o.price, o.energy_kwh, o.side
        try:  # NaN fails every comparison, so it lands here too
            ok = (lo <= price <= hi and emin <= energy <= emax and type(oid) is str_
                  and type(addr) is str_ and valid_id(oid) and valid_id(addr)
                  and (side == "buy" or side == "sell"))
        except TypeError:  # a non-number price or energy (only possible in-process)
            ok = False
        if not ok:
            odd_ids = odd_ids or type(oid) is not str_
            reject(Notice(str_(oid), str_(addr), REJECTED, 0.0, _invalid_reason(o, rules)))
        elif counts[oid] > 1:
            reject(Notice(oid, addr, REJECTED, 0.0, R_DUPLICATE))
        elif side != want:
            reject(Notice(oid, addr, REJECTED, 0.0, r_side))
        elif o.interval != req_iv:
            reject(Notice(oid, addr, REJECTED, 0.0, r_interval))
        elif addr == req_addr:
            reject(Notice(oid, addr, REJECTED, 0.0, R_OWN))
        elif (price > limit) if buying else (price < limit):
            reject(Notice(oid, addr, REJECTED, 0.0, r_price))
        else:
            keep((price if buying else -price, oid, o))
    # Sort by price alone: a float-only key takes CPython's fast path. Ties keep input
    # order here, but every tie group the walk reaches is re-sorted by (hash, id) below,
    # and the order within groups it does not reach never shows (their notices are
    # sorted by id).
    eligible.sort(key=first)

    # Walk price levels in merit order, in whole mWh, until the request is covered. Ties
    # are ordered by hash only in the levels the walk reaches: the rest lose anyway, and
    # their notices are sorted by id, so hashing them would change nothing.
    remaining = to_mwh(request.energy_kwh)
    accepted: list[tuple[str, Order, int, int, int]] = []
    accept = accepted.append
    outbid: list[tuple[float, str, Order]] = []
    caps_mwh = {oid: to_mwh(v) for oid, v in caps.items()}
    i, n_eligible = 0, len(eligible)
    while i < n_eligible and remaining > 0:
        level = eligible[i][0]
        j = i + 1
        while j < n_eligible and eligible[j][0] == level:
            j += 1
        group = eligible[i:j]
        if j - i > 1:
            group.sort(key=lambda e: (blake((prefix + e[1]).encode(), digest_size=8).digest(),
                                      e[1]))
        for k, (_, oid, o) in enumerate(group):
            if remaining <= 0:
                outbid = group[k:]
                break
            q = round(o.energy_kwh * MWH_PER_KWH)  # == units.to_mwh, inlined
            cap = q
            if caps_mwh and oid in caps_mwh:
                cap = min(q, caps_mwh[oid])
                if cap <= 0:
                    rejected.append(Notice(oid, o.address, REJECTED, 0.0, R_CAPPED_OUT))
                    continue
            take = cap if cap <= remaining else remaining
            accept((oid, o, take, q, cap))
            remaining -= take
        i = j
    n = len(accepted)
    cleared = to_mwh(request.energy_kwh) - remaining

    clearing_price = accepted[-1][1].price if n else None
    awards: list[Award] = []
    notices = rejected
    add_award, add_notice = awards.append, notices.append
    uniform = pricing == Pricing.PAY_AS_CLEAR
    ACCEPTED, PARTIAL = Status.ACCEPTED, Status.PARTIAL
    for oid, o, take, q, cap in accepted:
        price = clearing_price if uniform else o.price
        kwh = take / MWH_PER_KWH
        add_award(Award(oid, o.address, want, kwh, price,
                        round(take * price) / UEUR_PER_EUR))  # == units.amount_ueur(kwh, price)
        if take == q:
            add_notice(Notice(oid, o.address, ACCEPTED, kwh, R_ACCEPTED))
        elif take == cap:
            add_notice(Notice(oid, o.address, PARTIAL, kwh,
                              f"curtailed by the grid check (DSO cap): {kwh!r} of "
                              f"{o.energy_kwh!r} kWh"))
        else:
            add_notice(Notice(oid, o.address, PARTIAL, kwh,
                              f"partially accepted: {kwh!r} of {o.energy_kwh!r} kWh covered the "
                              "rest of the request"))
    for losers in (outbid, eligible[i:]):
        notices.extend([Notice(oid, o.address, REJECTED, 0.0, R_OUTBID) for _, oid, o in losers])
    if len(counts) == len(orders) + 1 and not odd_ids:  # unique ids: fast str-key sort
        notices.sort(key=first)
    else:  # copies of an id: order them by all fields, whatever the input order
        notices.sort()

    if n == 0:
        outcome = Outcome.NO_MATCH
    elif remaining > 0:
        outcome = Outcome.PARTIAL
    else:
        outcome = Outcome.EXACT
    return Clearing(request=request, pricing=pricing, outcome=outcome, awards=tuple(awards),
                    cleared_energy_kwh=cleared / MWH_PER_KWH, clearing_price=clearing_price,
                    notices=tuple(notices), caps=caps)


def clear_dict(params: Mapping[str, Any]) -> dict[str, Any]:
    """Contract entry point for the ledger: JSON object in, JSON object out.

    ``params = {"request": <order>, "orders": [<order>, ...], "pricing": "pay_as_bid" |
    "pay_as_clear" (optional, default: the rules' pricing), "rules": <MarketRules dict>
    (optional), "caps": {order_id: kWh} (optional: the grid check's DSO caps)}``. Returns `Clearing.to_dict()`. A malformed call (not an object, unknown
    keys, a malformed request or order dict) raises `MarketError`/`OrderRejected` naming
    the field, e.g. ``orders[3].price``; orders that are well-formed but unacceptable
    (wrong side, priced out, duplicated, out of the market's bounds) are rejected in
    their notice instead, exactly as `clear` does.
    """
    p = _mapping(params, "params")
    _keys(p, {"request", "orders", "pricing", "rules", "caps"}, "params",
          required={"request", "orders"})
    rules = MarketRules.from_dict(p["rules"]) if p.get("rules") is not None else DEFAULT_RULES
    pricing = _enum(Pricing, p, "pricing", "params") if p.get("pricing") is not None \
        else rules.pricing
    request = Order.from_dict(p["request"], rules, where="request.")
    # shape only (rules=None): unacceptable values are the auction's business, in notices
    orders = [Order.from_dict(o, None, where=f"orders[{i}].")
              for i, o in enumerate(_list(p["orders"], "orders"))]
    return clear(request, orders, pricing, rules=rules, caps=p.get("caps")).to_dict()


# --------------------------------------------------------------------------- dict parsing

E = TypeVar("E", bound=StrEnum)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MarketError(f"expected an object, got {type(value).__name__}", where)
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise MarketError(f"expected a list, got {type(value).__name__}", where)
    return list(value)


def _keys(d: Mapping[str, Any], allowed: set[str], where: str,
          required: set[str] | None = None) -> None:
    unknown = sorted(str(k) for k in set(d) - allowed)
    if unknown:
        raise MarketError(f"unknown field(s) {', '.join(unknown)}", where)
    missing = sorted((allowed if required is None else required) - set(d))
    if missing:
        raise MarketError(f"missing field(s) {', '.join(missing)}", where)


def _str(d: Mapping[str, Any], key: str, where: str) -> str:
    v = d[key]
    if not isinstance(v, str):
        raise MarketError(f"must be a string (got {type(v).__name__})", f"{where}.{key}")
    return v


def _num(d: Mapping[str, Any], key: str, where: str) -> float:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or v != v or v in (
            float("inf"), float("-inf")):
        raise MarketError(f"must be a finite number (got {v!r})", f"{where}.{key}")
    return float(v)


def _enum(cls: type[E], d: Mapping[str, Any], key: str, where: str) -> E:
    v = d[key]
    try:
        return cls(v)
    except (ValueError, TypeError):
        allowed = ", ".join(repr(str(m)) for m in cls)
        raise MarketError(f"must be one of {allowed} (got {v!r})", f"{where}.{key}") from None
