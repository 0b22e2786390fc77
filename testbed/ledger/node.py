"""A ledger validator on the message bus.

Each node has its own key, `Chain` and SQLite store and talks to others only through MQTT
(topic scheme in `testbed.bus.topics`). Protocol per height h, after h-1 committed:

1. Transactions arrive on `ledger/tx`; a node admits a transaction to its mempool after
   checking shape, signature, freshness and replay (`Freshness`); refusals are logged.
2. The PoE-elected proposer of round 0 waits `block_interval_s`, then publishes a proposal
   (block + transactions). If no block commits within `round_timeout_s` per round, round
   r+1's proposer (the next in CPF order) takes over.
3. A validator checks the proposal completely and votes (signed) once per height.
4. A node that holds votes of more than 2/3 of the validators for a block it has checked
   commits it with those votes as certificate; the proposer re-publishes block and
   certificate on `ledger/blocks/committed` for nodes that missed votes.
5. A node that starts, or sees a block beyond its height, asks `ledger/sync/request` for
   the blocks it lacks; peers answer on its `sync/{node}/response` topic, and it verifies
   every block (certificate included) before applying it.

Voting once per height is safe with fewer than n/3 faulty validators (two certificates for
one height would need an honest validator to vote twice); if a proposal reaches only part
of the validators before its proposer dies, the height can stall (see the note in README).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time as _time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.bus import topics
from testbed.bus.client import BusClient, BusMessage
from testbed.ledger import canonical, election, messages
from testbed.ledger.blocks import Block, Vote, encode_certificate
from testbed.ledger.chain import Chain
from testbed.ledger.errors import Reason, Rejected
from testbed.ledger.identity import KeyPair
from testbed.ledger.messages import Freshness, SignedMessage
from testbed.ledger.setup import LedgerLayout

log = logging.getLogger("testbed.ledger.node")
SYNC_BATCH = 20


def _wire_block(block: Block, txs: list[SignedMessage], cert: bytes | None = None) -> bytes:
    obj: dict[str, Any] = {"block": {"header": block.header, "signature": block.signature},
                           "txs": [m.as_dict() for m in txs]}
    if cert is not None:
        obj["cert"] = canonical.decode(cert, strict=False)
    return canonical.encode(obj)


def _unwire_block(payload: bytes) -> tuple[Block, list[SignedMessage], bytes | None]:
    try:
        obj = canonical.decode(payload, strict=False)
        block = Block.parse(canonical.encode(obj["block"]))
        txs = [messages.parse(canonical.encode(t)) for t in obj["txs"]]
        cert = canonical.encode(obj["cert"]) if "cert" in obj else None
    except (canonical.NotCanonical, KeyError, TypeError) as exc:
        raise Rejected(Reason.MALFORMED, f"block message: {exc}") from None
    return block, txs, cert


@dataclass
class NodeStats:
    proposed: int = 0
    committed: int = 0
    synced: int = 0
    rejected: list[str] = field(default_factory=list)
    commit_latency_s: list[float] = field(default_factory=list)
    proposal_at: dict[int, float] = field(default_factory=dict)
    """perf_counter() when this node published its (last) proposal per height."""
    commit_at: dict[int, float] = field(default_factory=dict)
    """perf_counter() when this node committed each height (bench: commit latency)."""


class LedgerNode:
    def __init__(self, name: str, key: KeyPair, chain: Chain, bus: BusClient, site: str, *,
                 block_interval_s: float = 0.5, clock: Callable[[], float] = _time.time,
                 max_pending_log: int = 1000, autoproduce: bool = True) -> None:
        self.name, self.key, self.chain, self.bus, self.site = name, key, chain, bus, site
        self.block_interval_s = block_interval_s
        self.clock = clock
        self.fresh = Freshness(chain.state.params.max_skew_s)
        self.mempool: dict[str, SignedMessage] = {}
        self.stats = NodeStats()
        self._max_log = max_pending_log
        self._proposals: dict[tuple[int, str], tuple[Block, list[SignedMessage]]] = {}
        self._votes: dict[int, dict[str, dict[str, Vote]]] = {}
        self._voted: dict[int, str] = {}
        self._height_started = _time.monotonic()
        self._proposed_round: dict[int, int] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._syncing_since = 0.0
        self.committed_event = asyncio.Event()
        self.autoproduce = autoproduce
        """False: blocks are proposed only when `produce()` is called (a scenario's step
        decides when a block is due, on its own clock, so replays commit the same blocks)."""

    @property
    def validator(self) -> bool:
        return self.key.address in self.chain.state.validators()

    def _reject(self, where: str, exc: Rejected) -> None:
        text = f"{self.name}: {where}: {exc}"
        log.warning(text)
        if len(self.stats.rejected) < self._max_log:
            self.stats.rejected.append(text)

    # ------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        s = self.site
        handlers = [
            (topics.ledger_tx(s), self._on_tx),
            (topics.block_filter(s, "proposal"), self._on_proposal),
            (topics.block_filter(s, "votes"), self._on_vote),
            (topics.blocks_committed(s), self._on_committed),
            (topics.sync_request(s), self._on_sync_request),
            (topics.sync_response(s, self.name), self._on_sync_response),
        ]
        for flt, fn in handlers:
            sub = await self.bus.subscribe(flt, qos=1)
            self._tasks.append(asyncio.create_task(self._pump(sub, fn), name=f"{self.name}:{flt}"))
        if self.autoproduce:
            self._tasks.append(asyncio.create_task(self._producer(),
                                                   name=f"{self.name}:producer"))
        await self.request_sync()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()

    async def _pump(self, sub: Any, fn: Callable[[BusMessage], Any]) -> None:
        async for msg in sub:
            try:
                await fn(msg)
            except Rejected as exc:
                self._reject(msg.topic, exc)
            except Exception:  # a bad message must not kill the node
                log.exception("%s: handling %s", self.name, msg.topic)

    # ---------------------------------------------------------- transactions
    async def submit(self, msg: SignedMessage) -> None:
        """Publish a transaction to every node (this one included, via the broker)."""
        await self.bus.publish(topics.ledger_tx(self.site), msg.raw, qos=1)

    async def _on_tx(self, m: BusMessage) -> None:
        msg = messages.parse(m.payload)
        if msg.id in self.mempool:
            return
        if (msg.client_id, msg.req_id) in self.chain.state.recent:
            raise Rejected(Reason.REPLAY, f"reqId {msg.req_id} from {msg.client_id} is "
                           "already on the chain")
        self.fresh.check(msg, self.clock())
        self.chain.admit(msg)
        self.fresh.remember(msg, self.clock())
        self.mempool[msg.id] = msg
        self._wake.set()

    # --------------------------------------------------------------- blocks
    def _round_now(self) -> int:
        elapsed = _time.monotonic() - self._height_started - self.block_interval_s
        return max(0, int(elapsed // self.chain.state.params.round_timeout_s))

    async def _producer(self) -> None:
        while True:
            height = self.chain.height + 1
            if not self.mempool:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.5)
                if not self.mempool:
                    self._height_started = _time.monotonic()
                    continue
            wait = self._height_started + self.block_interval_s - _time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if self.chain.height + 1 != height:
                continue
            r = self._round_now()
            if (self.validator and self._proposed_round.get(height, -1) < r
                    and election.proposer(self.chain.state, r).address == self.key.address):
                self._proposed_round[height] = r
                await self._propose(r)
            await asyncio.sleep(0.05)

    async def produce(self) -> bool:
        """Propose the next block now if this node is the round-0 proposer elected by PoE
        and has transactions; True if it proposed."""
        if not (self.mempool and self.validator):
            return False
        if election.proposer(self.chain.state, 0).address != self.key.address:
            return False
        height = self.chain.height + 1
        if self._proposed_round.get(height, -1) >= 0:
            return False
        self._proposed_round[height] = 0
        await self._propose(0)
        return True

    async def _propose(self, round_: int) -> None:
        pending = list(self.mempool.values())
        proposal = self.chain.propose(self.key, pending, time=self.clock(), round_=round_)
        for msg, exc in proposal.dropped:
            self.mempool.pop(msg.id, None)
            self._reject("proposal dropped a transaction", exc)
        self.stats.proposed += 1
        log.debug("%s: proposes height %d round %d (%d txs)", self.name,
                  proposal.block.height, round_, len(proposal.txs))
        self._proposals[(proposal.block.height, proposal.block.hash)] = (
            proposal.block, proposal.txs)
        payload = _wire_block(proposal.block, proposal.txs)
        self.stats.proposal_at[proposal.block.height] = _time.perf_counter()
        await self.bus.publish(topics.block_proposal(self.site, proposal.block.height),
                               payload, qos=1)

    async def _on_proposal(self, m: BusMessage) -> None:
        block, txs, _ = _unwire_block(m.payload)
        height = self.chain.height + 1
        if block.height != height:
            if block.height > height:
                await self.request_sync()
            return
        if self._voted.get(height) not in (None, block.hash):
            return  # one vote per height
        # A later round is only legitimate once this node, too, has waited for the earlier
        # proposers (small tolerance for clock and delivery skew); else round 0 could be
        # skipped by a validator that simply claims round 1.
        timeout = self.chain.state.params.round_timeout_s
        early = (self._height_started + self.block_interval_s + (block.round - 0.25) * timeout
                 - _time.monotonic())
        if block.round > 0 and early > 0:
            log.debug("%s: round %d proposal for %d is %.2f s early", self.name, block.round,
                      height, early)
            await asyncio.sleep(early)
            if self.chain.height + 1 != height or self._voted.get(height) not in (
                    None, block.hash):
                return
        self.chain.check_proposal(block, txs, now=self.clock())
        self._proposals[(height, block.hash)] = (block, txs)
        if self.validator and height not in self._voted:
            self._voted[height] = block.hash
            log.debug("%s: votes for height %d round %d", self.name, height, block.round)
            vote = self.chain.vote(self.key, block)
            await self.bus.publish(topics.block_votes(self.site, height),
                                   canonical.encode(vote.as_dict()), qos=1)
        await self._maybe_commit(height, block.hash)

    async def _on_vote(self, m: BusMessage) -> None:
        vote = Vote.from_dict(canonical.decode(m.payload, strict=False))
        if vote.chain != self.chain.id or type(vote.height) is not int:
            return
        if vote.height <= self.chain.height:
            return
        state = self.chain.state
        entry = state.identities.get(vote.voter)
        if entry is None or "validator" not in entry.roles or not vote.signature_ok(
                entry.public_key):
            raise Rejected(Reason.BAD_SIGNATURE, f"vote from {vote.voter} does not verify")
        self._votes.setdefault(vote.height, {}).setdefault(vote.block, {})[vote.voter] = vote
        if vote.height == self.chain.height + 1:
            await self._maybe_commit(vote.height, vote.block)

    async def _maybe_commit(self, height: int, block_hash: str) -> None:
        votes = self._votes.get(height, {}).get(block_hash, {})
        proposal = self._proposals.get((height, block_hash))
        if proposal is None or len(votes) < self.chain.state.quorum():
            return
        block, txs = proposal
        cert = encode_certificate(list(votes.values()))
        self._commit(block, txs, cert)
        if block.proposer == self.key.address:
            await self.bus.publish(topics.blocks_committed(self.site),
                                   _wire_block(block, txs, cert), qos=1)

    def _commit(self, block: Block, txs: list[SignedMessage], cert: bytes) -> None:
        self.chain.commit(block, txs, cert, now=self.clock())
        for m in txs:
            self.mempool.pop(m.id, None)
        self.stats.committed += 1
        self.stats.commit_at[block.height] = _time.perf_counter()
        self.stats.commit_latency_s.append(_time.monotonic() - self._height_started)
        self._height_started = _time.monotonic()
        for h in [h for h in self._votes if h <= block.height]:
            del self._votes[h]
        for key in [k for k in self._proposals if k[0] <= block.height]:
            del self._proposals[key]
        self.committed_event.set()
        self._wake.set()

    async def _on_committed(self, m: BusMessage) -> None:
        block, txs, cert = _unwire_block(m.payload)
        if block.height <= self.chain.height:
            return
        if block.height > self.chain.height + 1:
            await self.request_sync()
            return
        if cert is None:
            raise Rejected(Reason.BAD_CERTIFICATE, "committed block without certificate")
        self._commit(block, txs, cert)

    # ----------------------------------------------------------------- sync
    async def request_sync(self) -> None:
        now = _time.monotonic()
        if now - self._syncing_since < 0.5:
            return
        self._syncing_since = now
        body = {"node": self.name, "from": self.chain.height + 1}
        await self.bus.publish(topics.sync_request(self.site), canonical.encode(body), qos=1)

    async def _on_sync_request(self, m: BusMessage) -> None:
        req = canonical.decode(m.payload, strict=False)
        if not (isinstance(req, dict) and isinstance(req.get("node"), str)
                and type(req.get("from")) is int) or req["node"] == self.name:
            return
        store = self.chain.store
        if store is None or store.height() < req["from"]:
            return
        start, top = max(1, req["from"]), store.height()
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
        obj = canonical.decode(m.payload, strict=False)
        for item in obj.get("blocks", []) if isinstance(obj, dict) else []:
            block, txs, cert = _unwire_block(canonical.encode(item))
            if block.height != self.chain.height + 1 or cert is None:
                continue
            self._commit(block, txs, cert)
            self.stats.synced += 1


async def run_node(layout_root: str, name: str, *, bus_url: str, site: str,
                   block_interval_s: float = 0.5, stop: asyncio.Event | None = None,
                   on_start: Callable[[LedgerNode], None] | None = None) -> LedgerNode:
    """Run one validator from a `testbed ledger init` folder until `stop` is set."""
    layout = LedgerLayout(Path(layout_root))
    genesis = layout.genesis()
    chain = Chain.open(layout.db_path(name), genesis=genesis)
    async with BusClient(bus_url, client_id=f"ledger-{site}-{name}") as bus:
        node = LedgerNode(name, layout.key(name), chain, bus, site,
                          block_interval_s=block_interval_s)
        await node.start()
        if on_start is not None:
            on_start(node)
        try:
            await (stop or asyncio.Event()).wait()
        finally:
            await node.stop()
            if chain.store is not None:
                chain.store.close()
    return node
