"""Delivery and settlement (pure): what is paid once the meters have spoken.

For each award: the delivered energy (metered over the delivery interval, in the award's
direction) is paid at the award's price, capped at the awarded energy (over-delivery was
not asked for and earns nothing); the shortfall (awarded - paid) costs the participant
`MarketRules.shortfall_penalty_eur_per_kwh`, paid to the aggregator. Who pays for
energy depends on the direction: the aggregator pays a participant who sold (discharged)
to it; a participant who bought (charged) pays the aggregator.

Amounts are integer micro-euros, computed by the one rounding function
`units.amount_ueur` (energy quantised to mWh, then mWh x EUR/kWh rounded half to even),
so a payment for full delivery equals the award's amount to the micro-euro and nothing
drifts on the ledger. Zero transfers are not recorded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .auction import Award, Clearing
from .orders import DEFAULT_RULES, MarketRules, Order, Side
from .units import amount_ueur, to_kwh, to_mwh


class TransferKind(StrEnum):
    ENERGY = "energy"
    PENALTY = "penalty"


@dataclass(frozen=True)
class Transfer:
    """One payment the ledger records: `payer` -> `payee`, `amount_ueur` > 0."""

    payer: str
    payee: str
    amount_ueur: int
    kind: TransferKind
    order_id: str
    interval: int | None
    energy_kwh: float
    """Energy the amount is for (paid or missing)."""

    def to_dict(self) -> dict[str, Any]:
        return {"payer": self.payer, "payee": self.payee, "amount_ueur": self.amount_ueur,
                "kind": str(self.kind), "order_id": self.order_id, "interval": self.interval,
                "energy_kwh": self.energy_kwh}


@dataclass(frozen=True)
class Settlement:
    order_id: str
    awarded_kwh: float
    delivered_kwh: float
    """As metered, in the award's direction (negative counts as none)."""
    paid_kwh: float
    """min(delivered, awarded)."""
    shortfall_kwh: float
    transfers: tuple[Transfer, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"order_id": self.order_id, "awarded_kwh": self.awarded_kwh,
                "delivered_kwh": self.delivered_kwh, "paid_kwh": self.paid_kwh,
                "shortfall_kwh": self.shortfall_kwh,
                "transfers": [t.to_dict() for t in self.transfers]}


def _transfer(payer: str, payee: str, amount: int, kind: TransferKind, order_id: str,
              interval: int | None, energy_kwh: float) -> Transfer:
    """A transfer with a positive amount; a negative one (negative price) flows back."""
    if amount < 0:
        payer, payee, amount = payee, payer, -amount
    return Transfer(payer, payee, amount, kind, order_id, interval, energy_kwh)


def settle(award: Award, request: Order, delivered_kwh: float, *,
           rules: MarketRules = DEFAULT_RULES) -> Settlement:
    """Settle one award of the auction on `request` given the metered delivery."""
    if not math.isfinite(delivered_kwh):
        raise ValueError(f"delivered_kwh must be finite, got {delivered_kwh!r}")
    awarded = to_mwh(award.energy_kwh)
    delivered = to_mwh(max(0.0, delivered_kwh))
    paid = min(delivered, awarded)
    short = awarded - paid
    aggregator, participant = request.address, award.address
    transfers = []
    energy_amount = amount_ueur(to_kwh(paid), award.price)
    if energy_amount:
        if award.side == Side.SELL:  # participant delivered energy to the aggregator
            payer, payee = aggregator, participant
        else:  # participant took energy from the aggregator
            payer, payee = participant, aggregator
        transfers.append(_transfer(payer, payee, energy_amount, TransferKind.ENERGY,
                                   award.order_id, request.interval, to_kwh(paid)))
    penalty = amount_ueur(to_kwh(short), rules.shortfall_penalty_eur_per_kwh)
    if penalty:
        transfers.append(_transfer(participant, aggregator, penalty, TransferKind.PENALTY,
                                   award.order_id, request.interval, to_kwh(short)))
    return Settlement(order_id=award.order_id, awarded_kwh=to_kwh(awarded),
                      delivered_kwh=float(delivered_kwh), paid_kwh=to_kwh(paid),
                      shortfall_kwh=to_kwh(short), transfers=tuple(transfers))


def settle_clearing(clearing: Clearing, delivered_kwh: Mapping[str, float], *,
                    rules: MarketRules = DEFAULT_RULES) -> tuple[Settlement, ...]:
    """Settle every award of a clearing; an award missing from `delivered_kwh` delivered
    nothing. Sorted by order_id, like everything the ledger compares."""
    return tuple(settle(a, clearing.request, delivered_kwh.get(a.order_id, 0.0), rules=rules)
                 for a in sorted(clearing.awards, key=lambda a: a.order_id))
