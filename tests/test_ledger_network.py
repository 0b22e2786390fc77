"""Validators as separate nodes over a real MQTT broker (embedded amqtt and Mosquitto)."""

from __future__ import annotations

import asyncio
import hashlib
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ledger_net import stop_processes

from testbed.bus import topics
from testbed.bus.broker import EmbeddedBroker, MosquittoBroker
from testbed.bus.client import BusClient
from testbed.config import SiteConfig, load_site
from testbed.ledger import canonical, messages
from testbed.ledger import transactions as T
from testbed.ledger.blocks import Block
from testbed.ledger.chain import verify_store
from testbed.ledger.identity import address_of
from testbed.ledger.node import LedgerNode
from testbed.ledger.setup import init_ledger
from testbed.ledger.state import Params
from testbed.ledger.store import Store
from testbed.ledger.validators import Validators

HAVE_MOSQUITTO = shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()


def independent_election_check(db: Path, window: int = 4) -> int:
    """Recompute each block's proposer from the certified readings with eq. 9 directly
    (not with testbed.ledger.election); returns the number of blocks checked."""
    store = Store(db, readonly=True)
    g = Block.parse(store.block(0).raw, genesis=True)
    validators = {}
    for e in g.header["registry"]:
        if "validator" in e["roles"]:
            validators[address_of(bytes.fromhex(e["public_key"]))] = e["name"]
    readings: dict[str, list[tuple[float, float]]] = {a: [] for a in validators}
    prev = g.hash
    checked = 0
    for b in store.blocks(1):
        block = Block.parse(b.raw)
        cpf, gap = {}, {}
        for a, rs in readings.items():
            last = rs[-window:]
            if last:
                p, c = sum(x for x, _ in last), sum(y for _, y in last)
                cpf[a] = math.exp(-abs(p - c))
                gap[a] = round(abs(p - c) * 1e9)  # the documented resolution: 1 µWh
        order = sorted(validators, key=lambda a: (
            gap.get(a, 2**62), hashlib.sha256(f"{prev}|{a}".encode()).hexdigest()))
        assert block.proposer == order[block.round % len(order)], (
            f"height {block.height}: proposer {validators[block.proposer]}, CPFs "
            f"{ {validators[a]: round(v, 4) for a, v in cpf.items()} }")
        if cpf:
            assert block.header["evidence"]["cpf"] == pytest.approx(cpf.get(block.proposer, 0))
        for _, raw in b.txs:
            m = canonical.decode(raw)
            if m["operation"] == T.READING:
                p = m["parameters"]
                readings[m["clientId"]].append((p["production_kwh"], p["consumption_kwh"]))
        prev = b.hash
        checked += 1
    store.close()
    return checked


async def start_nodes(layout, names, url: str) -> list[LedgerNode]:
    """One validator node per name, each with its own store and broker connection."""
    nodes = []
    for n in names:
        bus = BusClient(url, client_id=f"test-{n}")
        await bus.connect()
        vals = await Validators.start(layout, bus, "demo", names=[n], autoproduce=True,
                                      block_interval_s=0.2)
        nodes += vals.nodes
    return nodes


async def submit_readings(bus: BusClient, layout, names, rounds: int, site: str) -> None:
    """Each validator's meter certifies one interval per round (different |P - C|)."""
    t = time.time()
    for r in range(rounds):
        for i, n in enumerate(names):
            k = layout.key(n)
            msg = messages.sign(k, T.READING, {
                "meter": k.address, "start": int(t) - 3600 + 60 * r, "duration_s": 60,
                "production_kwh": round(0.2 + 0.15 * ((i + r) % 3), 3),
                "consumption_kwh": 0.4}, at=time.time())
            await bus.publish(topics.ledger_tx(site), msg.raw, qos=1)
        await asyncio.sleep(0.3)


async def test_nodes_over_embedded_broker_commit_poe_elected_blocks(tmp_path):
    site = load_site("demo")
    layout = init_ledger(site, tmp_path / "ledger", params=Params(round_timeout_s=1.5))
    names = layout.validators()
    g = layout.genesis()
    async with EmbeddedBroker() as broker:
        nodes = await start_nodes(layout, names, broker.url)
        async with BusClient(broker.url) as client:
            await submit_readings(client, layout, names, 5, "demo")
            # a forged transaction and a replay: refused, the rest goes on
            k = layout.key(names[0])
            good = messages.sign(layout.key("aggregator"), T.PAYMENT, {
                "to": k.address, "amount": 1234, "award": None, "memo": "test"},
                at=time.time())
            forged = canonical.decode(good.raw)
            forged["parameters"]["amount"] = 999999
            await client.publish(topics.ledger_tx("demo"), canonical.encode(forged))
            await client.publish(topics.ledger_tx("demo"), good.raw)
            await client.publish(topics.ledger_tx("demo"), b"{not json")
            await asyncio.sleep(0.5)
            await client.publish(topics.ledger_tx("demo"), good.raw)  # replay
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            heads = {n.chain.state.head for n in nodes}
            if len(heads) == 1 and not any(n.mempool for n in nodes) and nodes[0].chain.height:
                break
            await asyncio.sleep(0.1)
        for n in nodes:
            await n.stop()
            await n.bus.close()
    heads = {(n.chain.height, n.chain.state.head) for n in nodes}
    assert len(heads) == 1, heads
    assert nodes[0].chain.height >= 3
    for n in nodes:
        assert n.chain.state.balance(k.address) == 1234
        text = "\n".join(n.stats.rejected)
        assert "bad-signature" in text and "malformed" in text and "replay" in text, text
        n.chain.store.close()
    db = layout.db_path(names[0])
    assert independent_election_check(db) == nodes[0].chain.height
    assert verify_store(db, genesis=g).ok


def _node_proc(folder: Path, name: str, url: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "testbed", "ledger", "node", str(folder), name, "--bus", url,
         "--site", "demo", "--block-interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _heads(layout, names) -> dict[str, tuple[int, str]]:
    out = {}
    for n in names:
        s = Store(layout.db_path(n), readonly=True)
        h = s.height()
        out[n] = (h, s.block(h).hash)
        s.close()
    return out


@pytest.mark.skipif(not HAVE_MOSQUITTO, reason="mosquitto is not installed (apt-get install "
                    "mosquitto)")
async def test_killed_node_restarts_and_catches_up_over_mosquitto(tmp_path):
    site = load_site("demo")
    layout = init_ledger(site, tmp_path / "ledger", params=Params(round_timeout_s=1.5))
    names = layout.validators()
    async with MosquittoBroker() as broker:
        procs = {n: _node_proc(layout.root, n, broker.url) for n in names}
        try:
            await asyncio.sleep(2.0)  # interpreters start
            async with BusClient(broker.url) as client:
                await submit_readings(client, layout, names, 3, "demo")
                await asyncio.sleep(1.0)
                victim = names[1]
                procs[victim].send_signal(signal.SIGKILL)
                procs[victim].wait()
                # the others go on without it (2 of 3 is not > 2/3: blocks wait) ...
                await submit_readings(client, layout, names[:1], 2, "demo")
                procs[victim] = _node_proc(layout.root, victim, broker.url)
                await asyncio.sleep(2.0)
                await submit_readings(client, layout, names, 2, "demo")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                heads = _heads(layout, names)
                if len(set(heads.values())) == 1 and heads[names[0]][0] >= 3:
                    break
                await asyncio.sleep(0.3)
        finally:
            stop_processes(procs.values())
    heads = _heads(layout, names)
    assert len(set(heads.values())) == 1, heads
    for n in names:
        assert verify_store(layout.db_path(n), genesis=layout.genesis()).ok
    assert independent_election_check(layout.db_path(names[1])) == heads[names[1]][0]


async def test_a_silent_proposer_is_replaced_by_the_next_in_cpf_order(tmp_path):
    """Four validators, one never starts: heights it would propose commit in round 1."""
    base = load_site("demo").model_dump()
    extra = {**base["prosumers"][0], "name": "house-4",
             "devices": [{**d, "name": f"{d['name']}-4", "port": 0}
                         for d in base["prosumers"][0]["devices"]]}
    site = SiteConfig.model_validate({**base, "prosumers": [*base["prosumers"], extra]})
    layout = init_ledger(site, tmp_path / "ledger", params=Params(round_timeout_s=1.0))
    names = layout.validators()
    silent = names[0]
    async with EmbeddedBroker() as broker:
        nodes = await start_nodes(layout, names[1:], broker.url)
        async with BusClient(broker.url) as client:
            # the silent validator is the most self-balanced: elected first each time
            t = time.time()
            for i, n in enumerate(names):
                k = layout.key(n)
                msg = messages.sign(k, T.READING, {
                    "meter": k.address, "start": int(t) - 120, "duration_s": 60,
                    "production_kwh": 0.5, "consumption_kwh": 0.5 + 0.3 * i}, at=t)
                await client.publish(topics.ledger_tx("demo"), msg.raw)
            deadline = time.monotonic() + 20  # readings commit first (whoever proposes)
            while time.monotonic() < deadline and not all(n.chain.height >= 1 for n in nodes):
                await asyncio.sleep(0.05)
            pay = messages.sign(layout.key("aggregator"), T.PAYMENT, {
                "to": layout.key(names[1]).address, "amount": 5, "award": None, "memo": ""},
                at=time.time())
            await client.publish(topics.ledger_tx("demo"), pay.raw)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(n.chain.height >= 2 for n in nodes):
            await asyncio.sleep(0.1)
        for n in nodes:
            await n.stop()
            await n.bus.close()
    chain = nodes[0].chain
    assert chain.height >= 2
    s = chain.store
    second = Block.parse(s.block(2).raw)
    assert second.round == 1 and second.proposer == layout.key(names[1]).address
    assert chain.state.balance(layout.key(names[1]).address) == 5
    silent_address = layout.key(silent).address
    proposers = {Block.parse(s.block(h).raw).proposer for h in range(1, chain.height + 1)}
    assert silent_address not in proposers
