"""Work the validators of one process share (`chain._CHECKED`): a block's rules run once
per process on a given state; every validator still checks the header, its own state and
the certificate, and ends in the state it would have reached alone."""

from __future__ import annotations

import pytest
from ledger_net import commit_traffic, make_net

from testbed.ledger import chain as C
from testbed.ledger.errors import Reason, Rejected
from testbed.ledger.state import LedgerState


def _traffic(net, blocks: int = 3) -> None:
    commit_traffic(net, blocks)
    net.open_and_award("test/first-come-v1", seller=net.validators[0])


def test_a_block_s_rules_run_once_per_process_and_every_node_ends_alike(monkeypatch):
    applied: list[int] = []
    real = LedgerState.apply

    def counting(self, msg, **kw):
        applied.append(id(self))
        return real(self, msg, **kw)

    monkeypatch.setattr(LedgerState, "apply", counting)
    C._CHECKED.clear()
    shared = make_net(4, nodes=3)
    _traffic(shared)
    per_check = applied.copy()
    applied.clear()
    monkeypatch.setattr(C, "MAX_SHARED_CHECKS", 0)  # nothing kept: each node applies
    C._CHECKED.clear()
    alone = make_net(4, nodes=3)
    _traffic(alone)
    # `net.commit` has chain 0 propose, then every chain check the block: the first check
    # applies it, the others take its effect; without sharing each one applies it
    ids = [id(c.state) for c in shared.chains]
    assert {i for i in per_check if i in ids} == {ids[0]}
    assert len(applied) == 2 * len(per_check)  # propose + 3 checks, not propose + 1
    digests = {c.state.digest() for c in [*shared.chains, *alone.chains]}
    assert len(digests) == 1 and shared.chain.height == alone.chain.height == 6
    assert all(c.reused == shared.chain.height for c in shared.chains)


def test_each_node_still_checks_the_header_and_refusals_are_not_kept():
    C._CHECKED.clear()
    net = make_net(4, nodes=2)
    net.time += 60
    p = net.propose([net.pay(net.aggregator, net.validators[1].address, 5)])
    a, b = net.chains
    a.check_proposal(p.block, p.txs)
    assert len(C._CHECKED) == 1
    with pytest.raises(Rejected) as exc:  # the effect is known; the block's date is not ok
        b.check_proposal(p.block, p.txs, now=p.block.time - 3600)
    assert exc.value.reason == Reason.STALE
    # a block whose transaction the rules refuse: refused by each node, never kept
    net.time += 60
    broke = net.pay(net.validators[2], net.validators[1].address, 10**15)
    bad = net.propose([])
    from testbed.ledger.blocks import Block, merkle_root
    header = {**bad.block.header, "merkle": merkle_root([broke.id]), "txs": 1}
    block = Block.create(net.key_of(bad.block.proposer), header)
    for c in (a, b):
        with pytest.raises(Rejected):
            c.check_proposal(block, [broke])
    assert len(C._CHECKED) == 1
