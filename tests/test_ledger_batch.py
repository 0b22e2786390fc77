"""Batch signature checks on every core give exactly the one-by-one answers."""

from __future__ import annotations

import os

import pytest
from ledger_net import make_net

from testbed.ledger import messages
from testbed.ledger.blocks import Block, merkle_root
from testbed.ledger.errors import Reason, Rejected
from testbed.ledger.identity import (
    BatchVerifier,
    KeyPair,
    SignatureCache,
    signature_cache,
    verify_many,
    verify_signature,
)


@pytest.fixture(scope="module")
def pool():
    v = BatchVerifier(1, min_batch=1)
    yield v
    v.close()


def test_batch_matches_one_by_one_in_order(pool):
    keys = [KeyPair.from_seed(bytes([i])) for i in range(3)]
    items = []
    for i in range(300):
        k = keys[i % 3]
        data = os.urandom(50 + i)
        sig = k.sign(data)
        if i % 7 == 3:
            data = data[:-1] + bytes([data[-1] ^ 1])   # tampered message
        elif i % 11 == 5:
            k = keys[(i + 1) % 3]                      # someone else's key
        elif i % 13 == 6:
            sig = b"\0" * 64                           # garbage signature
        items.append((k.public, sig, data))
    expected = [verify_signature(*it) for it in items]
    assert 0 < sum(expected) < len(expected)
    signature_cache().clear()  # the workers, not the cache, must answer
    assert pool.verify(items) == expected == verify_many(items)
    assert pool._pool and pool._pool[0].proc.is_alive()
    signature_cache().clear()
    pending = pool.start(items)
    w = pool._pool[0]
    while w.received < w.sent:  # let the worker answer every job before collecting
        assert w.conn.poll(30)
        w._read(block=True)
    taken = w.taken_back
    assert pending() == expected
    assert w.taken_back == taken  # all of it was checked by the worker process
    assert BatchVerifier(0).verify(items) == expected
    sent = w.sent
    assert pool.verify(items) == expected  # every answer now comes from the cache
    assert w.sent == sent


def test_signature_cache_answers_as_a_fresh_check_and_stays_bounded():
    k, other = KeyPair.from_seed(b"cache-a"), KeyPair.from_seed(b"cache-b")
    data = b"pay 5 to someone"
    sig = k.sign(data)
    cache = signature_cache()
    cache.clear()
    assert verify_signature(k.public, sig, data)
    assert (cache.hits, cache.misses) == (0, 1)
    assert verify_signature(k.public, sig, data)
    assert cache.hits == 1
    # any change of key, signature or signed bytes is another entry, checked afresh
    assert not verify_signature(k.public, sig, data + b"0")
    assert not verify_signature(other.public, sig, data)
    assert not verify_signature(k.public, bytes(64), data)
    assert not verify_signature(k.public, sig[:-1], data)  # malformed: no crash
    assert not verify_signature(b"short", sig, data)
    assert cache.hits == 1 and cache.misses == 6
    assert not verify_signature(k.public, sig, data + b"0")  # a refusal is remembered too
    assert verify_signature(k.public, sig, data)
    small = SignatureCache(maxsize=4, max_bad=2)
    for i in range(10):
        small.put(small.key(k.public, sig, b"%d" % i), True)
        small.put(small.key(k.public, bytes(64), b"%d" % i), False)
    assert len(small) == 6  # each table bounded on its own: forgeries evict no good answer
    assert small.get(small.key(k.public, sig, b"9")) is True
    assert small.get(small.key(k.public, sig, b"0")) is None
    assert small.get(small.key(k.public, bytes(64), b"9")) is False
    keys = [SignatureCache().key(k.public, sig, data) for _ in range(2)]
    assert keys[0] != keys[1]  # salted per cache: digests cannot be precomputed


def _block_with(net, txs):
    """The elected proposer's block over `txs` as given (even ones the rules refuse)."""
    p = net.propose([])
    h = dict(p.block.header, merkle=merkle_root([m.id for m in txs]), txs=len(txs))
    return Block.create(net.key_of(p.block.proposer), h)


def test_block_validation_refuses_the_same_forged_tx_in_parallel_or_not():
    net = make_net(4)
    net.time += 60
    txs = [net.pay(net.aggregator, net.validators[i % 4].address, 1 + i) for i in range(300)]
    good = txs[150]
    forged = messages.SignedMessage(good.client_id, good.req_id, good.date, good.operation,
                                    good.parameters, "ab" * 64)
    txs[150] = forged
    block = _block_with(net, txs)
    outcomes = []
    for workers in (0, 1):
        chain = net.chains[workers]
        chain.verifier = BatchVerifier(workers, min_batch=1)
        before = chain.state.digest()
        with pytest.raises(Rejected) as exc:
            chain.check_proposal(block, txs)
        assert chain.state.digest() == before
        assert not chain.verified  # nothing stays marked from a refused block
        outcomes.append((exc.value.reason, exc.value.tx, str(exc.value)))
        chain.verifier.close()
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == Reason.BAD_SIGNATURE and outcomes[0][1] == forged.id
    # The honest block commits on both paths.
    txs[150] = good
    assert not net.commit(txs).dropped


def test_admit_many_equals_admit_one_by_one(pool):
    net = make_net(4)
    net.time += 60
    msgs = [net.pay(net.aggregator, net.validators[0].address, 1 + i) for i in range(200)]
    msgs[10] = messages.SignedMessage(*[getattr(msgs[10], f) for f in (
        "client_id", "req_id", "date", "operation", "parameters")], "cd" * 64)
    msgs[20] = net.pay(net.outsider, net.validators[0].address, 5)
    msgs[30] = net.sign(net.aggregator, "payment", {"to": "nobody", "amount": 1,
                                                    "award": None, "memo": ""})
    a, b = net.chains
    a.verifier = pool
    batch = a.admit_many(msgs)
    single = []
    for m in msgs:
        try:
            b.admit(m)
        except Rejected as exc:
            single.append(exc)
        else:
            single.append(None)
    assert [None if e is None else e.reason for e in batch] == \
        [None if e is None else e.reason for e in single]
    assert [i for i, e in enumerate(batch) if e is not None] == [10, 20, 30]
    assert a.verified == b.verified


def test_worker_processes_inherit_no_socket_of_the_caller():
    """A node's MQTT connection must close when the node closes it: a forked worker holding
    a copy of the socket would keep it open (the peer would never see EOF)."""
    import socket
    a, b = socket.socketpair()
    v = BatchVerifier(1, min_batch=1)
    try:
        k = KeyPair.from_seed(b"s")
        items = [(k.public, k.sign(bytes([i])), bytes([i])) for i in range(64)]
        assert v.verify(items) == [True] * 64 and v._pool
        a.close()
        b.settimeout(10)
        assert b.recv(1) == b""  # EOF: no other process holds `a`
    finally:
        b.close()
        v.close()


def test_the_caller_takes_back_what_a_stalled_worker_has_not_started(pool):
    """Collecting never waits on a worker that has not begun: the caller checks those jobs
    itself (work sharing), and the worker, resumed, skips them."""
    import signal
    k = KeyPair.from_seed(b"t")
    items = [(k.public, k.sign(bytes([i])), bytes([i ^ (i % 5 == 0)])) for i in range(256)]
    expected = verify_many(items)
    signature_cache().clear()  # the checks must go to the worker, not the cache
    pool.verify(items[:200])  # a running worker
    w = pool._pool[0]
    os.kill(w.proc.pid, signal.SIGSTOP)
    try:
        taken = w.taken_back
        signature_cache().clear()
        assert pool.verify(items) == expected
        assert w.taken_back - taken == -(-len(items) // pool.chunk)  # every job taken back
    finally:
        os.kill(w.proc.pid, signal.SIGCONT)
    signature_cache().clear()
    assert pool.verify(items) == expected  # the resumed worker is still in service
    assert w.proc.is_alive() and pool._pool == [w]


def test_a_dead_worker_costs_speed_not_answers(pool):
    k = KeyPair.from_seed(b"d")
    items = [(k.public, k.sign(bytes([i])), bytes([i ^ (i % 3 == 0)])) for i in range(256)]
    expected = verify_many(items)
    signature_cache().clear()
    pending = pool.start(items)  # all of it on the worker ...
    pool._pool[0].proc.kill()    # ... which dies before answering (or after: either way)
    assert pending() == expected
    signature_cache().clear()
    assert pool.verify(items) == expected  # and a new worker takes the next batch
    assert pool._pool and pool._pool[0].proc.is_alive()
