"""Genesis, block production and full validation: the rules every node applies alike.

`Chain` holds a node's state and (optionally) its store. Every block is checked the same
way whether it arrives live, during catch-up or from `testbed ledger verify`: height and
link, time, PoE election of the proposer (and its round), the proposer's CPF evidence and
signature, the Merkle root, the commit certificate, then every transaction against the
rules in `state`. Nothing changes unless all of it passes.
"""

from __future__ import annotations

import time as _time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.ledger import canonical, election, messages
from testbed.ledger import transactions as T
from testbed.ledger.blocks import (
    ZERO_HASH,
    Block,
    Vote,
    check_certificate,
    merkle_root,
)
from testbed.ledger.errors import Reason, Rejected
from testbed.ledger.identity import KeyPair, address_of, batch_verifier
from testbed.ledger.messages import SignedMessage
from testbed.ledger.state import POOL, Effect, Entry, LedgerState, Params, SharedEffect
from testbed.ledger.store import Store, StoreDamaged, StoredBlock
from testbed.steps import Steps, run_steps

MAX_ROUNDS = 1000
MAX_PENDING_PSEUDONYMS = 65536


MAX_SHARED_CHECKS = 8
_CHECKED: OrderedDict[tuple[str, int, str, str, tuple[str, ...]], SharedEffect] = OrderedDict()
"""Blocks that passed `check_proposal` in this process: (chain, height and head of the
state checked on, block hash, transaction ids) -> the block's effect. The rules are pure
functions of the state and the block's bytes, and a chain's state at a height and head
is the one its blocks give, so a validator of this process that checks the same block on
the same state gets the answer another one computed, as from the signature cache (only
passes are kept: a refusal is always recomputed)."""

_PRECEDENCE = {T.REGISTRY: -1, T.PSEUDONYM: -1, T.GRID_CHECK: 0.5, T.AWARD: 1, T.PAYMENT: 2}
"""Order of operations within a proposal (stable otherwise: arrival order)."""


def make_genesis(admin: KeyPair, registry: Sequence[dict[str, Any]], *,
                 allocations: dict[str, int] | None = None, params: Params | None = None,
                 time: float | None = None, name: str = "testbed") -> Block:
    """Height 0: the registry, the administrator key, parameters and initial balances.

    It is signed by the administrator and is the trust anchor: the chain id is its hash.
    """
    for i, e in enumerate(registry):
        T.check_shape(T.REGISTRY, {"action": "add", "entry": e})
        if not e["roles"]:
            raise ValueError(f"registry[{i}] has no role")
    header = {"name": name, "height": 0, "prev": ZERO_HASH,
              "time": round(_time.time() if time is None else time, 3),
              "admin": admin.public.hex(), "params": (params or Params()).as_dict(),
              "registry": list(registry), "allocations": dict(allocations or {})}
    return Block.create(admin, header)


def genesis_state(genesis: Block) -> LedgerState:
    h = genesis.header
    try:
        admin = bytes.fromhex(h["admin"])
        state = LedgerState(Params.from_dict(h["params"]), admin, chain_id=genesis.hash,
                            head=genesis.hash, head_time=float(h["time"]))
        for e in h["registry"]:
            entry = Entry.from_dict(e)
            if entry.address in state.identities:
                raise ValueError(f"{entry.address} registered twice")
            state.identities[entry.address] = entry
        for address, amount in h["allocations"].items():
            if type(amount) is not int or amount < 0:
                raise ValueError(f"allocation to {address} must be a non-negative integer")
            state.balances[address] = amount
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise Rejected(Reason.BAD_BLOCK, f"genesis: {exc!r}", height=0) from None
    if h.get("height") != 0 or h.get("prev") != ZERO_HASH:
        raise Rejected(Reason.BAD_BLOCK, "genesis must be height 0 with a zero prev",
                       height=0)
    if not genesis.signature_ok(admin):
        raise Rejected(Reason.BAD_SIGNATURE, "genesis is not signed by its administrator",
                       height=0)
    if not state.validators():
        raise Rejected(Reason.BAD_BLOCK, "genesis registers no validator", height=0)
    return state


def _check_shape(msg: SignedMessage) -> None:
    """`transactions.check_shape` once per message object: a pure function of its
    operation and parameters, which nothing changes, and `messages.parse` hands every
    in-process validator the same object (a refusal is not remembered)."""
    if "_shape_ok" not in msg.__dict__:
        T.check_shape(msg.operation, msg.parameters)
        msg.__dict__["_shape_ok"] = True


# A block's work comes in `Steps` (one per transaction): driven to the end at once by
# `run_steps`, or by a node in slices (`steps.drive`), so a block of 1,000 transactions
# never holds the loop for its whole duration. A state journal (`trial`, `atomic`) is open
# across the steps: whoever drives them must keep every other use of this chain out until
# they finish (a node holds its lock).


@dataclass
class Proposal:
    block: Block
    txs: list[SignedMessage]
    dropped: list[tuple[SignedMessage, Rejected]] = field(default_factory=list)


class Chain:
    """A node's view of the ledger: state, head and (optionally) its SQLite store."""

    def __init__(self, genesis: Block, store: Store | None = None) -> None:
        self.genesis = genesis
        self.state = genesis_state(genesis)
        self.store = store
        self.verified: set[str] = set()
        """Ids of transactions whose signature this node has checked (mempool)."""
        self.pending_pseudonyms: dict[str, tuple[bytes, int, int]] = {}
        """Pseudonyms certified by transactions in the mempool, not yet on the chain."""
        self.verifier = batch_verifier()
        self.checked: tuple[str, tuple[str, ...], int, str, Effect] | None = None
        """The last block `check_proposal` passed (or `propose` built): (hash, tx ids, state height and head it
        was checked on, its effect), which `commit` of that block on that state redoes."""
        self.reused = 0
        """Blocks committed by redoing their checked effect (tests, benches)."""
        """Spreads a block's (or a mempool burst's) signature checks over every core."""
        if store is not None and store.height() < 0:
            store.append(0, genesis.hash, genesis.raw, b"[]", [])

    @property
    def id(self) -> str:
        return self.genesis.hash

    @property
    def height(self) -> int:
        return self.state.height

    @classmethod
    def open(cls, path: Path | str, *, genesis: Block | None = None,
             readonly: bool = False) -> Chain:
        """Open a node's database (creating it from `genesis`) and replay it fully checked.

        `readonly` opens it through SQLite's read-only URI (`show`, `wallets`): the file is
        not modified, and a file that is not a ledger store is refused, not converted."""
        store = Store(path, readonly=readonly)
        try:
            stored = store.block(0)
            if stored is None:
                if genesis is None or readonly:
                    raise ValueError(f"{path}: empty ledger database and no genesis given")
                return cls(genesis, store)
            g = Block.parse(stored.raw, genesis=True)
            if genesis is not None and g.hash != genesis.hash:
                raise ValueError(f"{path}: holds chain {g.hash[:16]}, expected "
                                 f"{genesis.hash[:16]}")
            chain = cls(g, None)
            for b in store.blocks(1):
                chain.commit_raw(b.raw, [raw for _, raw in b.txs], b.cert)
        except BaseException:
            store.close()
            raise
        chain.store = store
        return chain

    # ------------------------------------------------------------ production
    def _admission_key(self, msg: SignedMessage) -> bytes | None:
        """The key a mempool arrival must verify against: the registry's, or that of a
        pseudonym whose administrator-signed certificate is itself waiting in the mempool
        (a TCR's order follows its certificate within one block interval; the block's
        rules still apply the certificate first and check the order against it)."""
        key = self.state.signer_key(msg)
        if key is None and msg.client_id in self.pending_pseudonyms:
            pk, lo, hi = self.pending_pseudonyms[msg.client_id]
            if lo <= msg.time and (msg.time < hi or msg.operation == T.PAYMENT):
                key = pk
        return key

    def _admitted(self, msg: SignedMessage) -> None:
        self.verified.add(msg.id)
        if msg.operation == T.PSEUDONYM and msg.client_id == self.state.admin_address:
            p = msg.parameters
            pk = bytes.fromhex(p["public_key"])
            pending = self.pending_pseudonyms
            pending[address_of(pk)] = (pk, p["valid_from"], p["valid_to"])
            while len(pending) > MAX_PENDING_PSEUDONYMS:  # oldest first: bounded memory
                del pending[next(iter(pending))]

    def admit(self, msg: SignedMessage) -> None:
        """Mempool admission: shape and signature against the current registry."""
        _check_shape(msg)
        if msg.id not in self.verified:
            key = self._admission_key(msg)
            messages.verify(msg, lambda a: key)
            self._admitted(msg)

    def admit_many(self, msgs: Sequence[SignedMessage]) -> list[Rejected | None]:
        """`admit` for a batch (a burst of mempool arrivals): signatures checked on every
        core. Per message, in order: None if admitted, else why not."""
        return self.admit_start(msgs)()

    def admit_start(self, msgs: Sequence[SignedMessage]
                    ) -> Callable[[], list[Rejected | None]]:
        """`admit_many` in two steps: the signature checks start on the worker processes
        and this returns at once, so the node can apply a block meanwhile; calling the
        result collects the answers and admits (keys are resolved now, as on arrival)."""
        msgs = list(msgs)
        errors: list[Rejected | None] = [None] * len(msgs)
        keys: dict[str, bytes] = {}
        todo = []
        for i, msg in enumerate(msgs):
            if msg.id in self.verified:
                continue
            try:
                _check_shape(msg)
                key = self._admission_key(msg)
                if key is None:
                    raise Rejected(Reason.UNKNOWN_KEY, f"clientId {msg.client_id} is not "
                                   "registered")
            except Rejected as exc:
                errors[i] = exc
                continue
            keys[msg.client_id] = key
            todo.append(i)
        pending = messages.verify_batch_start([msgs[i] for i in todo], keys.get,
                                              verifier=self.verifier)

        def collect() -> list[Rejected | None]:
            for i, exc in zip(todo, pending(), strict=True):
                if exc is None:
                    self._admitted(msgs[i])
                errors[i] = exc
            return errors

        return collect

    def _preverify(self, txs: Sequence[SignedMessage]) -> set[str]:
        """Batch-check the signatures of a block's transactions on every core before the
        rules run one by one. Only good ones are marked; anything else (bad shape, unknown
        key, a key registered earlier in this block) is left for `state.apply` to refuse
        in block order with its usual reason, so the outcome is the sequential one.
        Returns the ids it marked (to forget them if the block fails)."""
        state, todo = self.state, []
        for m in txs:
            if m.id in self.verified:
                continue
            try:
                _check_shape(m)
            except Rejected:
                continue
            if state.signer_key(m) is not None:
                todo.append(m)
        checked = messages.verify_batch(todo, lambda a: state.public_key(a, None),
                                        verifier=self.verifier)
        marked = {m.id for m, exc in zip(todo, checked, strict=True) if exc is None}
        self.verified |= marked
        return marked

    def propose(self, key: KeyPair, txs: Iterable[SignedMessage], *, time: float,
                round_: int = 0) -> Proposal:
        """Build and sign the next block from candidate transactions, dropping those the
        rules refuse (with their reasons). Only the elected proposer for `round_` may."""
        return run_steps(self.propose_steps(key, txs, time=time, round_=round_))

    def propose_steps(self, key: KeyPair, txs: Iterable[SignedMessage], *, time: float,
                      round_: int = 0) -> Steps[Proposal]:
        """`propose` as steps (see `Steps`): one per candidate transaction."""
        state = self.state
        elected = election.proposer(state, round_)
        if elected.address != key.address:
            raise Rejected(Reason.WRONG_PROPOSER, f"round {round_} of height "
                           f"{state.height + 1} belongs to {elected.address}, not "
                           f"{key.address}", height=state.height + 1)
        time = round(max(time, state.head_time + 0.001), 3)
        height = state.height + 1
        # Dependencies first: an award re-executes over the auction's committed orders
        # and a payment settles an award line, so arrival order (messages from different
        # senders race on the bus) must not decide whether they fit in this block.
        candidates = sorted(txs, key=lambda m: _PRECEDENCE.get(m.operation, 0))
        entry = state.identities[key.address]
        if (state.params.block_reward > 0 and entry.mode in ("RE", "RE+TE")
                and state.balance(POOL) >= state.params.block_reward):
            reward = messages.sign(key, T.REWARD, {"to": key.address, "height": height,
                                                   "amount": state.params.block_reward},
                                   at=time)
            self.verified.add(reward.id)
            candidates.insert(0, reward)
        accepted: list[SignedMessage] = []
        dropped: list[tuple[SignedMessage, Rejected]] = []
        effect: list[Effect] = []
        self.checked = None
        with state.trial(effect):
            state.advance(height, state.head, time)
            for msg in candidates:
                if len(accepted) >= state.params.max_block_txs:
                    break
                yield
                exc = state.try_apply(msg, block_time=time, height=height,
                                      proposer=key.address, index=len(accepted),
                                      verified=self.verified)
                if exc is None:
                    accepted.append(msg)
                else:
                    dropped.append((msg, exc.at(tx=msg.id)))
        header = {"chain": self.id, "height": height, "prev": state.head, "time": time,
                  "round": round_, "proposer": key.address, "evidence": elected.evidence(),
                  "merkle": merkle_root([m.id for m in accepted]), "txs": len(accepted)}
        block = Block.create(key, header)
        # the accepted transactions were applied in block order, as `commit` applies them
        self.checked = (block.hash, tuple(m.id for m in accepted), state.height, state.head,
                        effect[0])
        return Proposal(block, accepted, dropped)

    def vote(self, key: KeyPair, block: Block) -> Vote:
        return Vote.cast(key, self.id, block.height, block.hash)

    # ------------------------------------------------------------ validation
    def _check_header(self, block: Block, txs: Sequence[SignedMessage],
                      now: float | None) -> None:
        state, h = self.state, block.header
        height = state.height + 1
        if h["chain"] != self.id:
            raise Rejected(Reason.BAD_BLOCK, f"block of chain {str(h['chain'])[:16]}, this is "
                           f"{self.id[:16]}", height=block.height)
        if block.height != height:
            raise Rejected(Reason.BAD_BLOCK, f"expected height {height}, got {block.height}",
                           height=block.height)
        if h["prev"] != state.head:
            raise Rejected(Reason.BAD_BLOCK, f"prev {h['prev'][:16]} is not the head "
                           f"{state.head[:16]}", height=height)
        if not h["time"] > state.head_time:
            raise Rejected(Reason.BAD_BLOCK, f"time {h['time']} is not after the previous "
                           f"block's {state.head_time}", height=height)
        if now is not None and h["time"] > now + state.params.max_skew_s:
            raise Rejected(Reason.STALE, f"block dated {h['time'] - now:+.1f} s in the future",
                           height=height)
        if not 0 <= block.round < MAX_ROUNDS:
            raise Rejected(Reason.BAD_BLOCK, f"round {block.round} out of range", height=height)
        elected = election.proposer(state, block.round)
        if block.proposer != elected.address:
            raise Rejected(Reason.WRONG_PROPOSER, f"round {block.round} belongs to "
                           f"{elected.address} (CPF {elected.cpf:.6f}), block proposed by "
                           f"{block.proposer}", height=height)
        if canonical.encode(h["evidence"]) != canonical.encode(elected.evidence()):
            raise Rejected(Reason.BAD_BLOCK, "proposer's CPF evidence does not match its "
                           "certified readings", height=height)
        if not block.signature_ok(state.identities[block.proposer].public_key):
            raise Rejected(Reason.BAD_SIGNATURE, "block is not signed by its proposer",
                           height=height)
        if h["txs"] != len(txs) or h["merkle"] != merkle_root([m.id for m in txs]):
            raise Rejected(Reason.BAD_BLOCK, "transactions do not match the header's Merkle "
                           "root", height=height)

    def _apply_txs(self, block: Block, txs: Sequence[SignedMessage]) -> Steps[None]:
        state = self.state
        state.advance(block.height, block.hash, block.time)
        for i, msg in enumerate(txs):
            yield
            try:
                state.apply(msg, block_time=block.time, height=block.height,
                            proposer=block.proposer, index=i, verified=self.verified)
            except Rejected as exc:
                raise exc.at(height=block.height, tx=msg.id) from None

    def _redo(self, block: Block, effect: Effect) -> Steps[None]:
        self.state.redo(effect, block.height, block.hash, block.time)
        self.reused += 1
        yield

    def check_proposal(self, block: Block, txs: Sequence[SignedMessage], *,
                       now: float | None = None) -> None:
        """Everything but the certificate; leaves the state as it was (a validator votes
        only after this passes)."""
        run_steps(self.check_proposal_steps(block, txs, now=now))

    def check_proposal_steps(self, block: Block, txs: Sequence[SignedMessage], *,
                             now: float | None = None) -> Steps[None]:
        """`check_proposal` as steps (see `Steps`): one per transaction."""
        self._check_header(block, txs, now)
        state = self.state
        ids = tuple(m.id for m in txs)
        key = (self.id, state.height, state.head, block.hash, ids)
        self.checked = None
        shared = _CHECKED.get(key)
        if shared is not None:
            _CHECKED.move_to_end(key)
            self.checked = (block.hash, ids, state.height, state.head, state.adopt(shared))
            return
        marked = self._preverify(txs)
        effect: list[Effect] = []
        try:
            with state.trial(effect):
                yield from self._apply_txs(block, txs)
        except Rejected:
            self.verified -= marked
            raise
        self.verified.update(ids)
        self.checked = (block.hash, ids, state.height, state.head, effect[0])
        portable = state.share(effect[0])
        if portable is not None:
            _CHECKED[key] = portable
            if len(_CHECKED) > MAX_SHARED_CHECKS:
                _CHECKED.popitem(last=False)

    def commit(self, block: Block, txs: Sequence[SignedMessage], cert: bytes, *,
               now: float | None = None) -> None:
        """Fully check a block with its commit certificate, apply it and store it."""
        run_steps(self.commit_steps(block, txs, cert, now=now))

    def commit_steps(self, block: Block, txs: Sequence[SignedMessage], cert: bytes, *,
                     now: float | None = None) -> Steps[None]:
        """`commit` as steps (see `Steps`): one per transaction; the state changes and the
        store is written at the last step only (all or nothing, as `commit`)."""
        state = self.state
        self._check_header(block, txs, now)
        validators = {a: state.identities[a].public_key for a in state.validators()}
        try:
            check_certificate(cert, chain=self.id, block=block, validators=validators,
                              quorum=state.quorum())
        except Rejected as exc:
            raise exc.at(height=block.height) from None
        checked, self.checked = self.checked, None
        if (checked is not None and checked[0] == block.hash
                and checked[2:4] == (state.height, state.head)
                and checked[1] == tuple(m.id for m in txs)):
            # this very block passed `check_proposal` against this very state: its rules
            # ran then, and the same bytes on the same state give the same result
            apply: Steps[None] = self._redo(block, checked[4])
            marked: set[str] = set()
        else:
            apply = self._apply_txs(block, txs)
            marked = self._preverify(txs)
        try:
            with state.atomic():
                yield from apply
                if self.store is not None:
                    yield from self.store.append_steps(block.height, block.hash, block.raw,
                                                       cert, [(m.id, m.raw) for m in txs])
        except Rejected:
            self.verified -= marked
            raise
        for m in txs:
            self.verified.discard(m.id)
            if m.operation == T.PSEUDONYM:
                self.pending_pseudonyms.pop(address_of(bytes.fromhex(
                    m.parameters["public_key"])), None)

    def commit_raw(self, raw: bytes, tx_raws: Sequence[bytes], cert: bytes, *,
                   now: float | None = None) -> Block:
        """`commit` from stored or received bytes (strictly canonical)."""
        height = self.state.height + 1
        try:
            block = Block.parse(raw)
            txs = [messages.parse(r) for r in tx_raws]
        except Rejected as exc:
            raise exc.at(height=height) from None
        self.commit(block, txs, cert, now=now)
        return block

    def wallets(self) -> dict[str, int]:
        return dict(sorted(self.state.balances.items()))


def admin_address(genesis: Block) -> str:
    return address_of(bytes.fromhex(genesis.header["admin"]))


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    height: int | None
    """Last good height when ok; the first bad height otherwise; None: not a ledger store."""
    chain_id: str
    txs: int
    error: str = ""


class UnusableEvidence(ValueError):
    """`verify --against` was given something that proves nothing (unreadable, forged)."""


@dataclass(frozen=True)
class HeadCertificate:
    """A committed block's header and its commit certificate: what a peer (or an auditor
    who saved it) holds as proof that the chain reached `block.height`. `verify --against`
    uses it to detect a store whose last blocks were deleted."""

    block: Block
    cert: bytes

    def encode(self) -> bytes:
        return canonical.encode({"kind": "testbed/head-certificate/v1",
                                 "block": canonical.decode(self.block.raw),
                                 "cert": canonical.decode(self.cert)})

    @classmethod
    def parse(cls, raw: bytes, *, source: str = "head certificate") -> HeadCertificate:
        try:
            obj = canonical.decode(raw.strip(), strict=False)
            if not (isinstance(obj, dict) and obj.get("kind") == "testbed/head-certificate/v1"
                    and set(obj) == {"kind", "block", "cert"}):
                raise ValueError("expected {kind: testbed/head-certificate/v1, block, cert}")
            block = Block.parse(canonical.encode(obj["block"]))
            return cls(block, canonical.encode(obj["cert"]))
        except (ValueError, Rejected) as exc:
            raise UnusableEvidence(f"{source}: not a head certificate ({exc})") from None


def head_certificate(path: Path | str) -> HeadCertificate:
    """The head block and certificate of a store (read-only, unverified: the reader checks)."""
    store = Store(path, readonly=True)
    try:
        top = store.height()
        b = store.block(top)
        if b is None or top < 1:
            raise ValueError(f"{path}: holds no committed block after genesis")
        return HeadCertificate(Block.parse(b.raw), b.cert)
    except Rejected as exc:
        raise ValueError(f"{path}: head block unreadable ({exc})") from None
    finally:
        store.close()


@dataclass(frozen=True)
class Against:
    """What `verify --against` compares a store with: a peer's store (every block hash, and
    its blocks to check) or a head certificate file (`head` only)."""

    source: str
    head: HeadCertificate | None
    hashes: dict[int, str] = field(default_factory=dict)
    store: Path | None = None

    def certified(self, height: int) -> HeadCertificate | None:
        """The peer's block at `height` with its certificate (unverified), if readable."""
        if self.store is None:
            return None
        try:
            peer = Store(self.store, readonly=True)
        except ValueError:
            return None
        try:
            b = peer.block(height)
            return None if b is None else HeadCertificate(Block.parse(b.raw), b.cert)
        except (ValueError, Rejected):
            return None
        finally:
            peer.close()


def load_against(path: Path | str) -> Against:
    """OTHER for `verify --against`: a peer's store or a head certificate file (`ledger
    head`). Raises UnusableEvidence if it is neither."""
    path = Path(path)
    try:
        head = path.read_bytes()[:16]
    except OSError as exc:
        raise UnusableEvidence(f"{path}: cannot read ({exc.strerror})") from None
    if not head.startswith(b"SQLite format 3"):
        return Against(str(path), HeadCertificate.parse(path.read_bytes(), source=str(path)))
    try:
        store = Store(path, readonly=True)
        try:
            hashes = store.hashes()
        finally:
            store.close()
    except ValueError as exc:
        raise UnusableEvidence(f"{path}: {exc}") from None
    try:
        cert = head_certificate(path)
    except ValueError:
        cert = None
    return Against(str(path), cert, hashes, path)


def _certified_by(chain: Chain, evidence: HeadCertificate) -> int:
    """Votes of this chain's validators (as of its head) on the evidence's block; raises
    UnusableEvidence when they do not make a commit certificate."""
    state = chain.state
    validators = {a: state.identities[a].public_key for a in state.validators()}
    try:
        return len(check_certificate(evidence.cert, chain=chain.id, block=evidence.block,
                                     validators=validators, quorum=state.quorum()))
    except Rejected as exc:
        raise UnusableEvidence(f"OTHER's block at height {evidence.block.height} carries no "
                               f"valid commit certificate for this chain's validators "
                               f"({exc.detail})") from None


def _check_against(chain: Chain, store: Store, other: Against) -> None:
    """Raise Rejected when OTHER proves this store stops short of the chain (a certified
    block beyond its head) or holds another block than a certified one at some height;
    raise UnusableEvidence when OTHER proves nothing (another chain, no valid votes)."""
    top = chain.height
    theirs0 = other.hashes.get(0)
    ours0 = store.block(0)
    if theirs0 is not None and ours0 is not None and theirs0 != ours0.hash:
        raise UnusableEvidence(f"OTHER holds chain {theirs0[:16]}, this store "
                               f"{ours0.hash[:16]}")
    for h, theirs in sorted(other.hashes.items()):
        if h > top:
            break
        ours = store.block(h)
        if ours is not None and ours.hash != theirs:
            evidence = other.certified(h)
            if evidence is None or evidence.block.hash != theirs:
                raise UnusableEvidence(f"OTHER's block at height {h} differs and cannot be "
                                       "read: OTHER is damaged")
            votes = _certified_by(chain, evidence)
            raise Rejected(Reason.BAD_BLOCK, f"OTHER holds another block here "
                           f"({theirs[:16]}, {votes} validator votes) than this store "
                           f"({ours.hash[:16]}): two blocks certified at one height",
                           height=h)
    head = other.head
    if head is None:
        return
    if head.block.header.get("chain") != chain.id:
        raise UnusableEvidence(f"OTHER is a head of chain "
                               f"{str(head.block.header.get('chain'))[:16]}, this store "
                               f"holds {chain.id[:16]}")
    if head.block.height <= top:
        ours = store.block(head.block.height)
        if ours is None or ours.hash != head.block.hash:
            votes = _certified_by(chain, head)
            raise Rejected(Reason.BAD_BLOCK, f"OTHER's certified head ({votes} validator "
                           "votes) is another block than this store's",
                           height=head.block.height)
        return
    votes = _certified_by(chain, head)
    raise Rejected(Reason.BAD_BLOCK, f"missing: the store ends at height {top}, but OTHER "
                   f"proves height {head.block.height} was committed ({votes} validator "
                   f"votes): the store is truncated", height=top + 1)


class _Peer:
    """Another node's store read in step with one being fully verified: it verifies the
    same way if it holds byte-identical blocks and transactions at every height (what the
    full check recomputes from) and each certificate that differs from the reference's
    (nodes assemble their own from the precommits they received) passes the very check
    `commit` makes, against the validators of that height. Anything else, or any error,
    marks it `differs`: it then gets a full `verify_store` of its own."""

    def __init__(self, path: Path | str, *, closed: bool = False) -> None:
        self.path = path
        self.store: Store | None = None
        self.differs = False
        self.certs_checked = 0
        self.certs: list[bytes] = []
        """The certificate of each height compared so far (an incremental audit checks at
        the end that the store still holds these)."""
        self.open(closed=closed)

    def open(self, *, closed: bool = False) -> None:
        """(Re)open the store read-only, on a new snapshot (`closed`: see `Store`)."""
        self.close()
        if self.differs:
            return
        try:
            self.store = Store(self.path, readonly=True, closed=closed)
            self.store.snapshot()
        except Exception:  # noqa: BLE001 - the full verify reports whatever this is
            self.store = None
            self.differs = True

    def compare(self, ours: StoredBlock, chain: Chain | None) -> None:
        """Height `ours.height` before `chain` (None: genesis) commits it."""
        if self.differs or self.store is None:
            return
        try:
            b = self.store.block(ours.height)
            if b is None or (b.hash, b.raw, b.txs) != (ours.hash, ours.raw, ours.txs):
                self.differs = True
                return
            if b.cert != ours.cert:
                if chain is None:
                    self.differs = True
                    return
                state = chain.state
                check_certificate(b.cert, chain=chain.id, block=Block.parse(b.raw),
                                  validators={a: state.identities[a].public_key
                                              for a in state.validators()},
                                  quorum=state.quorum())
                self.certs_checked += 1
            self.certs.append(b.cert)
        except Exception:  # noqa: BLE001 - a refused certificate, a damaged row, ...
            self.differs = True

    def same_as(self, heights: list[int], tx_count: int) -> bool:
        if self.differs or self.store is None:
            return False
        try:
            return self.store.heights() == heights and self.store.tx_count() == tx_count
        except Exception:  # noqa: BLE001
            return False

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


def verify_stores(paths: Sequence[Path | str], *, genesis: Block | None = None,
                  closed: bool = False) -> list[VerifyReport]:
    """`verify_store` of several nodes' stores of one chain, with the same reports, at the
    cost of about one: the first is fully verified and the others are read in step and
    compared with it (`_Peer`); a store that differs in any way, or all of them when the
    first fails, is fully verified on its own."""
    if not paths:
        return []
    peers = [_Peer(p, closed=closed) for p in paths[1:]]
    try:
        first = verify_store(paths[0], genesis=genesis, _peers=peers, closed=closed)
        out = [first]
        for p in peers:
            # an ok report means heights 0..height, all holding its `txs` transactions
            if first.ok and p.same_as(list(range((first.height or 0) + 1)), first.txs):
                out.append(first)
            else:
                p.close()
                out.append(verify_store(p.path, genesis=genesis, closed=closed))
        return out
    finally:
        for p in peers:
            p.close()


def verify_genesis(store: Store, genesis: Block | None, peers: Sequence[_Peer] = ()
                   ) -> Chain:
    """`verify_store`'s check of height 0 (the stored genesis, against `genesis` if given):
    a chain at height 0 to replay the store on. Raises Rejected or StoreDamaged."""
    g0 = store.block(0)
    if g0 is None:
        raise Rejected(Reason.BAD_BLOCK, "genesis row vanished", height=0)
    g = Block.parse(g0.raw, genesis=True)
    if g0.hash != g.hash:
        raise Rejected(Reason.BAD_BLOCK, "stored hash differs from the block's", height=0)
    if genesis is not None and g.hash != genesis.hash:
        raise Rejected(Reason.BAD_BLOCK, f"genesis {g.hash[:16]} is not the expected "
                       f"{genesis.hash[:16]}", height=0)
    if g0.txs or g0.cert != b"[]":
        raise Rejected(Reason.BAD_BLOCK, "genesis carries transactions or votes", height=0)
    for p in peers:
        p.compare(g0, None)
    return Chain(g)


def verify_next(chain: Chain, store: Store, peers: Sequence[_Peer] = ()) -> StoredBlock:
    """`verify_store`'s check of the store's next height: the block read back, committed
    by `chain` with every check `commit` makes (certificate included), its stored hash
    and transaction ids recomputed. Raises Rejected or StoreDamaged."""
    h = chain.height + 1
    b = store.block(h)
    if b is None:
        raise Rejected(Reason.BAD_BLOCK, f"height {h} is missing", height=h)
    for p in peers:
        p.compare(b, chain)
    block = chain.commit_raw(b.raw, [raw for _, raw in b.txs], b.cert)
    if block.hash != b.hash:
        raise Rejected(Reason.BAD_BLOCK, "stored hash differs from the block's", height=h)
    for tid, raw in b.txs:
        if tid != canonical.sha256_hex(raw):
            raise Rejected(Reason.BAD_BLOCK, f"stored tx id {tid[:16]} differs from its bytes",
                           height=h)
    return b


def verify_store(path: Path | str, *, genesis: Block | None = None,
                 against: Against | None = None, _peers: Sequence[_Peer] = (),
                 closed: bool = False) -> VerifyReport:
    """Recompute every hash, signature, election and contract result of a node database.

    Never raises for a damaged file: whatever is wrong (bytes changed, a column of the
    wrong type, a dropped table, a truncated or foreign file) comes back as a failed
    report naming the first bad height, or height None for "not a ledger store".
    `against` (see `load_against`) also catches a store whose last blocks were deleted.
    `_peers` (see `verify_stores`) are compared with each height as it is checked.
    `closed`: no node has the store open (see `Store`: no SQLite file is left beside it)."""
    try:
        store = Store(path, readonly=True, closed=closed)
    except (ValueError, OSError) as exc:
        return VerifyReport(False, None, "", 0, f"not a ledger store ({exc})")
    at, count, chain_id = 0, 0, ""
    try:
        store.snapshot()
        heights = store.heights()
        if not heights or heights[0] != 0:
            return VerifyReport(False, 0, "", 0, "no genesis block at height 0")
        chain = verify_genesis(store, genesis, _peers)
        chain_id = chain.id
        for expect, h in enumerate(heights[1:], start=1):
            at = expect
            if h != expect:
                raise Rejected(Reason.BAD_BLOCK, f"height {expect} is missing", height=expect)
            count += len(verify_next(chain, store, _peers).txs)
        at = chain.height + 1
        stray = store.tx_count() - count
        if stray:
            raise Rejected(Reason.BAD_BLOCK, f"{stray} stored transactions belong to no "
                           "block", height=at)
        if against is not None:
            at = chain.height
            _check_against(chain, store, against)
        return VerifyReport(True, chain.height, chain.id, count)
    except Rejected as exc:
        return VerifyReport(False, at if exc.height is None else exc.height, chain_id, count,
                            str(exc.at(height=at if exc.height is None else exc.height)))
    except StoreDamaged as exc:
        return VerifyReport(False, exc.height, chain_id, count, exc.detail)
    except UnusableEvidence:
        raise
    except ValueError as exc:
        return VerifyReport(False, at, chain_id, count, f"unreadable: {exc}")
    except Exception as exc:  # damage of a kind nobody foresaw is still a FAILED report
        return VerifyReport(False, at, chain_id, count,
                            f"unreadable: {type(exc).__name__}: {exc}")
    finally:
        store.close()
