"""Tendermint consensus for one chain as a pure, deterministic state machine.

The rules are those of Buchman, Kwon and Milosevic, "The latest gossip on BFT consensus"
(2018, Algorithm 1), the algorithm CometBFT specifies: heights, rounds, propose / prevote /
precommit, locking on a value precommitted in round r and releasing the lock only for a
proposal that carries a proof of lock (a valid round with more than 2/3 prevotes) at a later
round, timeouts that grow with the round, and the f+1 round skip. n validators tolerate any
f < n/3 faulty ones (crash or Byzantine): a decision needs precommits of a quorum
q = floor(2n/3) + 1, and any two quorums share an honest validator.

Pure: `Tendermint` takes inputs (`Proposal`, `Vote` from authenticated senders, `Timeout`)
and returns actions (`Broadcast`, `Schedule`, `Decide`, `Missing`, `Evidence`); it does no
I/O, reads no clock and draws no randomness. The ledger node runs it over MQTT
(`testbed.ledger.node`), the tests run it under a simulated network.

Durability: every vote or proposal this validator signs goes through `signed`, a mapping
(height, round, step) -> value that the caller persists before sending (the node: an
fsync'd file beside its store). A restarted validator is built with that mapping, so it
signs again only what it signed before, and its lock is derived from its last non-nil
precommit. Values are opaque strings (block hashes); whether a value is valid is decided by
the caller when it hands over a proposal (`Proposal.valid`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

PROPOSE, PREVOTE, PRECOMMIT = 0, 1, 2
STEP_NAMES = ("propose", "prevote", "precommit")
RESEND = 3
"""Timeout kind: re-broadcast this round's own messages (messages lost before the network
healed are sent again; the algorithm assumes eventual delivery)."""
MAX_FUTURE_ROUNDS = 20
"""Votes and proposals more than this many rounds ahead are ignored (bounded memory)."""


@dataclass(frozen=True, slots=True)
class Proposal:
    height: int
    round: int
    value: str
    valid_round: int
    sender: str
    valid: bool = True
    """The caller's full check of the value (block rules); invalid ones get nil prevotes."""


@dataclass(frozen=True, slots=True)
class Vote:
    step: int
    """PREVOTE or PRECOMMIT."""
    height: int
    round: int
    value: str | None
    """None: nil."""
    sender: str


@dataclass(frozen=True, slots=True)
class Timeout:
    step: int
    """PROPOSE, PREVOTE, PRECOMMIT or RESEND."""
    height: int
    round: int


@dataclass(frozen=True, slots=True)
class Broadcast:
    message: Proposal | Vote
    resend: bool = False
    """True: a copy of a message this validator already signed and sent."""


@dataclass(frozen=True, slots=True)
class Schedule:
    timeout: Timeout
    delay: float


@dataclass(frozen=True, slots=True)
class Decide:
    height: int
    round: int
    value: str
    precommits: tuple[Vote, ...]
    """The commit certificate: precommits of a quorum for `value` in `round`."""


@dataclass(frozen=True, slots=True)
class Missing:
    """A quorum precommitted a value whose proposal this validator does not hold: fetch the
    decided block from a peer (sync)."""

    height: int
    value: str


@dataclass(frozen=True, slots=True)
class Evidence:
    """Two different messages signed by one validator for one height, round and step."""

    first: Proposal | Vote
    second: Proposal | Vote


Action = Broadcast | Schedule | Decide | Missing | Evidence


@dataclass(frozen=True)
class Timeouts:
    """Seconds; each grows linearly with the round so that, after the network stabilises,
    a round eventually lasts long enough for honest validators to hear each other."""

    propose: float = 1.0
    vote: float = 0.25
    growth: float = 0.5

    def of(self, step: int, round_: int) -> float:
        base = self.propose if step in (PROPOSE, RESEND) else self.vote
        factor = 1.0 + self.growth * round_
        return base * factor * (3 if step == RESEND else 1)


def quorum(n: int) -> int:
    """More than two thirds of n."""
    return 2 * n // 3 + 1


def tolerated(n: int) -> int:
    """f: the faulty validators n tolerates (f < n/3)."""
    return (n - 1) // 3


SignedLog = dict[tuple[int, int, int], str | None]
"""(height, round, step) -> value this validator signed (step PROPOSE for its proposals)."""


class Record:
    """What a validator must not forget across a crash: what it signed (so it never signs a
    different value for the same height, round and step) and the prevotes that made it lock
    (its proof of lock, which it forwards when it re-proposes the locked value).

    This base class keeps them in memory (the simulation's "disk" outlives the state
    machine); the node's subclass writes each entry to an fsync'd file before returning."""

    def __init__(self) -> None:
        self.signed: SignedLog = {}
        self.pol: dict[tuple[int, int], tuple[Vote, ...]] = {}

    def sign(self, key: tuple[int, int, int], value: str | None) -> None:
        self.signed[key] = value

    def proof(self, height: int, round_: int, prevotes: tuple[Vote, ...]) -> None:
        self.pol[(height, round_)] = prevotes

    def forget_below(self, height: int) -> None:
        for key in [k for k in self.signed if k[0] < height]:
            del self.signed[key]
        for k2 in [k for k in self.pol if k[0] < height]:
            del self.pol[k2]


MAX_VALUES_PER_SENDER = 3
"""Conflicting votes kept per validator, round and step: an equivocator's votes still count
(two quorums always share an honest validator, whatever the faulty ones signed), but only a
few of them, so memory stays bounded."""


@dataclass
class _Round:
    proposals: dict[str, Proposal] = field(default_factory=dict)
    prevotes: dict[str | None, dict[str, Vote]] = field(default_factory=dict)
    precommits: dict[str | None, dict[str, Vote]] = field(default_factory=dict)
    prevoters: dict[str, int] = field(default_factory=dict)
    precommitters: dict[str, int] = field(default_factory=dict)
    senders: set[str] = field(default_factory=set)
    prevote_timer: bool = False
    precommit_timer: bool = False
    locked_here: bool = False


class Tendermint:
    """One validator's consensus at one height (call `next_height` after a decision)."""

    def __init__(self, me: str, validators: Sequence[str], height: int,
                 proposer: Callable[[int], str], get_value: Callable[[int], str | None],
                 *, timeouts: Timeouts | None = None, record: Record | None = None,
                 max_evidence: int = 100) -> None:
        self.me = me
        self.timeouts = timeouts or Timeouts()
        self.record = Record() if record is None else record
        self.signed = self.record.signed
        self.evidence: list[Evidence] = []
        self.max_evidence = max_evidence
        self._setup(validators, height, proposer, get_value)

    def _setup(self, validators: Sequence[str], height: int, proposer: Callable[[int], str],
               get_value: Callable[[int], str | None]) -> None:
        self.validators = frozenset(validators)
        self.n = len(self.validators)
        self.q = quorum(self.n)
        self.weak = self.n - self.q + 1
        self.height = height
        self.proposer = proposer
        self.get_value = get_value
        self.round = -1
        self.step = PROPOSE
        self.locked_value: str | None = None
        self.locked_round = -1
        self.valid_value: str | None = None
        self.valid_round = -1
        self.decided: Decide | None = None
        self.rounds: dict[int, _Round] = {}
        self.values: dict[str, bool] = {}
        self._missing: set[str] = set()
        # a restarted validator: its lock is its last non-nil precommit at this height
        for (h, r, step), value in self.signed.items():
            if h == height and step == PRECOMMIT and value is not None and r > self.locked_round:
                self.locked_round, self.locked_value = r, value
                self.valid_round, self.valid_value = r, value
        for (h, r, step), value in self.signed.items():  # own votes, to gossip again
            if h == height and step in (PREVOTE, PRECOMMIT):
                self._record(Vote(step, h, r, value, self.me), [])
        for (h, _r), votes in self.record.pol.items():
            if h == height:
                for v in votes:
                    self._record(v, [])

    @property
    def started(self) -> bool:
        return self.round >= 0

    def next_height(self, validators: Sequence[str], proposer: Callable[[int], str],
                    get_value: Callable[[int], str | None]) -> None:
        """Move to height+1 (not started: call `start`)."""
        self.record.forget_below(self.height + 1)
        self._setup(validators, self.height + 1, proposer, get_value)

    # ------------------------------------------------------------------ inputs
    def start(self, round_: int | None = None) -> list[Action]:
        """Begin the height (the node calls this once it has something to decide); a
        restarted validator resumes at the last round it signed anything in."""
        out: list[Action] = []
        if round_ is None:
            round_ = max((r for h, r, _ in self.signed if h == self.height), default=0)
        if self.round < round_ and self.decided is None:
            self._start_round(round_, out)
            self._progress(out)
        return out

    def on_proposal(self, p: Proposal) -> list[Action]:
        """A proposal whose signature the caller checked (sender authenticated)."""
        out: list[Action] = []
        if (p.height != self.height or p.sender not in self.validators or p.round < 0
                or p.round > max(self.round, 0) + MAX_FUTURE_ROUNDS or self.decided
                or not -1 <= p.valid_round < p.round or p.sender != self.proposer(p.round)):
            return out
        rs = self._round(p.round)
        if p.value in rs.proposals or len(rs.proposals) >= 2:
            return out  # an equivocating proposer is kept to two values per round
        if rs.proposals:
            first = next(iter(rs.proposals.values()))
            self._evidence(first, p, out)
        rs.proposals[p.value] = p
        rs.senders.add(p.sender)
        if p.value not in self.values:
            self.values[p.value] = p.valid
        self._progress(out)
        return out

    def on_vote(self, v: Vote) -> list[Action]:
        """A prevote or precommit whose signature the caller checked."""
        out: list[Action] = []
        if (v.height != self.height or v.sender not in self.validators or v.round < 0
                or v.round > max(self.round, 0) + MAX_FUTURE_ROUNDS
                or v.step not in (PREVOTE, PRECOMMIT)):
            return out
        if self._record(v, out) and self.decided is None:
            self._progress(out)
        return out

    def _record(self, v: Vote, out: list[Action]) -> bool:
        rs = self._round(v.round)
        votes, voters = ((rs.prevotes, rs.prevoters) if v.step == PREVOTE
                         else (rs.precommits, rs.precommitters))
        of_value = votes.get(v.value)
        if of_value is not None and v.sender in of_value:
            return False
        seen = voters.get(v.sender, 0)
        if seen:
            other = next(x[v.sender] for x in votes.values() if v.sender in x)
            self._evidence(other, v, out)
            if seen >= MAX_VALUES_PER_SENDER:
                return False
        voters[v.sender] = seen + 1
        if of_value is None:
            of_value = votes[v.value] = {}
        of_value[v.sender] = v
        rs.senders.add(v.sender)
        return True

    def on_timeout(self, t: Timeout) -> list[Action]:
        out: list[Action] = []
        if t.height != self.height or t.round != self.round or self.decided is not None:
            return out
        if t.step == PROPOSE and self.step == PROPOSE:
            self._vote(PREVOTE, None, out)
            self.step = PREVOTE
        elif t.step == PREVOTE and self.step == PREVOTE:
            self._vote(PRECOMMIT, None, out)
            self.step = PRECOMMIT
        elif t.step == PRECOMMIT:
            self._start_round(self.round + 1, out)
        elif t.step == RESEND:
            # gossip: every message of this round and the previous one that this validator
            # holds (its own and others', all signed), so that validators that lost them, or
            # that are still in the previous round, catch up
            for rr in (self.round - 1, self.round):
                rs = self.rounds.get(rr)
                if rs is None:
                    continue
                for p in rs.proposals.values():
                    out.append(Broadcast(p, resend=True))
                    self._forward_pol(p, out)
                for votes in (rs.prevotes, rs.precommits):
                    for by_sender in votes.values():
                        out.extend(Broadcast(v, resend=True) for v in by_sender.values())
            out.append(Schedule(t, self.timeouts.of(RESEND, self.round)))
            return out
        self._progress(out)
        return out

    # ------------------------------------------------------------------- rules
    def _round(self, r: int) -> _Round:
        rs = self.rounds.get(r)
        if rs is None:
            rs = self.rounds[r] = _Round()
        return rs

    def _evidence(self, a: Proposal | Vote, b: Proposal | Vote, out: list[Action]) -> None:
        if len(self.evidence) < self.max_evidence:
            ev = Evidence(a, b)
            self.evidence.append(ev)
            out.append(ev)

    def _start_round(self, r: int, out: list[Action]) -> None:
        self.round, self.step = r, PROPOSE
        h = self.height
        if self.proposer(r) == self.me:
            key = (h, r, PROPOSE)
            if key in self.signed:
                value = self.signed[key]
                vr = self.valid_round if value == self.valid_value else -1
            elif self.valid_value is not None:
                value, vr = self.valid_value, self.valid_round
            else:
                value, vr = self.get_value(r), -1
            if value is not None:
                self.record.sign(key, value)
                p = Proposal(h, r, value, vr, self.me, True)
                out.append(Broadcast(p))
                self.on_proposal_own(p)
                self._forward_pol(p, out)
        out.append(Schedule(Timeout(PROPOSE, h, r), self.timeouts.of(PROPOSE, r)))
        out.append(Schedule(Timeout(RESEND, h, r), self.timeouts.of(RESEND, r)))

    def _forward_pol(self, p: Proposal, out: list[Action]) -> None:
        """A proposal re-proposing a valid value travels with its proof of lock (the
        prevotes of its valid round), so validators that missed them can accept it."""
        if p.valid_round >= 0:
            rs = self.rounds.get(p.valid_round)
            for v in (rs.prevotes.get(p.value, {}).values() if rs else ()):
                out.append(Broadcast(v, resend=True))

    def on_proposal_own(self, p: Proposal) -> None:
        rs = self._round(p.round)
        rs.proposals.setdefault(p.value, p)
        rs.senders.add(p.sender)
        self.values.setdefault(p.value, True)

    def _vote(self, step: int, value: str | None, out: list[Action]) -> None:
        key = (self.height, self.round, step)
        if key in self.signed:
            value = self.signed[key]  # never sign two different votes for one step
        else:
            self.record.sign(key, value)
        v = Vote(step, self.height, self.round, value, self.me)
        out.append(Broadcast(v))
        self._record(v, out)  # our own vote counts (the caller's loop makes progress)

    def may_prevote(self, p: Proposal) -> bool:
        """The lock rule (lines 22-33 of the paper's Algorithm 1)."""
        if not p.valid:
            return False
        if p.valid_round == -1:
            return self.locked_round == -1 or self.locked_value == p.value
        return self.locked_round <= p.valid_round or self.locked_value == p.value

    def _progress(self, out: list[Action]) -> None:
        changed = True
        while changed and self.decided is None:
            changed = self._step_once(out)

    def _step_once(self, out: list[Action]) -> bool:
        r, q = self.round, self.q
        # decision, any round (line 49)
        for rr, rs in self.rounds.items():
            for value, votes in rs.precommits.items():
                if value is None or len(votes) < q:
                    continue
                if self.values.get(value):
                    cert = tuple(votes.values())
                    self.decided = Decide(self.height, rr, value, cert)
                    out.append(self.decided)
                    return False
                if value not in self.values and value not in self._missing:
                    self._missing.add(value)
                    out.append(Missing(self.height, value))
        if r < 0:
            return False
        rs = self._round(r)
        proposer = self.proposer(r)
        if self.step == PROPOSE:
            for p in rs.proposals.values():
                if p.sender != proposer:
                    continue
                if p.valid_round == -1:
                    ok = self.may_prevote(p)
                elif rs_vr := self.rounds.get(p.valid_round):
                    if len(rs_vr.prevotes.get(p.value, ())) < q:
                        continue
                    ok = self.may_prevote(p)
                else:
                    continue
                self.step = PREVOTE
                self._vote(PREVOTE, p.value if ok else None, out)
                return True
        if self.step == PREVOTE and not rs.prevote_timer and len(rs.prevoters) >= q:
            rs.prevote_timer = True
            out.append(Schedule(Timeout(PREVOTE, self.height, r), self.timeouts.of(PREVOTE, r)))
        if self.step >= PREVOTE and not rs.locked_here:
            for value, votes in rs.prevotes.items():
                if value is not None and len(votes) >= q and self.values.get(value):
                    rs.locked_here = True
                    if self.step == PREVOTE:
                        self.locked_value, self.locked_round = value, r
                        self.record.proof(self.height, r, tuple(votes.values()))
                        self.step = PRECOMMIT
                        self._vote(PRECOMMIT, value, out)
                    self.valid_value, self.valid_round = value, r
                    return True
        # a proof of lock seen late (forwarded) still makes its value the one to re-propose
        for rr, rs2 in self.rounds.items():
            if self.valid_round < rr < r:
                for value, votes in rs2.prevotes.items():
                    if value is not None and len(votes) >= q and self.values.get(value):
                        self.valid_value, self.valid_round = value, rr
        if self.step == PREVOTE and len(rs.prevotes.get(None, ())) >= q:
            self.step = PRECOMMIT
            self._vote(PRECOMMIT, None, out)
            return True
        if not rs.precommit_timer and len(rs.precommitters) >= q:
            rs.precommit_timer = True
            out.append(Schedule(Timeout(PRECOMMIT, self.height, r),
                                self.timeouts.of(PRECOMMIT, r)))
        for rr in sorted(self.rounds):
            if rr > r and len(self.rounds[rr].senders) >= self.weak:
                self._start_round(rr, out)
                return True
        return False


def run(sm: Tendermint, inputs: Iterable[Proposal | Vote | Timeout]) -> list[Action]:
    """Feed several inputs; the concatenated actions."""
    out: list[Action] = []
    for x in inputs:
        if isinstance(x, Proposal):
            out += sm.on_proposal(x)
        elif isinstance(x, Vote):
            out += sm.on_vote(x)
        else:
            out += sm.on_timeout(x)
    return out
