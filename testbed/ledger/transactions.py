"""Transaction kinds: the `operation` of a signed message and the shape of its parameters.

Every transaction is a `SignedMessage`. This module checks shape only (types, ranges,
units); who may send what and what it does to balances lives in `state`.

Units: energy in kWh (paper: `{"unit": "kWh", "value": ...}`), prices in EUR/kWh, money on
the ledger in integer micro-euros (`amount`), times in Unix seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from testbed.ledger.errors import Reason, Rejected
from testbed.ledger.identity import is_address

READING = "meter-reading"
AUCTION = "auction-open"
ORDER = "bid-offer"
AWARD = "award"
PAYMENT = "payment"
REWARD = "reward"
REGISTRY = "registry"
PSEUDONYM = "pseudonym"
GRID_CHECK = "grid-check"

ROLES = frozenset({"validator", "meter", "aggregator", "dso"})
LIGHTS = frozenset({"green", "amber", "red"})
MODES = frozenset({"TE", "RE", "RE+TE"})
PRICINGS = frozenset({"pay-as-bid", "pay-as-clear"})
SIDES = frozenset({"buy", "sell"})
MAX_AMOUNT = 10**15  # micro-euros: a billion euros, far beyond any testbed
MAX_ENERGY_KWH = 1e6
_HEX = set("0123456789abcdef")


def _fail(op: str, path: str, expected: str, got: Any) -> Rejected:
    return Rejected(Reason.MALFORMED, f"{op}: parameters.{path}: expected {expected}, "
                    f"got {got!r}")


class _Check:
    """Field accessors that raise a MALFORMED rejection naming the field."""

    def __init__(self, op: str, params: Mapping[str, Any]) -> None:
        self.op, self.params = op, params

    def _get(self, path: str) -> Any:
        node: Any = self.params
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise Rejected(Reason.MALFORMED, f"{self.op}: parameters.{path} is missing")
            node = node[part]
        return node

    def keys(self, path: str, allowed: set[str]) -> None:
        node = self._get(path) if path else self.params
        if not isinstance(node, Mapping):
            raise _fail(self.op, path, "an object", node)
        extra = set(node) - allowed
        if extra:
            raise _fail(self.op, path or "<root>", f"only {sorted(allowed)}", sorted(extra))

    def address(self, path: str) -> str:
        v = self._get(path)
        if not is_address(v):
            raise _fail(self.op, path, "an address (tb + 40 hex)", v)
        return v

    def hex(self, path: str, n: int, what: str) -> str:
        v = self._get(path)
        if not (isinstance(v, str) and len(v) == n and set(v) <= _HEX):
            raise _fail(self.op, path, f"{what} ({n} lowercase hex)", v)
        return v

    def tx_id(self, path: str) -> str:
        return self.hex(path, 64, "a transaction id")

    def integer(self, path: str, lo: int, hi: int) -> int:
        v = self._get(path)
        if type(v) is not int or not lo <= v <= hi:
            raise _fail(self.op, path, f"an integer in [{lo}, {hi}]", v)
        return v

    def number(self, path: str, lo: float, hi: float, *, open_lo: bool = False) -> float:
        v = self._get(path)
        if type(v) not in (int, float) or not math.isfinite(v) or not lo <= v <= hi \
                or (open_lo and v == lo):
            bound = f"({lo}, {hi}]" if open_lo else f"[{lo}, {hi}]"
            raise _fail(self.op, path, f"a finite number in {bound}", v)
        return float(v)

    def choice(self, path: str, options: frozenset[str]) -> str:
        v = self._get(path)
        if v not in options:
            raise _fail(self.op, path, f"one of {sorted(options)}", v)
        return v

    def text(self, path: str, max_len: int = 200) -> str:
        v = self._get(path)
        if not isinstance(v, str) or len(v) > max_len:
            raise _fail(self.op, path, f"a string of at most {max_len} characters", v)
        return v

    def quantity(self, path: str, unit: str, lo: float, hi: float, *,
                 open_lo: bool = False) -> float:
        """The paper's `{"unit": ..., "value": ...}` pair."""
        self.keys(path, {"unit", "value"})
        if self._get(f"{path}.unit") != unit:
            raise _fail(self.op, f"{path}.unit", repr(unit), self._get(f"{path}.unit"))
        return self.number(f"{path}.value", lo, hi, open_lo=open_lo)


def _reading(c: _Check) -> None:
    c.keys("", {"meter", "start", "duration_s", "production_kwh", "consumption_kwh"})
    c.address("meter")
    c.integer("start", 0, 2**40)
    c.integer("duration_s", 1, 86400)
    c.number("production_kwh", 0.0, MAX_ENERGY_KWH)
    c.number("consumption_kwh", 0.0, MAX_ENERGY_KWH)


def _bid(c: _Check, price_lo: float = -10.0, price_hi: float = 10.0) -> None:
    c.keys("bid", {"type", "energy", "price"})
    c.choice("bid.type", SIDES)
    c.quantity("bid.energy", "kWh", 0.0, MAX_ENERGY_KWH, open_lo=True)
    c.quantity("bid.price", "EUR/kWh", price_lo, price_hi)


def _auction(c: _Check) -> None:
    c.keys("", {"address", "interval", "gate", "pricing", "contract", "bid"})
    c.address("address")
    c.integer("interval", 0, 2**40)
    c.integer("gate", 0, 2**40)
    c.choice("pricing", PRICINGS)
    c.text("contract", 64)
    _bid(c)


def _order(c: _Check) -> None:
    c.keys("", {"address", "cpf", "auction", "bid"})
    c.address("address")
    c.number("cpf", 0.0, 1.0)
    c.tx_id("auction")
    _bid(c)


def _award(c: _Check) -> None:
    c.keys("", {"auction", "contract", "orders", "result", "caps"})
    c.tx_id("auction")
    c.text("contract", 64)
    orders = c._get("orders")
    if not isinstance(orders, list):
        raise _fail(c.op, "orders", "a list of transaction ids", orders)
    if not all(isinstance(o, str) and len(o) == 64 and set(o) <= _HEX for o in orders):
        raise _fail(c.op, "orders", "a list of transaction ids (64 hex)", orders)
    if not isinstance(c._get("result"), dict):
        raise _fail(c.op, "result", "an object (the contract's output)", c._get("result"))
    if "caps" in c.params:  # the grid check's DSO caps: order id -> kWh (testbed.grid)
        _caps(c)


def _caps(c: _Check) -> None:
    caps = c._get("caps")
    if not isinstance(caps, dict):
        raise _fail(c.op, "caps", "an object {order id: kWh}", caps)
    for oid in caps:
        if not (len(oid) == 64 and set(oid) <= _HEX):
            raise _fail(c.op, "caps", "order ids (64 hex) as keys", oid)
        c.number(f"caps.{oid}", 0.0, MAX_ENERGY_KWH)


def _grid_check(c: _Check) -> None:
    """The DSO's verdict on an auction's dispatch: caps it imposes, traffic light, how
    many re-clear rounds it took, whether the final dispatch is acceptable."""
    c.keys("", {"auction", "caps", "light", "rounds", "passed"})
    c.tx_id("auction")
    _caps(c)
    c.choice("light", LIGHTS)
    c.integer("rounds", 1, 1000)
    if type(c._get("passed")) is not bool:
        raise _fail(c.op, "passed", "true or false", c._get("passed"))


def _payment(c: _Check) -> None:
    c.keys("", {"to", "amount", "award", "memo"})
    c.address("to")
    c.integer("amount", 1, MAX_AMOUNT)
    if c._get("award") is not None:
        c.tx_id("award")
    c.text("memo", 200)


def _reward(c: _Check) -> None:
    c.keys("", {"to", "amount", "height"})
    c.address("to")
    c.integer("amount", 1, MAX_AMOUNT)
    c.integer("height", 1, 2**40)


def _entry(c: _Check, path: str) -> None:
    c.keys(path, {"name", "public_key", "meter_type", "serial", "roles", "mode"})
    c.text(f"{path}.name", 100)
    c.hex(f"{path}.public_key", 64, "an Ed25519 public key")
    c.text(f"{path}.meter_type", 100)
    c.text(f"{path}.serial", 100)
    roles = c._get(f"{path}.roles")
    if not (isinstance(roles, list) and roles and set(roles) <= ROLES
            and len(set(roles)) == len(roles)):
        raise _fail(c.op, f"{path}.roles", f"a non-empty list from {sorted(ROLES)}", roles)
    c.choice(f"{path}.mode", MODES)


def _registry(c: _Check) -> None:
    c.keys("", {"action", "entry", "address"})
    action = c.choice("action", frozenset({"add", "remove"}))
    if action == "add":
        _entry(c, "entry")
    else:
        c.address("address")


def _pseudonym(c: _Check) -> None:
    c.keys("", {"public_key", "escrow", "valid_from", "valid_to"})
    c.hex("public_key", 64, "an Ed25519 public key")
    c.hex("escrow", 64, "an HMAC-SHA256 escrow tag")
    lo = c.integer("valid_from", 0, 2**40)
    hi = c.integer("valid_to", 0, 2**40)
    if hi <= lo:
        raise _fail(c.op, "valid_to", f"> valid_from ({lo})", hi)


SCHEMAS: dict[str, Callable[[_Check], None]] = {
    READING: _reading, AUCTION: _auction, ORDER: _order, AWARD: _award, PAYMENT: _payment,
    REWARD: _reward, REGISTRY: _registry, PSEUDONYM: _pseudonym, GRID_CHECK: _grid_check,
}


def check_shape(operation: str, parameters: Mapping[str, Any]) -> None:
    schema = SCHEMAS.get(operation)
    if schema is None:
        raise Rejected(Reason.MALFORMED, f"unknown operation {operation!r}; expected one of "
                       f"{sorted(SCHEMAS)}")
    schema(_Check(operation, parameters))


def entry_dict(name: str, public_key: bytes, *, meter_type: str = "emulated-sunspec-203",
               serial: str = "", roles: list[str], mode: str = "TE") -> dict[str, Any]:
    """A registry (CSM-DB) record as it appears in genesis and registry transactions."""
    return {"name": name, "public_key": public_key.hex(), "meter_type": meter_type,
            "serial": serial, "roles": sorted(roles), "mode": mode}
