"""Ledger benchmark: committed signed transactions per second, and block commit latency.

Run:  python bench/ledger.py [--txs N] [--block B] [--validators 4,16,64] [--quick]
                             [--broker mosquitto|embedded] [--json PATH]
                             [--e2e-txs N] [--kill-trials K] [--flood N] [--only-network]
                             [--stall-txs N] [--stall-bursts K] [--only-stall]

1. Ceiling: raw Ed25519 verifications per second (cryptography/OpenSSL), one core, in
   this run. Every committed transaction costs at least one verification per node.
   Whether `verify` releases the GIL (two threads vs one) and the rate of the batch
   verifier the ledger uses (`identity.BatchVerifier`: the caller plus forked workers,
   one per further core) are measured alongside.
2. Throughput with full checks, one validator's work: N pre-signed transactions (payments
   and certified meter readings from registered keys; signing is the clients' work and is
   done before the clock starts) go through what a node does to each: strict parse of the
   canonical bytes, shape check, signature verification, freshness (stale/replay) check,
   then blocks of B transactions are proposed (every rule applied), checked with a 4-vote
   commit certificate (4 signature checks per block) and committed to the SQLite (WAL)
   store. Mempool admission checks each block's worth of arrivals as one batch on every
   core (`Chain.admit_start`): queued on the worker while the previous block is applied;
   collecting takes back and checks in this process whatever the worker has not started
   (work sharing: neither process waits while the other has checks left). Figure: committed tx/s, and its ratio to the raw verify rate
   of one core (the ratio exceeds 1 only by using more than one core).
   Every validator does this same work on its own machine, so this is the network's rate;
   `--inproc-validators V` also runs V full validators in this one process (V times the
   work on these 2 cores) for comparison.
3. Commit latency for 4, 16 and 64 validators, each a `LedgerNode` with its own store and
   MQTT connection to a real broker (Mosquitto when installed, else embedded amqtt), all in
   this one process: time from the proposer publishing a block to the last node
   committing it (proposal check + one signed vote per validator + certificate), median
   and p90 over blocks of 50 transactions. All nodes share two cores, so this is an upper
   bound of what separate hosts would see.

4. End to end: 4 validator processes (`testbed ledger node`) over Mosquitto, each with its
   own store and vote record; a client publishes N pre-signed payments as fast as the broker
   takes them; figure: committed tx/s = N / (time until every store holds all N).
5. Crash of the proposer (`--kill-trials K`, 20 for the issue's figure): the elected proposer
   is SIGKILLed right after it publishes its proposal; per trial, the time until the other
   three commit that height, the round it committed in (0: the proposal still won; 1: the
   next proposer's), and the time the restarted process needs to catch up to the same head.
6. Forged flood (`--flood N`): N forged proposals (round 999), votes and sync requests
   published as fast as possible while transactions flow; figure: the worst commit delay of
   a transaction compared with the same run without the flood.

7. Event loop (`--stall-txs N`, default 1000; `--only-stall` for this figure alone): 4
   validators in this process on one bus connection, as in a real-time run, take bursts
   of N transactions (a market interval's bids, awards, readings and payments at ~1,000
   devices) and commit each in one block; a 1 ms ticker records how late it wakes: the
   longest stretch a callback held the loop (the run's ticks must stay < 10 ms late).
   With its CPU per committed transaction and per block, everything in this process (the
   4 nodes, their bus client; the broker too when embedded): `--only-stall --stall-txs 96
   --stall-bursts 40 --broker embedded` is the fast 24 h run's ledger work (96 blocks of
   ~96 transactions, sent as the run's ledger phase sends them: batches; one message per
   transaction with `--stall-one-by-one`).

Output: rich tables and, as the last line, one JSON object (also written to --json PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.bus import topics  # noqa: E402
from testbed.bus.broker import EmbeddedBroker, MosquittoBroker, find_mosquitto  # noqa: E402
from testbed.bus.client import BusClient  # noqa: E402
from testbed.ledger import election, messages  # noqa: E402
from testbed.ledger import transactions as T  # noqa: E402
from testbed.ledger.blocks import Block, Vote, encode_certificate  # noqa: E402
from testbed.ledger.chain import Chain, make_genesis  # noqa: E402
from testbed.ledger.identity import KeyPair, batch_verifier, signature_cache  # noqa: E402
from testbed.ledger.messages import Freshness  # noqa: E402
from testbed.ledger.setup import LedgerLayout  # noqa: E402
from testbed.ledger.state import MICRO, Params  # noqa: E402
from testbed.ledger.store import Store  # noqa: E402
from testbed.ledger.validators import Validators  # noqa: E402

console = Console(stderr=True)
TARGET_TPS = 10_000


def raw_verify_rate(n: int) -> float:
    k = KeyPair.generate()
    pub = k.private.public_key()
    data = os.urandom(300)
    sig = k.sign(data)
    t = time.perf_counter()
    for _ in range(n):
        pub.verify(sig, data)
    return n / (time.perf_counter() - t)


def verify_parallelism(n: int) -> dict:
    """Does cryptography's Ed25519 verify release the GIL? Two threads against one, and
    the batch verifier (processes) against one core, on the same signatures."""
    from concurrent.futures import ThreadPoolExecutor

    from testbed.ledger.identity import batch_verifier, signature_cache, verify_many
    cache = signature_cache()  # cleared before each figure: it measures checks, not hits
    k = KeyPair.generate()
    items = []
    for _ in range(n):
        data = os.urandom(300)
        items.append((k.public, k.sign(data), data))
    cache.clear()
    t = time.perf_counter()
    verify_many(items)
    one = n / (time.perf_counter() - t)
    half = n // 2
    with ThreadPoolExecutor(2) as ex:
        cache.clear()
        t = time.perf_counter()
        list(ex.map(verify_many, [items[:half], items[half:]]))
        two = n / (time.perf_counter() - t)
    bv = batch_verifier()
    assert all(bv.verify(items[:200]))  # start the pool before the clock
    cache.clear()
    t = time.perf_counter()
    ok = bv.verify(items)
    batch = n / (time.perf_counter() - t)
    assert all(ok)
    return {"one_thread_per_s": one, "two_threads_per_s": two,
            "gil_released": two > 1.3 * one, "batch_per_s": batch,
            "batch_workers": bv.workers}


def worker_cpu_s() -> float:
    """CPU seconds used so far by the batch verifier's worker processes (Linux /proc)."""
    from testbed.ledger.identity import batch_verifier
    total = 0.0
    for pid in [w.proc.pid for w in batch_verifier()._pool]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def make_chain(n_validators: int, store: Path | None):
    admin = KeyPair.from_seed(b"bench-admin")
    agg = KeyPair.from_seed(b"bench-aggregator")
    vals = [KeyPair.from_seed(f"bench-v{i}".encode()) for i in range(n_validators)]
    reg = [T.entry_dict("aggregator", agg.public, roles=["aggregator"])]
    reg += [T.entry_dict(f"house-{i}", k.public, roles=["validator", "meter"])
            for i, k in enumerate(vals)]
    t0 = time.time() - 10
    g = make_genesis(admin, reg, allocations={agg.address: 10**9 * MICRO}, time=t0,
                     params=Params(max_block_txs=100_000))
    chain = Chain.open(store, genesis=g) if store else Chain(g)
    return g, chain, agg, vals


def presign(agg: KeyPair, vals: list[KeyPair], n: int, *, part: int = 0,
            parts: int = 1) -> list[bytes]:
    """n signed transactions; `part` of `parts` takes its own meter intervals (several
    batches for one chain)."""
    now = time.time()
    per_meter = n // 4 // len(vals) + 1
    base = int(now) - 60 * (per_meter * (parts - part) + 2)  # every reading ends in the past
    out = []
    seq = [0] * len(vals)
    for i in range(n):
        if i % 4 == 3:  # a certified reading, one interval further each time per meter
            j = (i // 4) % len(vals)
            k = vals[j]
            start = base + 60 * seq[j]
            seq[j] += 1
            msg = messages.sign(k, T.READING, {"meter": k.address, "start": start,
                                               "duration_s": 60, "production_kwh": 0.1,
                                               "consumption_kwh": 0.12}, at=now)
        else:
            msg = messages.sign(agg, T.PAYMENT, {"to": vals[i % len(vals)].address,
                                                 "amount": 1 + i % 1000, "award": None,
                                                 "memo": f"bench {i}"}, at=now)
        out.append(msg.raw)
    return out


def throughput(n_txs: int, block: int, tmp: Path, validators_inproc: int = 1) -> dict:
    g, chain, agg, vals = make_chain(4, tmp / "node0.db")
    extra = [Chain.open(tmp / f"node{i}.db", genesis=g) for i in range(1, validators_inproc)]
    raws = presign(agg, vals, n_txs)
    signature_cache().clear()  # nothing checked before; in-process validators share it
    by_addr = {k.address: k for k in vals}
    fresh = [Freshness(600) for _ in range(validators_inproc)]
    chains = [chain, *extra]

    def arrive(node: int, start: int):
        """A block's worth of arrivals: parsed, freshness-checked, and their signatures
        handed to the worker processes (collected before the block that takes them)."""
        now = time.time()
        msgs = [messages.parse(raw) for raw in raws[start:start + block]]
        for m in msgs:
            fresh[node].check(m, now)
        return msgs, chains[node].admit_start(msgs), now

    t, cpu, wcpu = time.perf_counter(), time.process_time(), worker_cpu_s()
    committed = 0
    pending = [arrive(i, 0) for i in range(len(chains))]
    for start in range(0, len(raws), block):
        batch = []
        for node, (msgs, collect, now) in enumerate(pending):
            refused = [e for e in collect() if e is not None]
            assert not refused, refused[:1]
            for m in msgs:
                fresh[node].remember(m, now)
            if node == 0:
                batch = msgs
        # the next arrivals are verified on the other core while this block is applied
        pending = ([arrive(i, start + block) for i in range(len(chains))]
                   if start + block < len(raws) else [])
        proposer = by_addr[election.proposer(chain.state).address]
        p = chain.propose(proposer, batch, time=time.time())
        assert not p.dropped, p.dropped[:1]
        cert = encode_certificate([Vote.cast(k, chain.id, p.block.height, p.block.hash)
                                   for k in vals])
        for c in chains:
            c.check_proposal(p.block, p.txs)
            c.commit(p.block, p.txs, cert)
        committed += len(p.txs)
    elapsed = time.perf_counter() - t
    cpu, wcpu = time.process_time() - cpu, worker_cpu_s() - wcpu
    for c in [chain, *extra]:
        c.store.close()
    return {"txs": committed, "seconds": elapsed, "tps": committed / elapsed,
            "main_process_cpu_us_per_tx": 1e6 * cpu / committed,
            "worker_cpu_us_per_tx": 1e6 * wcpu / committed,
            # each process on a core of its own (an idle 2-core machine): the busier one
            # sets the pace; a CPU-time projection, not a wall-clock measurement
            "cpu_bound_tps_two_idle_cores": committed / max(cpu, wcpu, 1e-9),
            "blocks": chain.height, "validators_in_process": validators_inproc}


async def commit_latency(n_validators: int, blocks: int, broker_kind: str, tmp: Path) -> dict:
    facades: list[Validators] = []

    layout, agg, vals = bench_layout(tmp / f"layout{n_validators}", n_validators)
    use_mosquitto = broker_kind == "mosquitto" and find_mosquitto() is not None
    broker = MosquittoBroker() if use_mosquitto else EmbeddedBroker()
    async with broker:
        nodes = []
        buses = []
        for name in layout.validators():
            bus = BusClient(broker.url, client_id=f"bench-{n_validators}-{name}")
            await bus.connect()
            buses.append(bus)
            v = await Validators.start(layout, bus, "bench", names=[name], autoproduce=True,
                                       block_interval_s=0.05)
            nodes += v.nodes
            facades.append(v)
        client = BusClient(broker.url)
        await client.connect()
        for b in range(blocks):
            now = time.time()
            batch = [(topics.ledger_tx("bench"), messages.sign(
                agg, T.PAYMENT, {"to": vals[j % len(vals)].address, "amount": 1,
                                 "award": None, "memo": f"{b}-{j}"}, at=now).raw)
                for j in range(50)]
            await client.publish_many(batch)
            deadline = time.monotonic() + 120
            while any(n.mempool for n in nodes) or len({n.chain.height for n in nodes}) > 1:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{n_validators} validators: batch {b} did not "
                                       "commit within 120 s")
                await asyncio.sleep(0.005)
        by_key = {n.key.address: n for n in nodes}
        store = nodes[0].chain.store
        lat, sizes = [], []
        for h in range(1, nodes[0].chain.height + 1):
            blk = Block.parse(store.block(h).raw)
            proposed = by_key[blk.proposer].stats.proposal_at[h]
            lat.append(max(n.stats.commit_at[h] for n in nodes) - proposed)
            sizes.append(blk.header["txs"])
        await client.close()
        for v in facades:
            await v.stop()
        for bus in buses:
            await bus.close()
    lat.sort()
    return {"validators": n_validators, "blocks": len(lat), "txs_per_block": statistics.mean(sizes),
            "broker": "mosquitto" if use_mosquitto else "embedded-amqtt",
            "median_ms": 1000 * statistics.median(lat),
            "p90_ms": 1000 * lat[min(len(lat) - 1, int(0.9 * len(lat)))]}


async def loop_stall(n_txs: int, broker_kind: str, tmp: Path, bursts: int = 3,
                     one_by_one: bool = False) -> dict:
    """The event loop while 4 in-process validators take a market interval's burst (as in
    a real-time run: one bus connection, one loop, blocks produced on demand): a ticker
    sleeps 1 ms at a time and records how late it wakes, i.e. the longest stretch any
    callback held the loop. Per burst: n_txs signed transactions submitted through the
    facade, then one block produced and committed by every node."""
    layout, agg, vals = bench_layout(tmp / "stall", 4)
    use_mosquitto = broker_kind == "mosquitto" and find_mosquitto() is not None
    broker = MosquittoBroker() if use_mosquitto else EmbeddedBroker()
    lates: list[float] = []
    busy: list[float] = []
    """Per tick: wall lateness, and the loop thread's CPU time between two ticks (what
    other callbacks held it for, not inflated when a loaded machine preempts it)."""
    async with broker:
        bus = BusClient(broker.url, client_id="bench-stall")
        await bus.connect()
        v = await Validators.start(layout, bus, "bench", autoproduce=False)
        loop = asyncio.get_running_loop()
        ticking = True

        async def ticker() -> None:
            while ticking:
                t, c = loop.time(), time.thread_time()
                await asyncio.sleep(0.001)
                lates.append(loop.time() - t - 0.001)
                busy.append(time.thread_time() - c)

        signed = [[messages.parse(r) for r in presign(agg, vals, n_txs, part=b, parts=bursts)]
                  for b in range(bursts)]  # the clients' work, before the clock
        signature_cache().clear()
        gc.collect()
        gc.freeze()  # as the run engine does after its set-up: full collections stay short
        cpu, t0 = time.process_time(), time.perf_counter()
        tick = asyncio.create_task(ticker())
        committed = 0
        for b, msgs in enumerate(signed):
            before = v.height()
            if one_by_one:
                for m in msgs:
                    await v.submit(m)
            else:  # as the run's ledger phase sends its queue: batches (`submit_many`)
                await v.submit_many(msgs)
            height = await v.produce({m.id for m in msgs}, timeout_s=120)
            if height is None:
                raise RuntimeError(f"burst {b}: no block within 120 s")
            committed += sum(len(txs) for _, txs in v.blocks_since(before))
        ticking = False
        await tick
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu
        gc.unfreeze()
        await v.stop()
        await bus.close()
    lates.sort()
    busy.sort()

    def p99(xs: list[float]) -> float:
        return 1000 * xs[min(len(xs) - 1, int(0.99 * len(xs)))]

    return {"txs_per_burst": n_txs, "bursts": bursts, "committed": committed,
            "broker": "mosquitto" if use_mosquitto else "embedded-amqtt",
            "ticks": len(lates), "max_stall_ms": 1000 * lates[-1], "p99_late_ms": p99(lates),
            "max_stall_cpu_ms": 1000 * busy[-1], "p99_stall_cpu_ms": p99(busy),
            "loadavg": os.getloadavg()[0],
            "one_by_one": one_by_one,
            "wall_s": wall, "cpu_us_per_tx": 1e6 * cpu / max(committed, 1),
            "cpu_ms_per_block": 1e3 * cpu / bursts}


def bench_layout(root: Path, n_validators: int,
                 params: Params | None = None) -> tuple[LedgerLayout, KeyPair, list[KeyPair]]:
    """A `testbed ledger init`-style folder for the bench chain (keys, genesis, stores), so
    nodes start through the `Validators` facade like everywhere else."""
    admin = KeyPair.from_seed(b"bench-admin")
    agg = KeyPair.from_seed(b"bench-aggregator")
    vals = [KeyPair.from_seed(f"bench-v{i}".encode()) for i in range(n_validators)]
    reg = [T.entry_dict("aggregator", agg.public, roles=["aggregator"])]
    reg += [T.entry_dict(f"house-{i}", k.public, roles=["validator", "meter"])
            for i, k in enumerate(vals)]
    g = make_genesis(admin, reg, allocations={agg.address: 10**9 * MICRO},
                     time=time.time() - 10,
                     params=params or Params(max_block_txs=100_000, round_timeout_s=1.0))
    layout = LedgerLayout(root)
    root.mkdir(parents=True, exist_ok=True)
    layout.genesis_path.write_bytes(g.raw + b"\n")
    agg.save(layout.key_path("aggregator"))
    for i, k in enumerate(vals):
        k.save(layout.key_path(f"house-{i}"))
        Chain.open(layout.db_path(f"house-{i}"), genesis=g).store.close()
    return layout, agg, vals


def _proc(layout: LedgerLayout, name: str, url: str, interval: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.Popen(
        [sys.executable, "-m", "testbed", "ledger", "node", str(layout.root), name, "--bus", url,
         "--site", "bench", "--block-interval", str(interval)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def _count(layout: LedgerLayout, name: str) -> tuple[int, int, str]:
    """(transactions, height, head hash) of one store, read-only."""
    s = Store(layout.db_path(name), readonly=True)
    try:
        n = s.db.execute("SELECT COUNT(*) FROM txs").fetchone()[0]
        h = s.height()
        return n, h, s.block(h).hash
    finally:
        s.close()


def _stop_all(procs: dict[str, subprocess.Popen]) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs.values():
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


async def _wait(cond, limit: float) -> float | None:  # noqa: ASYNC109
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        if cond():
            return time.perf_counter() - t0
        await asyncio.sleep(0.02)
    return None


async def _all_up(hello, names: list[str], limit: float = 120.0) -> None:  # noqa: ASYNC109
    """Wait until every node has subscribed: each publishes a sync request once it has."""
    from testbed.ledger import canonical

    seen: set[str] = set()
    deadline = time.monotonic() + limit
    while seen != set(names):
        m = await hello.get(timeout=max(0.1, deadline - time.monotonic()))
        seen.add(canonical.decode(m.payload).get("node"))


async def end_to_end(n_txs: int, tmp: Path, kill_trials: int, flood: int) -> dict:
    """4 validator processes over Mosquitto: committed tx/s, proposer kills, forged flood."""
    from testbed.ledger import canonical

    layout, agg, vals = bench_layout(tmp / "e2e", 4)
    names = layout.validators()
    out: dict = {"validators": 4, "processes": 4, "broker": "mosquitto"}
    async with MosquittoBroker() as broker, BusClient(broker.url) as client:
        hello = await client.subscribe(topics.sync_request("bench"))
        procs = {n: _proc(layout, n, broker.url, 0.05) for n in names}
        try:
            await _all_up(hello, names)
            now = time.time()
            raws = [(topics.ledger_tx("bench"), messages.sign(
                agg, T.PAYMENT, {"to": vals[i % 4].address, "amount": 1, "award": None,
                                 "memo": f"e2e {i}"}, at=now).raw) for i in range(n_txs)]
            t0 = time.perf_counter()
            await client.publish_many(raws, window=500)
            published = time.perf_counter() - t0
            done = await _wait(lambda: all(_count(layout, n)[0] >= n_txs for n in names),
                               300)
            out.update({"txs": n_txs, "publish_s": published,
                        "seconds": None if done is None else published + done,
                        "tps": None if done is None else n_txs / (published + done),
                        "blocks": _count(layout, names[0])[1]})
            # proposer crashes
            kills = []
            props = await client.subscribe(topics.block_filter("bench", "proposal"))
            by_addr = {layout.key(n).address: n for n in names}
            for trial in range(kill_trials):
                before = min(_count(layout, n)[1] for n in names)
                m = messages.sign(agg, T.PAYMENT, {"to": vals[0].address, "amount": 2,
                                                   "award": None, "memo": f"kill {trial}"},
                                  at=time.time())
                await client.publish(topics.ledger_tx("bench"), m.raw)
                while True:
                    p = canonical.decode((await props.get(timeout=60)).payload)
                    if p["height"] == before + 1:
                        break
                victim = by_addr[p["proposer"]]
                procs[victim].send_signal(signal.SIGKILL)
                procs[victim].wait()
                others = [n for n in names if n != victim]
                commit = await _wait(lambda o=others, b=before: all(
                    _count(layout, n)[1] > b for n in o), 60)
                s = Store(layout.db_path(others[0]), readonly=True)
                rnd = canonical.decode(s.block(before + 1).cert)[0].get("round")
                s.close()
                procs[victim] = _proc(layout, victim, broker.url, 0.05)
                catch = await _wait(lambda: len({_count(layout, n)[1:] for n in names}) == 1,
                                    60)
                kills.append({"commit_s": commit, "round": rnd, "catch_up_s": catch})
                props.close()
                props = await client.subscribe(topics.block_filter("bench", "proposal"))
            out["kills"] = kills
            if flood:
                out["flood"] = await _flood(layout, client, agg, vals, names, flood)
        finally:
            _stop_all(procs)
    heads = {_count(layout, n)[1:] for n in names}
    out["same_head"] = len(heads) == 1
    return out


async def _flood(layout, client, agg, vals, names, count: int) -> dict:
    """Commit delays of payments published every 0.25 s, without and with a forged flood."""
    from testbed.ledger import canonical

    chain_id = Block.parse(layout.genesis_path.read_bytes().strip(), genesis=True).hash

    async def delays(k: int) -> list[float]:
        got = []
        for i in range(k):
            before = _count(layout, names[0])[0]
            m = messages.sign(agg, T.PAYMENT, {"to": vals[1].address, "amount": 3,
                                               "award": None, "memo": f"fl {time.time()} {i}"},
                              at=time.time())
            await client.publish(topics.ledger_tx("bench"), m.raw)
            d = await _wait(lambda b=before: all(_count(layout, n)[0] > b for n in names), 30)
            got.append(d if d is not None else float("inf"))
            await asyncio.sleep(0.25)
        return got

    base = await delays(8)
    height = _count(layout, names[0])[1] + 1
    forged = []
    v0 = layout.key(names[0])
    for i in range(count):
        kind = i % 3
        if kind == 0:
            body = {"type": "proposal", "chain": chain_id, "height": height + i % 3,
                    "round": 999, "valid_round": -1, "proposer": v0.address,
                    "signature": "00" * 64, "block": {"header": {}, "signature": ""}, "txs": []}
            forged.append((topics.block_proposal("bench", height), canonical.encode(body)))
        elif kind == 1:
            body = {"type": "precommit", "chain": chain_id, "height": height, "round": 0,
                    "block": f"{i:064x}", "voter": v0.address, "signature": "11" * 64}
            forged.append((topics.block_votes("bench", height), canonical.encode(body)))
        else:
            body = {"node": names[0], "from": 1, "address": v0.address, "time": time.time(),
                    "signature": f"{i:0128x}"}
            forged.append((topics.sync_request("bench"), canonical.encode(body)))
    t0 = time.perf_counter()
    task = asyncio.create_task(client.publish_many(forged, window=500))
    under = await delays(8)
    await task
    return {"forged": count, "flood_publish_s": time.perf_counter() - t0,
            "commit_delay_ms_without": [round(1000 * d, 1) for d in base],
            "commit_delay_ms_with": [round(1000 * d, 1) for d in under],
            "worst_extra_ms": round(1000 * (max(under) - max(base)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--txs", type=int, default=50_000)
    ap.add_argument("--block", type=int, default=1000)
    ap.add_argument("--validators", default="4,16,64")
    ap.add_argument("--latency-blocks", type=int, default=10)
    ap.add_argument("--inproc-validators", type=int, default=4)
    ap.add_argument("--broker", choices=("mosquitto", "embedded"), default="mosquitto")
    ap.add_argument("--e2e-txs", type=int, default=20_000,
                    help="transactions for the 4-process end-to-end figure (0: skip)")
    ap.add_argument("--kill-trials", type=int, default=None, help="default 20 (--quick: 3)")
    ap.add_argument("--flood", type=int, default=None, help="default 20000 (--quick: 3000)")
    ap.add_argument("--only-network", action="store_true",
                    help="only the 4-process end-to-end part (4-6)")
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--stall-txs", type=int, default=1000,
                    help="burst size for the event-loop stall figure (0: skip it)")
    ap.add_argument("--stall-bursts", type=int, default=3,
                    help="bursts (one block each) for the event-loop stall figure")
    ap.add_argument("--stall-one-by-one", action="store_true",
                    help="submit each transaction as its own bus message (before this "
                         "wave's batches)")
    ap.add_argument("--only-stall", action="store_true",
                    help="only the event-loop stall figure")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    if args.quick:
        args.txs, args.validators, args.latency_blocks = 4000, "4", 3
        args.e2e_txs = 3000
    if args.kill_trials is None:
        args.kill_trials = 3 if args.quick else 20
    if args.flood is None:
        args.flood = 3000 if args.quick else 20_000
    logging.basicConfig(level=logging.ERROR)
    figures: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "loadavg_at_start": os.getloadavg()}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.stall_txs and (args.only_stall or not args.only_network):
            console.print(f"event loop during {args.stall_txs}-tx bursts, 4 validators in "
                          "this process …")
            figures["loop_stall"] = asyncio.run(loop_stall(
                args.stall_txs, args.broker, tmp, bursts=args.stall_bursts,
                one_by_one=args.stall_one_by_one))
            st = figures["loop_stall"]
            Console().print(f"event loop, {st['txs_per_burst']}-tx bursts x {st['bursts']} "
                            f"to 4 in-process validators ({st['broker']}): loop held "
                            f"at most {st['max_stall_cpu_ms']:.1f} ms CPU between 1 ms "
                            f"ticks (p99 {st['p99_stall_cpu_ms']:.1f}); tick lateness max "
                            f"{st['max_stall_ms']:.1f} ms, p99 {st['p99_late_ms']:.1f} ms "
                            f"(wall, load {st['loadavg']:.1f}); {st['cpu_us_per_tx']:.0f} µs "
                            f"CPU per committed tx, {st['cpu_ms_per_block']:.1f} ms per block")
        if args.only_stall:
            print(json.dumps(figures, separators=(",", ":")), flush=True)
            return
        if not args.only_network:
            console.print("raw Ed25519 verify rate …")
            figures["raw_verify_per_s"] = raw_verify_rate(20_000 if not args.quick else 5000)
            figures["verify_parallel"] = verify_parallelism(20_000 if not args.quick else 6000)
            console.print(f"committed tx/s with full checks ({args.txs} txs, blocks of "
                          f"{args.block}) …")
            tp = throughput(args.txs, args.block, tmp)
            tp["ratio_to_raw_verify"] = tp["tps"] / figures["raw_verify_per_s"]
            figures["throughput"] = tp
            # the same work with every signature checked in this one process (A/B, same run)
            bv = batch_verifier()
            workers, bv.workers = bv.workers, 0
            (tmp / "inline").mkdir()
            figures["throughput_one_process"] = throughput(args.txs, args.block, tmp / "inline")
            bv.workers = workers
            if args.inproc_validators > 1:
                (tmp / "inproc").mkdir()
                n = max(2000, args.txs // 5)
                figures["throughput_inproc"] = throughput(n, args.block, tmp / "inproc",
                                                          args.inproc_validators)
            figures["latency"] = []
            for v in [int(x) for x in args.validators.split(",") if x]:
                console.print(f"commit latency, {v} validators over {args.broker} …")
                (tmp / f"v{v}").mkdir()
                blocks = args.latency_blocks if v <= 16 else max(3, args.latency_blocks // 2)
                figures["latency"].append(asyncio.run(commit_latency(v, blocks,
                                                                     args.broker, tmp / f"v{v}")))
        if args.e2e_txs and find_mosquitto() is not None:
            console.print(f"end to end: 4 validator processes over Mosquitto, {args.e2e_txs} txs, "
                          f"{args.kill_trials} proposer kills, flood of {args.flood} …")
            figures["end_to_end"] = asyncio.run(end_to_end(args.e2e_txs, tmp, args.kill_trials,
                                                           args.flood))
    if not args.only_network:
        t = Table(title="ledger throughput (one validator's work per transaction)")
        for col in ("figure", "value", "target"):
            t.add_column(col)
        t.add_row("raw Ed25519 verify /s, one core", f"{figures['raw_verify_per_s']:,.0f}", "")
        vp = figures["verify_parallel"]
        t.add_row("  two threads /s (GIL released?)", f"{vp['two_threads_per_s']:,.0f}",
                  "faster: GIL released" if vp["gil_released"] else "not faster")
        t.add_row(f"  batch verifier /s ({vp['batch_workers']} worker process(es) + caller)",
                  f"{vp['batch_per_s']:,.0f}", "")
        t.add_row("committed signed tx/s, full checks", f"{tp['tps']:,.0f}",
                  f">= {TARGET_TPS:,} {'ok' if tp['tps'] >= TARGET_TPS else 'MISSED'}")
        t.add_row("ratio to raw verify (one core)", f"{tp['ratio_to_raw_verify']:.2f}", "")
        t.add_row("  same, signatures checked in this process only",
                  f"{figures['throughput_one_process']['tps']:,.0f}", "(A/B in this run)")
        t.add_row("CPU per tx: main process / verify worker",
                  f"{tp['main_process_cpu_us_per_tx']:.0f} / "
                  f"{tp['worker_cpu_us_per_tx']:.0f} µs", "")
        t.add_row("tx/s if each had an idle core (CPU-time projection)",
                  f"{tp['cpu_bound_tps_two_idle_cores']:,.0f}", "")
        t.add_row("load average at start (shared machine)",
                  " ".join(f"{x:.1f}" for x in figures["machine"]["loadavg_at_start"]), "")
        if "throughput_inproc" in figures:
            ti = figures["throughput_inproc"]
            t.add_row(f"tx/s with {ti['validators_in_process']} validators in this process",
                      f"{ti['tps']:,.0f}", "(all share 2 cores)")
        Console().print(t)
        lt = Table(title="block commit latency (proposal -> last node committed)")
        for col in ("validators", "broker", "blocks", "tx/block", "median ms", "p90 ms"):
            lt.add_column(col)
        for row in figures["latency"]:
            lt.add_row(str(row["validators"]), row["broker"], str(row["blocks"]),
                       f"{row['txs_per_block']:.0f}", f"{row['median_ms']:.1f}",
                       f"{row['p90_ms']:.1f}")
        Console().print(lt)
    e2e = figures.get("end_to_end")
    if e2e:
        et = Table(title="4 validator processes over Mosquitto")
        et.add_column("figure")
        et.add_column("value")
        et.add_row("committed tx/s end to end",
                   "timed out" if e2e["tps"] is None else f"{e2e['tps']:,.0f} ({e2e['txs']} txs, "
                   f"{e2e['blocks']} blocks)")
        kills = e2e.get("kills", [])
        if kills:
            ok = [k for k in kills if k["commit_s"] is not None]
            et.add_row("proposer SIGKILLed after proposing",
                       f"{len(ok)}/{len(kills)} heights committed; max "
                       f"{max((k['commit_s'] for k in ok), default=0):.2f} s; rounds "
                       f"{sorted({k['round'] for k in kills}, key=str)}; catch-up max "
                       f"{max((k['catch_up_s'] or 0 for k in kills), default=0):.2f} s")
        fl = e2e.get("flood")
        if fl:
            et.add_row(f"forged flood of {fl['forged']:,} ({fl['flood_publish_s']:.1f} s)",
                       f"worst commit delay {max(fl['commit_delay_ms_with']):.0f} ms vs "
                       f"{max(fl['commit_delay_ms_without']):.0f} ms without")
        et.add_row("same head on all nodes", str(e2e["same_head"]))
        Console().print(et)
    print(json.dumps(figures, separators=(",", ":")), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
