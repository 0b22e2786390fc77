"""The Tendermint state machine alone, and under >= 10,000 seeded simulated schedules."""

from __future__ import annotations

import pytest
from consensus_sim import Sim, Violation

from testbed.ledger import consensus as C

NAMES = ["a", "b", "c", "d"]


def machine(me: str, record: C.Record | None = None, value: str = "X") -> C.Tendermint:
    return C.Tendermint(me, NAMES, 1, lambda r: NAMES[r % 4], lambda r: f"{value}{r}",
                        record=record)


def votes(step: int, value: str | None, senders, round_: int = 0) -> list[C.Vote]:
    return [C.Vote(step, 1, round_, value, s) for s in senders]


def broadcasts(actions) -> list:
    return [a.message for a in actions if isinstance(a, C.Broadcast)]


def test_quorum_and_tolerance():
    assert [(n, C.quorum(n), C.tolerated(n)) for n in (1, 3, 4, 7, 10)] == [
        (1, 1, 0), (3, 3, 0), (4, 3, 1), (7, 5, 2), (10, 7, 3)]


def test_one_round_without_faults_decides_the_proposal_with_a_quorum_certificate():
    b = machine("b")
    out = b.start()
    assert [type(a) for a in out] == [C.Schedule, C.Schedule]  # not b's round: waits
    out = b.on_proposal(C.Proposal(1, 0, "X0", -1, "a"))
    assert broadcasts(out) == [C.Vote(C.PREVOTE, 1, 0, "X0", "b")]
    out = C.run(b, votes(C.PREVOTE, "X0", "ac"))
    assert broadcasts(out) == [C.Vote(C.PRECOMMIT, 1, 0, "X0", "b")]
    assert (b.locked_round, b.locked_value) == (0, "X0")
    assert not [a for a in C.run(b, votes(C.PRECOMMIT, "X0", "a")) if isinstance(a, C.Decide)]
    out = b.on_vote(C.Vote(C.PRECOMMIT, 1, 0, "X0", "c"))
    decided = [a for a in out if isinstance(a, C.Decide)]
    assert len(decided) == 1 and decided[0].value == "X0" and decided[0].round == 0
    assert {v.sender for v in decided[0].precommits} == {"a", "b", "c"}


def test_proposer_proposes_and_a_forged_round_proposal_is_ignored():
    a = machine("a")
    out = a.start()
    assert broadcasts(out) == [C.Proposal(1, 0, "X0", -1, "a"), C.Vote(C.PREVOTE, 1, 0, "X0", "a")]
    b = machine("b")
    b.start()
    # round 0 belongs to a: the same proposal from c is not counted
    assert b.on_proposal(C.Proposal(1, 0, "Y", -1, "c")) == []
    # a round far ahead is not stored (bounded memory)
    assert b.on_proposal(C.Proposal(1, 999, "Y", -1, NAMES[999 % 4])) == []
    assert 999 not in b.rounds


def test_a_locked_validator_prevotes_nil_for_another_value_until_a_newer_proof_of_lock():
    b = machine("b")
    b.start()
    C.run(b, [C.Proposal(1, 0, "X0", -1, "a"), *votes(C.PREVOTE, "X0", "ac")])
    assert b.locked_value == "X0"
    # round 1 (proposer b itself re-proposes its valid value X0)
    out = C.run(b, [*votes(C.PRECOMMIT, None, "acd"), C.Timeout(C.PRECOMMIT, 1, 0)])
    assert C.Proposal(1, 1, "X0", 0, "b") in broadcasts(out)
    # round 2: c proposes a fresh value; b stays with its lock
    C.run(b, [*votes(C.PRECOMMIT, None, "acd", 1), C.Timeout(C.PRECOMMIT, 1, 1)])
    out = b.on_proposal(C.Proposal(1, 2, "Z", -1, "c"))
    assert broadcasts(out) == [C.Vote(C.PREVOTE, 1, 2, None, "b")]
    # round 3: d re-proposes Z with a proof of lock from round 2 (newer than b's lock)
    C.run(b, [*votes(C.PREVOTE, "Z", "acd", 2), *votes(C.PRECOMMIT, None, "acd", 2),
              C.Timeout(C.PRECOMMIT, 1, 2)])
    out = b.on_proposal(C.Proposal(1, 3, "Z", 2, "d"))
    assert broadcasts(out) == [C.Vote(C.PREVOTE, 1, 3, "Z", "b")]


def test_a_restarted_validator_never_signs_a_different_vote_and_keeps_its_lock():
    rec = C.Record()
    b = machine("b", rec)
    b.start()
    C.run(b, [C.Proposal(1, 0, "X0", -1, "a"), *votes(C.PREVOTE, "X0", "ac")])
    assert rec.signed[(1, 0, C.PREVOTE)] == "X0" and rec.signed[(1, 0, C.PRECOMMIT)] == "X0"
    assert (1, 0) in rec.pol
    again = machine("b", rec)  # crash: only the record survives
    assert (again.locked_round, again.locked_value) == (0, "X0")
    again.start()
    # the round-0 proposal timer fires first this time: the recorded prevote is re-sent
    out = again.on_timeout(C.Timeout(C.PROPOSE, 1, 0))
    assert broadcasts(out) == [C.Vote(C.PREVOTE, 1, 0, "X0", "b")]


def test_equivocation_is_kept_as_evidence():
    b = machine("b")
    b.start()
    C.run(b, [C.Vote(C.PREVOTE, 1, 0, "X0", "c")])
    out = b.on_vote(C.Vote(C.PREVOTE, 1, 0, "Y", "c"))
    ev = [a for a in out if isinstance(a, C.Evidence)]
    assert len(ev) == 1 and {ev[0].first.value, ev[0].second.value} == {"X0", "Y"}
    assert b.evidence == ev


def test_10000_simulated_schedules_keep_agreement_validity_and_liveness():
    """Seeded schedules: drops, duplicates, delays and reordering, partitions, crashes and
    restarts with the durable record, one Byzantine (equivocating proposer and voter) or
    crashed validator; every 10th schedule has 7 validators. Liveness: every honest
    validator decides 2 heights within 120 simulated s after the network heals."""
    worst = 0.0
    kinds = {"byzantine": 0, "crashed": 0}
    for seed in range(10_000):
        sim = Sim(seed, n=7 if seed % 10 == 0 else 4, split=seed % 5 == 1)
        kinds["byzantine" if sim.nodes[sim.faulty].byzantine else "crashed"] += 1
        worst = max(worst, sim.run())
        assert len(sim.decisions) == 2
    assert kinds["byzantine"] > 5000 and kinds["crashed"] > 2000
    assert worst < 120


class NoLockCheck(C.Tendermint):
    """The deliberately broken rule: prevote any valid proposal, ignoring the lock."""

    def may_prevote(self, p: C.Proposal) -> bool:
        return p.valid


def test_the_simulation_catches_a_dropped_lock_check():
    for seed in range(5000):
        try:
            Sim(seed, machine=NoLockCheck, byzantine=True, split=True).run()
        except Violation as exc:
            if "agreement" in str(exc):
                break
    else:
        pytest.fail("5000 schedules did not expose the missing lock check")
    # the same schedule with the correct rule is safe and live
    Sim(seed, byzantine=True, split=True).run()


def test_certificates_are_precommits_of_one_round():
    """Precommits carry their round (signed); a certificate mixing rounds is refused, and
    one from before rounds existed still verifies."""
    from ledger_net import make_net

    from testbed.ledger.blocks import Vote, check_certificate, encode_certificate
    from testbed.ledger.errors import Rejected

    net = make_net(4, nodes=1)
    p = net.propose([net.pay(net.aggregator, net.validators[0].address, 5)])
    validators = {k.address: k.public for k in net.validators}

    def cert(rounds):
        return encode_certificate([Vote.cast(k, net.chain.id, p.block.height, p.block.hash, r)
                                   for k, r in zip(net.validators, rounds, strict=False)])

    kw = {"chain": net.chain.id, "block": p.block, "validators": validators, "quorum": 3}
    assert len(check_certificate(cert([2, 2, 2]), **kw)) == 3
    assert len(check_certificate(cert([None] * 4), **kw)) == 4
    with pytest.raises(Rejected, match="different rounds"):
        check_certificate(cert([1, 2, 2, 2]), **kw)
    # the round is signed: changing it breaks the vote's signature
    forged = Vote.cast(net.validators[0], net.chain.id, p.block.height, p.block.hash, 1)
    moved = Vote(forged.chain, forged.height, forged.block, forged.voter, forged.signature, 2)
    assert not moved.signature_ok(net.validators[0].public)
    net.chain.commit(p.block, p.txs, cert([3, 3, 3]))
    assert net.chain.height == 1
