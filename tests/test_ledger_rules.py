"""Ledger rules: every refusal is specific and leaves the state as it was."""

from __future__ import annotations

import hashlib
import math

import pytest
from ledger_net import T0, make_net

from testbed.ledger import canonical, election, messages
from testbed.ledger import transactions as T
from testbed.ledger.blocks import Block, merkle_root
from testbed.ledger.contracts import check_result, execute
from testbed.ledger.errors import Reason, Rejected
from testbed.ledger.identity import KeyPair, escrow_tag, reveal_owner
from testbed.ledger.messages import Freshness, SignedMessage
from testbed.ledger.state import POOL, Params


def forge(msg: SignedMessage, **params) -> SignedMessage:
    """The same envelope and signature with changed parameters."""
    return SignedMessage(msg.client_id, msg.req_id, msg.date, msg.operation,
                         {**msg.parameters, **params}, msg.signature)


def rejected_block(net, txs, reason: Reason) -> Rejected:
    """Commit must fail on every node with `reason`, changing nothing."""
    before = [c.state.digest() for c in net.chains]
    p = net.chain.propose(net.key_of(election.proposer(net.chain.state).address), [],
                          time=net.time + 1)
    header = {**p.block.header, "merkle": merkle_root([m.id for m in txs]), "txs": len(txs)}
    block = Block.create(net.key_of(header["proposer"]), header)
    with pytest.raises(Rejected) as info:
        net.chain.commit(block, txs, net.certify(block))
    assert info.value.reason == reason, info.value
    assert info.value.height == 1
    assert [c.state.digest() for c in net.chains] == before
    return info.value


def test_signed_message_has_the_papers_shape_and_round_trips():
    net = make_net()
    k = net.validators[0]
    msg = net.reading(k, 1.0, 2.0)
    obj = canonical.decode(msg.raw)
    assert set(obj) == {"clientId", "reqId", "date", "operation", "parameters", "signature"}
    assert obj["clientId"] == k.address and obj["operation"] == "meter-reading"
    again = messages.parse(msg.raw)
    assert again == msg and again.id == msg.id
    assert messages.verify(again, net.chain.state.public_key) == k.public


def test_parsing_the_same_bytes_again_gives_the_same_message_refusals_are_not_kept():
    """The validators of one process each parse every transaction: once is enough."""
    net = make_net()
    msg = net.reading(net.validators[0], 1.0, 2.0)
    first = messages.parse(bytes(msg.raw))
    assert messages.parse(bytes(msg.raw)) is first and first == msg
    assert messages.parse(msg.raw.decode()) is not first  # text: parsed afresh
    loose = msg.raw.replace(b'{"clientId"', b'{ "clientId"')
    for _ in range(2):
        with pytest.raises(Rejected) as info:
            messages.parse(loose)
        assert "not in canonical form" in str(info.value)
        assert loose not in messages._PARSED
    assert messages.parse(loose, strict=False) == msg
    others = [net.reading(net.validators[1], 0.1 * i, 0.0, start=60 * i).raw
              for i in range(messages.MAX_PARSED + 1)]
    for raw in others:
        messages.parse(raw)
    assert len(messages._PARSED) == messages.MAX_PARSED  # bounded: the oldest went first
    assert msg.raw not in messages._PARSED and others[-1] in messages._PARSED


@pytest.mark.parametrize("raw, expected", [
    (b"{not json", "not valid JSON"),
    (b'{"a": 1}', "not in canonical form"),
    (b'{"a":1}', "envelope fields"),
    (b"[1,2]", "must be a JSON object"),
    (b'{"x":NaN}', "not valid JSON"),
])
def test_malformed_envelopes_are_refused_with_the_reason(raw, expected):
    with pytest.raises(Rejected) as info:
        messages.parse(raw)
    assert info.value.reason == Reason.MALFORMED
    assert expected in str(info.value)


def test_awards_and_grid_checks_may_grow_with_the_market_other_envelopes_may_not():
    """An award or a DSO check carries a line per order (500 prosumers: 120-160 kB), so
    those two operations have a larger ceiling, decided from the canonical prefix before
    any decoding; every other operation keeps the 64 kB one."""
    k = KeyPair.generate()
    pad = ["x" * 60] * 3_000  # ~190 kB of parameters
    for op in (T.AWARD, T.GRID_CHECK):
        big = messages.sign(k, op, {"lines": pad}, at=T0)
        assert len(big.raw) > 2 * messages.MAX_MESSAGE_BYTES
        assert messages.size_limit(big.raw) == messages.MAX_LARGE_MESSAGE_BYTES
        assert messages.parse(big.raw) == big
        assert messages.verify(big, {k.address: k.public}.get) == k.public
    payment = messages.sign(k, T.PAYMENT, {"lines": pad}, at=T0)
    with pytest.raises(Rejected, match=f"exceeds {messages.MAX_MESSAGE_BYTES}$") as info:
        messages.parse(payment.raw)
    assert info.value.reason == Reason.MALFORMED
    huge = messages.sign(k, T.AWARD, {"lines": ["x" * 1000] * 4_300}, at=T0)
    with pytest.raises(Rejected, match=f"exceeds {messages.MAX_LARGE_MESSAGE_BYTES}$"):
        messages.parse(huge.raw)
    # the larger ceiling needs the canonical key order: a reordered envelope gets 64 kB
    reordered = b'{"operation":"award",' + big.raw[1:]
    assert messages.size_limit(reordered) == messages.MAX_MESSAGE_BYTES
    with pytest.raises(Rejected, match="exceeds"):
        messages.parse(reordered, strict=False)


def test_forged_signature_is_refused_at_admission_and_in_a_block():
    net = make_net()
    good = net.pay(net.aggregator, net.validators[0].address, 5)
    forged = forge(good, amount=500)
    with pytest.raises(Rejected) as info:
        net.chain.admit(forged)
    assert info.value.reason == Reason.BAD_SIGNATURE
    rejected_block(net, [forged], Reason.BAD_SIGNATURE)


def test_unregistered_key_is_refused():
    net = make_net()
    msg = net.reading(net.outsider, 1.0, 1.0)
    with pytest.raises(Rejected) as info:
        net.chain.admit(msg)
    assert info.value.reason == Reason.UNKNOWN_KEY
    rejected_block(net, [msg], Reason.UNKNOWN_KEY)


def test_replayed_req_id_is_refused_live_and_on_chain():
    net = make_net()
    first = net.pay(net.aggregator, net.validators[0].address, 5, req_id="r-1")
    net.commit([first])
    # same reqId, different content (a new signature): still a replay
    again = net.pay(net.aggregator, net.validators[1].address, 7, req_id="r-1", dt=2)
    before = net.chain.state.digest()
    p = net.propose([again])
    assert p.txs == [] and p.dropped[0][1].reason == Reason.REPLAY
    assert net.chain.state.digest() == before
    fresh = Freshness(max_skew_s=60)
    resolve = net.chain.state.public_key
    fresh.accept(first, resolve, now=first.time)
    with pytest.raises(Rejected) as info:
        fresh.accept(first, resolve, now=first.time + 1)
    assert info.value.reason == Reason.REPLAY


def test_stale_timestamps_are_refused_live_and_on_chain():
    net = make_net(params=Params(max_skew_s=30, max_age_s=120))
    old = net.pay(net.aggregator, net.validators[0].address, 5, dt=-200)
    with pytest.raises(Rejected) as info:
        Freshness(30).accept(old, net.chain.state.public_key, now=net.time)
    assert info.value.reason == Reason.STALE and "allowed ±30 s" in str(info.value)
    future = net.pay(net.aggregator, net.validators[0].address, 5, dt=+100)
    for msg in (old, future):
        p = net.propose([msg], dt=0.5)
        assert p.dropped[0][1].reason == Reason.STALE


def test_wrong_proposer_is_refused():
    net = make_net()
    net.commit([net.reading(k, 1.0, 1.0 + i) for i, k in enumerate(net.validators)])
    elected = election.proposer(net.chain.state).address
    other = next(k for k in net.validators if k.address != elected)
    with pytest.raises(Rejected) as info:
        net.chain.propose(other, [], time=net.time + 1)
    assert info.value.reason == Reason.WRONG_PROPOSER
    # a block built by hand by the wrong validator, even with a full certificate
    p = net.propose([])
    header = {**p.block.header, "proposer": other.address,
              "evidence": election.standing(net.chain.state, other.address).evidence()}
    block = Block.create(other, header)
    before = net.chain.state.digest()
    with pytest.raises(Rejected) as info:
        net.chain.commit(block, [], net.certify(block))
    assert info.value.reason == Reason.WRONG_PROPOSER and info.value.height == 2
    assert net.chain.state.digest() == before


def test_block_without_a_valid_commit_certificate_is_refused():
    net = make_net(4)
    p = net.propose([net.pay(net.aggregator, net.validators[0].address, 5)])
    before = net.chain.state.digest()
    other = net.propose([]).block  # another block at the same height
    bad_certs = {
        "2 of 4 votes": net.certify(p.block, net.validators[:2]),
        "votes for another block": net.certify(other),
        "an outsider's vote": net.certify(p.block, [*net.validators[:2], net.outsider]),
        "not JSON": b"garbage",
    }
    forged = canonical.decode(net.certify(p.block))
    forged[0]["signature"] = "00" * 64
    bad_certs["a forged vote"] = canonical.encode(forged)
    for what, cert in bad_certs.items():
        with pytest.raises(Rejected) as info:
            net.chain.commit(p.block, p.txs, cert)
        assert info.value.reason in (Reason.BAD_CERTIFICATE, Reason.MALFORMED), what
        assert net.chain.state.digest() == before, what
    net.chain.commit(p.block, p.txs, net.certify(p.block, net.validators[:3]))  # 3 > 2/3 of 4
    assert net.chain.height == 1


def test_overdraw_and_double_settlement_are_refused():
    net = make_net()
    v0 = net.validators[0]
    p = net.propose([net.pay(v0, net.validators[1].address, 1)])  # v0 holds nothing
    assert p.dropped[0][1].reason == Reason.OVERDRAW
    # an award obliges the aggregator to pay v0 once
    auction, award = net.open_and_award("test/first-come-v1", seller=v0)
    line = [k for k in net.chain.state.lines if k[0] == award.id]
    assert line == [(award.id, net.aggregator.address, v0.address)]
    due = net.chain.state.lines[line[0]][0]
    assert due == 1_000_000  # 5 kWh x 0.20 EUR/kWh
    pay = net.pay(net.aggregator, v0.address, due, award=award.id)
    net.commit([pay])
    assert net.chain.state.balance(v0.address) == due
    twice = net.pay(net.aggregator, v0.address, due, award=award.id, dt=2)
    p = net.propose([twice])
    assert p.dropped[0][1].reason == Reason.DOUBLE_SPEND
    # two spends of one balance in one block: the second overdraws
    a = net.pay(v0, net.validators[1].address, due)
    b = net.pay(v0, net.validators[2].address, due)
    p = net.propose([a, b])
    assert p.txs == [a] and p.dropped[0][1].reason == Reason.OVERDRAW


def test_contract_result_must_equal_re_execution():
    net = make_net()
    seller = net.validators[1]
    req, _ = net.open_and_award("test/first-come-v1", seller=seller)
    # a second auction whose award claims more money than the contract computes
    gate = int(net.time) + 10
    req2 = net.auction("test/first-come-v1", energy=1.0, price=0.3, interval=8, gate=gate)
    order = net.order(seller, req2.id, energy=1.0, price=0.1)
    net.commit([req2, order])
    net.time = gate + 1
    honest = execute("test/first-come-v1", net.chain.state.auctions[req2.id].contract_inputs())
    cheat = canonical.decode(canonical.encode(honest))
    cheat["awards"][0]["amount_eur"] = 10.0
    bad = net.award(req2.id, "test/first-come-v1", [order.id], cheat)
    before = net.chain.state.digest()
    p = net.propose([bad])
    assert p.dropped[0][1].reason == Reason.CONTRACT_MISMATCH
    assert net.chain.state.digest() == before
    censored = net.award(req2.id, "test/first-come-v1", [], {"awards": []})
    p = net.propose([censored])
    assert p.dropped[0][1].reason == Reason.CONTRACT_MISMATCH  # every order must count
    with pytest.raises(Rejected) as info:
        check_result("test/first-come-v1", net.chain.state.auctions[req2.id].contract_inputs(),
                     cheat)
    assert info.value.reason == Reason.CONTRACT_MISMATCH


def test_poe_election_picks_the_cpf_closest_to_one_and_rounds_rotate():
    net = make_net(4)
    gaps = [0.9, 0.1, 2.5, 0.4]  # |P - C| per validator
    net.commit([net.reading(k, 1.0, 1.0 + g) for k, g in zip(net.validators, gaps,
                                                             strict=True)])
    order = election.ranking(net.chain.state)
    expected = [net.validators[i].address for i in (1, 3, 0, 2)]
    assert [s.address for s in order] == expected
    assert order[0].cpf == pytest.approx(math.exp(-0.1))
    assert [election.proposer(net.chain.state, r).address for r in range(5)] == [
        *expected, expected[0]]
    p = net.commit([])
    assert p.block.proposer == expected[0]
    assert p.block.header["evidence"]["cpf"] == pytest.approx(math.exp(-0.1))
    p = net.commit([], round_=2)  # two silent proposers: the third in CPF order
    assert p.block.proposer == expected[2] and p.block.round == 2


def test_ties_and_validators_without_readings_break_deterministically():
    net = make_net(4)
    net.commit([net.reading(k, 1.0, 1.5) for k in net.validators[:2]])
    a = [s.address for s in election.ranking(net.chain.state)]
    assert set(a[:2]) == {k.address for k in net.validators[:2]}  # readings rank first
    head = net.chain.state.head
    tie = sorted(a[:2], key=lambda x: hashlib.sha256(f"{head}|{x}".encode()).hexdigest())
    assert a[:2] == tie
    assert [s.address for s in election.ranking(net.chains[1].state)] == a


def test_reward_goes_to_re_proposers_from_the_pool():
    net = make_net(2, params=Params(block_reward=250_000), modes=["RE+TE", "TE"])
    net.commit([net.reading(net.validators[0], 1, 1), net.reading(net.validators[1], 0, 5)])
    p = net.commit([net.pay(net.aggregator, net.validators[1].address, 1)])
    assert p.block.proposer == net.validators[0].address
    assert p.txs[0].operation == T.REWARD
    assert net.chain.state.balance(net.validators[0].address) == 2 * 250_000
    assert net.chain.state.balance(POOL) == 10_000_000 - 2 * 250_000


def test_registry_changes_need_the_administrator_and_change_the_validator_set():
    net = make_net(3)
    newcomer = KeyPair.from_seed(b"newcomer")
    entry = T.entry_dict("house-new", newcomer.public, roles=["validator", "meter"])
    by_outsider = net.sign(net.validators[0], T.REGISTRY, {"action": "add", "entry": entry})
    assert net.propose([by_outsider]).dropped[0][1].reason == Reason.NOT_AUTHORISED
    net.commit([net.sign(net.admin, T.REGISTRY, {"action": "add", "entry": entry})])
    assert newcomer.address in net.chain.state.validators()
    assert net.chain.state.quorum() == 3  # 4 validators: more than 2/3 is 3
    net.validators.append(newcomer)
    p = net.commit([net.reading(newcomer, 1, 1)])
    assert p.txs[0].client_id == newcomer.address
    gone = net.sign(net.admin, T.REGISTRY, {"action": "remove", "address": newcomer.address})
    net.commit([gone])
    assert newcomer.address not in net.chain.state.validators()
    p = net.propose([net.reading(newcomer, 1, 1, start=int(net.time) + 100)])
    assert p.dropped[0][1].reason == Reason.UNKNOWN_KEY


def test_pseudonyms_are_certified_by_the_registry_and_auditable():
    net = make_net()
    owner = net.validators[2]
    audit_key = b"k" * 32
    pseudo = KeyPair.from_seed(b"period-42")
    cert = net.sign(net.admin, T.PSEUDONYM, {
        "public_key": pseudo.public.hex(), "escrow": escrow_tag(audit_key, owner.address,
                                                                  pseudo.address),
        "valid_from": int(net.time), "valid_to": int(net.time) + 3600})
    net.commit([cert])
    req = net.auction("test/first-come-v1", energy=1.0, price=0.3, interval=1,
                      gate=int(net.time) + 60)
    order = net.order(pseudo, req.id, energy=1.0, price=0.1, cpf=0.9)
    p = net.commit([req, order])
    assert p.txs == [req, order]
    assert owner.address not in canonical.encode(order.as_dict()).decode()
    ps = net.chain.state.pseudonyms[pseudo.address]
    identities = sorted(net.chain.state.identities)
    assert reveal_owner(audit_key, pseudo.address, ps.escrow, identities) == owner.address
    assert reveal_owner(b"x" * 32, pseudo.address, ps.escrow, identities) is None
    net.time += 7200  # past valid_to
    late = net.sign(pseudo, T.ORDER, {**order.parameters})
    assert net.propose([late]).dropped[0][1].reason == Reason.UNKNOWN_KEY


def test_a_block_with_one_bad_transaction_is_refused_whole():
    net = make_net()
    good = net.pay(net.aggregator, net.validators[0].address, 5)
    bad = net.pay(net.validators[1], net.validators[0].address, 5)  # overdraws
    err = rejected_block(net, [good, bad], Reason.OVERDRAW)
    assert err.tx == bad.id
    assert net.chain.state.balance(net.validators[0].address) == 0


def test_readings_are_certified_by_their_own_meter_only():
    net = make_net()
    a, b = net.validators[:2]
    other = net.sign(a, T.READING, {"meter": b.address, "start": int(net.time) - 60,
                                    "duration_s": 60, "production_kwh": 1.0,
                                    "consumption_kwh": 1.0})
    assert net.propose([other]).dropped[0][1].reason == Reason.NOT_AUTHORISED
    net.commit([net.reading(a, 1, 1)])
    overlap = net.reading(a, 1, 1, start=int(net.time) - 90)
    assert net.propose([overlap]).dropped[0][1].reason == Reason.INVALID
    negative = net.reading(a, -1, 1, start=int(net.time))
    with pytest.raises(Rejected) as info:
        net.chain.admit(negative)
    assert info.value.reason == Reason.MALFORMED
    assert "parameters.production_kwh" in str(info.value)


def test_merkle_root_depends_on_every_id_and_their_order():
    ids = [canonical.sha256_hex(bytes([i])) for i in range(5)]
    roots = {merkle_root(ids[:n]) for n in range(6)}
    assert len(roots) == 6
    assert merkle_root(ids) != merkle_root([ids[1], ids[0], *ids[2:]])
    assert merkle_root(ids[:3]) != merkle_root([*ids[:3], ids[2]])  # no duplication trick


def test_the_markets_merit_order_auction_runs_as_a_contract():
    """Two sellers answer an aggregator bid; validators re-execute the clearing and the
    award obliges the aggregator to pay each winner exactly the cleared amount once."""
    from testbed.market.auction import CONTRACT
    net = make_net(3)
    gate = int(net.time) + 10
    req = net.auction(CONTRACT, energy=3.0, price=0.25, interval=3, gate=gate)
    net.commit([req])
    offers = [(net.validators[0], 2.0, 0.20), (net.validators[1], 2.0, 0.10),
              (net.validators[2], 5.0, 0.30)]  # the last is above the aggregator's price
    orders = [net.order(k, req.id, energy=e, price=p) for k, e, p in offers]
    assert not net.commit(orders).dropped
    net.time = gate + 1
    result = execute(CONTRACT, net.chain.state.auctions[req.id].contract_inputs())
    assert result["outcome"] == "exact"
    assert [(a["address"], a["energy_kwh"]) for a in result["awards"]] == [
        (net.validators[1].address, 2.0), (net.validators[0].address, 1.0)]
    statuses = {n["address"]: n["status"] for n in result["notices"]}
    assert statuses[net.validators[2].address] == "rejected"
    award = net.award(req.id, CONTRACT, [o.id for o in orders], result)
    assert not net.commit([award]).dropped
    lines = {k[2]: v for k, v in net.chain.state.lines.items() if k[0] == award.id}
    assert lines == {net.validators[1].address: (200_000, False),
                     net.validators[0].address: (200_000, False)}


def test_an_award_with_grid_caps_re_executes_with_them():
    """The DSO's caps travel in the award and are contract inputs: validators re-execute
    the capped clearing; the same result without its caps is a contract mismatch."""
    from testbed.market.auction import CONTRACT
    net = make_net(2)
    gate = int(net.time) + 10
    req = net.auction(CONTRACT, energy=3.0, price=0.25, interval=3, gate=gate)
    net.commit([req])
    orders = [net.order(net.validators[0], req.id, energy=2.0, price=0.10),
              net.order(net.validators[1], req.id, energy=2.0, price=0.20)]
    net.commit(orders)
    net.time = gate + 1
    first = orders[0].id  # order ids on the ledger are the bid-offer tx ids
    inputs = {**net.chain.state.auctions[req.id].contract_inputs(), "caps": {first: 0.5}}
    result = execute(CONTRACT, inputs)
    assert [a["energy_kwh"] for a in result["awards"]] == [0.5, 2.0]
    assert result["caps"] == {first: 0.5}
    ids = [o.id for o in orders]
    uncapped = net.propose([net.award(req.id, CONTRACT, ids, result)])
    assert uncapped.dropped[0][1].reason == Reason.CONTRACT_MISMATCH
    bad = net.propose([net.award(req.id, CONTRACT, ids, result, caps={first: -1})])
    assert bad.dropped[0][1].reason == Reason.MALFORMED
    # caps are the DSO's: only with its signed grid check of this auction
    p = net.commit([net.grid_check(req.id, {first: 0.5}),
                    net.award(req.id, CONTRACT, ids, result, caps={first: 0.5})])
    assert not p.dropped and [m.operation for m in p.txs] == ["grid-check", "award"]


def _capped_auction(net):
    from testbed.market.auction import CONTRACT
    gate = int(net.time) + 10
    req = net.auction(CONTRACT, energy=3.0, price=0.25, interval=3, gate=gate)
    net.commit([req])
    orders = [net.order(net.validators[0], req.id, energy=2.0, price=0.10),
              net.order(net.validators[1], req.id, energy=2.0, price=0.20)]
    net.commit(orders)
    net.time = gate + 1
    caps = {orders[0].id: 0.5}
    inputs = {**net.chain.state.auctions[req.id].contract_inputs(), "caps": caps}
    award = net.award(req.id, CONTRACT, [o.id for o in orders], execute(CONTRACT, inputs),
                      caps=caps)
    return req, caps, award


def test_award_caps_without_the_dsos_signature_are_refused():
    net = make_net(2)
    req, caps, award = _capped_auction(net)
    # no grid check at all: the aggregator's own claim of caps
    p = net.propose([award])
    assert p.dropped[0][1].reason == Reason.NOT_AUTHORISED and "DSO" in str(p.dropped[0][1])
    # a grid check signed by the aggregator (not the DSO) is refused, and so the award
    p = net.propose([net.grid_check(req.id, caps, key=net.aggregator), award])
    assert [e.reason for _, e in p.dropped] == [Reason.NOT_AUTHORISED] * 2
    # a forged DSO signature: the DSO's address, someone else's key
    good = net.grid_check(req.id, caps)
    forged = messages.sign(net.outsider, T.GRID_CHECK, dict(good.parameters), at=net.time,
                           client_id=net.dso.address)
    p = net.propose([forged, award])
    assert [e.reason for _, e in p.dropped] == [Reason.BAD_SIGNATURE, Reason.NOT_AUTHORISED]
    # a block that carries them anyway is refused by every validator (re-execution)
    for txs in ([award], [forged, award]):
        block = _forced_block(net, txs)
        with pytest.raises(Rejected) as exc:
            net.chains[1].check_proposal(block, txs)
        assert exc.value.reason in (Reason.NOT_AUTHORISED, Reason.BAD_SIGNATURE)
    assert net.chain.state.auctions[req.id].award is None
    # the DSO's caps must be the award's, no more and no fewer
    net.commit([good])
    other = {**caps, next(iter(caps)): 0.25}
    p = net.propose([net.award(req.id, award.parameters["contract"],
                               award.parameters["orders"], award.parameters["result"],
                               caps=other)])
    assert p.dropped[0][1].reason == Reason.CONTRACT_MISMATCH
    uncapped = net.award(req.id, award.parameters["contract"], award.parameters["orders"],
                         award.parameters["result"])
    assert net.propose([uncapped]).dropped[0][1].reason == Reason.CONTRACT_MISMATCH
    assert not net.commit([award]).dropped
    assert net.chain.state.grid_checks[req.id].light == "amber"


def test_a_grid_check_names_orders_of_its_auction_once():
    net = make_net(2)
    req, caps, _ = _capped_auction(net)
    stray = net.grid_check(req.id, {"ab" * 32: 1.0})
    assert net.propose([stray]).dropped[0][1].reason == Reason.INVALID
    bad = net.grid_check(req.id, caps, light="purple")
    assert net.propose([bad]).dropped[0][1].reason == Reason.MALFORMED
    assert not net.commit([net.grid_check(req.id, caps)]).dropped
    again = net.grid_check(req.id, caps, rounds=3)
    assert net.propose([again]).dropped[0][1].reason == Reason.DOUBLE_SPEND


def _forced_block(net, txs):
    """The elected proposer's block over `txs` as given, bypassing the proposer's checks."""
    p = net.propose([])
    net.time -= 1
    h = dict(p.block.header, merkle=merkle_root([m.id for m in txs]), txs=len(txs))
    return Block.create(net.key_of(p.block.proposer), h)


def test_a_proposal_puts_orders_before_their_award_whatever_the_arrival_order():
    """Orders and the award reach a proposer over the bus from different senders; when
    the award arrives first the block still takes both (dependencies go first)."""
    from testbed.market.auction import CONTRACT
    net = make_net(2)
    gate = int(net.time) + 10
    req = net.auction(CONTRACT, energy=3.0, price=0.25, interval=3, gate=gate)
    net.commit([req])
    orders = [net.order(net.validators[0], req.id, energy=2.0, price=0.10),
              net.order(net.validators[1], req.id, energy=2.0, price=0.20)]
    state = net.chain.state
    with state.trial():  # what the contract will see once the orders are committed
        state.advance(state.height + 1, state.head, net.time + 1)
        for i, o in enumerate(orders):
            state.apply(o, block_time=net.time + 1, height=state.height, proposer="",
                        index=i, verified=set())
        inputs = state.auctions[req.id].contract_inputs()
    net.time = gate + 1
    award = net.award(req.id, CONTRACT, [o.id for o in orders], execute(CONTRACT, inputs))
    p = net.commit([award, *orders])  # award first, as it may arrive
    assert not p.dropped
    assert [m.operation for m in p.txs][-1] == "award"
    assert len({k for k in net.chain.state.lines if k[0] == award.id}) == 2


# ------------------------------------------------------------------ market rules in genesis
def test_market_rules_live_in_genesis_and_the_contract_clears_under_them():
    """A chain whose genesis says pay-as-clear and prices up to 0.30 EUR/kWh: auctions
    must follow it, and the award re-executes under those rules, not the agents' own."""
    from testbed.market.auction import CONTRACT
    from testbed.market.orders import MarketRules, Pricing
    rules = MarketRules(price_max=0.30, pricing=Pricing.PAY_AS_CLEAR, interval_s=300)
    net = make_net(3, params=Params(market=rules.to_dict()))
    assert net.genesis.header["params"]["market"] == rules.to_dict()
    assert net.chain.state.params.rules == rules
    gate = int(net.time) + 10

    def open_(pricing="pay-as-clear", price=0.25):
        m = net.auction(CONTRACT, energy=3.0, price=price, interval=3, gate=gate)
        return net.sign(net.aggregator, T.AUCTION, {**m.parameters, "pricing": pricing})
    assert net.propose([open_("pay-as-bid")]).dropped[0][1].reason == Reason.INVALID
    refused = net.propose([open_(price=0.5)]).dropped[0][1]
    assert refused.reason == Reason.INVALID and "market rules" in refused.detail
    req = open_()
    net.commit([req])
    orders = [net.order(net.validators[0], req.id, energy=2.0, price=0.10),
              net.order(net.validators[1], req.id, energy=2.0, price=0.20),
              net.order(net.validators[2], req.id, energy=2.0, price=0.40)]  # above 0.30
    net.commit(orders)
    net.time = gate + 1
    inputs = net.chain.state.auctions[req.id].contract_inputs()
    assert inputs["rules"] == rules.to_dict()
    on_chain = execute(CONTRACT, inputs)
    statuses = {n["address"]: n["status"] for n in on_chain["notices"]}
    assert statuses[net.validators[2].address] == "rejected"
    assert {a["price"] for a in on_chain["awards"]} == {0.20}  # uniform clearing price
    # an aggregator clearing under other rules (the defaults) disagrees with the chain
    elsewhere = execute(CONTRACT, {**inputs, "rules": None})
    assert elsewhere != on_chain
    ids = [o.id for o in orders]
    assert net.propose([net.award(req.id, CONTRACT, ids, elsewhere)]).dropped[0][1].reason \
        == Reason.CONTRACT_MISMATCH
    assert not net.commit([net.award(req.id, CONTRACT, ids, on_chain)]).dropped


def test_genesis_with_unusable_market_rules_is_refused():
    from testbed.ledger.chain import genesis_state, make_genesis
    net = make_net(2)
    bad = dict(net.genesis.header["params"], market={"price_min": 5, "price_max": 1})
    g = make_genesis(net.admin, net.genesis.header["registry"], time=T0,
                     params=None)
    header = dict(g.header, params=bad)
    forged = Block.create(net.admin, header)
    with pytest.raises(Rejected, match="params.market"):
        genesis_state(forged)
    # a genesis from before market rules were in it still opens, with the defaults
    old = dict(net.genesis.header["params"])
    del old["market"]
    state = genesis_state(Block.create(net.admin, dict(g.header, params=old)))
    assert state.params.market == Params().market


def test_commit_of_the_checked_block_redoes_its_effect_to_the_same_state():
    """A validator commits the block it checked (or built) by redoing that effect (the
    rules ran then, on the same state): the state is exactly that of a node applying
    every block in full, through readings, payments, an auction, its orders and award,
    and reqIds leaving the replay horizon; another block than the checked one, or a
    changed state, is applied in full."""
    from testbed.ledger.chain import Chain
    net = make_net(4, nodes=1)
    full = Chain(net.genesis)
    blocks = []

    def commit(txs):
        p = net.commit(txs)
        assert not p.dropped
        blocks.append((p.block, p.txs))
        full.commit(p.block, p.txs, net.certify(p.block))
        assert full.state.digest() == net.chain.state.digest()

    for h in range(3):
        net.time += 60
        commit([*(net.reading(k, 0.5 + 0.1 * i, 0.7) for i, k in enumerate(net.validators)),
                net.pay(net.aggregator, net.validators[h].address, 1000 + h)])
    gate = int(net.time) + 10
    req = net.auction("test/first-come-v1", energy=1.0, price=0.2, interval=3, gate=gate)
    commit([req])
    order = net.order(net.validators[0], req.id, energy=1.0, price=0.1)
    commit([order])
    net.time = gate + 1
    result = execute("test/first-come-v1", net.chain.state.auctions[req.id].contract_inputs())
    commit([net.award(req.id, "test/first-come-v1", [order.id], result)])
    net.time += 2 * (net.chain.state.params.max_age_s + net.chain.state.params.max_skew_s)
    assert net.chain.state.recent
    commit([net.reading(net.validators[1], 0.3, 0.2)])  # the older reqIds leave the horizon
    assert len(net.chain.state.recent) == 1
    assert net.chain.reused == len(blocks) and full.reused == 0
    assert full.state.balances == net.chain.state.balances
    assert full.state.auctions == net.chain.state.auctions
    assert list(full.state._recent_order) == list(net.chain.state._recent_order)
    # checked one block, committing another: applied in full (and its rules apply)
    c = net.chain
    a = net.propose([net.reading(net.validators[2], 0.1, 0.1)])
    b = net.propose([net.reading(net.validators[3], 0.1, 0.1)], dt=0.5)
    c.check_proposal(a.block, a.txs)
    c.commit(b.block, b.txs, net.certify(b.block))
    assert c.reused == len(blocks) and c.checked is None
    full.commit(b.block, b.txs, net.certify(b.block))
    assert full.state.digest() == c.state.digest()
    # the proposer commits the block it built (a refused transaction dropped) by redoing
    # what building it did
    rich = net.chain.state.balance(net.aggregator.address)
    p = net.propose([net.pay(net.aggregator, net.validators[0].address, rich + 1),
                     net.reading(net.validators[0], 0.2, 0.1),
                     net.pay(net.aggregator, net.validators[1].address, 7)])
    assert [exc.reason for _, exc in p.dropped] == [Reason.OVERDRAW] and len(p.txs) == 2
    c.commit(p.block, p.txs, net.certify(p.block))
    assert c.reused == len(blocks) + 1
    full.commit(p.block, p.txs, net.certify(p.block))
    assert full.state.digest() == c.state.digest()
    assert list(full.state._recent_order) == list(c.state._recent_order)


@pytest.mark.parametrize("params", [
    {"to": "tb" + "0" * 40, "amount": 5, "award": None, "memo": "héllo \"quoted\" \u2603"},
    {"meter": "tb" + "1" * 40, "start": 1, "duration_s": 900, "production_kwh": 0.1,
     "consumption_kwh": 1e-7},
    {"nested": {"b": [1, 2.5, {"z": None, "a": True}], "a": "x"}, "empty": {}},
])
def test_a_signed_message_s_bytes_are_its_canonical_encoding(params):
    """`sign` builds the envelope's bytes from the signed body (not encoded twice): they
    are exactly the canonical encoding, parse strictly and verify."""
    key = KeyPair.from_seed(b"bytes")
    m = messages.sign(key, T.PAYMENT, params, at=1_800_000_000.25)
    assert m.raw == canonical.encode(m.as_dict())
    again = messages.parse(bytes(m.raw))
    assert again == m and again.id == m.id
    assert messages.verify(again, lambda a: key.public) == key.public
