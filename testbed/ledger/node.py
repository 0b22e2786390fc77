"""A ledger validator on the message bus: Tendermint consensus over MQTT.

Each node has its own key, `Chain`, SQLite store and vote record, and talks to others only
through MQTT (topic scheme in `testbed.bus.topics`). The consensus rules live in
`testbed.ledger.consensus` (a pure state machine, also run under a simulated network by
the tests); this module does the I/O around it:

1. Transactions arrive on `ledger/tx`; a node admits one to its mempool after checking
   shape, signature, freshness and replay; refusals are logged as one line.
2. A height starts when a node has transactions (after `block_interval_s`), when `produce`
   is called (a scenario's fast clock), or when a validator's proposal or vote for it
   arrives. The PoE election orders each round's proposer (round r: the r-th in CPF order).
3. Proposals and prevotes/precommits are signed; a validator writes what it signs to its
   record (`<store>.votes`, fsync'd) before publishing it, so a restarted validator never
   signs two different values for one height, round and step. A decision (precommits of
   more than 2/3 of the validators in one round) commits the block with those precommits
   as its certificate; the round's proposer republishes it on `ledger/blocks/committed`.
4. A node that starts, or sees a later height, asks `ledger/sync/request` (signed) for the
   blocks it lacks; peers answer a registered validator's request with bounded batches, at
   most once per `SYNC_INTERVAL_S` per requester, and every block is verified (certificate
   included) before it is applied.

Bounded work per message: each handler checks size, shape, chain, height, round, registered
sender and elected proposer before one signature check, and only then does heavy work
(a proposal's full block check, once per block). Nothing waits on a message's claims;
messages for the next height are buffered with a bound per sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time as _time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.bus import topics
from testbed.bus.client import BusClient, BusMessage
from testbed.ledger import canonical, election, messages
from testbed.ledger import consensus as C
from testbed.ledger.blocks import VOTE_DOMAIN, Block, Vote, encode_certificate
from testbed.ledger.chain import Chain, Proposal
from testbed.ledger.errors import Reason, Rejected
from testbed.ledger.identity import KeyPair, is_address, verify_signature
from testbed.ledger.messages import Freshness, SignedMessage
from testbed.steps import R, Steps, drive

log = logging.getLogger("testbed.ledger.node")
PROPOSAL_DOMAIN = b"testbed/proposal/v1\n"
PREVOTE_DOMAIN = b"testbed/prevote/v1\n"
SYNC_DOMAIN = b"testbed/sync-request/v1\n"
SYNC_BATCH = 20
SYNC_MAX_BLOCKS = 200
"""Blocks one sync request is answered with at most (the requester asks again)."""
SYNC_INTERVAL_S = 0.5
"""A requester is answered at most this often (per node)."""
MAX_VOTE_BYTES = 2048
MAX_SYNC_REQUEST_BYTES = 1024
MAX_BLOCK_BYTES = 32 * 1024 * 1024
MAX_AHEAD_PER_SENDER = 16
"""Next-height messages kept per validator until this node gets there."""
MAX_QUEUED = 20_000
"""Votes or sync requests waiting to be handled, at most (the oldest make room)."""
MAX_QUEUED_PROPOSALS = 2_000
MAX_TX_BATCH = 4096
"""Transactions one message on the tx topic may carry (`tx_batch`)."""
MAX_REMEMBERED = 100_000
"""Transaction ids a node keeps of those it refused and of those it committed."""
MAX_LOG_PER_S = 20
"""Refusal lines logged per second per node (the rest are counted)."""
SLICE_S = 0.0005
"""Longest stretch a node's block work (building, checking, committing a block) holds the
event loop before it lets other callbacks run: a real-time run's ticks share the loop."""


async def _drive(steps: Steps[R]) -> R:
    """A chain's steps in slices of `SLICE_S` (cancelled midway: rolled back)."""
    return await drive(steps, SLICE_S)


def _from_dicts(items: list[Any]) -> Steps[list[SignedMessage]]:
    """A block's transactions from their JSON objects, each with its id computed (the
    canonical encoding: the Merkle root check needs them all)."""
    out = []
    for t in items:
        yield
        m = messages.from_dict(t)
        _ = m.id
        out.append(m)
    return out


MAX_SHARED = 8
"""Proposals whose decoding is kept per process (see `_SHARED`)."""
_SHARED: OrderedDict[str, list[Any]] = OrderedDict()
"""Decoded proposals by the sha256 of their bytes: [decoded JSON, the task building its
transactions (`_from_dicts`) or None]. The validators of one process receive the same
proposal each, and decoding it (the JSON, then each transaction's canonical bytes and id
for the Merkle check) is a pure function of the bytes, so one node does it for all; each
node still checks the block itself. Nothing writes to a decoded proposal or a message."""


def _decoded(digest: str, payload: bytes) -> Any:
    """canonical.decode(payload, strict=False), once per process (see `_SHARED`)."""
    hit = _SHARED.get(digest)
    if hit is not None:
        _SHARED.move_to_end(digest)
        return hit[0]
    obj = canonical.decode(payload, strict=False)
    _SHARED[digest] = [obj, None]
    if len(_SHARED) > MAX_SHARED:
        _SHARED.popitem(last=False)
    return obj


async def _proposal_txs(digest: str, obj: Any) -> list[SignedMessage]:
    """The transactions of the decoded proposal `obj` (`_from_dicts`), built once per
    process: the nodes that ask while the first builds them (in slices) wait for it."""
    hit = _SHARED.get(digest)
    if hit is None or hit[0] is not obj:
        return await _drive(_from_dicts(obj["txs"]))
    task = hit[1]
    if task is None or task.get_loop() is not asyncio.get_running_loop():
        task = hit[1] = asyncio.ensure_future(_drive(_from_dicts(obj["txs"])))
    return list(await asyncio.shield(task))  # a node cancelled meanwhile leaves it running


def _check_turn(digest: str) -> asyncio.Lock | contextlib.AbstractAsyncContextManager[None]:
    """Taken by a node while it checks the proposal `digest`: the nodes of one process
    check it one after the other (not interleaved slice by slice), so all but the first
    find its answer in `chain._CHECKED` (the same check on the same state and bytes)."""
    hit = _SHARED.get(digest)
    if hit is None:
        return contextlib.nullcontext()
    loop = asyncio.get_running_loop()
    if len(hit) < 3 or hit[2][0] is not loop:
        hit[2:] = [(loop, asyncio.Lock())]
    return hit[2][1]


_COMMITTED_HEAD = b'{"block":{"header":'
_JSON = json.JSONDecoder()


def _committed_height(payload: bytes) -> int | None:
    """The height in a committed-block message's header (canonical JSON puts it first),
    read without decoding its transactions: the nodes that committed the block already
    skip it at this cost. None when the message does not start as canonical; a wrong
    answer can only make this node skip a message (it syncs the block instead)."""
    if not payload.startswith(_COMMITTED_HEAD):
        return None
    try:
        header, _ = _JSON.raw_decode(payload[len(_COMMITTED_HEAD):].decode())
    except (ValueError, UnicodeDecodeError):
        return None
    height = header.get("height") if isinstance(header, dict) else None
    return height if type(height) is int else None


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@dataclass
class NodeStats:
    proposed: int = 0
    committed: int = 0
    synced: int = 0
    rejected: list[str] = field(default_factory=list)
    rejected_count: int = 0
    commit_latency_s: list[float] = field(default_factory=list)
    proposal_at: dict[int, float] = field(default_factory=dict)
    """perf_counter() when this node published its (last) proposal per height."""
    commit_at: dict[int, float] = field(default_factory=dict)
    """perf_counter() when this node committed each height (bench: commit latency)."""
    rounds: dict[int, int] = field(default_factory=dict)
    """The round each height was decided in."""


class FileRecord(C.Record):
    """The consensus record in a file beside the store: one canonical JSON line per signed
    value or proof of lock, fsync'd before the caller publishes what it signed (`sync`,
    awaited by the node before it sends anything: the fsync runs off the event loop)."""

    COMPACT_LINES = 512
    """Lines the file may hold before `forget_below` rewrites it without the finished
    heights (a rewrite and its fsync per height cost more than the height's own entries;
    entries below the height a node opens the file at are skipped on reading)."""

    def __init__(self, path: Path, height: int) -> None:
        super().__init__()
        self.path = path
        self._lines = 0
        torn = False
        if path.exists():
            data = path.read_bytes()
            torn = bool(data) and not data.endswith(b"\n")
            self._lines = data.count(b"\n")
            for line in data.splitlines():
                try:
                    e = canonical.decode(line, strict=False)
                    if e["h"] < height:
                        continue
                    if e["k"] == "s":
                        self.signed[(e["h"], e["r"], e["s"])] = e["v"]
                    elif e["k"] == "p":
                        self.pol[(e["h"], e["r"])] = tuple(
                            C.Vote(C.PREVOTE, e["h"], e["r"], v, s) for s, v in e["votes"])
                except (canonical.NotCanonical, KeyError, TypeError, ValueError):
                    continue  # a torn last line (killed mid-write): it was never sent
        self._fh = open(path, "ab")  # noqa: SIM115 - held for the node's life
        self._unsynced = False
        if torn:  # the next entry must not be appended to the torn line
            self._rewrite()

    def _write(self, entry: dict[str, Any]) -> None:
        self._fh.write(canonical.encode(entry) + b"\n")
        self._fh.flush()
        self._lines += 1
        self._unsynced = True

    async def sync(self) -> None:
        """Make what was written durable (fsync in a worker thread: a disk flush can take
        tens of ms and must not hold the event loop); before a signed value is sent."""
        if self._unsynced:
            self._unsynced = False
            await asyncio.to_thread(os.fsync, self._fh.fileno())

    def sign(self, key: tuple[int, int, int], value: str | None) -> None:
        self._write({"k": "s", "h": key[0], "r": key[1], "s": key[2], "v": value})
        super().sign(key, value)

    def proof(self, height: int, round_: int, prevotes: tuple[C.Vote, ...]) -> None:
        self._write({"k": "p", "h": height, "r": round_,
                     "votes": [[v.sender, v.value] for v in prevotes]})
        super().proof(height, round_, prevotes)

    def forget_below(self, height: int) -> None:
        super().forget_below(height)
        if self._lines > self.COMPACT_LINES:
            self._rewrite()

    def _rewrite(self) -> None:
        """Replace the file with the entries still kept, fsync'd."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as fh:
            for (h, r, s), v in self.signed.items():
                fh.write(canonical.encode({"k": "s", "h": h, "r": r, "s": s, "v": v}) + b"\n")
            for (h, r), votes in self.pol.items():
                fh.write(canonical.encode({"k": "p", "h": h, "r": r, "votes": [
                    [x.sender, x.value] for x in votes]}) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._fh.close()
        os.replace(tmp, self.path)
        self._fh = open(self.path, "ab")  # noqa: SIM115
        self._lines = len(self.signed) + len(self.pol)
        self._unsynced = False  # the new file holds every entry, fsync'd

    def close(self) -> None:
        self._fh.close()


def record_path(chain: Chain) -> Path | None:
    return None if chain.store is None else Path(f"{chain.store.path}.votes")


def _vote_body(chain: str, height: int, round_: int, block: str | None) -> bytes:
    return canonical.encode({"chain": chain, "height": height, "block": block,
                             "round": round_})


class LedgerNode:
    def __init__(self, name: str, key: KeyPair, chain: Chain, bus: BusClient, site: str, *,
                 block_interval_s: float = 0.5, clock: Callable[[], float] = _time.time,
                 max_pending_log: int = 1000, autoproduce: bool = True,
                 timeouts: C.Timeouts | None = None) -> None:
        self.name, self.key, self.chain, self.bus, self.site = name, key, chain, bus, site
        self.block_interval_s = block_interval_s
        self.clock = clock
        self.fresh = Freshness(chain.state.params.max_skew_s)
        self.mempool: dict[str, SignedMessage] = {}
        self.refused: OrderedDict[str, str] = OrderedDict()
        """Ids of transactions this node refused (bounded), with the reason."""
        self.committed_txs: OrderedDict[str, None] = OrderedDict()
        """Ids of the transactions this node committed, the latest `MAX_REMEMBERED`."""
        self.stats = NodeStats()
        self.evidence: list[C.Evidence] = []
        self._max_log = max_pending_log
        self.autoproduce = autoproduce
        """False: heights start only when `produce()` is called (a scenario's step decides
        when a block is due, on its own clock, so replays commit the same blocks)."""
        t = chain.state.params.round_timeout_s
        self.timeouts = timeouts or C.Timeouts(propose=t, vote=t / 4, growth=0.5)
        path = record_path(chain)
        self.record: C.Record = (FileRecord(path, chain.height + 1) if path is not None
                                 else C.Record())
        self._tasks: list[asyncio.Task[None]] = []
        self._timers: list[asyncio.TimerHandle] = []
        self._wake = asyncio.Event()
        self.committed_event = asyncio.Event()
        self.watchers: list[Callable[[], None]] = []
        """Called whenever a transaction was handled (admitted or refused) or a block
        committed: lets a fast-clock driver wait on events instead of polling."""
        self._log_window = (0.0, 0)
        self._last_commit = _time.monotonic()
        self._syncing_since = -1e9
        self._sync_served: dict[str, float] = {}
        self._sm: C.Tendermint | None = None
        self._lock = asyncio.Lock()
        """Held by whatever uses the chain or the state machine (one message, a timeout, a
        height started): block work yields to the loop midway (`_drive`), with the state
        journal open, and nothing else of this node may run in between."""
        self._prepared: tuple[int, frozenset[str], Proposal] | None = None
        self.committed_height = chain.height
        """The chain's height once committed (`chain.height` moves while a block is
        checked in steps)."""
        self._new_height_state()

    # ------------------------------------------------------------ height state
    def _new_height_state(self) -> None:
        state = self.chain.state
        self._validators = {a: state.identities[a].public_key for a in state.validators()}
        self._order = [s.address for s in election.ranking(state)]
        self._blocks: dict[str, tuple[Block, list[SignedMessage]]] = {}
        self._checked: dict[str, bool] = {}
        self._raw: dict[tuple[Any, ...], bytes] = {}
        self._seen: set[str] = set()
        self._ahead: dict[str, list[BusMessage]] = {}
        self._proposals_checked: dict[int, int] = {}
        self._height_started = _time.monotonic()
        for h in self._timers:
            h.cancel()
        self._timers = []
        if self._sm is None:
            self._sm = C.Tendermint(self.key.address, list(self._validators),
                                    self.chain.height + 1, self._proposer, self._get_value,
                                    timeouts=self.timeouts, record=self.record)
        else:
            self._sm.next_height(list(self._validators), self._proposer, self._get_value)

    def _proposer(self, round_: int) -> str:
        return self._order[round_ % len(self._order)]

    @property
    def validator(self) -> bool:
        return self.key.address in self._validators

    @property
    def round(self) -> int:
        return self._sm.round if self._sm is not None else -1

    @property
    def n(self) -> int:
        return len(self._validators)

    @property
    def f(self) -> int:
        return C.tolerated(self.n)

    def _reject(self, where: str, exc: Rejected | str) -> None:
        text = f"{self.name}: {where}: {exc}"
        self.stats.rejected_count += 1
        if len(self.stats.rejected) < self._max_log:
            self.stats.rejected.append(text)
        now = _time.monotonic()
        start, count = self._log_window
        if now - start > 1.0:
            if count > MAX_LOG_PER_S:
                log.warning("%s: %d more refusals in the last second", self.name,
                            count - MAX_LOG_PER_S)
            self._log_window = (now, 1)
            log.warning(text)
            return
        self._log_window = (start, count + 1)
        if count < MAX_LOG_PER_S:
            log.warning(text)

    # ------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        s = self.site
        # consensus traffic is repeated by its senders (gossip) and anyone on the broker can
        # flood it: its queues are bounded; transactions are not dropped here
        handlers = [
            (topics.ledger_tx(s), self._on_tx, None),
            (topics.block_filter(s, "proposal"), self._on_proposal, MAX_QUEUED_PROPOSALS),
            (topics.block_filter(s, "votes"), self._on_vote, MAX_QUEUED),
            (topics.blocks_committed(s), self._on_committed, MAX_QUEUED_PROPOSALS),
            (topics.sync_request(s), self._on_sync_request, MAX_QUEUED),
            (topics.sync_response(s, self.name), self._on_sync_response, MAX_QUEUED_PROPOSALS),
        ]
        for flt, fn, bound in handlers:
            sub = await self.bus.subscribe(flt, qos=1, max_pending=bound)
            self._tasks.append(asyncio.create_task(self._pump(sub, fn), name=f"{self.name}:{flt}"))
        if self.autoproduce:
            self._tasks.append(asyncio.create_task(self._producer(),
                                                   name=f"{self.name}:producer"))
        async with self._lock:
            if any(k[0] == self.chain.height + 1 for k in self.record.signed):
                await self._execute(self._sm_start())  # restarted mid-height: resume it
            await self.request_sync()

    async def stop(self) -> None:
        for h in self._timers:
            h.cancel()
        self._timers = []
        tasks = list(self._tasks)
        for _ in range(10):  # re-cancel a task that swallowed one cancellation
            if not tasks:
                break
            for t in tasks:
                t.cancel()
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            tasks = list(pending)
        self._tasks.clear()
        if isinstance(self.record, FileRecord):
            self.record.close()

    async def _pump(self, sub: Any, fn: Callable[[BusMessage], Any]) -> None:
        n, since = 0, _time.perf_counter()
        async for msg in sub:
            try:
                async with self._lock:
                    await fn(msg)
            except Rejected as exc:
                self._reject(msg.topic, exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bad message must not kill the node, nor flood logs
                self._reject(msg.topic, f"refused ({type(exc).__name__}: {exc})")
                log.debug("%s: handling %s", self.name, msg.topic, exc_info=True)
            n += 1
            if n % 16 == 0 or _time.perf_counter() - since > SLICE_S:
                await asyncio.sleep(0)  # a flood on one topic must not starve the others
                since = _time.perf_counter()

    # ---------------------------------------------------------- transactions
    async def submit(self, msg: SignedMessage) -> None:
        """Publish a transaction to every node (this one included, via the broker)."""
        await self.bus.publish(topics.ledger_tx(self.site), msg.raw, qos=1)

    def _refuse_tx(self, tx_id: str, exc: Rejected) -> None:
        self.refused[tx_id] = str(exc)
        while len(self.refused) > MAX_REMEMBERED:
            self.refused.popitem(last=False)
        raise exc

    def _notify(self) -> None:
        for fn in self.watchers:
            fn()

    async def _on_tx(self, m: BusMessage) -> None:
        """One transaction, or a batch of them (`tx_batch`): each is admitted or refused
        on its own, exactly as if it had come alone, in the batch's order."""
        try:
            if b"\n" not in m.payload:
                self._admit_tx(m.payload)
                return
            parts = m.payload.split(b"\n")
            if len(parts) > MAX_TX_BATCH:
                raise Rejected(Reason.MALFORMED, f"batch of {len(parts)} transactions (at "
                               f"most {MAX_TX_BATCH})")
            since = _time.perf_counter()
            for raw in parts:
                try:
                    self._admit_tx(raw)
                except Rejected as exc:
                    self._reject(m.topic, exc)
                if _time.perf_counter() - since > SLICE_S:
                    await asyncio.sleep(0)  # a real-time run's ticks share the loop
                    since = _time.perf_counter()
        finally:
            self._notify()

    def _admit_tx(self, payload: bytes) -> None:
        tx_id = _sha(payload)
        if tx_id in self.mempool:
            return
        try:
            msg = messages.parse(payload)
            if msg.id in self.mempool:
                return
            if (msg.client_id, msg.req_id) in self.chain.state.recent:
                raise Rejected(Reason.REPLAY, f"reqId {msg.req_id} from {msg.client_id} is "
                               "already on the chain")
            self.fresh.check(msg, self.clock())
            self.chain.admit(msg)
        except Rejected as exc:
            self._refuse_tx(tx_id, exc)
            return
        self.fresh.remember(msg, self.clock())
        self.mempool[msg.id] = msg
        self._wake.set()

    # ------------------------------------------------------------ production
    async def _producer(self) -> None:
        """Start a height once transactions wait and `block_interval_s` has passed."""
        while True:
            sm = self._sm
            if self.mempool and sm is not None and not sm.started and self.validator:
                wait = self._last_commit + self.block_interval_s - _time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                async with self._lock:
                    await self._prepare()
                    await self._execute(self._sm_start())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.25):
                    await self._wake.wait()

    def _sm_start(self) -> list[C.Action]:
        assert self._sm is not None
        if self._sm.started or not self.validator:
            return []
        self._height_started = _time.monotonic()
        return self._sm.start()

    async def produce(self) -> bool:
        """Start the next height now (fast-clock runs); True if this node proposed."""
        before = self.stats.proposed
        async with self._lock:
            await self._prepare()
            await self._execute(self._sm_start())
        return self.stats.proposed > before

    async def _prepare(self) -> None:
        """Build round 0's block in steps before the state machine asks for it (it asks
        synchronously: `_get_value`), when this node is that round's proposer. The lock
        is held until the height starts, so the mempool is still the one it was built
        from."""
        sm = self._sm
        self._prepared = None
        if sm is None or sm.started or not self.validator or self._proposer(0) != self.key.address:
            return
        pool = frozenset(self.mempool)
        try:
            proposal = await _drive(self.chain.propose_steps(
                self.key, list(self.mempool.values()), time=self.clock(), round_=0))
        except Rejected:
            return  # `_get_value` proposes again and reports it
        self._prepared = (self.chain.height + 1, pool, proposal)

    def _get_value(self, round_: int) -> str | None:
        """The state machine asks this node, elected for `round_`, for a new block."""
        prepared, self._prepared = self._prepared, None
        if (round_ == 0 and prepared is not None and prepared[0] == self.chain.height + 1
                and prepared[1] == frozenset(self.mempool)):
            proposal = prepared[2]
        else:
            try:
                proposal = self.chain.propose(self.key, list(self.mempool.values()),
                                              time=self.clock(), round_=round_)
            except Rejected as exc:
                self._reject("propose", exc)
                return None
        for msg, exc in proposal.dropped:
            self.mempool.pop(msg.id, None)
            self.refused[msg.id] = str(exc)
            self._reject("proposal dropped a transaction", exc)
        block = proposal.block
        self._blocks[block.hash] = (block, proposal.txs)
        self._checked[block.hash] = True
        return block.hash

    # ------------------------------------------------------------- messages out
    def _proposal_wire(self, p: C.Proposal) -> bytes | None:
        got = self._blocks.get(p.value)
        if got is None:
            return None
        block, txs = got
        return proposal_wire(self.key, self.chain.id, p.round, p.valid_round, block, txs)

    def _vote_wire(self, v: C.Vote) -> bytes:
        body = _vote_body(self.chain.id, v.height, v.round, v.value)
        domain = PREVOTE_DOMAIN if v.step == C.PREVOTE else VOTE_DOMAIN
        sig = self.key.sign(domain + body).hex()
        return canonical.encode({
            "type": "prevote" if v.step == C.PREVOTE else "precommit", "chain": self.chain.id,
            "height": v.height, "round": v.round, "block": v.value,
            "voter": self.key.address, "signature": sig})

    async def _execute(self, actions: list[C.Action]) -> None:
        loop = asyncio.get_running_loop()
        for a in actions:
            if isinstance(a, C.Broadcast):
                await self._broadcast(a)
            elif isinstance(a, C.Schedule):
                self._timers.append(loop.call_later(a.delay, self._fire, a.timeout))
            elif isinstance(a, C.Decide):
                await self._decide(a)
            elif isinstance(a, C.Missing):
                await self.request_sync(force=True)
            elif isinstance(a, C.Evidence):
                self.evidence.append(a)
                log.warning("%s: equivocation by %s at height %d round %d: %r and %r",
                            self.name, a.first.sender, a.first.height, a.first.round,
                            getattr(a.first, "value", None), getattr(a.second, "value", None))

    async def _broadcast(self, a: C.Broadcast) -> None:
        if isinstance(self.record, FileRecord):
            await self.record.sync()  # what this node signed is on disk before it is sent
        m = a.message
        if isinstance(m, C.Proposal):
            key: tuple[Any, ...] = ("p", m.round, m.value)
            raw = self._raw.get(key)
            if raw is None and m.sender == self.key.address and not a.resend:
                raw = self._proposal_wire(m)
                if raw is None:
                    return
                self._raw[key] = raw
                self.stats.proposed += 1
                self.stats.proposal_at[m.height] = _time.perf_counter()
                log.debug("%s: proposes height %d round %d", self.name, m.height, m.round)
            if raw is not None:
                await self.bus.publish(topics.block_proposal(self.site, m.height), raw, qos=1)
            return
        key = ("v", m.sender, m.step, m.round, m.value)
        raw = self._raw.get(key)
        if raw is None and m.sender == self.key.address:
            raw = self._raw[key] = self._vote_wire(m)
        if raw is not None:
            await self.bus.publish(topics.block_votes(self.site, m.height), raw, qos=1)

    def _fire(self, t: C.Timeout) -> None:
        if self._sm is None or t.height != self._sm.height:
            return
        task = asyncio.get_running_loop().create_task(self._timeout(t))
        self._tasks.append(task)
        task.add_done_callback(lambda tk: tk in self._tasks and self._tasks.remove(tk))

    async def _timeout(self, t: C.Timeout) -> None:
        async with self._lock:
            if self._sm is not None and t.height == self._sm.height:
                await self._execute(self._sm.on_timeout(t))

    # -------------------------------------------------------------- messages in
    def _next_height_message(self, height: int, sender: Any, m: BusMessage) -> bool:
        """True if the message is for a later height (kept or answered with a sync)."""
        current = self.chain.height + 1
        if height <= current:
            return False
        if height == current + 1 and isinstance(sender, str) and sender in self._validators:
            box = self._ahead.setdefault(sender, [])
            if len(box) < MAX_AHEAD_PER_SENDER:
                box.append(m)
        return True

    async def _on_proposal(self, m: BusMessage) -> None:
        if len(m.payload) > MAX_BLOCK_BYTES:
            raise Rejected(Reason.MALFORMED, f"proposal of {len(m.payload)} bytes")
        digest = _sha(m.payload)
        if digest in self._seen:
            return
        obj = _decoded(digest, m.payload)
        fields = {"type", "chain", "height", "round", "valid_round", "proposer", "signature",
                  "block", "txs"}
        if not (isinstance(obj, dict) and set(obj) == fields and obj["type"] == "proposal"
                and type(obj["height"]) is int and type(obj["round"]) is int
                and type(obj["valid_round"]) is int and isinstance(obj["txs"], list)
                and isinstance(obj["signature"], str)):
            raise Rejected(Reason.MALFORMED, "proposal must be {type, chain, height, round, "
                           "valid_round, proposer, signature, block, txs}")
        if obj["chain"] != self.chain.id:
            raise Rejected(Reason.BAD_BLOCK, "proposal for another chain")
        height, rnd, sender = obj["height"], obj["round"], obj["proposer"]
        if sender == self.key.address:
            return
        if height <= self.chain.height:
            return
        if self._next_height_message(height, sender, m):
            await self.request_sync()
            return
        sm = self._sm
        assert sm is not None
        if not 0 <= rnd <= max(sm.round, 0) + C.MAX_FUTURE_ROUNDS or not (
                -1 <= obj["valid_round"] < rnd):
            raise Rejected(Reason.BAD_BLOCK, f"proposal round {rnd} (valid round "
                           f"{obj['valid_round']}) is not plausible at round {sm.round}")
        if sender not in self._validators or sender != self._proposer(rnd):
            raise Rejected(Reason.WRONG_PROPOSER, f"round {rnd} of height {height} belongs to "
                           f"{self._proposer(rnd)}, not {str(sender)[:42]}")
        if self._proposals_checked.get(rnd, 0) >= 2:
            return  # an equivocating proposer costs at most two full checks per round
        try:
            block = Block.parse(canonical.encode(obj["block"]))
        except Rejected:
            raise
        except Exception as exc:
            raise Rejected(Reason.MALFORMED, f"proposal block: {exc}") from None
        body = {"chain": self.chain.id, "height": height, "round": rnd,
                "valid_round": obj["valid_round"], "block_hash": block.hash}
        if not _sig_ok(self._validators[sender], obj["signature"],
                       PROPOSAL_DOMAIN + canonical.encode(body)):
            raise Rejected(Reason.BAD_SIGNATURE, f"proposal for height {height} round {rnd} "
                           f"is not signed by its proposer")
        self._remember(digest)
        self._proposals_checked[rnd] = self._proposals_checked.get(rnd, 0) + 1
        valid = self._checked.get(block.hash)
        if valid is None:
            try:
                txs = await _proposal_txs(digest, obj)
                if block.height != height:
                    raise Rejected(Reason.BAD_BLOCK, "block height differs from the proposal's")
                async with _check_turn(digest):
                    await _drive(self.chain.check_proposal_steps(block, txs,
                                                                 now=self.clock()))
                valid = True
                self._blocks[block.hash] = (block, txs)
            except Rejected as exc:
                valid = False
                self._reject("proposal", exc)
            self._checked[block.hash] = valid
        self._raw[("p", rnd, block.hash)] = m.payload
        actions = sm.on_proposal(C.Proposal(height, rnd, block.hash, obj["valid_round"],
                                            sender, valid))
        if not sm.started:
            actions += self._sm_start()
        await self._execute(actions)

    async def _on_vote(self, m: BusMessage) -> None:
        if len(m.payload) > MAX_VOTE_BYTES:
            raise Rejected(Reason.MALFORMED, f"vote of {len(m.payload)} bytes")
        digest = _sha(m.payload)
        if digest in self._seen:
            return
        obj = canonical.decode(m.payload, strict=False)
        fields = {"type", "chain", "height", "round", "block", "voter", "signature"}
        if not (isinstance(obj, dict) and set(obj) == fields
                and obj["type"] in ("prevote", "precommit") and type(obj["height"]) is int
                and type(obj["round"]) is int and isinstance(obj["signature"], str)
                and (obj["block"] is None or isinstance(obj["block"], str))):
            raise Rejected(Reason.MALFORMED, "vote must be {type, chain, height, round, block, "
                           "voter, signature}")
        if obj["chain"] != self.chain.id:
            raise Rejected(Reason.BAD_BLOCK, "vote for another chain")
        height, rnd, voter = obj["height"], obj["round"], obj["voter"]
        if voter == self.key.address or height <= self.chain.height:
            return
        ahead = height > self.chain.height + 1
        if height > self.chain.height + 2:
            await self.request_sync()
            return
        sm = self._sm
        assert sm is not None
        if not 0 <= rnd <= (0 if ahead else max(sm.round, 0)) + C.MAX_FUTURE_ROUNDS:
            raise Rejected(Reason.BAD_BLOCK, f"vote round {rnd} is not plausible at round "
                           f"{sm.round}")
        key = self._validators.get(voter) if isinstance(voter, str) else None
        if key is None:
            raise Rejected(Reason.UNKNOWN_KEY, f"vote from {str(voter)[:42]}, not a registered "
                           "validator")
        step = C.PREVOTE if obj["type"] == "prevote" else C.PRECOMMIT
        domain = PREVOTE_DOMAIN if step == C.PREVOTE else VOTE_DOMAIN
        if not _sig_ok(key, obj["signature"],
                       domain + _vote_body(self.chain.id, height, rnd, obj["block"])):
            raise Rejected(Reason.BAD_SIGNATURE, f"{obj['type']} from {voter} does not verify")
        self._remember(digest)
        if ahead:  # the next height's vote, signed: kept (bounded) until this node gets there
            self._next_height_message(height, voter, m)
            await self.request_sync()
            return
        actions = sm.on_vote(C.Vote(step, height, rnd, obj["block"], voter))
        rs = sm.rounds.get(rnd)
        counted = (rs.prevotes if step == C.PREVOTE else rs.precommits) if rs else {}
        if voter in counted.get(obj["block"], {}):  # kept by the state machine (bounded)
            self._raw.setdefault(("v", voter, step, rnd, obj["block"]), m.payload)
        if not sm.started:
            actions += self._sm_start()
        await self._execute(actions)

    def _remember(self, digest: str) -> None:
        """Payloads already handled (a shortcut for duplicates; forgotten when large)."""
        if len(self._seen) >= 100_000:
            self._seen.clear()
        self._seen.add(digest)

    # ---------------------------------------------------------------- commit
    async def _decide(self, d: C.Decide) -> None:
        if d.height != self.chain.height + 1:
            return  # committed meanwhile (sync)
        got = self._blocks.get(d.value)
        if got is None:
            await self.request_sync(force=True)
            return
        block, txs = got
        votes = []
        for v in d.precommits:
            raw = self._raw.get(("v", v.sender, C.PRECOMMIT, v.round, v.value))
            if raw is None:
                continue
            o = canonical.decode(raw, strict=False)
            votes.append(Vote(self.chain.id, d.height, d.value, o["voter"], o["signature"],
                              d.round))
        if len(votes) < self.chain.state.quorum():
            await self.request_sync(force=True)  # votes known only from the record: fetch
            return
        cert = encode_certificate(votes)
        proposer = self._proposer(d.round)
        await self._commit(block, txs, cert, round_=d.round)
        if proposer == self.key.address:
            await self.bus.publish(topics.blocks_committed(self.site),
                                   _wire_committed(block, txs, cert), qos=1)
        await self._after_commit()

    async def _commit(self, block: Block, txs: list[SignedMessage], cert: bytes, *,
                      round_: int | None = None) -> None:
        await _drive(self.chain.commit_steps(block, txs, cert, now=self.clock()))
        self.committed_height = self.chain.height
        done = self.committed_txs
        for m in txs:
            self.mempool.pop(m.id, None)
            done[m.id] = None
        while len(done) > MAX_REMEMBERED:
            done.popitem(last=False)
        self.stats.committed += 1
        self.stats.commit_at[block.height] = _time.perf_counter()
        self.stats.commit_latency_s.append(_time.monotonic() - self._height_started)
        if round_ is not None:
            self.stats.rounds[block.height] = round_
        self._last_commit = _time.monotonic()
        log.debug("%s: committed height %d (round %s)", self.name, block.height, round_)
        ahead = [m for box in self._ahead.values() for m in box]
        self._new_height_state()
        self._replay = ahead
        self.committed_event.set()
        self._wake.set()
        self._notify()

    async def _after_commit(self) -> None:
        ahead, self._replay = getattr(self, "_replay", []), []
        for m in ahead:
            handler = self._on_proposal if m.topic.endswith("/proposal") else self._on_vote
            try:
                await handler(m)
            except Rejected as exc:
                self._reject(m.topic, exc)

    async def _on_committed(self, m: BusMessage) -> None:
        if len(m.payload) > MAX_BLOCK_BYTES:
            raise Rejected(Reason.MALFORMED, f"committed block of {len(m.payload)} bytes")
        peek = _committed_height(m.payload)
        if peek is not None and peek <= self.chain.height:
            return
        block, txs, cert = _unwire_committed(m.payload)
        if block.height <= self.chain.height:
            return
        if block.height > self.chain.height + 1:
            await self.request_sync()
            return
        await self._commit(block, txs, cert)
        await self._after_commit()

    # ----------------------------------------------------------------- sync
    async def request_sync(self, *, force: bool = False) -> None:
        now = _time.monotonic()
        if now - self._syncing_since < (0.1 if force else SYNC_INTERVAL_S):
            return
        self._syncing_since = now
        body = {"node": self.name, "from": self.chain.height + 1, "address": self.key.address,
                "time": round(self.clock(), 3)}
        sig = self.key.sign(SYNC_DOMAIN + canonical.encode(body)).hex()
        await self.bus.publish(topics.sync_request(self.site),
                               canonical.encode({**body, "signature": sig}), qos=1)

    async def _on_sync_request(self, m: BusMessage) -> None:
        if len(m.payload) > MAX_SYNC_REQUEST_BYTES:
            raise Rejected(Reason.MALFORMED, f"sync request of {len(m.payload)} bytes")
        req = canonical.decode(m.payload, strict=False)
        if not (isinstance(req, dict) and set(req) == {"node", "from", "address", "time",
                                                       "signature"}
                and isinstance(req["node"], str) and type(req["from"]) is int
                and is_address(req["address"]) and isinstance(req["signature"], str)
                and type(req["time"]) in (int, float)):
            raise Rejected(Reason.MALFORMED, "sync request must be {node, from, address, time, "
                           "signature}")
        if req["address"] == self.key.address:
            return
        store = self.chain.store
        if store is None or self.chain.height < req["from"]:
            return
        entry = self.chain.state.identities.get(req["address"])
        if entry is None or req["address"] not in self._validators or entry.name != req["node"]:
            raise Rejected(Reason.UNKNOWN_KEY, f"sync request from {req['address']} "
                           f"({req['node'][:40]!r}), not a registered validator of that name")
        now = _time.monotonic()
        if now - self._sync_served.get(req["address"], -1e9) < SYNC_INTERVAL_S:
            return  # rate limit per requester (checked before the signature: cheapest)
        if abs(req["time"] - self.clock()) > self.chain.state.params.max_skew_s:
            raise Rejected(Reason.STALE, "sync request dated outside the allowed skew")
        body = {k: req[k] for k in ("node", "from", "address", "time")}
        if not _sig_ok(entry.public_key, req["signature"], SYNC_DOMAIN + canonical.encode(body)):
            raise Rejected(Reason.BAD_SIGNATURE, f"sync request from {req['address']} does not "
                           "verify")
        self._sync_served[req["address"]] = now
        start = max(1, req["from"])
        top = min(self.chain.height, start + SYNC_MAX_BLOCKS - 1)
        while start <= top:
            batch = []
            for b in store.blocks(start, min(top, start + SYNC_BATCH - 1)):
                batch.append({"block": canonical.decode(b.raw),
                              "txs": [canonical.decode(raw) for _, raw in b.txs],
                              "cert": canonical.decode(b.cert)})
            await self.bus.publish(topics.sync_response(self.site, req["node"]),
                                   canonical.encode({"blocks": batch}), qos=1)
            start += SYNC_BATCH

    async def _on_sync_response(self, m: BusMessage) -> None:
        if _time.monotonic() - self._syncing_since > 30:
            return  # nothing asked for
        if len(m.payload) > MAX_BLOCK_BYTES:
            raise Rejected(Reason.MALFORMED, f"sync response of {len(m.payload)} bytes")
        obj = canonical.decode(m.payload, strict=False)
        items = obj.get("blocks", []) if isinstance(obj, dict) else []
        if not isinstance(items, list):
            raise Rejected(Reason.MALFORMED, "sync response must be {blocks: [...]}")
        for item in items[:SYNC_MAX_BLOCKS]:
            if not isinstance(item, dict):
                raise Rejected(Reason.MALFORMED, "sync response item must be an object")
            block, txs, cert = _unwire_committed(canonical.encode(item))
            if block.height != self.chain.height + 1:
                continue
            await self._commit(block, txs, cert)
            self.stats.synced += 1
        await self._after_commit()
        if len(items) >= SYNC_BATCH:
            await self.request_sync()  # there may be more


TX_BATCH_BYTES = 1 << 20
"""What `tx_batches` puts in one message at most (a larger transaction goes alone)."""


def tx_batches(msgs: list[SignedMessage]) -> list[bytes]:
    """Payloads for the tx topic carrying `msgs` in order: each a batch of envelopes
    joined by newlines (a canonical envelope holds no newline byte: JSON escapes it), at
    most `MAX_TX_BATCH` and about `TX_BATCH_BYTES` each. A node admits a batch's
    transactions one by one as if each had come alone; one message instead of one per
    transaction spares the bus and broker most of their per-message work."""
    out: list[bytes] = []
    batch: list[bytes] = []
    size = 0
    for m in msgs:
        raw = m.raw
        if batch and (size + len(raw) > TX_BATCH_BYTES or len(batch) >= MAX_TX_BATCH):
            out.append(b"\n".join(batch))
            batch, size = [], 0
        batch.append(raw)
        size += len(raw) + 1
    if batch:
        out.append(b"\n".join(batch))
    return out


def proposal_wire(key: KeyPair, chain_id: str, round_: int, valid_round: int, block: Block,
                  txs: list[SignedMessage]) -> bytes:
    """A proposal message: `block` proposed in `round_` (it may have been created in an
    earlier one, `valid_round`), signed by that round's proposer."""
    body = {"chain": chain_id, "height": block.height, "round": round_,
            "valid_round": valid_round, "block_hash": block.hash}
    sig = key.sign(PROPOSAL_DOMAIN + canonical.encode(body)).hex()
    return _with_txs({
        "type": "proposal", "chain": chain_id, "height": block.height, "round": round_,
        "valid_round": valid_round, "proposer": key.address, "signature": sig,
        "block": {"header": block.header, "signature": block.signature}}, txs)


_NO_TXS = b'"txs":[]'


def _with_txs(obj: dict[str, Any], txs: list[SignedMessage]) -> bytes:
    """canonical.encode(obj + {"txs": [m.as_dict() for m in txs]}), joined from each
    transaction's own canonical bytes (the canonical encoding of a list is its members'
    encodings joined): no 1,000 transactions encoded again on the event loop."""
    head = canonical.encode({**obj, "txs": []})
    if head.count(_NO_TXS) != 1:
        return canonical.encode({**obj, "txs": [m.as_dict() for m in txs]})
    return head.replace(_NO_TXS, b'"txs":[' + b",".join(m.raw for m in txs) + b"]")


def _sig_ok(public_key: bytes, signature: str, data: bytes) -> bool:
    try:
        sig = bytes.fromhex(signature)
    except (ValueError, TypeError):
        return False
    return verify_signature(public_key, sig, data)


def _wire_committed(block: Block, txs: list[SignedMessage], cert: bytes) -> bytes:
    return _with_txs({"block": {"header": block.header, "signature": block.signature},
                      "cert": canonical.decode(cert, strict=False)}, txs)


def _unwire_committed(payload: bytes) -> tuple[Block, list[SignedMessage], bytes]:
    try:
        obj = canonical.decode(payload, strict=False)
        block = Block.parse(canonical.encode(obj["block"]))
        txs = [messages.from_dict(t) for t in obj["txs"]]
        cert = canonical.encode(obj["cert"])
    except (canonical.NotCanonical, KeyError, TypeError) as exc:
        raise Rejected(Reason.MALFORMED, f"block message: {exc}") from None
    return block, txs, cert


async def run_node(layout_root: str, name: str, *, bus_url: str, site: str,
                   block_interval_s: float = 0.5, stop: asyncio.Event | None = None,
                   on_start: Callable[[LedgerNode], None] | None = None) -> LedgerNode:
    """Run one validator from a `testbed ledger init` folder until `stop` is set."""
    from testbed.ledger.setup import LedgerLayout
    from testbed.ledger.validators import Validators

    layout = LedgerLayout(Path(layout_root))
    async with BusClient(bus_url, client_id=f"ledger-{site}-{name}") as bus:
        vals = await Validators.start(layout, bus, site, names=[name], autoproduce=True,
                                      block_interval_s=block_interval_s)
        node = vals.nodes[0]
        if on_start is not None:
            on_start(node)
        try:
            await (stop or asyncio.Event()).wait()
        finally:
            await vals.stop()
    return node
