"""The ledger phase: meter readings, payments and the market's messages go to the
validators (`ledger.validators.Validators`, the facade), a block is produced at every
interval end on the run's clock, and committed blocks are recorded in the run store.

Does bus I/O through the facade. Transactions (its own and those the market hands in) are
queued during an interval and sent before the block, in their order and as few bus
messages (`Validators.submit_many`), so a replay with the same seed commits the same
blocks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from testbed.clock import EPOCH
from testbed.ledger import messages
from testbed.ledger import transactions as T
from testbed.ledger.identity import KeyPair
from testbed.ledger.pseudonyms import PseudonymDesk
from testbed.ledger.validators import Validators
from testbed.market.settlement import Transfer, TransferKind
from testbed.telemetry.store import RunStore


class LedgerPhase:
    def __init__(self, validators: Validators, store: RunStore, keys: Mapping[str, KeyPair],
                 aggregator_key: KeyPair, interval_s: int) -> None:
        self.validators = validators
        self.store = store
        self.keys = dict(keys)
        self.aggregator_key = aggregator_key
        self.by_address = {k.address: k for k in [*self.keys.values(), aggregator_key]}
        self.names = {k.address: n for n, k in self.keys.items()}
        self.names.update((n.key.address, n.name) for n in validators.nodes)
        self.n = len(validators.nodes)
        self.f = (self.n - 1) // 3
        """Faulty validators the chain tolerates (f < n/3): 4 tolerate one, 3 none."""
        self.interval_s = interval_s
        self.submitted: list[str] = []
        self.committed: set[str] = set()
        self.blocks = 0
        self.recorded = 0
        self._outbox: list[messages.SignedMessage] = []
        self.verified: dict[str, dict[str, Any]] = {}
        self._verifying = False
        validators.audit_as_committed()  # the end-of-run audit, block by block meanwhile

    async def submit(self, msg: messages.SignedMessage) -> None:
        """What the market's agents hand in: queued after everything queued before, and
        sent with it at the interval's end (before its block), in one batch."""
        self._outbox.append(msg)

    async def _flush(self) -> None:
        """Publish what is queued, in order, in as few messages as it takes."""
        outbox, self._outbox = self._outbox, []
        self.submitted.extend(m.id for m in outbox)
        await self.validators.submit_many(outbox)

    def readings(self, interval: int, certified: Iterable[tuple[str, float, float]],
                 at: float) -> None:
        """Each meter signs its interval's production and consumption (PoE evidence)."""
        for name, prod, cons in certified:
            self._outbox.append(messages.sign(self.keys[name], T.READING, {
                "meter": self.keys[name].address, "start": int(EPOCH + interval * self.interval_s),
                "duration_s": self.interval_s, "production_kwh": round(prod, 6),
                "consumption_kwh": round(cons, 6)}, at=at))

    def queue(self, msg: messages.SignedMessage) -> None:
        """A transaction that must reach the chain before the next one submitted (a
        pseudonym's certificate before the order it signs)."""
        self._outbox.append(msg)

    def payments(self, transfers: Iterable[tuple[Transfer, str]], at: float,
                 desk: PseudonymDesk | None = None) -> None:
        """Settlement transfers, each signed by its payer: (transfer, award id). A payer
        that is a pseudonym pays through `desk` (its owner's top-up first)."""
        for x, award_id in transfers:
            award = award_id if x.kind == TransferKind.ENERGY else None
            memo = f"{x.kind} {x.order_id[:16]} interval {x.interval}"
            by_pseudonym = desk.payments(x.payer, x.payee, x.amount_ueur, award=award,
                                         memo=memo, at=at) if desk is not None else []
            self._outbox.extend(by_pseudonym or [messages.sign(
                self.by_address[x.payer], T.PAYMENT, {"to": x.payee, "amount": x.amount_ueur,
                                                      "award": award, "memo": memo}, at=at)])

    async def interval_end(self, interval: int, t: float) -> None:
        """The elected validator proposes once every submitted transaction has reached it
        (or been refused by it); every node commits; the new blocks are recorded."""
        await self._flush()
        want = set(self.submitted) - self.committed
        if want:
            before = self.validators.height()
            if await self.validators.produce(want) is None:
                self.store.event(t, "block-missing", None, f"no block committed after height "
                                 f"{before} within 10 s")
        self._record()

    def _record(self) -> None:
        recorded = self.recorded
        for block, tx_ids in self.validators.blocks_since(self.recorded):
            self.committed.update(tx_ids)
            self.blocks += 1
            self.store.insert("blocks", {
                "height": block.height, "t": block.time - EPOCH, "hash": block.hash,
                "proposer": block.proposer,
                "proposer_name": self.names.get(block.proposer, "?"), "round": block.round,
                "txs": block.header["txs"], "cpf": block.header.get("evidence", {})})
            self.recorded = block.height
        if self.recorded > recorded:
            self.validators.audit_committed()

    async def stop(self) -> None:
        """Stop the validators and start the audit of their stores (`summary` collects it:
        the audit worker reads the stores back while the run tears down the rest)."""
        try:
            await self.validators.stop()
            self.validators.verify_start()
            self._verifying = True
        except BaseException:
            self.validators.close_audit()
            raise

    def _verified(self) -> dict[str, dict[str, Any]]:
        if self._verifying:
            self._verifying = False
            try:
                self.verified = self.validators.verify()
            finally:
                self.validators.close_audit()
        return self.verified

    def rejected(self) -> int:
        return sum(r["rejected"] for r in self.validators.report().values())

    def summary(self) -> dict[str, Any]:
        v = self._verified()
        return {"enabled": True, "validators": self.n, "tolerates": self.f,
                "blocks": self.blocks, "submitted": len(self.submitted),
                "uncommitted": len(set(self.submitted) - self.committed), "verified": v,
                "verifies": bool(v) and all(x["ok"] for x in v.values())}
