"""A seeded, simulated network for `testbed.ledger.consensus.Tendermint`.

One schedule = one seed: n validators, one of them faulty (Byzantine: equivocating as
proposer and as voter, per recipient; or crashed for good), the others honest but possibly
crashing and restarting (with their durable vote log, as the node's fsync'd file). Before
the global stabilisation time GST the network drops, duplicates, delays (so reorders) and
partitions messages; after GST every message arrives within `DELTA`. Signatures are
modelled as unforgeable: a certificate is accepted only if each of its precommits was really
emitted by its sender (`Sim.signed`).

Checked: agreement (no two honest validators decide different values at one height, also
across crashes), validity (only values honestly proposed and valid are decided) and
liveness (every honest validator decides `heights` heights within `LIVENESS_S` of GST).
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from testbed.ledger import consensus as C

DELTA = 0.05
LIVENESS_S = 120.0


class Violation(AssertionError):
    pass


@dataclass
class Node:
    name: str
    sm: C.Tendermint | None
    disk: C.Record = field(default_factory=C.Record)
    decided: list[C.Decide] = field(default_factory=list)
    up: bool = True
    epoch: int = 0
    ahead: list[object] = field(default_factory=list)
    byzantine: bool = False


class Sim:
    def __init__(self, seed: int, *, n: int = 4, heights: int = 2,
                 machine: type[C.Tendermint] = C.Tendermint,
                 byzantine: bool | None = None, split: bool = False) -> None:
        rnd = self.rnd = random.Random(seed)
        self.seed, self.n, self.heights, self.machine = seed, n, heights, machine
        self.split = split
        """A sharper adversary: the Byzantine validator votes for a value towards one honest
        validator and nil towards the others, and proposes a fresh value in its rounds."""
        self.names = [f"v{i}" for i in range(n)]
        self.now = 0.0
        self.queue: list[tuple[float, int, str, object]] = []
        self.seq = 0
        self.signed: set[tuple[str, int, int, int, str | None]] = set()
        self.proposed: set[str] = set()
        self.decisions: dict[int, str] = {}
        self.gst = rnd.uniform(0, 20)
        self.drop = rnd.choice((0.0, 0.1, 0.3, 0.6))
        self.dup = rnd.choice((0.0, 0.1))
        self.max_delay = rnd.choice((0.1, 0.5, 2.0))
        self.timeouts = C.Timeouts(propose=0.5, vote=0.2, growth=0.5)
        faulty = rnd.randrange(n)
        kind = rnd.random() if byzantine is None else (0.0 if byzantine else 1.0)
        self.faulty = self.names[faulty]
        self.partition: tuple[float, float, set[str]] | None = None
        if rnd.random() < 0.3:
            a = rnd.uniform(0, self.gst)
            side = set(rnd.sample(self.names, rnd.randrange(1, n)))
            self.partition = (a, rnd.uniform(a, self.gst), side)
        self.nodes: dict[str, Node] = {}
        for name in self.names:
            node = Node(name, None, byzantine=name == self.faulty and kind < 0.7)
            self.nodes[name] = node
            if name == self.faulty and not node.byzantine:
                node.up = False  # crashed for good
                continue
            self._boot(node)
        honest = [x for x in self.names if x != self.faulty]
        for name in rnd.sample(honest, rnd.randrange(0, len(honest) + 1)):
            if rnd.random() < 0.5:
                t = rnd.uniform(0, self.gst)
                self._at(t, "crash", name)
                self._at(rnd.uniform(t, self.gst + 1), "restart", name)

    # ----------------------------------------------------------------- plumbing
    def _at(self, t: float, kind: str, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (t, self.seq, kind, payload))

    def proposer(self, height: int):
        return lambda r: self.names[(height + r) % self.n]

    def _value(self, node: Node, height: int):
        def get(r: int) -> str:
            v = f"h{height}/{node.name}/r{r}"
            self.proposed.add(v)
            return v
        return get

    def _boot(self, node: Node) -> None:
        h = len(node.decided) + 1
        node.sm = self.machine(node.name, self.names, h, self.proposer(h), self._value(node, h),
                               timeouts=self.timeouts, record=node.disk)
        node.up = True
        node.epoch += 1
        node.ahead = []
        self._act(node, node.sm.start())

    def _send(self, src: str, dst: str, msg: object) -> None:
        t = self.now
        if t < self.gst:
            if self.partition and self.partition[0] <= t < self.partition[1] and (
                    (src in self.partition[2]) != (dst in self.partition[2])):
                return
            if self.rnd.random() < self.drop:
                return
            delay = self.rnd.uniform(0, self.max_delay)
            if self.rnd.random() < self.dup:
                self._at(t + self.rnd.uniform(0, self.max_delay), "deliver", (dst, msg))
        else:
            delay = self.rnd.uniform(0, DELTA)
        self._at(t + delay, "deliver", (dst, msg))

    def _broadcast(self, node: Node, msg: C.Proposal | C.Vote) -> None:
        for dst in self.names:
            if dst == node.name:
                continue
            if node.byzantine and msg.sender == node.name:
                out = self._split(msg, dst) if self.split else self._mutate(msg)
            else:
                out = msg
            self._send(node.name, dst, out)

    def _split(self, msg: C.Proposal | C.Vote, dst: str) -> C.Proposal | C.Vote:
        if isinstance(msg, C.Proposal):
            v = f"h{msg.height}/byz/r{msg.round}"
            self.proposed.add(v)
            return C.Proposal(msg.height, msg.round, v, -1, msg.sender, True)
        favoured = self.names[(msg.height * 7 + msg.round) % self.n]
        known = sorted(v for v in self.proposed if v.startswith(f"h{msg.height}/"))
        value = (known[-1] if known else None) if dst == favoured else None
        if isinstance(msg.value, str):
            value = msg.value if dst == favoured else None
        self.signed.add((msg.sender, msg.step, msg.height, msg.round, value))
        return C.Vote(msg.step, msg.height, msg.round, value, msg.sender)

    def _mutate(self, msg: C.Proposal | C.Vote) -> C.Proposal | C.Vote:
        """A Byzantine validator: a different message to each recipient."""
        rnd = self.rnd
        if isinstance(msg, C.Proposal):
            choice = rnd.random()
            if choice < 0.3:
                return msg
            if choice < 0.8:
                v = f"h{msg.height}/byz{rnd.randrange(3)}/r{msg.round}"
                self.proposed.add(v)
                vr = rnd.choice((-1, msg.valid_round, max(-1, msg.round - 1)))
                return C.Proposal(msg.height, msg.round, v, vr, msg.sender, True)
            return C.Proposal(msg.height, msg.round, f"bad/{rnd.randrange(3)}", -1,
                              msg.sender, False)
        known = sorted(v for v in self.proposed if v.startswith(f"h{msg.height}/"))
        value = rnd.choice([msg.value, None, *known[-4:]])
        self.signed.add((msg.sender, msg.step, msg.height, msg.round, value))
        return C.Vote(msg.step, msg.height, msg.round, value, msg.sender)

    def _act(self, node: Node, actions: list[C.Action]) -> None:
        for a in actions:
            if isinstance(a, C.Broadcast):
                m = a.message
                if isinstance(m, C.Vote):
                    self.signed.add((m.sender, m.step, m.height, m.round, m.value))
                self._broadcast(node, m)
            elif isinstance(a, C.Schedule):
                self._at(self.now + a.delay, "timeout", (node.name, node.epoch, a.timeout))
            elif isinstance(a, C.Decide):
                self._decide(node, a)
            elif isinstance(a, C.Missing):
                for dst in self.names:
                    if dst != node.name:
                        self._send(node.name, dst, ("sync", node.name, a.height))

    def _decide(self, node: Node, d: C.Decide) -> None:
        h = len(node.decided) + 1
        if d.height != h or h > self.heights:
            return
        self._certify(d)
        if not node.byzantine:
            prior = self.decisions.setdefault(h, d.value)
            if prior != d.value:
                raise Violation(f"seed {self.seed}: agreement: height {h} decided {prior!r} "
                                f"and {d.value!r} ({node.name})")
            if d.value.startswith("bad") or d.value not in self.proposed:
                raise Violation(f"seed {self.seed}: validity: {node.name} decided "
                                f"{d.value!r}")
        node.decided.append(d)
        if len(node.decided) >= self.heights:
            if node.sm is not None:
                node.sm.decided = d
            return
        assert node.sm is not None
        h += 1
        node.sm.next_height(self.names, self.proposer(h), self._value(node, h))
        self._act(node, node.sm.start())
        ahead, node.ahead = node.ahead, []
        for msg in ahead:
            self._receive(node, msg)

    def _certify(self, d: C.Decide) -> None:
        senders = {v.sender for v in d.precommits}
        ok = (len(senders) == len(d.precommits) >= C.quorum(self.n)
              and all(v.round == d.round and v.value == d.value and v.step == C.PRECOMMIT
                      and (v.sender, C.PRECOMMIT, d.height, d.round, d.value) in self.signed
                      for v in d.precommits))
        if not ok:
            raise Violation(f"seed {self.seed}: certificate of height {d.height} does not hold")

    def _receive(self, node: Node, msg: object) -> None:
        sm = node.sm
        assert sm is not None
        if isinstance(msg, tuple):  # ("sync", requester, height) or ("cert", Decide)
            if msg[0] == "sync":
                if not node.byzantine:
                    for d in node.decided[msg[2] - 1:]:
                        self._send(node.name, msg[1], ("cert", d))
            elif msg[1].height == len(node.decided) + 1:
                self._decide(node, msg[1])
            return
        height = msg.height  # type: ignore[attr-defined]
        if height > sm.height:
            if height == sm.height + 1 and len(node.ahead) < 200:
                node.ahead.append(msg)
            if self.rnd.random() < 0.2:
                self._send(node.name, msg.sender, ("sync", node.name, sm.height))  # type: ignore[attr-defined]
            return
        if height < sm.height or (sm.decided is not None and height == sm.height):
            if not node.byzantine and height <= len(node.decided):  # help a laggard
                self._send(node.name, msg.sender, ("cert", node.decided[height - 1]))  # type: ignore[attr-defined]
            return
        if isinstance(msg, C.Proposal):
            self._act(node, sm.on_proposal(msg))
        else:
            self._act(node, sm.on_vote(msg))  # type: ignore[arg-type]

    # --------------------------------------------------------------------- run
    def run(self) -> float:
        """Run to the end; returns when (simulated s after GST) the last honest node
        decided its last height."""
        honest = [self.nodes[x] for x in self.names if x != self.faulty]
        end = self.gst + LIVENESS_S
        while self.queue:
            t, _, kind, payload = heapq.heappop(self.queue)
            if t > end:
                break
            self.now = t
            if kind == "deliver":
                dst, msg = payload  # type: ignore[misc]
                node = self.nodes[dst]
                if node.up:
                    self._receive(node, msg)
            elif kind == "timeout":
                name, epoch, timeout = payload  # type: ignore[misc]
                node = self.nodes[name]
                if node.up and node.epoch == epoch and node.sm is not None:
                    self._act(node, node.sm.on_timeout(timeout))
            elif kind == "crash":
                node = self.nodes[payload]  # type: ignore[index]
                node.up, node.sm = False, None
                node.epoch += 1
            elif kind == "restart":
                node = self.nodes[payload]  # type: ignore[index]
                if not node.up:
                    self._boot(node)
            if all(len(x.decided) >= self.heights for x in honest) and t >= self.gst:
                return t - self.gst
        missing = {x.name: len(x.decided) for x in honest if len(x.decided) < self.heights}
        if missing:
            raise Violation(f"seed {self.seed}: liveness: {missing} of {self.heights} heights "
                            f"decided {LIVENESS_S:g} s after GST ({self.gst:.1f} s)")
        return max(0.0, self.now - self.gst)
