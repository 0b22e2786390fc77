"""Ledger benchmark: committed signed transactions per second, and block commit latency.

Run:  python bench/ledger.py [--txs N] [--block B] [--validators 4,16,64] [--quick]
                             [--broker mosquitto|embedded] [--json PATH]

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
   core (`Chain.admit_many`). Figure: committed tx/s, and its ratio to the raw verify rate
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

Output: rich tables and, as the last line, one JSON object (also written to --json PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
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
from testbed.ledger.identity import KeyPair, batch_verifier  # noqa: E402
from testbed.ledger.messages import Freshness  # noqa: E402
from testbed.ledger.node import LedgerNode  # noqa: E402
from testbed.ledger.state import MICRO, Params  # noqa: E402

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

    from testbed.ledger.identity import batch_verifier, verify_many
    k = KeyPair.generate()
    items = []
    for _ in range(n):
        data = os.urandom(300)
        items.append((k.public, k.sign(data), data))
    t = time.perf_counter()
    verify_many(items)
    one = n / (time.perf_counter() - t)
    half = n // 2
    with ThreadPoolExecutor(2) as ex:
        t = time.perf_counter()
        list(ex.map(verify_many, [items[:half], items[half:]]))
        two = n / (time.perf_counter() - t)
    bv = batch_verifier()
    assert all(bv.verify(items[:200]))  # start the pool before the clock
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


def presign(agg: KeyPair, vals: list[KeyPair], n: int) -> list[bytes]:
    now = time.time()
    base = int(now) - 60 * (n // 4 // len(vals) + 2)  # every reading ends in the past
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

    g, _, agg, vals = make_chain(n_validators, None)
    use_mosquitto = broker_kind == "mosquitto" and find_mosquitto() is not None
    broker = MosquittoBroker() if use_mosquitto else EmbeddedBroker()
    async with broker:
        nodes = []
        for i, k in enumerate(vals):
            bus = BusClient(broker.url, client_id=f"bench-{n_validators}-{i}")
            await bus.connect()
            node = LedgerNode(f"v{i}", k, Chain.open(tmp / f"lat{n_validators}-{i}.db",
                                                     genesis=g),
                              bus, "bench", block_interval_s=0.05)
            await node.start()
            nodes.append(node)
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
        for n in nodes:
            await n.stop()
            await n.bus.close()
            n.chain.store.close()
    lat.sort()
    return {"validators": n_validators, "blocks": len(lat), "txs_per_block": statistics.mean(sizes),
            "broker": "mosquitto" if use_mosquitto else "embedded-amqtt",
            "median_ms": 1000 * statistics.median(lat),
            "p90_ms": 1000 * lat[min(len(lat) - 1, int(0.9 * len(lat)))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--txs", type=int, default=50_000)
    ap.add_argument("--block", type=int, default=1000)
    ap.add_argument("--validators", default="4,16,64")
    ap.add_argument("--latency-blocks", type=int, default=10)
    ap.add_argument("--inproc-validators", type=int, default=4)
    ap.add_argument("--broker", choices=("mosquitto", "embedded"), default="mosquitto")
    ap.add_argument("--quick", action="store_true", help="small smoke run (< 20 s)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    if args.quick:
        args.txs, args.validators, args.latency_blocks = 4000, "4", 3
    logging.basicConfig(level=logging.ERROR)
    figures: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "loadavg_at_start": os.getloadavg()}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
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
              f"{tp['main_process_cpu_us_per_tx']:.0f} / {tp['worker_cpu_us_per_tx']:.0f} µs",
              "")
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
    print(json.dumps(figures, separators=(",", ":")), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
