"""Topic scheme: builders, validation, parsing and the QoS table."""

from __future__ import annotations

import pytest

from testbed.bus import topics as t
from testbed.bus.client import topic_matches


def test_builders() -> None:
    assert t.market_request("lab", 42) == "testbed/lab/market/42/request"
    assert t.market_orders("lab", "2024-06-01T12:15") == "testbed/lab/market/2024-06-01T12:15/orders"
    assert t.market_awards("lab", 0) == "testbed/lab/market/0/awards"
    assert t.market_notices("lab", 1) == "testbed/lab/market/1/notices"
    assert t.meter_readings("lab", "0xAbC123") == "testbed/lab/meter/0xAbC123/readings"
    assert t.ledger_tx("lab") == "testbed/lab/ledger/tx"
    assert t.block_proposal("lab", 7) == "testbed/lab/ledger/blocks/7/proposal"
    assert t.block_votes("lab", 7) == "testbed/lab/ledger/blocks/7/votes"
    assert t.blocks_committed("lab") == "testbed/lab/ledger/blocks/committed"
    assert t.sync_request("lab") == "testbed/lab/ledger/sync/request"
    assert t.sync_response("lab", "node-2") == "testbed/lab/ledger/sync/node-2/response"


@pytest.mark.parametrize(("bad", "fragment"), [
    ("a/b", "'/' (level separator)"),
    ("+", "'+' (wildcard)"),
    ("x#", "'#' (wildcard)"),
    ("a\0b", "NUL"),
    ("", "empty"),
    ("sp ace", "' '"),
    ("é", "'é'"),
    ("x" * 129, "longer than 128"),
])
def test_bad_segments_are_rejected(bad: str, fragment: str) -> None:
    with pytest.raises(t.TopicError, match="meter address") as e:
        t.meter_readings("lab", bad)
    assert fragment in str(e.value)


def test_other_validation_errors() -> None:
    with pytest.raises(t.TopicError, match="site"):
        t.ledger_tx("lab/other")
    with pytest.raises(t.TopicError, match="node"):
        t.sync_response("lab", "#")
    with pytest.raises(t.TopicError, match="must be ≥ 0"):
        t.market_orders("lab", -1)
    with pytest.raises(t.TopicError, match="must be an int"):
        t.block_votes("lab", "7")  # type: ignore[arg-type]
    with pytest.raises(t.TopicError, match="must be an int"):
        t.block_votes("lab", True)
    with pytest.raises(t.TopicError, match="expected one of"):
        t.market("lab", 1, "bids")
    assert issubclass(t.TopicError, ValueError)


def test_parse_roundtrip_and_qos() -> None:
    cases = {
        t.market_request("s", 3): ("request", {"interval": "3"}, 1),
        t.market_orders("s", 3): ("orders", {"interval": "3"}, 1),
        t.market_awards("s", 3): ("awards", {"interval": "3"}, 1),
        t.market_notices("s", 3): ("notices", {"interval": "3"}, 0),
        t.meter_readings("s", "m1"): ("readings", {"address": "m1"}, 1),
        t.ledger_tx("s"): ("tx", {}, 1),
        t.block_proposal("s", 9): ("proposal", {"height": "9"}, 1),
        t.block_votes("s", 9): ("votes", {"height": "9"}, 1),
        t.blocks_committed("s"): ("committed", {}, 1),
        t.sync_request("s"): ("sync_request", {}, 1),
        t.sync_response("s", "n1"): ("sync_response", {"node": "n1"}, 1),
    }
    for topic, (kind, params, qos) in cases.items():
        p = t.parse(topic)
        assert (p.site, p.kind, p.params, p.qos) == ("s", kind, params, qos)
        assert t.qos_for(topic) == qos
    assert set(t.QOS) == {k for k, _, _ in cases.values()}
    for bad in ("other/s/ledger/tx", "testbed/s", "testbed/s/ledger/blocks/x/votes",
                "testbed/s/meter/+/readings", "testbed/s/market/1/bids"):
        with pytest.raises(t.TopicError, match="not in the testbed scheme"):
            t.parse(bad)


def test_filters_match_their_topics() -> None:
    assert topic_matches(t.market_filter("s", "orders"), t.market_orders("s", 5))
    assert not topic_matches(t.market_filter("s", "orders"), t.market_awards("s", 5))
    assert topic_matches(t.market_filter("s"), t.market_awards("s", 5))
    assert topic_matches(t.meter_readings_filter("s"), t.meter_readings("s", "m9"))
    assert topic_matches(t.block_filter("s"), t.block_votes("s", 1))
    assert topic_matches(t.block_filter("s", "proposal"), t.block_proposal("s", 1))
    assert not topic_matches(t.block_filter("s"), t.blocks_committed("s"))
    assert topic_matches(t.site_filter("s"), t.sync_response("s", "n"))
    assert not topic_matches(t.site_filter("s"), t.ledger_tx("s2"))
