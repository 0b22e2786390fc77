"""Ledger state and the rules that change it: registry (CSM-DB), wallets, readings, auctions.

The state is derived from the chain only: replaying the blocks from genesis rebuilds it.
`apply` checks one transaction completely before it changes anything, and every change is
journalled, so a block whose k-th transaction fails is rolled back as a whole (`atomic`).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from testbed.ledger import canonical, contracts
from testbed.ledger import transactions as T
from testbed.ledger.errors import Reason, Rejected
from testbed.ledger.identity import address_of
from testbed.ledger.messages import SignedMessage, verify
from testbed.market.orders import (
    DEFAULT_RULES,
    MarketError,
    MarketRules,
    Order,
    Side,
    validate_order,
)
from testbed.market.units import UEUR_PER_EUR, eur_to_ueur

_MISSING = object()
"""An undo entry's old value when the key was absent."""

POOL = "tb" + "0" * 40
"""The incentive pool: funded in genesis, pays block rewards, has no key."""

MICRO = UEUR_PER_EUR
"""Ledger money is integer micro-euros, the market's unit (`testbed.market.units`)."""


@dataclass(frozen=True)
class Params:
    """Chain parameters fixed in genesis."""

    max_skew_s: float = 300.0
    """A transaction may be dated at most this far after the block that includes it."""
    max_age_s: float = 900.0
    """... and at most this far before it; reqIds are remembered for this long."""
    cpf_window: int = 4
    """Number of latest certified readings over which a validator's CPF is computed."""
    block_reward: int = 0
    """Incentive (micro-euros) to a proposer in RE or RE+TE mode, paid from POOL."""
    max_block_txs: int = 10_000
    round_timeout_s: float = 2.0
    """A silent proposer is replaced by the next in CPF order after this long."""
    market: dict[str, Any] = field(default_factory=DEFAULT_RULES.to_dict)
    """The market rules (`MarketRules.to_dict`: pricing, interval, price and energy
    limits) every auction on this chain runs under: the auction contract reads them from
    here, so re-executing it never depends on what the agents agreed out of band."""

    def __post_init__(self) -> None:
        try:
            rules = MarketRules.from_dict(self.market)
        except (MarketError, TypeError) as exc:
            raise ValueError(f"params.market: {exc}") from None
        object.__setattr__(self, "market", rules.to_dict())

    @cached_property
    def rules(self) -> MarketRules:
        return MarketRules.from_dict(self.market)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Params:
        if "market" not in d:  # a chain made before market rules were in genesis
            d = {**d, "market": DEFAULT_RULES.to_dict()}
        return cls(**d)

    def as_dict(self) -> dict[str, Any]:
        return {"max_skew_s": self.max_skew_s, "max_age_s": self.max_age_s,
                "cpf_window": self.cpf_window, "block_reward": self.block_reward,
                "max_block_txs": self.max_block_txs, "round_timeout_s": self.round_timeout_s,
                "market": dict(self.market)}


@dataclass(frozen=True)
class Entry:
    """A CSM-DB record: a certified meter/HEM, the aggregator, or a validator node."""

    address: str
    name: str
    public_key: bytes
    meter_type: str
    serial: str
    roles: frozenset[str]
    mode: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Entry:
        pk = bytes.fromhex(d["public_key"])
        return cls(address_of(pk), d["name"], pk, d["meter_type"], d["serial"],
                   frozenset(d["roles"]), d["mode"])


@dataclass(frozen=True)
class Pseudonym:
    address: str
    public_key: bytes
    escrow: str
    valid_from: int
    valid_to: int


@dataclass(frozen=True)
class GridCheck:
    tx: str
    dso: str
    caps: dict[str, float]
    light: str
    passed: bool


@dataclass(frozen=True)
class Reading:
    tx: str
    start: int
    duration_s: int
    production_kwh: float
    consumption_kwh: float


@dataclass(frozen=True)
class Auction:
    id: str
    opener: str
    interval: int
    gate: int
    side: str
    energy_kwh: float
    price: float
    pricing: str
    contract: str
    rules: dict[str, Any] = field(default_factory=DEFAULT_RULES.to_dict)
    """The chain's market rules (genesis `params.market`) the contract clears under."""
    orders: tuple[str, ...] = ()
    order_inputs: tuple[dict[str, Any], ...] = ()
    award: str | None = None

    def contract_inputs(self) -> dict[str, Any]:
        """What the auction contract sees: the request, every order committed for it, and
        the chain's market rules."""
        request = {"order_id": self.id, "address": self.opener, "side": self.side,
                   "energy_kwh": self.energy_kwh, "price": self.price,
                   "interval": self.interval}
        return {"request": request, "orders": list(self.order_inputs), "pricing": self.pricing,
                "rules": dict(self.rules)}


@dataclass(frozen=True)
class Effect:
    """What applying one block did to a `LedgerState` (see `LedgerState.trial`)."""

    sets: tuple[tuple[dict, Any, Any], ...]
    """(table, key, final value or _MISSING) for every entry the block touched."""
    recent: tuple[tuple[float, str, str], ...]
    """Entries appended to the replay horizon, in order."""


@dataclass(frozen=True)
class SharedEffect:
    """An `Effect` with its tables named, not held: what another state at the same height
    and head (hence the same state: the rules are pure functions of the chain) adopts to
    redo the same block (`LedgerState.share`, `adopt`)."""

    sets: tuple[tuple[str, Any, Any], ...]
    recent: tuple[tuple[float, str, str], ...]


_TABLES = ("identities", "pseudonyms", "balances", "readings", "auctions", "grid_checks",
           "lines", "recent")
"""The state's tables an `Effect` may touch (their values are immutable: every change
replaces them through the journal)."""


@dataclass
class LedgerState:
    params: Params
    admin: bytes
    chain_id: str = ""
    height: int = 0
    head: str = "0" * 64
    head_time: float = 0.0
    identities: dict[str, Entry] = field(default_factory=dict)
    pseudonyms: dict[str, Pseudonym] = field(default_factory=dict)
    balances: dict[str, int] = field(default_factory=dict)
    readings: dict[str, tuple[Reading, ...]] = field(default_factory=dict)
    auctions: dict[str, Auction] = field(default_factory=dict)
    grid_checks: dict[str, GridCheck] = field(default_factory=dict)
    """auction id -> the DSO's signed grid check of its dispatch."""
    lines: dict[tuple[str, str, str], tuple[int, bool]] = field(default_factory=dict)
    """(award, payer, payee) -> (amount due, paid): what an award obliges."""
    recent: dict[tuple[str, str], float] = field(default_factory=dict)
    _recent_order: deque[tuple[float, str, str]] = field(default_factory=deque)
    _undo: list[Any] | None = None
    """Journal of changes to undo: (table, key, old value) tuples or callables."""

    # ----------------------------------------------------------------- queries
    @property
    def admin_address(self) -> str:
        return address_of(self.admin)

    def validators(self) -> list[str]:
        return sorted(a for a, e in self.identities.items() if "validator" in e.roles)

    def quorum(self) -> int:
        """Votes needed to commit: more than two thirds of the registered validators."""
        return 2 * len(self.validators()) // 3 + 1

    def public_key(self, address: str, at: float | None = None, *,
                   spending: bool = False) -> bytes | None:
        """The key `address` signs with at time `at` (None: any time). A pseudonym bids
        only inside its certified window; `spending` (a payment from its wallet) is allowed
        from the window's start on, so what it earned is never locked in."""
        entry = self.identities.get(address)
        if entry is not None:
            return entry.public_key
        p = self.pseudonyms.get(address)
        if p is not None and (at is None or (p.valid_from <= at and (
                spending or at < p.valid_to))):
            return p.public_key
        if address == self.admin_address:
            return self.admin
        return None

    def signer_key(self, msg: SignedMessage) -> bytes | None:
        """The registered key `msg` must verify against, at its date and for its kind."""
        return self.public_key(msg.client_id, msg.time, spending=msg.operation == T.PAYMENT)

    def balance(self, address: str) -> int:
        return self.balances.get(address, 0)

    def digest(self) -> str:
        """A hash of everything the rules depend on (tests: 'no change to state')."""
        return canonical.digest({
            "height": self.height, "head": self.head, "balances": self.balances,
            "identities": sorted(self.identities), "pseudonyms": sorted(self.pseudonyms),
            "readings": {a: [r.tx for r in rs] for a, rs in self.readings.items()},
            "auctions": {a: [x.award, list(x.orders)] for a, x in self.auctions.items()},
            "lines": sorted([*k, *v] for k, v in self.lines.items()),
            "grid_checks": {a: g.tx for a, g in self.grid_checks.items()},
            "recent": sorted(f"{c}/{r}" for c, r in self.recent),
        })

    # ----------------------------------------------------------------- journal
    def _set(self, table: dict, key: Any, value: Any) -> None:
        undo = self._undo
        if undo is not None:  # (table, key, old value) tuples: the hot path of every rule
            undo.append((table, key, table.get(key, _MISSING)))
        table[key] = value

    def _del(self, table: dict, key: Any) -> None:
        old = table.pop(key)
        if self._undo is not None:
            self._undo.append((table, key, old))

    def _attr(self, name: str, value: Any) -> None:
        if self._undo is not None:
            old = getattr(self, name)
            self._undo.append(lambda: setattr(self, name, old))
        setattr(self, name, value)

    @staticmethod
    def _rollback(undo: list, mark: int = 0) -> None:
        while len(undo) > mark:
            entry = undo.pop()
            if type(entry) is tuple:
                table, key, old = entry
                if old is _MISSING:
                    table.pop(key, None)
                else:
                    table[key] = old
            else:
                entry()

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """All changes inside happen, or none. Nested, it is a savepoint of the outer one."""
        outer = self._undo is not None
        if not outer:
            self._undo = []
        undo = self._undo
        mark = len(undo)
        try:
            yield
        except BaseException:
            self._rollback(undo, mark)
            if not outer:
                self._undo = None
            raise
        if not outer:
            self._undo = None

    @contextlib.contextmanager
    def trial(self, effect: list[Effect] | None = None) -> Iterator[None]:
        """Apply, look, and roll back whatever happened (validating a proposal). When the
        body finishes without an error, what it did is appended to `effect` first (`redo`
        makes the same change again without re-running the rules)."""
        if self._undo is not None:
            raise RuntimeError("trial inside a journal")
        self._undo = undo = []
        try:
            yield
            if effect is not None:
                effect.append(self._effect(undo))
        finally:
            self._undo = None
            self._rollback(undo)

    def _effect(self, undo: list) -> Effect:
        """The journal's net change: each touched entry's final value, and the reqIds
        appended to the replay horizon (`advance` is redone by `redo` itself)."""
        pop = self._recent_order.pop
        order = self._recent_order
        appended = sum(1 for e in undo if type(e) is not tuple and e == pop)
        # an entry touched twice is listed twice, with its one final value
        return Effect(tuple([(e[0], e[1], e[0].get(e[1], _MISSING)) for e in undo
                             if type(e) is tuple]),
                      tuple(list(order)[len(order) - appended:]) if appended else ())

    def share(self, effect: Effect) -> SharedEffect | None:
        """`effect` (of a trial on this state) by table name; None if it touched anything
        else."""
        names = {id(getattr(self, n)): n for n in _TABLES}
        try:
            sets = tuple([(names[id(t)], k, v) for t, k, v in effect.sets])
        except KeyError:
            return None
        return SharedEffect(sets, effect.recent)

    def adopt(self, shared: SharedEffect) -> Effect:
        """A shared effect on this state's own tables (for `redo`)."""
        return Effect(tuple([(getattr(self, n), k, v) for n, k, v in shared.sets]),
                      shared.recent)

    def redo(self, effect: Effect, height: int, head: str, time: float) -> None:
        """Make the change `effect` recorded (a `trial` from this very state, of the block
        at `height`), journalled like `apply`; the caller guarantees the state is the one
        the trial started from."""
        self.advance(height, head, time)
        for table, key, value in effect.sets:
            if value is _MISSING:
                if key in table:
                    self._del(table, key)
            else:
                self._set(table, key, value)
        order = self._recent_order
        for item in effect.recent:
            order.append(item)
            if self._undo is not None:
                self._undo.append(order.pop)

    def try_apply(self, msg: SignedMessage, **kwargs: Any) -> Rejected | None:
        """`apply` inside a journal (`trial`, `atomic`) with its own savepoint: a refused
        transaction leaves no change and its refusal is returned (building a proposal;
        cheaper than an `atomic` block per transaction)."""
        undo = self._undo
        if undo is None:
            raise RuntimeError("try_apply outside a journal")
        mark = len(undo)
        try:
            self.apply(msg, **kwargs)
        except Rejected as exc:
            self._rollback(undo, mark)
            return exc
        except BaseException:
            self._rollback(undo, mark)
            raise
        return None

    # ------------------------------------------------------------------ money
    def _transfer(self, payer: str, payee: str, amount: int) -> None:
        self._set(self.balances, payer, self.balance(payer) - amount)
        self._set(self.balances, payee, self.balance(payee) + amount)

    # ------------------------------------------------------------------- time
    def advance(self, height: int, head: str, time: float) -> None:
        """Move to a new block: forget reqIds that are now too old to be replayed."""
        self._attr("height", height)
        self._attr("head", head)
        self._attr("head_time", time)
        horizon = time - self.params.max_age_s - self.params.max_skew_s
        order = self._recent_order
        while order and order[0][0] < horizon:
            item = order.popleft()
            if self._undo is not None:
                self._undo.append(lambda item=item: order.appendleft(item))
            key = (item[1], item[2])
            if key in self.recent:
                self._del(self.recent, key)

    # ---------------------------------------------------------- transactions
    def apply(self, msg: SignedMessage, *, block_time: float, height: int, proposer: str,
              index: int, verified: set[str] | frozenset[str] = frozenset()) -> None:
        """Check one transaction against every rule, then apply it. Raises Rejected.

        `verified` holds ids whose shape and signature this node has already checked
        (mempool admission, a batch verification): both are pure functions of the
        message's bytes, so they are not repeated; that the key is still registered is."""
        checked = msg.id in verified
        if not checked:
            T.check_shape(msg.operation, msg.parameters)
        t = msg.time
        if t > block_time + self.params.max_skew_s or t < block_time - self.params.max_age_s:
            raise Rejected(Reason.STALE, f"{msg.operation} dated {msg.date} is "
                           f"{t - block_time:+.1f} s from its block (allowed "
                           f"-{self.params.max_age_s:g}/+{self.params.max_skew_s:g} s)")
        if not checked:
            verify(msg, lambda a: self.signer_key(msg))
        elif self.signer_key(msg) is None:
            raise Rejected(Reason.UNKNOWN_KEY, f"clientId {msg.client_id} is not registered")
        key = (msg.client_id, msg.req_id)
        if key in self.recent:
            raise Rejected(Reason.REPLAY, f"reqId {msg.req_id} from {msg.client_id} is "
                           "already on the chain")
        _HANDLERS[msg.operation](self, msg, block_time, height, proposer, index)
        self._set(self.recent, key, t)
        self._recent_order.append((t, *key))
        if self._undo is not None:
            self._undo.append(self._recent_order.pop)

    def _role(self, msg: SignedMessage, role: str) -> Entry:
        entry = self.identities.get(msg.client_id)
        if entry is None or role not in entry.roles:
            raise Rejected(Reason.NOT_AUTHORISED, f"{msg.operation} needs a registered "
                           f"{role}; {msg.client_id} is not one")
        return entry

    def _admin_only(self, msg: SignedMessage) -> None:
        if msg.client_id != self.admin_address:
            raise Rejected(Reason.NOT_AUTHORISED, f"{msg.operation} must be signed by the "
                           f"registry administrator {self.admin_address}")

    def _reading(self, msg: SignedMessage, *_: Any) -> None:
        self._role(msg, "meter")
        p = msg.parameters
        if p["meter"] != msg.client_id:
            raise Rejected(Reason.NOT_AUTHORISED, f"reading for meter {p['meter']} signed by "
                           f"{msg.client_id}: a meter certifies only its own readings")
        end = p["start"] + p["duration_s"]
        if end > msg.time + 1:
            raise Rejected(Reason.INVALID, f"reading interval ends at {end}, after the "
                           f"message date {msg.date}")
        history = self.readings.get(msg.client_id, ())
        if history and p["start"] < history[-1].start + history[-1].duration_s:
            last = history[-1]
            raise Rejected(Reason.INVALID, f"reading starting {p['start']} overlaps the "
                           f"previous one ({last.start}+{last.duration_s} s)")
        new = Reading(msg.id, p["start"], p["duration_s"], float(p["production_kwh"]),
                      float(p["consumption_kwh"]))
        keep = max(self.params.cpf_window, 1)
        self._set(self.readings, msg.client_id, (*history[-(keep - 1):], new)
                  if keep > 1 else (new,))

    def _auction(self, msg: SignedMessage, *_: Any) -> None:
        self._role(msg, "aggregator")
        p = msg.parameters
        if p["address"] != msg.client_id:
            raise Rejected(Reason.NOT_AUTHORISED, "auction address must be the signer's")
        if p["contract"] not in contracts.names():
            raise Rejected(Reason.INVALID, f"unknown contract {p['contract']!r}; known: "
                           f"{contracts.names()}")
        bid = p["bid"]
        rules = self.params.rules
        if p["pricing"].replace("-", "_") != str(rules.pricing):
            raise Rejected(Reason.INVALID, f"auction pricing {p['pricing']!r}; this chain's "
                           f"market rules (genesis) say {str(rules.pricing).replace('_', '-')!r}")
        try:
            validate_order(Order(msg.id, msg.client_id, Side(bid["type"]),
                                 float(bid["energy"]["value"]), float(bid["price"]["value"]),
                                 p["interval"]), rules)
        except MarketError as exc:
            raise Rejected(Reason.INVALID, f"auction request outside the chain's market "
                           f"rules: {exc}") from None
        self._set(self.auctions, msg.id, Auction(
            msg.id, msg.client_id, p["interval"], p["gate"], bid["type"],
            float(bid["energy"]["value"]), float(bid["price"]["value"]), p["pricing"],
            p["contract"], self.params.market))

    def _order(self, msg: SignedMessage, *_: Any) -> None:
        p = msg.parameters
        if p["address"] != msg.client_id:
            raise Rejected(Reason.NOT_AUTHORISED, "order address must be the signer's")
        auction = self.auctions.get(p["auction"])
        if auction is None:
            raise Rejected(Reason.INVALID, f"order for unknown auction {p['auction'][:16]}")
        if auction.award is not None or msg.time > auction.gate:
            raise Rejected(Reason.INVALID, f"auction {auction.id[:16]} is closed (gate "
                           f"{auction.gate}, order dated {msg.date})")
        if msg.client_id == auction.opener:
            raise Rejected(Reason.NOT_AUTHORISED, "the auction's opener cannot answer it")
        side = p["bid"]["type"]
        if side == auction.side:
            raise Rejected(Reason.INVALID, f"auction {auction.id[:16]} is a {auction.side}; "
                           f"answers must be the other side, got {side}")
        order = {"order_id": msg.id, "address": msg.client_id, "side": side,
                 "energy_kwh": float(p["bid"]["energy"]["value"]),
                 "price": float(p["bid"]["price"]["value"]), "interval": auction.interval}
        self._set(self.auctions, auction.id, replace(
            auction, orders=(*auction.orders, msg.id),
            order_inputs=(*auction.order_inputs, order)))

    def _award(self, msg: SignedMessage, block_time: float, *_: Any) -> None:
        p = msg.parameters
        auction = self.auctions.get(p["auction"])
        if auction is None:
            raise Rejected(Reason.INVALID, f"award for unknown auction {p['auction'][:16]}")
        if msg.client_id != auction.opener:
            raise Rejected(Reason.NOT_AUTHORISED, "only the auction's opener publishes its "
                           "award")
        if auction.award is not None:
            raise Rejected(Reason.DOUBLE_SPEND, f"auction {auction.id[:16]} was already "
                           f"awarded in {auction.award[:16]}")
        if block_time < auction.gate:
            raise Rejected(Reason.INVALID, f"award before the gate closes ({auction.gate})")
        if p["contract"] != auction.contract:
            raise Rejected(Reason.INVALID, f"award runs {p['contract']!r}, auction declared "
                           f"{auction.contract!r}")
        if tuple(p["orders"]) != auction.orders:
            raise Rejected(Reason.CONTRACT_MISMATCH, f"award lists {len(p['orders'])} orders; "
                           f"the chain holds {len(auction.orders)} for this auction (every "
                           "committed order must be considered)")
        inputs = auction.contract_inputs()
        caps = self._dso_caps(auction, {k: float(v) for k, v in (p.get("caps") or {}).items()})
        if caps:  # the DSO's grid caps are contract inputs, visible on-chain
            inputs["caps"] = caps
        result = contracts.check_result(auction.contract, inputs, p["result"])
        for award in result.get("awards", []):
            amount = eur_to_ueur(float(award["amount_eur"]))
            if amount <= 0:
                continue
            payer, payee = ((auction.opener, award["address"]) if auction.side == "buy"
                            else (award["address"], auction.opener))
            line = (msg.id, payer, payee)
            due = self.lines.get(line, (0, False))[0]
            self._set(self.lines, line, (due + amount, False))
        self._set(self.auctions, auction.id, replace(auction, award=msg.id))

    def _dso_caps(self, auction: Auction, claimed: dict[str, float]) -> dict[str, float]:
        """The caps an award must honour are the DSO's, from its signed grid check of this
        auction: caps the DSO did not sign are refused, and so is an award that leaves
        out caps the DSO imposed."""
        check = self.grid_checks.get(auction.id)
        if check is None:
            if claimed:
                raise Rejected(Reason.NOT_AUTHORISED, f"award carries grid caps for auction "
                               f"{auction.id[:16]} but no grid check signed by the DSO is "
                               "on the chain")
            return {}
        if canonical.encode(claimed) != canonical.encode(check.caps):
            raise Rejected(Reason.CONTRACT_MISMATCH, f"award caps differ from those of the "
                           f"DSO's grid check {check.tx[:16]} ({len(claimed)} vs "
                           f"{len(check.caps)} orders capped)")
        return check.caps

    def _grid_check(self, msg: SignedMessage, *_: Any) -> None:
        self._role(msg, "dso")
        p = msg.parameters
        auction = self.auctions.get(p["auction"])
        if auction is None:
            raise Rejected(Reason.INVALID, f"grid check of unknown auction {p['auction'][:16]}")
        if auction.award is not None:
            raise Rejected(Reason.INVALID, f"auction {auction.id[:16]} is already awarded")
        if auction.id in self.grid_checks:
            raise Rejected(Reason.DOUBLE_SPEND, f"auction {auction.id[:16]} already has the "
                           f"DSO's grid check {self.grid_checks[auction.id].tx[:16]}")
        unknown = sorted(set(p["caps"]) - set(auction.orders))
        if unknown:
            raise Rejected(Reason.INVALID, f"grid check caps {unknown[0][:16]}, not an order "
                           f"of auction {auction.id[:16]}")
        caps = {k: float(v) for k, v in p["caps"].items()}
        self._set(self.grid_checks, auction.id, GridCheck(msg.id, msg.client_id, caps,
                                                          p["light"], p["passed"]))

    def _payment(self, msg: SignedMessage, *_: Any) -> None:
        p = msg.parameters
        payer, payee, amount = msg.client_id, p["to"], p["amount"]
        if payee == payer:
            raise Rejected(Reason.INVALID, "payment to oneself")
        line_key = None
        if p["award"] is not None:
            line_key = (p["award"], payer, payee)
            line = self.lines.get(line_key)
            if line is None:
                raise Rejected(Reason.INVALID, f"award {p['award'][:16]} obliges no payment "
                               f"from {payer} to {payee}")
            due, paid = line
            if paid:
                raise Rejected(Reason.DOUBLE_SPEND, f"award {p['award'][:16]} was already "
                               f"settled from {payer} to {payee}")
            if amount > due:
                raise Rejected(Reason.INVALID, f"payment {amount} exceeds the {due} µ€ the "
                               "award obliges")
        if self.balance(payer) < amount:
            raise Rejected(Reason.OVERDRAW, f"{payer} holds {self.balance(payer)} µ€, "
                           f"cannot pay {amount}")
        self._transfer(payer, payee, amount)
        if line_key is not None:
            self._set(self.lines, line_key, (self.lines[line_key][0], True))

    def _reward(self, msg: SignedMessage, block_time: float, height: int, proposer: str,
                index: int) -> None:
        p = msg.parameters
        if index != 0 or msg.client_id != proposer or p["to"] != proposer:
            raise Rejected(Reason.NOT_AUTHORISED, "a reward is the first transaction of a "
                           "block, signed by and paid to its proposer")
        if p["height"] != height:
            raise Rejected(Reason.INVALID, f"reward for height {p['height']} in block {height}")
        entry = self.identities.get(proposer)
        if entry is None or entry.mode not in ("RE", "RE+TE"):
            raise Rejected(Reason.NOT_AUTHORISED, "only proposers in RE or RE+TE mode earn "
                           "the incentive")
        if p["amount"] != self.params.block_reward:
            raise Rejected(Reason.INVALID, f"reward {p['amount']} µ€, the chain pays "
                           f"{self.params.block_reward}")
        if self.balance(POOL) < p["amount"]:
            raise Rejected(Reason.OVERDRAW, "the incentive pool is empty")
        self._transfer(POOL, proposer, p["amount"])

    def _registry(self, msg: SignedMessage, *_: Any) -> None:
        self._admin_only(msg)
        p = msg.parameters
        if p["action"] == "add":
            entry = Entry.from_dict(p["entry"])
            if entry.address in self.identities or entry.address in self.pseudonyms:
                raise Rejected(Reason.INVALID, f"{entry.address} is already registered")
            self._set(self.identities, entry.address, entry)
        else:
            address = p["address"]
            if address not in self.identities:
                raise Rejected(Reason.INVALID, f"{address} is not registered")
            if self.validators() == [address]:
                raise Rejected(Reason.INVALID, "cannot remove the last validator")
            self._del(self.identities, address)

    def _pseudonym(self, msg: SignedMessage, *_: Any) -> None:
        self._admin_only(msg)
        p = msg.parameters
        pk = bytes.fromhex(p["public_key"])
        address = address_of(pk)
        if address in self.identities or address in self.pseudonyms:
            raise Rejected(Reason.INVALID, f"{address} is already registered")
        self._set(self.pseudonyms, address, Pseudonym(address, pk, p["escrow"],
                                                      p["valid_from"], p["valid_to"]))


_HANDLERS: dict[str, Callable[..., None]] = {
    T.READING: LedgerState._reading, T.AUCTION: LedgerState._auction,
    T.ORDER: LedgerState._order, T.AWARD: LedgerState._award,
    T.PAYMENT: LedgerState._payment, T.REWARD: LedgerState._reward,
    T.REGISTRY: LedgerState._registry, T.PSEUDONYM: LedgerState._pseudonym,
    T.GRID_CHECK: LedgerState._grid_check,
}
