"""Settlement (pure): pay what each awarded battery delivered, measured by its own
readings in the delivery interval (`Accounting`'s interval energies), per the market's
rules (`market.settlement`). Returns the transfers; the ledger phase signs them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from testbed.market.auction import Clearing
from testbed.market.orders import MarketRules, Side
from testbed.market.settlement import Settlement as Settled
from testbed.market.settlement import Transfer, settle_clearing


@dataclass(frozen=True)
class Due:
    """An award waiting for its delivery interval to be metered."""

    clearing: Clearing
    award_id: str
    request_id: str


@dataclass(frozen=True)
class Paid:
    """One order's settlement, with who it is and what it delivered."""

    request_id: str
    award_id: str
    prosumer: str
    delivered_kwh: float
    settlement: Settled

    @property
    def transfers(self) -> tuple[Transfer, ...]:
        return self.settlement.transfers

    def row(self, t: float) -> dict[str, Any]:
        s = self.settlement
        return {"t": t, "request_id": self.request_id, "order_id": s.order_id,
                "prosumer": self.prosumer, "awarded_kwh": s.awarded_kwh,
                "delivered_kwh": s.delivered_kwh, "paid_kwh": s.paid_kwh,
                "shortfall_kwh": s.shortfall_kwh,
                "transfers": [x.to_dict() for x in s.transfers]}


class SettlementPhase:
    """Awards wait here for their delivery interval; `interval_end` settles them."""

    def __init__(self, rules: MarketRules, owner: Mapping[str, str]) -> None:
        self.rules = rules
        self.owner = owner
        """ledger address -> prosumer name."""
        self.pending: dict[int, list[Due]] = {}

    def add(self, delivery: int, due: Due) -> None:
        self.pending.setdefault(delivery, []).append(due)

    def interval_end(self, interval: int, energy: Mapping[str, Mapping[str, float]]
                     ) -> list[Paid]:
        """Settle the awards delivered in `interval` from each battery's metered
        discharge (sell awards) or charge (buy awards) in it."""
        out: list[Paid] = []
        for due in self.pending.pop(interval, []):
            c = due.clearing
            delivered: dict[str, float] = {}
            for a in c.awards:
                e = energy[self.owner[a.address]]
                delivered[a.order_id] = (e["dis_wh"] if a.side == Side.SELL else
                                         e["ch_wh"]) / 1000.0
            for s in settle_clearing(c, delivered, rules=self.rules):
                prosumer = self.owner[c.awarded[s.order_id].address]
                out.append(Paid(due.request_id, due.award_id, prosumer,
                                    delivered[s.order_id], s))
        return out
