"""Market agents refuse any payload with one log line and its reason, never a traceback:
generated payloads through the inbox's checks, and hostile awards (even signed by the
auction's own aggregator) through a transactive controller on a real broker."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.bus import topics
from testbed.bus.broker import EmbeddedBroker
from testbed.bus.client import BusClient, BusMessage
from testbed.ledger import messages
from testbed.ledger import transactions as T
from testbed.ledger.identity import KeyPair
from testbed.market.agents import MAX_REFUSAL, Inbox, TCRAgent
from testbed.market.orders import MarketRules
from testbed.market.tcr import Mode, TCRParams
from testbed.physics.models import BatteryParams

AGG = KeyPair.from_seed(b"agg")
TCR = KeyPair.from_seed(b"tcr")
KEYS = {k.address: k.public for k in (AGG, TCR)}

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)
OPS = st.sampled_from([T.ORDER, T.AUCTION, T.AWARD, T.PAYMENT, "x", ""])


def one_line_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The market's log records; each must be one line without a traceback."""
    out = []
    for r in caplog.records:
        assert r.exc_info is None, f"traceback logged: {r.getMessage()}"
        msg = r.getMessage()
        assert "\n" not in msg and "Traceback" not in msg, msg
        out.append(msg)
    return out


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    how = draw(st.sampled_from(["bytes", "json", "envelope", "signed"]))
    if how == "bytes":
        return draw(st.binary(max_size=200))
    if how == "json":
        return json.dumps(draw(JSON)).encode()
    if how == "envelope":  # the right keys, anything in them
        return json.dumps({k: draw(JSON) for k in ("clientId", "reqId", "date", "operation",
                                                   "parameters", "signature")}).encode()
    params = draw(st.dictionaries(st.sampled_from(
        ["address", "cpf", "auction", "bid", "interval", "gate", "result", "orders",
         "contract", "pricing"]), JSON, max_size=6))
    return messages.sign(draw(st.sampled_from([AGG, TCR])), draw(OPS), params,
                         at=time.time()).raw


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=payloads(), operation=st.sampled_from([T.ORDER, T.AUCTION, T.AWARD]))
def test_any_payload_is_accepted_or_refused_in_one_line(caplog: pytest.LogCaptureFixture,
                                                        payload: bytes, operation: str) -> None:
    caplog.clear()
    inbox = Inbox(KEYS.get, time.time)
    with caplog.at_level(logging.WARNING, logger="testbed.market"):
        msg = inbox.accept(BusMessage("lab/market/7/orders", payload), operation)
    lines = one_line_records(caplog)
    if msg is None:
        assert len(inbox.refused) == 1 == len(lines)
        assert lines[0].startswith("refused lab/market/7/orders: ")
        assert len(inbox.refused[0]) <= MAX_REFUSAL and inbox.refused[0].isprintable()
    else:
        assert msg.operation == operation and not inbox.refused


async def test_hostile_awards_cost_the_controller_one_line_each(
        caplog: pytest.LogCaptureFixture) -> None:
    awarded: list[tuple[float, str, int]] = []
    async with EmbeddedBroker() as broker:
        bus, attacker = BusClient(broker.url), BusClient(broker.url)
        await bus.connect()
        await attacker.connect()
        tcr = TCRAgent(TCR, bus, "lab", resolve=KEYS.get, is_aggregator=lambda a: a == AGG.address,
                       params=TCRParams(), battery_params=BatteryParams(), battery=lambda: 0.9,
                       mode=Mode.TE, rules=MarketRules(price_max=1.0),
                       on_award=lambda kwh, side, iv: awarded.append((kwh, str(side), iv)))
        await tcr.start()
        req = messages.sign(AGG, T.AUCTION, {
            "address": AGG.address, "interval": 7, "gate": int(time.time()) + 60,
            "pricing": "pay-as-bid", "contract": "auction/v1",
            "bid": {"type": "buy", "energy": {"unit": "kWh", "value": 2.0},
                    "price": {"unit": "EUR/kWh", "value": 0.35}}}, at=time.time())
        await attacker.publish(topics.market_request("lab", 7), req.raw)
        for _ in range(200):
            if req.id in tcr.answers:
                break
            await asyncio.sleep(0.01)
        order = tcr.answers[req.id].order
        assert order is not None, "a full battery offers"
        oid = order.id

        def award(result: object) -> bytes:
            return messages.sign(AGG, T.AWARD, {"auction": req.id, "contract": "auction/v1",
                                                "orders": [oid], "result": result},
                                 at=time.time()).raw

        hostile = [
            b"\x00\xff not json", b"{}", b"[]", json.dumps({"clientId": [1]}).encode(),
            award({"awards": 5}), award({"awards": [1, 2]}), award({"notices": "abc"}),
            award({"awards": [{"order_id": oid, "energy_kwh": "lots", "side": "sell"}]}),
            award({"awards": [{"order_id": oid, "energy_kwh": 1.0, "side": "sideways"}]}),
            award({"awards": [{"order_id": oid, "side": "sell"}]}),
            award({"awards": [{"order_id": oid, "energy_kwh": -1.0, "side": "sell"}]}),
            award({"awards": [{"order_id": oid, "energy_kwh": "1e999", "side": "sell"}]}),
            award({"awards": [{"order_id": oid, "energy_kwh": 1.0, "side": "sell\n"
                              + "x" * 5000}]}),
        ]
        with caplog.at_level(logging.WARNING, logger="testbed.market"):
            for p in hostile:
                await attacker.publish(topics.market_awards("lab", 7), p)
            await attacker.publish(topics.market_request("lab", 8), b"\x00garbage\n\n")
            # then a good award: the controller still works
            await attacker.publish(topics.market_awards("lab", 7), award(
                {"awards": [{"order_id": oid, "energy_kwh": 1.25, "side": "sell"}],
                 "notices": [{"order_id": oid, "status": "accepted"}]}))
            await asyncio.wait_for(tcr.awarded.wait(), 5)
        await tcr.stop()
        await bus.close()
        await attacker.close()
    lines = one_line_records(caplog)
    assert awarded == [(1.25, "sell", 7)]
    assert len(tcr.inbox.refused) == len(hostile) + 1 == len(lines)
    assert all(len(x) <= MAX_REFUSAL for x in tcr.inbox.refused)
    refused = "\n".join(tcr.inbox.refused)
    for reason in ("not valid JSON", "awards must be a list", "awards must hold objects",
                   "could not convert string to float", "'sideways' is not a valid Side",
                   "KeyError", "not a finite amount", "notices must be a list"):
        assert reason in refused, (reason, refused)


def test_agents_of_one_process_each_check_a_message_they_all_receive() -> None:
    """The run's TCRs share one decoding of a request every one of them receives, not its
    checks: an agent whose registry has another key for the sender refuses it, and a
    replay is refused by the agent that saw it before, not by the others."""
    signer, other = KeyPair.generate(), KeyPair.generate()
    now = time.time()
    msg = messages.sign(signer, T.AUCTION, {
        "address": signer.address, "interval": 7, "gate": int(now) + 1,
        "pricing": "pay-as-bid", "contract": "testbed-merit-order/1",
        "bid": {"type": "buy", "energy": {"unit": "kWh", "value": 1.0},
                "price": {"unit": "EUR/kWh", "value": 0.3}}}, at=now)
    m = BusMessage("x/market/7/request", msg.raw)
    knows = Inbox(lambda a: signer.public if a == signer.address else None, lambda: now)
    wrong = Inbox(lambda a: other.public if a == signer.address else None, lambda: now)
    fresh = Inbox(lambda a: signer.public if a == signer.address else None, lambda: now)
    assert knows.accept(m, T.AUCTION) is not None
    assert wrong.accept(m, T.AUCTION) is None and "unknown-key" in wrong.refused[0]
    assert knows.accept(m, T.AUCTION) is None and "replay" in knows.refused[0].lower()
    assert fresh.accept(m, T.AUCTION) is not None and not fresh.refused
