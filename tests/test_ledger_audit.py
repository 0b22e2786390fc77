"""The end-of-run audit done as blocks are committed (`ledger.audit`): the same reports as
`verify_stores` over the stores as they are at the end, damage done before or after a
block was followed caught at its height, and no worker process or file left behind."""

from __future__ import annotations

import sqlite3

import pytest
from ledger_net import commit_traffic, make_net

from testbed.ledger.audit import AuditWorker, Follower
from testbed.ledger.chain import verify_store, verify_stores


def _grow(folder, blocks: int, follow=lambda: None):
    """Two validators' stores of one chain (a.db, b.db), `follow` called after each block
    while their writers are open; the stores closed at the end."""
    net = make_net(4, stores=[str(folder / "a.db"), str(folder / "b.db")])
    commit_traffic(net, blocks, follow)
    return net


def _close(net) -> None:
    for c in net.chains:
        c.store.close()


def _flip(path, sql: str, *args) -> None:
    """Change one byte of the blob the query selects (`SELECT rowid, blob ...`)."""
    con = sqlite3.connect(path)
    table = "txs" if " txs " in sql else "blocks"
    rowid, blob = con.execute(sql, args).fetchone()
    blob = bytearray(blob)
    blob[len(blob) // 2] ^= 0x20
    col = sql.split()[2]
    con.execute(f"UPDATE {table} SET {col} = ? WHERE rowid = ?", (bytes(blob), rowid))
    con.commit()
    con.close()


def test_the_worker_reports_what_verify_stores_reports_and_exits(tmp_path):
    genesis_path = tmp_path / "genesis.json"
    paths = [tmp_path / "a.db", tmp_path / "b.db"]
    net = make_net(4)  # the same genesis as `_grow`'s (fixed keys and time)
    genesis_path.write_bytes(net.genesis.raw + b"\n")
    worker = AuditWorker.start(genesis_path, paths, net.genesis)
    try:
        net = _grow(tmp_path, 6, worker.follow)
        assert worker.pause()  # no store held open by the worker while the nodes close
        _close(net)
        reports = worker.finish()
    finally:
        worker.kill()
    assert worker.proc.poll() is not None
    # it read the closed stores without leaving SQLite's -shm/-wal files beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.db", "b.db", "genesis.json"]
    expected = verify_stores(paths, genesis=net.genesis)
    assert reports == expected
    assert all(r.ok and r.height == 6 and r.txs == 30 for r in reports)


@pytest.mark.parametrize("where", ["first", "peer"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_damage_before_or_after_a_block_was_followed_is_caught_at_its_height(
        tmp_path, where, when):
    """A byte of a transaction at height 3 changed while the run goes on (before the
    follower reads that height) or after it verified it (the final read-back): the
    reports are `verify_stores`'s, failed at height 3 for the damaged store only."""
    paths = [tmp_path / "a.db", tmp_path / "b.db"]
    victim = paths[0] if where == "first" else paths[1]
    follower = None
    done = []

    def follow() -> None:
        done.append(1)
        if when == "before" and len(done) == 3:
            _flip(victim, "SELECT rowid, raw FROM txs WHERE height = 3 AND idx = 2")
        follower.follow()

    follower = Follower(paths, make_net(4).genesis)
    net = _grow(tmp_path, 6, follow)
    _close(net)
    if when == "after":
        assert not follower.failed and follower.chain.height == 6
        _flip(victim, "SELECT rowid, raw FROM txs WHERE height = 3 AND idx = 2")
    reports = follower.finish()
    assert reports == verify_stores(paths, genesis=net.genesis)
    bad = reports[0] if where == "first" else reports[1]
    assert not bad.ok and bad.height == 3
    assert sum(not r.ok for r in reports) == 1


def test_a_truncated_peer_and_a_certificate_changed_later_are_caught(tmp_path):
    paths = [tmp_path / "a.db", tmp_path / "b.db"]
    follower = Follower(paths, make_net(4).genesis)
    net = _grow(tmp_path, 5, lambda: follower.follow())
    _close(net)
    con = sqlite3.connect(paths[1])
    con.execute("DELETE FROM txs WHERE height = 5")
    con.execute("DELETE FROM blocks WHERE height = 5")
    con.commit()
    con.close()
    _flip(paths[0], "SELECT rowid, cert FROM blocks WHERE height = 2")
    reports = follower.finish()
    assert reports == verify_stores(paths, genesis=net.genesis)
    assert not reports[0].ok and reports[0].height == 2
    assert reports[1] == verify_store(paths[1], genesis=net.genesis)
    assert reports[1].ok and reports[1].height == 4


def test_a_killed_or_orphaned_worker_leaves_no_process_and_no_file(tmp_path):
    paths = [tmp_path / "a.db", tmp_path / "b.db"]
    genesis_path = tmp_path / "genesis.json"
    genesis_path.write_bytes(make_net(4).genesis.raw + b"\n")
    workers = [AuditWorker.start(genesis_path, paths, make_net(4).genesis) for _ in range(2)]
    net = _grow(tmp_path, 3, lambda: [w.follow() for w in workers])
    for w in workers:
        assert w.pause()
    workers[0].kill()  # the run failed
    assert workers[0].proc.poll() is not None
    workers[1].proc.stdin.close()  # the parent is gone: its end of the pipe closes
    assert workers[1].proc.wait(timeout=60) == 0
    workers[1].kill()
    _close(net)  # the nodes' connections were the last: their WAL files go with them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.db", "b.db", "genesis.json"]
