"""Pseudonyms in the market: TCRs answer under certified per-auction pseudonyms, the
aggregator and the ledger accept them, payments reach them, and only the audit key maps
them back to their owners (`ledger reveal`)."""

from __future__ import annotations

import asyncio
import time

import pytest
from ledger_net import make_net
from typer.testing import CliRunner

from testbed.bus.broker import EmbeddedBroker
from testbed.bus.client import BusClient
from testbed.cli import app
from testbed.ledger import transactions as T
from testbed.ledger.errors import Reason
from testbed.ledger.pseudonyms import PseudonymDesk, derive, reveal
from testbed.market.agents import AggregatorAgent, TCRAgent
from testbed.market.orders import Side
from testbed.market.tcr import Mode, TCRParams
from testbed.physics.models import BatteryParams

AUDIT = bytes(range(32))


async def _round(net, desk, submitted):
    """One auction over a real (embedded) broker; the agents' clock is the chain's."""
    offset = net.time - time.time()

    def clock() -> float:
        return time.time() + offset

    ids = {k.address: k.public for k in [net.aggregator, *net.validators]}
    async with EmbeddedBroker() as broker:
        buses = [BusClient(broker.url) for _ in range(4)]
        for b in buses:
            await b.connect()
        tcrs = []
        for k, soc, bus in zip(net.validators[:3], (0.5, 0.8, 0.95), buses, strict=False):
            t = TCRAgent(k, bus, "lab", resolve=ids.get,
                         is_aggregator=lambda a: a == net.aggregator.address,
                         params=TCRParams(), battery_params=BatteryParams(),
                         battery=lambda soc=soc: soc, mode=Mode.TE, clock=clock,
                         pseudonym=desk.issue)
            await t.start()
            tcrs.append(t)
        agg = AggregatorAgent(net.aggregator, buses[3], "lab",
                              resolve=lambda a: ids.get(a) or desk.resolve(a), clock=clock,
                              submit=submitted.append)
        await asyncio.sleep(0.1)
        rnd = await agg.auction(Side.BUY, 2.0, 0.35, 7, gate_s=1.0)
        for t in tcrs:
            await t.stop()
        for b in buses:
            await b.close()
    net.time = clock() + 1
    return rnd, agg


@pytest.fixture(scope="module")
def traded(tmp_path_factory):
    d = tmp_path_factory.mktemp("pseudo")
    net = make_net(4, stores=[str(d / "a.db"), str(d / "b.db")])
    submitted = []
    desk = PseudonymDesk(net.admin, AUDIT, submit=submitted.append)
    rnd, agg = asyncio.run(_round(net, desk, submitted))
    return net, desk, submitted, rnd, agg, d


def test_orders_carry_certified_pseudonyms_only_and_the_ledger_takes_them(traded):
    net, desk, submitted, rnd, agg, _ = traded
    identities = {k.address for k in net.validators}
    assert len(rnd.orders) == 3 and not agg.inbox.refused
    for m in rnd.orders:
        assert m.client_id not in identities and m.parameters["address"] == m.client_id
        assert desk.owner(m.client_id) in identities
    assert {desk.owner(m.client_id) for m in rnd.orders} == {
        k.address for k in net.validators[:3]}
    # what the aggregator recorded, plus the administrator's certificates, commits as is
    p = net.commit(submitted)
    assert not p.dropped, p.dropped[:1]
    ops = [m.operation for m in p.txs]
    assert ops[:3] == [T.PSEUDONYM] * 3 and ops[-1] == T.AWARD
    assert set(net.chain.state.pseudonyms) == {m.client_id for m in rnd.orders}


def test_payments_reach_pseudonyms_and_their_owners_spend_them(traded):
    net, desk, _, rnd, _, _ = traded
    award = rnd.award
    state = net.chain.state
    lines = {k: v for k, v in state.lines.items() if k[0] == award.id}
    assert lines and all(payer == net.aggregator.address for _, payer, _ in lines)
    pays = [net.pay(net.aggregator, payee, due, award=award.id)
            for (_, _, payee), (due, _) in sorted(lines.items())]
    assert not net.commit(pays).dropped
    payee = sorted(lines)[0][2]
    earned = net.chain.state.balance(payee)
    assert earned == sorted(lines.items())[0][1][0]
    # the bidding window has closed: the pseudonym may no longer bid, but it may spend
    pseudo, owner = desk._keys[payee]
    net.time += 3600
    late = net.order(pseudo, rnd.request.id, energy=1.0, price=0.1)
    assert net.propose([late]).dropped[0][1].reason == Reason.UNKNOWN_KEY
    before = net.chain.state.balance(owner.address)
    assert not net.commit([net.pay(pseudo, owner.address, earned)]).dropped
    assert net.chain.state.balance(owner.address) == before + earned
    # a pseudonym that must pay is topped up by its owner first (settlement in runs)
    top_up, pay = desk.payments(payee, net.aggregator.address, 500, award=None,
                                memo="penalty", at=net.time)
    assert (top_up.client_id, pay.client_id) == (owner.address, payee)
    assert not net.commit([top_up, pay]).dropped
    assert desk.payments(net.aggregator.address, payee, 1, award=None, memo="", at=0) == []


def test_reveal_needs_the_audit_key(traded, tmp_path):
    net, desk, _, rnd, _, d = traded
    found = {r.pseudonym: r.owner for r in reveal(net.chain.state, AUDIT)}
    assert found == {m.client_id: desk.owner(m.client_id) for m in rnd.orders}
    assert all(r.owner is None for r in reveal(net.chain.state, bytes(32)))
    # nobody without the owner's private key derives its pseudonym
    assert derive(net.validators[0], rnd.request.id).address in found
    assert derive(net.outsider, rnd.request.id).address not in found
    for c in net.chains:
        c.store.close()
    key, wrong = tmp_path / "audit.key", tmp_path / "other.key"
    key.write_text(AUDIT.hex() + "\n")
    wrong.write_text(bytes(32).hex() + "\n")
    runner = CliRunner()
    ok = runner.invoke(app, ["ledger", "reveal", str(d / "a.db"), "--audit-key", str(key)])
    assert ok.exit_code == 0, ok.output
    for i in range(3):
        assert f"house-{i}" in ok.output
    bad = runner.invoke(app, ["ledger", "reveal", str(d / "a.db"), "--audit-key", str(wrong)])
    assert bad.exit_code == 1 and "opens none of the 3 pseudonyms" in bad.output
    assert "house-0" not in bad.output
    missing = runner.invoke(app, ["ledger", "reveal", str(d / "a.db")])
    assert missing.exit_code == 2
    junk = tmp_path / "junk.key"
    junk.write_text("not hex")
    r = runner.invoke(app, ["ledger", "reveal", str(d / "a.db"), "--audit-key", str(junk)])
    assert r.exit_code == 2 and "not an audit key" in r.output


def test_a_node_admits_an_order_whose_certificate_is_still_in_its_mempool():
    """Certificate and order reach a node within one block interval: the order is
    admitted against the pending certificate; a certificate not signed by the
    administrator vouches for nothing."""
    from testbed.ledger.errors import Rejected
    net = make_net(2)
    req = net.auction("test/first-come-v1", energy=1.0, price=0.3, interval=1,
                      gate=int(net.time) + 30)
    net.commit([req])
    desk = PseudonymDesk(net.admin, AUDIT)
    pseudo = desk.issue(net.validators[0], req)
    order = net.order(pseudo, req.id, energy=1.0, price=0.1)
    a, b = net.chains
    with pytest.raises(Rejected) as exc:
        a.admit(order)
    assert exc.value.reason == Reason.UNKNOWN_KEY
    rogue = derive(net.validators[1], req.id)
    b.admit(net.sign(net.validators[1], T.PSEUDONYM,  # well signed, but not by the admin
                     dict(desk.certificates[0].parameters, public_key=rogue.public.hex())))
    refused = b.admit_many([net.order(rogue, req.id, energy=1.0, price=0.1)])[0]
    assert refused is not None and refused.reason == Reason.UNKNOWN_KEY
    a.admit(desk.certificates[0])
    a.admit(order)
    assert a.admit_many([order]) == [None]
    p = net.commit([order, desk.certificates[0]])
    assert not p.dropped and not a.pending_pseudonyms
