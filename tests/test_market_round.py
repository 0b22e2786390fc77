"""An auction round end to end over a real broker, with signed messages and hostile input."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from testbed.bus import topics
from testbed.bus.broker import EmbeddedBroker, MosquittoBroker
from testbed.bus.client import BusClient
from testbed.ledger import canonical, messages
from testbed.ledger import transactions as T
from testbed.ledger.identity import KeyPair
from testbed.market.agents import AggregatorAgent, TCRAgent
from testbed.market.orders import MarketRules, Pricing, Side
from testbed.market.tcr import Mode, TCRParams
from testbed.physics.models import BatteryParams

HAVE_MOSQUITTO = shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()
BROKERS = ["embedded", pytest.param("mosquitto", marks=pytest.mark.skipif(
    not HAVE_MOSQUITTO, reason="mosquitto not installed (apt-get install mosquitto)"))]


@pytest.mark.parametrize("broker_kind", BROKERS)
async def test_aggregator_and_tcrs_complete_a_round_and_refuse_bad_input(broker_kind):
    aggregator = KeyPair.from_seed(b"agg")
    tcr_keys = [KeyPair.from_seed(f"tcr-{i}".encode()) for i in range(4)]
    intruder = KeyPair.from_seed(b"intruder")  # not registered
    keys = {k.address: k.public for k in [aggregator, *tcr_keys]}
    rules = MarketRules(price_max=1.0)
    battery = BatteryParams()
    socs = [0.10, 0.50, 0.80, 0.95]  # at SOC_min the first has nothing to offer
    broker = EmbeddedBroker() if broker_kind == "embedded" else MosquittoBroker()
    async with broker:
        buses = [BusClient(broker.url) for _ in range(6)]
        for b in buses:
            await b.connect()
        awarded: dict[str, float] = {}
        tcrs = []
        for i, (k, soc) in enumerate(zip(tcr_keys, socs, strict=True)):
            agent = TCRAgent(k, buses[i], "lab", resolve=keys.get,
                             is_aggregator=lambda a: a == aggregator.address,
                             params=TCRParams(), battery_params=battery,
                             battery=lambda soc=soc: soc, mode=Mode.TE, rules=rules,
                             on_award=lambda kwh, side, iv, a=k.address: awarded.__setitem__(
                                 a, kwh))
            await agent.start()
            tcrs.append(agent)
        agg = AggregatorAgent(aggregator, buses[4], "lab", resolve=keys.get, rules=rules)
        attacker = buses[5]

        async def attack() -> None:
            """Wait for the request, then send every kind of bad answer."""
            orders = topics.market_orders("lab", 7)
            watch = await attacker.subscribe(orders)
            async with await attacker.subscribe(topics.market_filter("lab", "request")) as s:
                m = await s.get(timeout=5)
            req = messages.parse(m.payload)
            victim = tcr_keys[3]

            def order(key, energy=1.0, price=0.2, **kw):
                return messages.sign(key, T.ORDER, {
                    "address": key.address, "cpf": 0.5, "auction": req.id,
                    "bid": {"type": "sell", "energy": {"unit": "kWh", "value": energy},
                            "price": {"unit": "EUR/kWh", "value": price}}}, at=time.time(),
                    **kw)
            await attacker.publish(orders, b"{this is not json")
            forged = canonical.decode(order(victim).raw)
            forged["parameters"]["bid"]["price"]["value"] = 0.01
            await attacker.publish(orders, canonical.encode(forged))
            await attacker.publish(orders, order(intruder).raw)
            # well signed by a registered prosumer (whose TCR stays silent), but invalid
            await attacker.publish(orders, order(tcr_keys[0], energy=-2.0).raw)
            await attacker.publish(orders, order(tcr_keys[0], price=5.0).raw)
            stale = messages.sign(tcr_keys[2], T.ORDER, order(tcr_keys[2]).parameters,
                                  at=time.time() - 3600)
            await attacker.publish(orders, stale.raw)
            # replay a genuine answer once it has been sent
            async with watch as s:
                while True:
                    got = await s.get(timeout=5)
                    try:
                        genuine = messages.parse(got.payload)
                    except Exception:
                        continue
                    if genuine.client_id == tcr_keys[2].address:
                        break
            await attacker.publish(orders, genuine.raw)

        attack_task = asyncio.create_task(attack())
        await asyncio.sleep(0.2)
        rnd = await agg.auction(Side.BUY, 2.0, 0.35, 7, gate_s=1.5, pricing=Pricing.PAY_AS_BID)
        await attack_task
        await asyncio.wait_for(asyncio.gather(*(t.awarded.wait() for t in tcrs[1:])), 5)
        for t in tcrs:
            await t.stop()
        for b in buses:
            await b.close()

    # the ledger takes an award only in a block dated at or after the gate
    assert rnd.award.time >= rnd.request.parameters["gate"]
    senders = sorted(m.client_id for m in rnd.orders)
    assert senders == sorted(k.address for k in tcr_keys[1:]), "SOC_min offers nothing"
    c = rnd.clearing
    assert c.outcome == "exact" and c.cleared_energy_kwh == pytest.approx(2.0)
    assert all(a.price <= 0.35 for a in c.awards)
    prices = [a.price for a in c.awards]
    assert prices == sorted(prices)  # merit order: cheapest (fullest battery) first
    assert c.awards[0].address == tcr_keys[3].address
    # every participant got a notice, losers included; winners got their award
    for t in tcrs[1:]:
        (answer,) = t.answers.values()
        assert answer.notice is not None and answer.notice["status"] in (
            "accepted", "partial", "rejected")
    assert awarded == {a.address: pytest.approx(a.energy_kwh) for a in c.awards}
    refused = "\n".join(agg.inbox.refused)
    for reason in ("not valid JSON", "bad-signature", "unknown-key", "parameters.bid.energy",
                   "outside the market's bounds", "stale", "replay"):
        assert reason in refused, (reason, refused)
    assert len(agg.inbox.refused) == 7


async def test_an_order_dated_after_the_gate_is_refused_as_the_ledger_would():
    """A clock faster than real time (a realtime scenario at speed x) passes the gate
    while the aggregator still waits in wall-clock time: an order dated after the gate
    must be refused here, not awarded and then dropped by the ledger (which refuses it)."""
    aggregator = KeyPair.from_seed(b"agg")
    early, late = KeyPair.from_seed(b"early"), KeyPair.from_seed(b"late")
    keys = {k.address: k.public for k in (aggregator, early, late)}
    t0, m0 = 1_782_043_200.0, time.monotonic()

    def clock() -> float:  # 300 simulated seconds per wall-clock second
        return t0 + (time.monotonic() - m0) * 300

    async with EmbeddedBroker() as broker:
        buses = [BusClient(broker.url) for _ in range(2)]
        for b in buses:
            await b.connect()
        agg = AggregatorAgent(aggregator, buses[0], "lab", resolve=keys.get, clock=clock)

        async def answer() -> None:
            async with await buses[1].subscribe(topics.market_filter("lab", "request")) as s:
                req = messages.parse((await s.get(timeout=5)).payload)
            gate = req.parameters["gate"]
            for key, at in ((early, req.time + 1), (late, gate + 5)):
                await buses[1].publish(topics.market_orders("lab", 3), messages.sign(
                    key, T.ORDER, {"address": key.address, "cpf": 0.5, "auction": req.id,
                                   "bid": {"type": "sell",
                                           "energy": {"unit": "kWh", "value": 1.0},
                                           "price": {"unit": "EUR/kWh", "value": 0.2}}},
                    at=at).raw)

        task = asyncio.create_task(answer())
        rnd = await agg.auction(Side.BUY, 2.0, 0.35, 3, gate_s=60, wait_s=0.5)
        await task
        # a wall-clock agent whose wait ends before its (whole-second) gate: the award
        # still waits for the gate
        agg.clock = time.time
        empty = await agg.auction(Side.BUY, 2.0, 0.35, 4, gate_s=1.0, wait_s=0.05)
        for b in buses:
            await b.close()
    assert [m.client_id for m in rnd.orders] == [early.address]
    assert rnd.request.parameters["gate"] - rnd.request.time <= 61  # simulated seconds
    assert rnd.award.time >= rnd.request.parameters["gate"]
    assert empty.orders == [] and empty.award.time >= empty.request.parameters["gate"]
    (refusal,) = agg.inbox.refused
    assert "after the gate" in refusal and late.address in refusal
