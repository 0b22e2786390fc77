"""The market's merit-order auction, registered as a ledger contract.

The ledger hands the contract the auction request, every order committed for it and the
chain's market rules from genesis (see `state.Auction.contract_inputs`), plus the DSO's
signed grid caps when there are any; the market module does the clearing. Pricing names on the ledger are the
paper-style `pay-as-bid` / `pay-as-clear`.
"""

from __future__ import annotations

from typing import Any

from testbed.ledger.contracts import contract
from testbed.market.auction import CONTRACT, clear_dict


@contract(CONTRACT)
def merit_order(inputs: dict[str, Any]) -> dict[str, Any]:
    return clear_dict({"request": inputs["request"], "orders": inputs["orders"],
                       "pricing": str(inputs["pricing"]).replace("-", "_"),
                       "rules": inputs.get("rules"), "caps": inputs.get("caps")})
