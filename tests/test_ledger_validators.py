"""The Validators facade (fast-clock production as the run engine uses it) and the durable
consensus record a validator keeps beside its store."""

from __future__ import annotations

import asyncio
import time

from testbed.bus import topics
from testbed.bus.broker import EmbeddedBroker
from testbed.bus.client import BusClient
from testbed.config import load_site
from testbed.ledger import consensus as C
from testbed.ledger import election, messages
from testbed.ledger import transactions as T
from testbed.ledger.chain import Chain
from testbed.ledger.node import FileRecord, proposal_wire
from testbed.ledger.setup import init_ledger
from testbed.ledger.state import Params
from testbed.ledger.validators import Validators, fault_note


def test_fault_note_states_n_and_f_and_warns_below_four():
    assert "f = 1" in fault_note(4) and "3 of 4" in fault_note(4)
    assert "no fault is tolerated" in fault_note(3) and "no fault" not in fault_note(4)


def test_file_record_survives_a_restart_and_ignores_a_torn_line(tmp_path):
    path = tmp_path / "n.db.votes"
    rec = FileRecord(path, 5)
    rec.sign((5, 0, C.PREVOTE), "B1")
    rec.sign((5, 0, C.PRECOMMIT), "B1")
    rec.proof(5, 0, (C.Vote(C.PREVOTE, 5, 0, "B1", "a"), C.Vote(C.PREVOTE, 5, 0, "B1", "b")))
    assert rec._unsynced  # written; the node awaits the fsync before sending (off the loop)
    asyncio.run(rec.sync())
    assert not rec._unsynced
    rec.close()
    with open(path, "ab") as fh:
        fh.write(b'{"k":"s","h":5,"r":1,"s')  # killed mid-write: never sent
    again = FileRecord(path, 5)
    assert again.signed == {(5, 0, C.PREVOTE): "B1", (5, 0, C.PRECOMMIT): "B1"}
    assert [v.sender for v in again.pol[(5, 0)]] == ["a", "b"]
    assert path.read_bytes().endswith(b"\n") and path.read_bytes().count(b"\n") == 3
    sm = C.Tendermint("c", ["a", "b", "c", "d"], 5, lambda r: "a", lambda r: None,
                      record=again)
    assert (sm.locked_round, sm.locked_value) == (0, "B1")
    again.sign((6, 0, C.PREVOTE), "B2")  # after the torn line was cut: readable
    again.forget_below(6)  # height 5 committed: forgotten, the file kept (3 + 1 lines)
    assert again.signed == {(6, 0, C.PREVOTE): "B2"} and again.pol == {}
    again.close()
    assert path.read_bytes().count(b"\n") == 4
    assert FileRecord(path, 6).signed == {(6, 0, C.PREVOTE): "B2"}
    small = FileRecord(path, 6)
    small.COMPACT_LINES = 2
    small.forget_below(7)  # over the bound: the file is rewritten without finished heights
    small.close()
    assert path.read_bytes() == b""
    assert FileRecord(path, 6).signed == {}


async def test_produce_commits_on_the_scenario_schedule_and_reports(tmp_path):
    """Fast-clock production through the facade: nothing is proposed until `produce`, which
    returns the new common height once every wanted transaction is committed everywhere."""
    layout = init_ledger(load_site("demo"), tmp_path / "ledger", validators=4, seed=3,
                         params=Params(round_timeout_s=2.0))
    agg = layout.key("aggregator")
    t0 = time.time()
    async with EmbeddedBroker() as broker, BusClient(broker.url) as bus:
        vals = await Validators.start(layout, bus, "demo", clock=lambda: t0 + 1)
        try:
            assert len(vals.nodes) == 4 and vals.height() == 0
            assert await vals.produce(set(), timeout_s=1.0) is None  # nothing to commit
            ids = set()
            for i in range(3):
                m = messages.sign(agg, T.PAYMENT, {"to": layout.key("house-1").address,
                                                   "amount": 10 + i, "award": None,
                                                   "memo": str(i)}, at=t0)
                ids.add(m.id)
                await vals.submit(m)
            forged = messages.sign(agg, T.PAYMENT, {"to": agg.address, "amount": 1,
                                                    "award": None, "memo": "x"}, at=t0 - 3600)
            ids.add(forged.id)  # stale: refused by the proposer, which produce accounts for
            await vals.submit(forged)
            assert await vals.produce(ids) == 1
            blocks = vals.blocks_since(0)
            assert len(blocks) == 1 and set(blocks[0][1]) == ids - {forged.id}
            # what `produce` waits on: every node knows what it committed, without an index
            # on the stores' transaction ids (none: it was most of a block's write)
            assert all(ids - {forged.id} <= set(n.committed_txs) for n in vals.nodes)
            assert all(n.chain.store.tx_location(t) is not None for n in vals.nodes
                       for t in ids - {forged.id})
            assert not vals.nodes[0].chain.store.db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'txs' "
                "AND sql IS NOT NULL").fetchall()
            assert blocks[0][0].round == 0
            rep = vals.report()
            assert {r["height"] for r in rep.values()} == {1}
            assert all(r["n"] == 4 and r["f"] == 1 for r in rep.values())
        finally:
            await vals.stop()
        assert all(v["ok"] and v["height"] == 1 for v in vals.verify().values())
        # read once the nodes closed them: no SQLite -shm/-wal file is left beside them
        nodes_dir = layout.db_path(vals.nodes[0].name).parent
        assert not [p.name for p in nodes_dir.iterdir() if p.name.endswith(("-wal", "-shm"))]


async def test_an_equivocating_proposer_is_kept_as_evidence_and_one_block_commits(tmp_path):
    """The round-0 proposer signs two different blocks for height 1 and publishes both; the
    three other validators (a quorum of 4) commit exactly one, each keeps the evidence."""
    layout = init_ledger(load_site("demo"), tmp_path / "ledger", validators=4, seed=5,
                         params=Params(round_timeout_s=2.0))
    genesis = layout.genesis()
    chain = Chain(genesis)
    elected = election.proposer(chain.state, 0).address
    names = layout.validators()
    byz = next(n for n in names if layout.key(n).address == elected)
    key, agg = layout.key(byz), layout.key("aggregator")
    now = time.time()
    txs = [messages.sign(agg, T.PAYMENT, {"to": key.address, "amount": a, "award": None,
                                          "memo": "eq"}, at=now) for a in (1, 2)]
    blocks = [chain.propose(key, [tx], time=now).block for tx in txs]
    assert blocks[0].hash != blocks[1].hash
    async with EmbeddedBroker() as broker, BusClient(broker.url) as bus:
        vals = await Validators.start(layout, bus, "demo",
                                      names=[n for n in names if n != byz])
        try:
            for tx in txs:
                await vals.submit(tx)
            for b, tx in zip(blocks, txs, strict=True):
                await bus.publish(topics.block_proposal("demo", 1),
                                  proposal_wire(key, chain.id, 0, -1, b, [tx]))
            deadline = time.monotonic() + 10
            while vals.height() < 1 and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            heads = {n.chain.state.head for n in vals.nodes}
            evidence = [len(n.evidence) for n in vals.nodes]
        finally:
            await vals.stop()
    assert vals.height() == 1 and len(heads) == 1 and heads <= {b.hash for b in blocks}
    assert all(e >= 1 for e in evidence), evidence
    ev = vals.nodes[0].evidence[0]
    assert ev.first.sender == ev.second.sender == elected


async def test_a_batch_of_transactions_is_admitted_as_each_alone(tmp_path):
    """`submit_many` sends a burst as newline-joined batches (`tx_batches`): each node
    admits or refuses every transaction of a batch on its own, in order, with the reason it
    would give it alone; a batch over the bound is refused whole; a block commits them."""
    from testbed.ledger import node as N

    layout = init_ledger(load_site("demo"), tmp_path / "ledger", validators=4, seed=4,
                         params=Params(round_timeout_s=2.0))
    agg = layout.key("aggregator")
    t0 = time.time()

    def pay(i: int, at: float = t0) -> messages.SignedMessage:
        return messages.sign(agg, T.PAYMENT, {"to": layout.key("house-1").address,
                                              "amount": 10 + i, "award": None,
                                              "memo": f"batch {i}"}, at=at)

    good = [pay(i) for i in range(5)]
    stale = pay(99, at=t0 - 3600)
    forged = messages.SignedMessage(agg.address, "forged", good[0].date, T.PAYMENT,
                                    {**good[0].parameters, "amount": 1}, good[0].signature)
    burst = [good[0], stale, good[1], forged, good[2], good[1], good[3], good[4]]
    assert len(N.tx_batches(burst)) == 1 and N.tx_batches(burst)[0].count(b"\n") == 7
    many = burst * 600  # 4,800 envelopes, ~2 MB: cut by size and count, order kept
    batches = N.tx_batches(many)
    assert len(batches) > 1 and b"\n".join(batches) == b"\n".join(m.raw for m in many)
    assert all(b.count(b"\n") < N.MAX_TX_BATCH and len(b) <= N.TX_BATCH_BYTES
               for b in batches)
    async with EmbeddedBroker() as broker, BusClient(broker.url) as bus:
        vals = await Validators.start(layout, bus, "demo", clock=lambda: t0 + 1)
        try:
            await vals.submit_many(burst)
            await bus.publish(topics.ledger_tx("demo"),
                              b"\n".join([good[0].raw] * (N.MAX_TX_BATCH + 1)), qos=1)
            assert await vals.produce({m.id for m in good} | {stale.id}) == 1
            for n in vals.nodes:
                assert n.refused[stale.id].startswith("stale:")
                assert n.refused[forged.id].startswith("bad-signature:")
                assert any("batch of 4097" in r for r in n.stats.rejected)
            (block, ids), = vals.blocks_since(0)
            assert ids == [m.id for m in good]  # in the batch's order, the copy ignored
        finally:
            await vals.stop()
