"""The local energy market, pure half: orders, the auction contract, the transactive
controller (TCR), the VPP aggregator and settlement.

No clock, randomness or I/O anywhere here: ledger validators re-execute these rules and
must get the same bytes. One module per concern:

- `orders`      Order, Side, Pricing, MarketRules, validate_order, OrderRejected
- `auction`     clear / clear_dict (the contract), Clearing, Award, Notice, Outcome
- `tcr`         quote / respond: a battery's offer and bid (paper V.D)
- `aggregator`  day_ahead_schedule, Aggregator: deviations -> requests (paper V.C)
- `settlement`  settle / settle_clearing: payments and penalties in micro-euros
- `units`       the mWh and micro-euro quanta and the one money rounding function
"""

from .aggregator import Aggregator, Schedule, day_ahead_schedule
from .auction import Award, Clearing, Notice, Outcome, Status, clear, clear_dict
from .orders import (
    DEFAULT_RULES,
    MarketError,
    MarketRules,
    Order,
    OrderRejected,
    Pricing,
    Side,
    validate_order,
)
from .settlement import Settlement, Transfer, TransferKind, settle, settle_clearing
from .tcr import Mode, Quote, TCRParams, quote, respond

__all__ = [
    "DEFAULT_RULES", "Aggregator", "Award", "Clearing", "MarketError", "MarketRules", "Mode",
    "Notice", "Order", "OrderRejected", "Outcome", "Pricing", "Quote", "Schedule", "Settlement",
    "Side", "Status", "TCRParams", "Transfer", "TransferKind", "clear", "clear_dict",
    "day_ahead_schedule", "quote", "respond", "settle", "settle_clearing", "validate_order",
]
