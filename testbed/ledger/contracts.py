"""Smart contracts: deterministic functions every validator re-executes.

A contract is a pure function from a JSON object to a JSON object: no clock, no
randomness, no I/O, no dependence on dict or set iteration order of its caller. The ledger
stores the inputs (by reference to on-chain transactions) and the result; a validator
re-executes and compares canonical bytes, so any difference, even in the last digit of a
float, rejects the block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from testbed.ledger import canonical
from testbed.ledger.errors import Reason, Rejected

Contract = Callable[[dict[str, Any]], dict[str, Any]]
_CONTRACTS: dict[str, Contract] = {}


def contract(name: str) -> Callable[[Contract], Contract]:
    """Register a contract under a versioned name (a new rule is a new name)."""

    def register(fn: Contract) -> Contract:
        if name in _CONTRACTS and _CONTRACTS[name] is not fn:
            raise ValueError(f"contract {name!r} is already registered")
        _CONTRACTS[name] = fn
        return fn

    return register


def names() -> list[str]:
    return sorted(_CONTRACTS)


def execute(name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """Run a contract; the result comes back as it would be stored (canonical JSON)."""
    fn = _CONTRACTS.get(name)
    if fn is None:
        raise Rejected(Reason.INVALID, f"unknown contract {name!r}; known: {sorted(_CONTRACTS)}")
    try:
        result = fn(canonical.decode(canonical.encode(inputs), strict=False))
        return canonical.decode(canonical.encode(result), strict=False)
    except Rejected:
        raise
    except Exception as exc:  # a contract failing is a rule outcome, not a crash
        raise Rejected(Reason.INVALID, f"contract {name!r} failed: {exc}") from None


def check_result(name: str, inputs: dict[str, Any], claimed: dict[str, Any]) -> dict[str, Any]:
    """Re-execute and compare byte for byte with the result carried in a transaction."""
    expected = execute(name, inputs)
    if canonical.encode(expected) != canonical.encode(claimed):
        raise Rejected(Reason.CONTRACT_MISMATCH, f"result of {name!r} differs from "
                       f"re-execution (claimed {canonical.digest(claimed)[:12]}, "
                       f"re-executed {canonical.digest(expected)[:12]})")
    return expected


@contract("test/first-come-v1")
def first_come(inputs: dict[str, Any]) -> dict[str, Any]:
    """A minimal auction used to test the mechanism independently of the market rules:
    orders are filled in the order given until the request is covered, at their price."""
    need = float(inputs["request"]["energy_kwh"])
    awards = []
    for order in inputs["orders"]:
        if need <= 0:
            break
        take = min(need, float(order["energy_kwh"]))
        awards.append({"order_id": order["order_id"], "address": order["address"],
                       "energy_kwh": take, "price": order["price"],
                       "amount_eur": take * order["price"]})
        need -= take
    return {"awards": awards}


# Contracts that live with their rules elsewhere register themselves on import.
import testbed.ledger.auction_contract  # noqa: E402, F401  (the market's auction)
