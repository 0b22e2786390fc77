"""The node database: replay on open, and `verify` catches any change of any byte."""

from __future__ import annotations

import random
import shutil
import sqlite3
import subprocess
import sys

import pytest
from ledger_net import make_net, stored_chain

from testbed.ledger import canonical
from testbed.ledger.chain import Chain, _Peer, verify_store, verify_stores


@pytest.fixture(scope="module")
def ledger_db(tmp_path_factory):
    """A stored chain of 12 blocks with readings, payments, an auction and its award."""
    d = tmp_path_factory.mktemp("ledger")
    return d / "a.db", stored_chain(d, blocks=12)


def test_reopening_replays_to_the_same_head(ledger_db):
    path, net = ledger_db
    chain = Chain.open(path, genesis=net.genesis)
    assert chain.height == net.chain.height == 15
    assert chain.state.digest() == net.chain.state.digest()
    assert chain.wallets() == net.chain.wallets()
    report = verify_store(path, genesis=net.genesis)
    assert report.ok and report.height == 15 and report.txs == 12 * 5 + 3


def test_verify_names_the_height_of_any_single_byte_change(ledger_db, tmp_path):
    path, net = ledger_db
    rng = random.Random(20261122)
    db = sqlite3.connect(path)
    rows = [("blocks", "raw", h) for (h,) in db.execute("SELECT height FROM blocks")]
    rows += [("blocks", "cert", h) for (h,) in db.execute("SELECT height FROM blocks WHERE height>0")]
    rows += [("txs", "raw", (h, i)) for h, i in db.execute("SELECT height, idx FROM txs")]
    db.close()
    for trial in range(60):
        table, col, key = rng.choice(rows)
        copy = tmp_path / f"t{trial}.db"
        shutil.copy(path, copy)
        con = sqlite3.connect(copy)
        where, args = (("height=?", (key,)) if table == "blocks"
                       else ("height=? AND idx=?", key))
        blob = bytearray(con.execute(f"SELECT {col} FROM {table} WHERE {where}", args)
                         .fetchone()[0])
        pos = rng.randrange(len(blob))
        blob[pos] ^= rng.randrange(1, 256)
        con.execute(f"UPDATE {table} SET {col}=? WHERE {where}", (bytes(blob), *args))
        con.commit()
        con.close()
        height = key if table == "blocks" else key[0]
        report = verify_store(copy, genesis=net.genesis)
        assert not report.ok, (table, col, key, pos)
        assert report.height == height, (table, col, key, pos, report.error)
        copy.unlink()


def _edit(path, sql: str, *args) -> None:
    con = sqlite3.connect(path)
    con.execute(sql, args)
    con.commit()
    con.close()


def test_verify_stores_reports_as_each_store_verified_alone(ledger_db, tmp_path):
    """The peers of the first store are compared with it, not replayed; every report is
    still the one `verify_store` gives that store alone, so damage to any peer (or to the
    first store) is caught at its height."""
    path, net = ledger_db
    rng = random.Random(20261203)
    copies = [tmp_path / f"n{i}.db" for i in range(3)]
    for c in copies:
        shutil.copy(path, c)
    good = verify_store(path, genesis=net.genesis)
    assert verify_stores([path, *copies], genesis=net.genesis) == [good] * 4
    # a peer whose certificate at height 7 is another valid one (3 of the 4 votes, as a
    # node that committed on the first quorum it saw) verifies; one with 2 votes does not
    votes = canonical.decode(sqlite3.connect(path).execute(
        "SELECT cert FROM blocks WHERE height = 7").fetchone()[0])
    assert len(votes) == 4
    _edit(copies[0], "UPDATE blocks SET cert = ? WHERE height = 7",
          canonical.encode(votes[1:]))
    _edit(copies[1], "UPDATE blocks SET cert = ? WHERE height = 7",
          canonical.encode(votes[2:]))
    peer = _Peer(copies[0])
    assert verify_store(path, genesis=net.genesis, _peers=[peer]).ok
    assert not peer.differs and peer.certs_checked == 1
    peer.close()
    reports = verify_stores([path, *copies], genesis=net.genesis)
    assert reports[:2] == [good, good]
    assert reports[2] == verify_store(copies[1], genesis=net.genesis)
    assert not reports[2].ok and reports[2].height == 7 and "2 votes" in reports[2].error
    assert reports[3] == good
    # a byte changed anywhere in a peer, or in the first store
    rows = [("blocks", "raw", h) for h in range(16)] + [("blocks", "cert", h) for h in
                                                          range(1, 16)]
    rows += [("txs", "raw", (h, i)) for h, i in sqlite3.connect(path).execute(
        "SELECT height, idx FROM txs")]
    for trial in range(12):
        table, col, key = rng.choice(rows)
        victim = copies[2] if trial % 3 else copies[0] if trial % 2 else path
        target = tmp_path / f"v{trial}.db"
        shutil.copy(victim if victim != path else path, target)
        where, args = (("height=?", (key,)) if table == "blocks"
                       else ("height=? AND idx=?", key))
        con = sqlite3.connect(target)
        blob = bytearray(con.execute(f"SELECT {col} FROM {table} WHERE {where}", args)
                         .fetchone()[0])
        blob[rng.randrange(len(blob))] ^= rng.randrange(1, 256)
        con.execute(f"UPDATE {table} SET {col}=? WHERE {where}", (bytes(blob), *args))
        con.commit()
        con.close()
        order = [target, path, copies[0]] if victim == path else [path, copies[0], target]
        reports = verify_stores(order, genesis=net.genesis)
        assert reports == [verify_store(p, genesis=net.genesis) for p in order], trial
        bad = reports[0] if victim == path else reports[2]
        assert not bad.ok and bad.height == (key if table == "blocks" else key[0])
        assert sum(not r.ok for r in reports) == 1, trial
        target.unlink()
    # a peer that lost its last block, or holds a stray transaction
    _edit(copies[2], "DELETE FROM blocks WHERE height = 15")
    _edit(copies[2], "DELETE FROM txs WHERE height = 15")
    trunc = tmp_path / "stray.db"
    shutil.copy(path, trunc)
    _edit(trunc, "INSERT INTO txs VALUES (99, 0, 'x', X'00')")
    reports = verify_stores([path, copies[2], trunc], genesis=net.genesis)
    assert reports[1].ok and reports[1].height == 14
    assert not reports[2].ok and "belong to no block" in reports[2].error
    assert verify_stores([], genesis=net.genesis) == []


def test_verify_detects_a_missing_block_and_a_foreign_genesis(ledger_db, tmp_path):
    path, net = ledger_db
    copy = tmp_path / "gap.db"
    shutil.copy(path, copy)
    con = sqlite3.connect(copy)
    con.execute("DELETE FROM blocks WHERE height = 5")
    con.commit()
    con.close()
    report = verify_store(copy)
    assert not report.ok and report.height == 5 and "missing" in report.error
    other = make_net(3).genesis
    report = verify_store(path, genesis=other)
    assert not report.ok and report.height == 0


def test_cli_verify_show_wallets(ledger_db, tmp_path):
    path, net = ledger_db
    run = [sys.executable, "-m", "testbed", "ledger"]
    ok = subprocess.run([*run, "verify", str(path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "heights 0-15" in ok.stdout and "63 transactions" in ok.stdout
    shown = subprocess.run([*run, "show", str(path), "--last", "3"], capture_output=True,
                           text=True)
    assert shown.returncode == 0 and "house-" in shown.stdout and "│ 15 " in shown.stdout
    one = subprocess.run([*run, "show", str(path), "--height", "13"], capture_output=True,
                         text=True)
    assert "auction-open" in one.stdout, one.stdout
    wallets = subprocess.run([*run, "wallets", str(path)], capture_output=True, text=True)
    agg = net.chain.state.balance(net.aggregator.address) / 1e6
    assert f"{agg:,.6f}" in wallets.stdout
    copy = tmp_path / "bad.db"
    shutil.copy(path, copy)
    con = sqlite3.connect(copy)
    raw = bytearray(con.execute("SELECT raw FROM txs WHERE height=7 AND idx=2").fetchone()[0])
    raw[40] ^= 1
    con.execute("UPDATE txs SET raw=? WHERE height=7 AND idx=2", (bytes(raw),))
    con.commit()
    con.close()
    bad = subprocess.run([*run, "verify", str(copy)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "FAILED at height 7" in bad.stderr


def test_block_work_in_steps_abandoned_midway_changes_nothing(tmp_path):
    """A node drives a block's check and commit in steps, yielding to its event loop;
    stopped between two steps (the node cancelled), the state journal rolls back and the
    store is not written: the chain is as before, and the same block commits afterwards."""
    net = make_net(4, stores=[str(tmp_path / "a.db")])
    net.time += 60
    txs = [net.pay(net.aggregator, net.validators[i % 4].address, 1 + i) for i in range(40)]
    p = net.propose(txs)
    chain = net.chain
    before = (chain.state.digest(), chain.height, chain.store.height())
    steps = chain.check_proposal_steps(p.block, p.txs)
    for _ in range(10):
        next(steps)
    assert chain.height == before[1] + 1  # mid-check: the block is applied in a trial
    steps.close()
    assert (chain.state.digest(), chain.height, chain.store.height()) == before
    cert = net.certify(p.block)
    steps = chain.commit_steps(p.block, p.txs, cert)
    for _ in range(30):
        next(steps)
    steps.close()
    assert (chain.state.digest(), chain.height, chain.store.height()) == before
    chain.commit(p.block, p.txs, cert)
    assert chain.height == chain.store.height() == before[1] + 1
    assert chain.state.balance(net.validators[1].address) > 0


def test_a_committed_block_message_is_skipped_by_its_header_alone(tmp_path):
    """Nodes that already hold a committed block read only its header's height from the
    proposer's message; a message not in canonical form gets no shortcut."""
    from testbed.ledger.node import (
        _committed_height,
        _unwire_committed,
        _wire_committed,
        proposal_wire,
    )
    net = make_net(4)
    net.time += 60
    p = net.commit([net.pay(net.aggregator, net.validators[1].address, 5)])
    cert = net.certify(p.block)
    wire = _wire_committed(p.block, p.txs, cert)
    assert wire == canonical.encode({"block": canonical.decode(p.block.raw),
                                     "txs": [m.as_dict() for m in p.txs],
                                     "cert": canonical.decode(cert)})
    assert _committed_height(wire) == p.block.height == 1
    assert _unwire_committed(wire)[0].hash == p.block.hash
    assert _committed_height(b" " + wire) is None
    assert _committed_height(b'{"block":{"header":[1]}}') is None
    assert _committed_height(b'{"block":{"header":{"height":"1"}}}') is None
    assert _committed_height(b'{"block":{"header":{"height":1') is None
    key = net.key_of(p.block.proposer)
    wire = proposal_wire(key, net.chain.id, 0, -1, p.block, p.txs)
    obj = canonical.decode(wire)
    assert obj["txs"] == [m.as_dict() for m in p.txs] and canonical.encode(obj) == wire
