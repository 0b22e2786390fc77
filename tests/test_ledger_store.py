"""The node database: replay on open, and `verify` catches any change of any byte."""

from __future__ import annotations

import random
import shutil
import sqlite3
import subprocess
import sys

import pytest
from ledger_net import make_net, stored_chain

from testbed.ledger.chain import Chain, verify_store


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
