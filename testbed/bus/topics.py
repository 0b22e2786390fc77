"""The testbed's MQTT topic scheme: one place that builds, validates and parses topics.

Every topic starts with ``testbed/{site}/`` so several sites (or runs) can share a broker.

==========================================================  =====  ===========================
topic                                                       QoS    what travels
==========================================================  =====  ===========================
``testbed/{site}/market/{interval}/request``                1      aggregator's bid or offer
``testbed/{site}/market/{interval}/orders``                 1      prosumers' bids and offers
``testbed/{site}/market/{interval}/awards``                 1      cleared awards
``testbed/{site}/market/{interval}/notices``                0      informational notices
``testbed/{site}/meter/{address}/readings``                 1      signed meter readings
``testbed/{site}/ledger/tx``                                1      pending transactions
``testbed/{site}/ledger/blocks/{height}/proposal``          1      proposed block
``testbed/{site}/ledger/blocks/{height}/votes``             1      validators' signatures
``testbed/{site}/ledger/blocks/committed``                  1      committed block + cert
``testbed/{site}/ledger/sync/request``                      1      "send me blocks from h"
``testbed/{site}/ledger/sync/{node}/response``              1      blocks for one node
==========================================================  =====  ===========================

QoS 1 for everything that moves money or energy (and for the ledger, whose messages a
validator must not miss); QoS 0 only for notices, which are advisory. Payloads are bytes
and signed elsewhere: the bus is transport only.

Segments (site, interval, address, node, height) are validated: ``/``, ``+``, ``#``, NUL
or anything outside ``[A-Za-z0-9._:@=~-]`` raises `TopicError`, so a hostile address can
neither write into another branch nor turn a publish topic into a wildcard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

ROOT = "testbed"
_SEGMENT = re.compile(r"[A-Za-z0-9._:@=~-]{1,128}")

#: QoS per topic kind (the last fixed word of the topic; see `parse`).
QOS: dict[str, int] = {
    "request": 1,
    "orders": 1,
    "awards": 1,
    "notices": 0,
    "readings": 1,
    "tx": 1,
    "proposal": 1,
    "votes": 1,
    "committed": 1,
    "sync_request": 1,
    "sync_response": 1,
}

MARKET_KINDS = ("request", "orders", "awards", "notices")


class TopicError(ValueError):
    """A topic segment would break the scheme (separator, wildcard, empty, odd characters)."""


def segment(value: str | int, what: str = "segment") -> str:
    """Validate one topic level; ints (intervals, heights) must be ≥ 0."""
    if isinstance(value, bool):
        raise TopicError(f"{what} {value!r}: not a topic segment")
    if isinstance(value, int):
        if value < 0:
            raise TopicError(f"{what} {value}: must be ≥ 0")
        return str(value)
    if not isinstance(value, str):
        raise TopicError(f"{what} {value!r}: must be str or int, not {type(value).__name__}")
    if _SEGMENT.fullmatch(value):
        return value
    if value == "":
        raise TopicError(f"{what} is empty")
    bad = sorted({c for c in value if not _SEGMENT.fullmatch(c)})
    named = {"/": "'/' (level separator)", "+": "'+' (wildcard)", "#": "'#' (wildcard)",
             "\0": "NUL"}
    shown = ", ".join(named.get(c, repr(c)) for c in bad)
    if len(value) > 128:
        raise TopicError(f"{what} {value[:40]!r}…: longer than 128 characters")
    raise TopicError(f"{what} {value!r}: not allowed in a topic segment: {shown}")


def _base(site: str) -> str:
    return f"{ROOT}/{segment(site, 'site')}"


def market(site: str, interval: str | int, kind: str) -> str:
    """``testbed/{site}/market/{interval}/{kind}``, kind one of `MARKET_KINDS`."""
    if kind not in MARKET_KINDS:
        raise TopicError(f"market topic kind {kind!r}: expected one of {', '.join(MARKET_KINDS)}")
    return f"{_base(site)}/market/{segment(interval, 'interval')}/{kind}"


def market_request(site: str, interval: str | int) -> str:
    return market(site, interval, "request")


def market_orders(site: str, interval: str | int) -> str:
    return market(site, interval, "orders")


def market_awards(site: str, interval: str | int) -> str:
    return market(site, interval, "awards")


def market_notices(site: str, interval: str | int) -> str:
    return market(site, interval, "notices")


def meter_readings(site: str, address: str) -> str:
    return f"{_base(site)}/meter/{segment(address, 'meter address')}/readings"


def ledger_tx(site: str) -> str:
    return f"{_base(site)}/ledger/tx"


def block_proposal(site: str, height: int) -> str:
    return f"{_base(site)}/ledger/blocks/{_height(height)}/proposal"


def block_votes(site: str, height: int) -> str:
    return f"{_base(site)}/ledger/blocks/{_height(height)}/votes"


def blocks_committed(site: str) -> str:
    return f"{_base(site)}/ledger/blocks/committed"


def sync_request(site: str) -> str:
    return f"{_base(site)}/ledger/sync/request"


def sync_response(site: str, node: str) -> str:
    return f"{_base(site)}/ledger/sync/{segment(node, 'node')}/response"


def _height(height: int) -> str:
    if not isinstance(height, int) or isinstance(height, bool):
        raise TopicError(f"block height {height!r}: must be an int")
    return segment(height, "block height")


# -- subscription filters ---------------------------------------------------------------------

def market_filter(site: str, kind: str | None = None) -> str:
    """Every interval's ``kind`` messages (all market kinds when None)."""
    if kind is not None and kind not in MARKET_KINDS:
        raise TopicError(f"market topic kind {kind!r}: expected one of {', '.join(MARKET_KINDS)}")
    return f"{_base(site)}/market/+/{kind or '+'}"


def meter_readings_filter(site: str) -> str:
    return f"{_base(site)}/meter/+/readings"


def block_filter(site: str, kind: str | None = None) -> str:
    """Proposals and/or votes at every height (``kind`` 'proposal', 'votes' or None)."""
    if kind not in (None, "proposal", "votes"):
        raise TopicError(f"block topic kind {kind!r}: expected 'proposal' or 'votes'")
    return f"{_base(site)}/ledger/blocks/+/{kind or '+'}"


def site_filter(site: str) -> str:
    """Everything of one site."""
    return f"{_base(site)}/#"


# -- parsing ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Topic:
    """A parsed topic: ``kind`` is a key of `QOS`; ``params`` hold the variable segments."""

    site: str
    kind: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def qos(self) -> int:
        return QOS[self.kind]


def parse(topic: str) -> Topic:
    """Inverse of the builders; `TopicError` for a topic outside the scheme."""
    p = topic.split("/")
    try:
        if len(p) < 3 or p[0] != ROOT:
            raise ValueError
        for s in p[1:]:
            segment(s)
        site, rest = p[1], p[2:]
        match rest:
            case ["market", interval, kind] if kind in MARKET_KINDS:
                return Topic(site, kind, {"interval": interval})
            case ["meter", address, "readings"]:
                return Topic(site, "readings", {"address": address})
            case ["ledger", "tx"]:
                return Topic(site, "tx")
            case ["ledger", "blocks", "committed"]:
                return Topic(site, "committed")
            case ["ledger", "blocks", height, ("proposal" | "votes") as kind] if height.isdigit():
                return Topic(site, kind, {"height": height})
            case ["ledger", "sync", "request"]:
                return Topic(site, "sync_request")
            case ["ledger", "sync", node, "response"]:
                return Topic(site, "sync_response", {"node": node})
    except (ValueError, TopicError):
        pass
    raise TopicError(f"topic {topic!r} is not in the testbed scheme")


def qos_for(topic: str) -> int:
    """The QoS a topic of the scheme must be published with."""
    return parse(topic).qos
