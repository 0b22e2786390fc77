"""Byzantine fault tolerance on a real broker: 4 validator processes over Mosquitto with the
elected proposer SIGKILLed right after it proposes, and forged traffic against nodes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ledger_net import stop_processes

from testbed.bus import topics
from testbed.bus.broker import MosquittoBroker, find_mosquitto
from testbed.bus.client import BusClient
from testbed.config import load_site
from testbed.ledger import canonical, messages
from testbed.ledger import transactions as T
from testbed.ledger.blocks import Block
from testbed.ledger.chain import verify_store
from testbed.ledger.identity import KeyPair
from testbed.ledger.setup import LedgerLayout, init_ledger
from testbed.ledger.state import Params
from testbed.ledger.store import Store
from testbed.ledger.validators import Validators

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not "
                                     "installed (apt-get install mosquitto)")
ROUND_S = 1.0


def node_proc(folder: Path, name: str, url: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.Popen(
        [sys.executable, "-m", "testbed", "ledger", "node", str(folder), name, "--bus", url,
         "--site", "demo", "--block-interval", "0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def head(layout: LedgerLayout, name: str) -> tuple[int, str]:
    s = Store(layout.db_path(name), readonly=True)
    try:
        h = s.height()
        return h, s.block(h).hash
    finally:
        s.close()


def cert_round(layout: LedgerLayout, name: str, height: int) -> int | None:
    s = Store(layout.db_path(name), readonly=True)
    try:
        b = s.block(height)
        votes = canonical.decode(b.cert)
        return votes[0].get("round")
    finally:
        s.close()


async def wait_for(cond, timeout: float, step: float = 0.05) -> bool:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(step)
    return cond()


def payment(layout: LedgerLayout, to: str, memo: str) -> bytes:
    return messages.sign(layout.key("aggregator"), T.PAYMENT, {
        "to": layout.key(to).address, "amount": 7, "award": None, "memo": memo},
        at=time.time()).raw


@needs_mosquitto
async def test_sigkilled_proposer_costs_at_most_a_round_and_catches_up(tmp_path):
    """3 trials (bench/ledger.py --kill-trials runs 20): each time the proposer that just
    published a proposal is SIGKILLed; the other three commit that height in round 0 or 1
    (under 3 round timeouts), no store holds two blocks at one height, and the killed
    validator, restarted, catches up to the same head."""
    layout = init_ledger(load_site("demo"), tmp_path / "ledger", validators=4,
                         params=Params(round_timeout_s=ROUND_S))
    names = layout.validators()
    assert len(names) == 4
    by_address = {layout.key(n).address: n for n in names}
    async with MosquittoBroker() as broker, BusClient(broker.url) as client:
        hello = await client.subscribe(topics.sync_request("demo"))
        props = await client.subscribe(topics.block_filter("demo", "proposal"))
        procs = {n: node_proc(layout.root, n, broker.url) for n in names}
        try:
            seen: set[str] = set()  # every node asks to sync once it has subscribed
            while seen != set(names):
                seen.add(canonical.decode((await hello.get(timeout=60)).payload)["node"])
            rounds = []
            for trial in range(3):
                before = min(head(layout, n)[0] for n in names)
                await client.publish(topics.ledger_tx("demo"),
                                     payment(layout, names[trial % 4], f"t{trial}"))
                while True:
                    m = await props.get(timeout=30)
                    p = canonical.decode(m.payload)
                    if p["height"] == before + 1:
                        break
                victim = by_address[p["proposer"]]
                procs[victim].send_signal(signal.SIGKILL)
                procs[victim].wait()
                others = [n for n in names if n != victim]
                assert await wait_for(lambda o=others, b=before: all(
                    head(layout, n)[0] > b for n in o), 30), f"trial {trial}: no commit"
                rounds.append(cert_round(layout, others[0], before + 1))
                procs[victim] = node_proc(layout.root, victim, broker.url)
                assert await wait_for(lambda: len({head(layout, n) for n in names}) == 1,
                                      30), f"trial {trial}: {victim} did not catch up"
                props.close()
                props = await client.subscribe(topics.block_filter("demo", "proposal"))
        finally:
            stop_processes(procs.values())
    assert all(r is not None and r <= 1 for r in rounds), rounds
    heads = {head(layout, n) for n in names}
    assert len(heads) == 1, heads
    for n in names:
        rep = verify_store(layout.db_path(n), genesis=layout.genesis())
        assert rep.ok and rep.height >= 3, rep


def forged_traffic(layout: LedgerLayout, chain_id: str, height: int, count: int) -> list:
    """Unsigned, forged and unregistered proposals, votes and sync requests."""
    outsider = KeyPair.from_seed(b"outsider")
    victim = layout.validators()[0]
    vkey = layout.key(victim)
    out = []
    for i in range(count):
        kind = i % 5
        if kind == 0:  # a proposal claiming a far round, unsigned
            body = {"type": "proposal", "chain": chain_id, "height": height, "round": 999,
                    "valid_round": -1, "proposer": vkey.address, "signature": "00" * 64,
                    "block": {"header": {}, "signature": ""}, "txs": []}
            out.append((topics.block_proposal("demo", height), canonical.encode(body)))
        elif kind == 1:  # a proposal in round 0 signed by an outsider
            body = {"type": "proposal", "chain": chain_id, "height": height, "round": 0,
                    "valid_round": -1, "proposer": outsider.address,
                    "signature": outsider.sign(b"x").hex(),
                    "block": {"header": {"i": i}, "signature": ""}, "txs": []}
            out.append((topics.block_proposal("demo", height), canonical.encode(body)))
        elif kind == 2:  # a precommit claiming a registered voter, bad signature
            body = {"type": "precommit", "chain": chain_id, "height": height, "round": 0,
                    "block": f"{i:064x}", "voter": vkey.address, "signature": "11" * 64}
            out.append((topics.block_votes("demo", height), canonical.encode(body)))
        elif kind == 3:  # an unsigned sync request naming a validator
            body = {"node": victim, "from": 1, "address": vkey.address, "time": time.time(),
                    "signature": f"{i:0128x}"}
            out.append((topics.sync_request("demo"), canonical.encode(body)))
        else:  # garbage
            out.append((topics.block_votes("demo", height), b"{\"not\": json" + bytes([i % 256])))
    return out


@needs_mosquitto
async def test_forged_messages_and_a_flood_delay_no_commit(tmp_path):
    """A forged proposal for round 999, forged votes, unsigned sync requests and garbage,
    once and then as a flood of 3,000 while transactions flow: every height still commits
    in round 0 (no round timeout lost), nobody answers a forged sync request, and every
    refusal is counted."""
    layout = init_ledger(load_site("demo"), tmp_path / "ledger", validators=4,
                         params=Params(round_timeout_s=ROUND_S))
    names = layout.validators()
    async with MosquittoBroker() as broker, BusClient(broker.url) as bus, \
            BusClient(broker.url) as attacker:
        vals = await Validators.start(layout, bus, "demo", autoproduce=True,
                                      block_interval_s=0.05)
        responses = await attacker.subscribe(
            topics.sync_request("demo").rsplit("/", 1)[0] + "/+/response")
        try:
            chain_id = vals.nodes[0].chain.id
            single = forged_traffic(layout, chain_id, 1, 5)
            await attacker.publish_many(single)
            await vals.submit(messages.parse(payment(layout, names[1], "first")))
            assert await wait_for(lambda: vals.height() >= 1, 20), vals.report()
            flood = forged_traffic(layout, chain_id, vals.height() + 1, 3000)
            flooding = asyncio.create_task(attacker.publish_many(flood, window=200))
            for k in range(5):
                await vals.submit(messages.parse(payment(layout, names[k % 4], f"f{k}")))
                target = vals.height() + 1
                assert await wait_for(lambda t=target: vals.height() >= t, 20), k
            await flooding
            await asyncio.sleep(0.5)
            await vals.submit(messages.parse(payment(layout, names[2], "after")))
            target = vals.height() + 1
            assert await wait_for(lambda: vals.height() >= target, 20)
            report = vals.report()
            rounds = {h: r for n in vals.nodes for h, r in n.stats.rounds.items()}
        finally:
            await vals.stop()
        assert rounds and set(rounds.values()) == {0}, rounds
        # 600 forged sync requests: none answered (a lagging node's own may be)
        assert responses.pending() < 10
        assert all(r["rejected"] >= 600 for r in report.values()), report
        assert all(r["n"] == 4 and r["f"] == 1 for r in report.values())
        heads = {head(layout, n) for n in names}
        assert len(heads) == 1
        for n in names:
            assert verify_store(layout.db_path(n), genesis=layout.genesis()).ok
        top = head(layout, names[0])[0]
        s = Store(layout.db_path(names[0]), readonly=True)
        proposers = {Block.parse(s.block(h).raw).proposer for h in range(1, top + 1)}
        s.close()
        assert proposers
