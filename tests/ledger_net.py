"""An in-process set of validators for rule tests (the bus tests use real brokers)."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from testbed.ledger import election, messages
from testbed.ledger import transactions as T
from testbed.ledger.blocks import Block, Vote, encode_certificate
from testbed.ledger.chain import Chain, Proposal, make_genesis
from testbed.ledger.contracts import execute
from testbed.ledger.identity import KeyPair
from testbed.ledger.messages import SignedMessage
from testbed.ledger.state import MICRO, POOL, Params

T0 = 1_800_000_000.0


@dataclass
class Net:
    admin: KeyPair
    aggregator: KeyPair
    validators: list[KeyPair]
    genesis: Block
    chains: list[Chain]
    time: float = T0
    outsider: KeyPair = field(default_factory=lambda: KeyPair.from_seed(b"outsider"))
    dso: KeyPair = field(default_factory=lambda: KeyPair.from_seed(b"dso"))

    @property
    def chain(self) -> Chain:
        return self.chains[0]

    def key_of(self, address: str) -> KeyPair:
        return next(k for k in [*self.validators, self.aggregator, self.admin, self.dso]
                    if k.address == address)

    def sign(self, key: KeyPair, op: str, params: dict, *, dt: float = 0.0,
             req_id: str | None = None) -> SignedMessage:
        return messages.sign(key, op, params, at=self.time + dt, req_id=req_id)

    def reading(self, key: KeyPair, p_kwh: float, c_kwh: float, *, start: int | None = None,
                duration: int = 60) -> SignedMessage:
        start = int(self.time) - duration if start is None else start
        return self.sign(key, T.READING, {"meter": key.address, "start": start,
                                          "duration_s": duration, "production_kwh": p_kwh,
                                          "consumption_kwh": c_kwh})

    def pay(self, payer: KeyPair, payee: str, amount: int, award: str | None = None,
            **kw) -> SignedMessage:
        return self.sign(payer, T.PAYMENT, {"to": payee, "amount": amount, "award": award,
                                            "memo": ""}, **kw)

    def auction(self, contract: str, *, energy: float, price: float, interval: int,
                gate: int, side: str = "buy") -> SignedMessage:
        """The aggregator opens an auction (its bid or offer)."""
        return self.sign(self.aggregator, T.AUCTION, {
            "address": self.aggregator.address, "interval": interval, "gate": gate,
            "pricing": "pay-as-bid", "contract": contract, "bid": _bid(side, energy, price)})

    def order(self, key: KeyPair, auction: str, *, energy: float, price: float,
              side: str = "sell", cpf: float = 0.5) -> SignedMessage:
        """A prosumer's answer to an auction."""
        return self.sign(key, T.ORDER, {"address": key.address, "cpf": cpf,
                                        "auction": auction, "bid": _bid(side, energy, price)})

    def award(self, auction: str, contract: str, orders: Sequence[str],
              result: dict, caps: dict | None = None) -> SignedMessage:
        params = {"auction": auction, "contract": contract, "orders": list(orders),
                  "result": result}
        if caps is not None:
            params["caps"] = caps
        return self.sign(self.aggregator, T.AWARD, params)

    def grid_check(self, auction: str, caps: dict, *, key: KeyPair | None = None,
                   light: str = "amber", rounds: int = 2, passed: bool = True
                   ) -> SignedMessage:
        """The DSO's signed verdict on an auction's dispatch (`key`: someone else signs)."""
        return self.sign(key or self.dso, T.GRID_CHECK, {
            "auction": auction, "caps": caps, "light": light, "rounds": rounds,
            "passed": passed})

    def open_and_award(self, contract: str, *, seller: KeyPair, price: float = 0.2,
                       energy: float = 5.0) -> tuple[SignedMessage, SignedMessage]:
        """One auction with one order, committed and awarded with the contract's result."""
        gate = int(self.time) + 10
        req = self.auction(contract, energy=energy, price=0.3, interval=7, gate=gate)
        self.commit([req])
        order = self.order(seller, req.id, energy=energy, price=price)
        self.commit([order])
        self.time = gate + 1
        result = execute(contract, self.chain.state.auctions[req.id].contract_inputs())
        award = self.award(req.id, contract, [order.id], result)
        self.commit([award])
        return req, award

    def propose(self, txs: Sequence[SignedMessage], *, round_: int = 0,
                dt: float = 1.0) -> Proposal:
        self.time += dt
        elected = election.proposer(self.chain.state, round_).address
        return self.chain.propose(self.key_of(elected), txs, time=self.time, round_=round_)

    def certify(self, block: Block, voters: Sequence[KeyPair] | None = None) -> bytes:
        voters = self.validators if voters is None else voters
        return encode_certificate([Vote.cast(k, self.chain.id, block.height, block.hash)
                                   for k in voters])

    def commit(self, txs: Sequence[SignedMessage], **kw) -> Proposal:
        """Propose with the elected validator, have everyone check and vote, commit."""
        p = self.propose(txs, **kw)
        for c in self.chains:
            c.check_proposal(p.block, p.txs)
        cert = self.certify(p.block)
        for c in self.chains:
            c.commit(p.block, p.txs, cert)
        return p


def _bid(side: str, energy: float, price: float) -> dict:
    return {"type": side, "energy": {"unit": "kWh", "value": energy},
            "price": {"unit": "EUR/kWh", "value": price}}


def make_net(n: int = 4, *, nodes: int = 2, params: Params | None = None,
             modes: Sequence[str] | None = None, stores: Sequence[str] | None = None) -> Net:
    admin = KeyPair.from_seed(b"admin")
    aggregator = KeyPair.from_seed(b"aggregator")
    validators = [KeyPair.from_seed(f"validator-{i}".encode()) for i in range(n)]
    registry = [T.entry_dict("aggregator", aggregator.public, roles=["aggregator"]),
                T.entry_dict("dso", KeyPair.from_seed(b"dso").public, roles=["dso"])]
    registry += [T.entry_dict(f"house-{i}", k.public, roles=["validator", "meter"],
                              serial=f"SN{i:04d}", mode=(modes[i] if modes else "TE"))
                 for i, k in enumerate(validators)]
    genesis = make_genesis(admin, registry, params=params or Params(), time=T0,
                           allocations={aggregator.address: 1000 * MICRO, POOL: 10 * MICRO})
    chains = [Chain.open(s, genesis=genesis) if stores else Chain(genesis)
              for s in (stores or [None] * nodes)]
    return Net(admin, aggregator, validators, genesis, chains)


def commit_traffic(net: Net, blocks: int, after: Callable[[], object] = lambda: None) -> None:
    """`blocks` blocks of a reading by each validator and a payment, a minute apart;
    `after` is called after each block."""
    for h in range(blocks):
        net.time += 60
        txs = [net.reading(k, 0.5 + 0.1 * i, 0.7) for i, k in enumerate(net.validators)]
        txs.append(net.pay(net.aggregator, net.validators[h % 4].address, 1000 + h))
        assert not net.commit(txs).dropped
        after()


def stored_chain(folder: Path, blocks: int) -> Net:
    """A chain stored in folder/a.db and folder/b.db (closed): `blocks` blocks of readings
    and a payment each, then an auction and its award."""
    net = make_net(4, stores=[str(folder / "a.db"), str(folder / "b.db")])
    commit_traffic(net, blocks)
    net.open_and_award("test/first-come-v1", seller=net.validators[0])
    for c in net.chains:
        c.store.close()
    return net


def stop_processes(procs: Iterable[subprocess.Popen]) -> None:
    """SIGTERM every node process, then reap each (SIGKILL after 10 s)."""
    procs = list(procs)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
