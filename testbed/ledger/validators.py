"""The validators of one chain, started from a ledger layout (engine branch stand-in).

The run engine, `testbed ledger`, the benches and the tests start nodes from a layout here
only. This file implements the facade's contract with today's `LedgerNode`; the consensus
work replaces it with its own implementation of the same interface.

Fast-clock block production waits on events (a transaction handled by the proposer, a
block committed), never on a polling loop, so no wall time is spent sleeping."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from testbed.bus import topics
from testbed.bus.client import BusClient, BusMessage
from testbed.ledger import election
from testbed.ledger.blocks import Block
from testbed.ledger.chain import Chain, verify_store
from testbed.ledger.messages import SignedMessage
from testbed.ledger.node import LedgerNode
from testbed.ledger.setup import LedgerLayout


class Validators:
    """The validators of one chain, started from a ledger layout."""

    nodes: list[LedgerNode]

    def __init__(self, layout: LedgerLayout, bus: BusClient, site: str,
                 nodes: list[LedgerNode]) -> None:
        self.layout, self.bus, self.site, self.nodes = layout, bus, site, nodes
        self._handled = asyncio.Event()
        self._rejected_seen = 0

    @classmethod
    async def start(cls, layout: LedgerLayout, bus: BusClient, site: str, *,
                    clock: Callable[[], float] | None = None, autoproduce: bool = False,
                    names: list[str] | None = None) -> Validators:
        """Open each validator's own store (layout.db_path(name)) and start its node."""
        self = cls(layout, bus, site, [])
        kw: dict[str, Any] = {"autoproduce": autoproduce}
        if clock is not None:
            kw["clock"] = clock
        genesis = layout.genesis()
        try:
            for name in names if names is not None else layout.validators():
                chain = Chain.open(layout.db_path(name), genesis=genesis)
                node = LedgerNode(name, layout.key(name), chain, bus, site, **kw)
                self._watch(node)
                await node.start()
                self.nodes.append(node)
        except BaseException:
            await self.stop()
            raise
        return self

    def _watch(self, node: LedgerNode) -> None:
        """Wake `produce` when the node has handled a transaction (admitted or refused)."""
        on_tx = node._on_tx

        async def handled(m: BusMessage) -> None:
            try:
                await on_tx(m)
            finally:
                self._handled.set()

        node._on_tx = handled  # type: ignore[method-assign]

    async def submit(self, msg: SignedMessage) -> None:
        """Publish a signed transaction on the site's ledger tx topic (qos 1)."""
        await self.bus.publish(topics.ledger_tx(self.site), msg.raw, qos=1)

    def _proposer(self) -> LedgerNode | None:
        live = [n for n in self.nodes if n.validator]
        if not live:
            return None
        elected = election.proposer(live[0].chain.state, 0).address
        return next((n for n in live if n.key.address == elected), None)

    async def produce(self, want: set[str] | None = None, *,
                      timeout_s: float = 10.0) -> int | None:
        """Wait until every tx id in `want` has reached the proposer (or been refused by
        it), have a block proposed and committed by all live nodes; the new common height,
        or None if nothing committed within `timeout_s`."""
        if not self.nodes:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        proposer = self._proposer()
        if proposer is not None and want:
            while True:
                self._handled.clear()
                have = len(want & proposer.mempool.keys())
                refused = len(proposer.stats.rejected) - self._rejected_seen
                if have + refused >= len(want) or not await _wait(self._handled, deadline,
                                                                  loop):
                    break
            self._rejected_seen = len(proposer.stats.rejected)
        height = self.height()
        for n in self.nodes:
            n.committed_event.clear()
        for n in self.nodes:
            await n.produce()
        while self.height() <= height:
            lagging = [n for n in self.nodes if n.chain.height <= height]
            if not await _wait_any([n.committed_event for n in lagging], deadline, loop):
                break
            for n in lagging:
                n.committed_event.clear()
        return self.height() if self.height() > height else None

    def height(self) -> int:
        """The lowest committed height among live nodes."""
        return min((n.chain.height for n in self.nodes), default=0)

    def blocks_since(self, height: int) -> list[tuple[Block, list[str]]]:
        """Committed blocks after `height` from the first node's store: (block, tx ids)."""
        store = self.nodes[0].chain.store if self.nodes else None
        out: list[tuple[Block, list[str]]] = []
        if store is None:
            return out
        for h in range(height + 1, self.nodes[0].chain.height + 1):
            stored = store.block(h)
            if stored is None:
                break
            out.append((Block.parse(stored.raw), [tx_id for tx_id, _ in stored.txs]))
        return out

    def report(self) -> dict[str, Any]:
        """Per node: height, round, rejected count, n, f."""
        n = len(self.layout.validators())
        return {node.name: {"height": node.chain.height, "round": 0,
                            "rejected": len(node.stats.rejected), "n": n, "f": (n - 1) // 3}
                for node in self.nodes}

    def verify(self) -> dict[str, dict[str, Any]]:
        """verify_store of every validator's store: {name: {"ok", "height", "error"}}."""
        out: dict[str, dict[str, Any]] = {}
        genesis = self.layout.genesis()
        for name in self.layout.validators():
            rep = verify_store(self.layout.db_path(name), genesis=genesis)
            out[name] = {"ok": rep.ok, "height": rep.height, "error": rep.error}
        return out

    async def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                await node.stop()


async def _wait(event: asyncio.Event, deadline: float, loop: asyncio.AbstractEventLoop) -> bool:
    """Wait for `event` until `deadline` (loop time); False on timeout."""
    left = deadline - loop.time()
    if left <= 0:
        return False
    try:
        await asyncio.wait_for(event.wait(), left)
    except TimeoutError:
        return False
    return True


async def _wait_any(events: list[asyncio.Event], deadline: float,
                    loop: asyncio.AbstractEventLoop) -> bool:
    left = deadline - loop.time()
    if left <= 0 or not events:
        return False
    tasks = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(tasks, timeout=left, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
    return bool(done)
