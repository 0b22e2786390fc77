"""The validators of one chain, started from a ledger layout.

The one place nodes are started from a `testbed ledger init` folder: used by the run
engine, `testbed ledger node`, the benches and the tests. Each validator gets its own store
(`layout.db_path(name)`), its own consensus record beside it, and its own `LedgerNode`;
all share the given bus connection (one process) or run one per process (`names=[one]`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from testbed.bus import topics
from testbed.bus.client import BusClient
from testbed.ledger import consensus, election
from testbed.ledger.audit import AuditWorker
from testbed.ledger.blocks import Block
from testbed.ledger.chain import Chain, verify_stores
from testbed.ledger.messages import SignedMessage
from testbed.ledger.node import LedgerNode, tx_batches
from testbed.ledger.setup import LedgerLayout

log = logging.getLogger("testbed.ledger.validators")


def fault_note(n: int) -> str:
    """What n validators tolerate, in one line (a warning below 4)."""
    f = consensus.tolerated(n)
    text = (f"{n} validators tolerate f = {f} faulty (crashed or Byzantine) "
            f"validator{'s' if f != 1 else ''}; a block needs {consensus.quorum(n)} of {n}")
    if n < 4:
        text += " - no fault is tolerated: one stopped validator halts the chain (use >= 4)"
    return text


class Validators:
    """The validators of one chain, started from a ledger layout: used by the run engine,
    `testbed ledger`, the benches and the tests (the one place nodes are started from a
    layout)."""

    nodes: list[LedgerNode]

    def __init__(self, layout: LedgerLayout, bus: BusClient, site: str,
                 nodes: list[LedgerNode]) -> None:
        self.layout, self.bus, self.site, self.nodes = layout, bus, site, nodes
        self.auditor: AuditWorker | None = None
        self._changed = asyncio.Event()
        for n in nodes:
            n.watchers.append(self._changed.set)

    @classmethod
    async def start(cls, layout: LedgerLayout, bus: BusClient, site: str, *,
                    clock: Callable[[], float] | None = None, autoproduce: bool = False,
                    names: list[str] | None = None, block_interval_s: float = 0.5,
                    timeouts: consensus.Timeouts | None = None) -> Validators:
        """Open each validator's own store and start its node (all of the layout's
        validators unless `names`)."""
        genesis = layout.genesis()
        chosen = layout.validators() if names is None else names
        nodes: list[LedgerNode] = []
        try:
            for name in chosen:
                chain = Chain.open(layout.db_path(name), genesis=genesis)
                kw: dict[str, Any] = {} if clock is None else {"clock": clock}
                node = LedgerNode(name, layout.key(name), chain, bus, site,
                                  autoproduce=autoproduce, block_interval_s=block_interval_s,
                                  timeouts=timeouts, **kw)
                nodes.append(node)
                await node.start()
        except BaseException:
            for node in nodes:
                await node.stop()
                if node.chain.store is not None:
                    node.chain.store.close()
            raise
        if nodes:
            log.info("%s: %s", site, fault_note(nodes[0].n))
        return cls(layout, bus, site, nodes)

    async def submit(self, msg: SignedMessage) -> None:
        """Publish a signed transaction on the site's ledger tx topic (qos 1)."""
        await self.bus.publish(topics.ledger_tx(self.site), msg.raw, qos=1)

    async def submit_many(self, msgs: list[SignedMessage]) -> None:
        """`submit` for a burst, in order, as few messages (`node.tx_batches`): what a
        validator admits is the same, the bus and broker handle one message, not one
        per transaction."""
        topic = topics.ledger_tx(self.site)
        for payload in tx_batches(msgs):
            await self.bus.publish(topic, payload, qos=1)

    def _proposer(self) -> LedgerNode | None:
        if not self.nodes:
            return None
        elected = election.proposer(self.nodes[0].chain.state, 0).address
        return next((n for n in self.nodes if n.key.address == elected), None)

    def _done(self, node: LedgerNode, tx_id: str) -> bool:
        return tx_id in node.mempool or tx_id in node.refused or tx_id in node.committed_txs

    async def produce(self, want: set[str] | None = None, *,
                      timeout_s: float = 10.0) -> int | None:
        """Fast-clock block production: wait until every tx id in `want` has reached the
        round-0 proposer (or been refused by it), start the height on every node and wait
        until all of them committed it. The new common height, or None if nothing
        committed within `timeout_s` (bounded; never hangs)."""
        if not self.nodes:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        proposer = self._proposer()
        if proposer is not None and want:
            await self._until(lambda: all(self._done(proposer, t) for t in want), deadline)
        if not any(n.mempool for n in self.nodes):
            return None  # nothing to commit
        height = self.height()
        for n in self.nodes:
            await n.produce()
        await self._until(lambda: self.height() > height, deadline)
        return self.height() if self.height() > height else None

    async def _until(self, done: Callable[[], bool], deadline: float) -> None:
        """Wait until `done()` or the deadline, woken by the nodes' events (a transaction
        handled, a block committed), never by a polling loop: the fast clock sleeps no
        wall time here."""
        loop = asyncio.get_running_loop()
        while not done():
            self._changed.clear()
            if done():
                return
            left = deadline - loop.time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def height(self) -> int:
        """The lowest committed height among the nodes."""
        return min((n.committed_height for n in self.nodes), default=0)

    def blocks_since(self, height: int) -> list[tuple[Block, list[str]]]:
        """Committed blocks after `height` from the first node's store: (block, tx ids)."""
        if not self.nodes or self.nodes[0].chain.store is None:
            return []
        out = []
        for b in self.nodes[0].chain.store.blocks(height + 1):
            out.append((Block.parse(b.raw), [tid for tid, _ in b.txs]))
        return out

    def report(self) -> dict[str, Any]:
        """Per node: height, round, rejected count, n, f (and rounds of decided heights)."""
        return {n.name: {"height": n.committed_height, "round": n.round,
                         "rejected": n.stats.rejected_count, "n": n.n, "f": n.f,
                         "proposed": n.stats.proposed, "synced": n.stats.synced,
                         "evidence": len(n.evidence),
                         "late_rounds": sum(1 for r in n.stats.rounds.values() if r > 0)}
                for n in self.nodes}

    def audit_as_committed(self) -> None:
        """Have `verify` done by a worker process (`audit.AuditWorker`, the machine's other
        core) that verifies each block once `audit_committed` says it is in the stores:
        at the end only what was committed since is left to check."""
        if self.auditor is None and self.nodes:
            paths = [self.layout.db_path(n.name) for n in self.nodes]
            try:
                self.auditor = AuditWorker.start(self.layout.genesis_path, paths,
                                                 self.layout.genesis())
            except OSError as exc:  # no process: `verify` audits in this one, as before
                log.warning("%s: store audit worker not started (%s); the stores are "
                            "audited at the end instead", self.site, exc)

    def audit_committed(self) -> None:
        """Blocks were committed: the audit worker (if any) verifies them meanwhile."""
        if self.auditor is not None:
            self.auditor.follow()

    def verify_start(self) -> None:
        """Start `verify` (after `stop`): the audit worker, if any, checks what is left
        and reads the stores back while the caller does other work."""
        if self.auditor is not None:
            self.auditor.finish_start()

    def verify(self) -> dict[str, dict[str, Any]]:
        """`verify_store` of every validator's store (through `verify_stores`: one full
        check, the others compared with it; by the audit worker if started, which has
        checked most blocks already): {name: {"ok", "height", "error"}}. After `stop`."""
        paths = [self.layout.db_path(n.name) for n in self.nodes]
        auditor, self.auditor = self.auditor, None
        reports = (auditor.finish() if auditor is not None
                   else verify_stores(paths, genesis=self.layout.genesis(), closed=True))
        return {n.name: {"ok": rep.ok, "height": rep.height, "error": rep.error}
                for n, rep in zip(self.nodes, reports, strict=True)}

    async def stop(self) -> None:
        for n in self.nodes:
            await n.stop()
        if self.auditor is not None and not self.auditor.pause():
            self.auditor = None  # it did not answer (killed): `verify` checks here
        for n in self.nodes:
            if n.chain.store is not None:
                n.chain.store.close()

    def close_audit(self) -> None:
        """Kill the audit worker if `verify` did not collect it (a failed run)."""
        auditor, self.auditor = self.auditor, None
        if auditor is not None:
            auditor.kill()
