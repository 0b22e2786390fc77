"""`ledger verify` on damaged stores: every kind of damage is a `FAILED ...` line and exit 1,
never a traceback; `--against` catches deleted last blocks; `show`/`wallets` never write."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ledger_net import make_net, stored_chain
from typer.testing import CliRunner

from testbed.cli import app
from testbed.ledger.chain import head_certificate, load_against, verify_store
from testbed.ledger.state import Params

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A stored chain of 8 blocks: readings, payments, an auction and its award."""
    d = tmp_path_factory.mktemp("damage")
    return d / "a.db", d / "b.db", stored_chain(d, blocks=5)


def content(path) -> list:
    """Every row as stored (type and value): what verify reads."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    con.text_factory = bytes
    try:
        return [con.execute("SELECT height, typeof(hash), hash, raw, cert FROM blocks "
                            "ORDER BY height").fetchall(),
                con.execute("SELECT height, idx, typeof(id), id, raw FROM txs "
                            "ORDER BY height, idx").fetchall()]
    finally:
        con.close()


def cli_verify(*args: str):
    r = runner.invoke(app, ["ledger", "verify", *args])
    # A crash inside the command would surface as a non-SystemExit exception here.
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output
    return r


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_byte_flip_fails_cleanly_or_changes_nothing(store, tmp_path, data):
    path, _, net = store
    raw = bytearray(path.read_bytes())
    pos = data.draw(st.integers(0, len(raw) - 1), label="pos")
    raw[pos] ^= data.draw(st.integers(1, 255), label="xor")
    copy = tmp_path / "flip.db"
    copy.write_bytes(bytes(raw))
    r = cli_verify(str(copy))
    if r.exit_code == 0:
        # Only a byte SQLite never reads back (free space, a spare header field) may pass.
        assert content(copy) == content(path), pos
    else:
        assert r.exit_code == 1, r.output
        assert r.output.startswith("FAILED at height ") or r.output.startswith(
            "FAILED: not a ledger store"), r.output
    report = verify_store(copy, genesis=net.genesis)
    assert report.ok == (r.exit_code == 0)


def _damage(path, sql: str, *args) -> None:
    con = sqlite3.connect(path)
    con.execute(sql, args)
    con.commit()
    con.close()


TYPED = {
    # name: (damage, expected first line prefix)
    "invalid UTF-8 in blocks.hash": (
        lambda p: _damage(p, "UPDATE blocks SET hash = CAST(? AS TEXT) WHERE height = 3",
                          b"\xff\xfe\x80abc"), "FAILED at height 3"),
    "invalid UTF-8 in txs.id": (
        lambda p: _damage(p, "UPDATE txs SET id = CAST(? AS TEXT) WHERE height = 2 AND idx = 1",
                          b"\xc3\x28"), "FAILED at height 2"),
    "block bytes stored as TEXT": (
        lambda p: _damage(p, "UPDATE blocks SET raw = CAST(raw AS TEXT) WHERE height = 4"),
        "FAILED at height 4"),
    "tx bytes stored as TEXT": (
        lambda p: _damage(p, "UPDATE txs SET raw = CAST(raw AS TEXT) WHERE height = 5"),
        "FAILED at height 5"),
    "hash stored as BLOB": (
        lambda p: _damage(p, "UPDATE blocks SET hash = CAST(hash AS BLOB) WHERE height = 1"),
        "FAILED at height 1"),
    "certificate stored as an integer": (
        lambda p: _damage(p, "UPDATE blocks SET cert = 7 WHERE height = 6"),
        "FAILED at height 6"),
    "genesis bytes stored as TEXT": (
        lambda p: _damage(p, "UPDATE blocks SET raw = CAST(raw AS TEXT) WHERE height = 0"),
        "FAILED at height 0"),
    "a stray transaction": (
        lambda p: _damage(p, "INSERT INTO txs VALUES (99, 0, 'x', x'00')"),
        "FAILED at height 9"),
    "dropped txs table": (lambda p: _damage(p, "DROP TABLE txs"), "FAILED: not a ledger store"),
    "dropped blocks table": (lambda p: _damage(p, "DROP TABLE blocks"),
                             "FAILED: not a ledger store"),
    "empty file": (lambda p: p.write_bytes(b""), "FAILED: not a ledger store"),
    "text file": (lambda p: p.write_text("hello\n" * 100), "FAILED: not a ledger store"),
    "truncated to 3 pages": (lambda p: p.write_bytes(p.read_bytes()[:3 * 4096]), "FAILED"),
    "truncated mid-page": (lambda p: p.write_bytes(p.read_bytes()[:4096 + 1000]), "FAILED"),
    "first 100 bytes only": (lambda p: p.write_bytes(p.read_bytes()[:100]),
                             "FAILED: not a ledger store"),
}


@pytest.mark.parametrize("kind", list(TYPED))
def test_typed_damage_fails_with_a_height_and_no_traceback(store, tmp_path, kind):
    path, _, _ = store
    copy = tmp_path / "typed.db"
    shutil.copy(path, copy)
    damage, expected = TYPED[kind]
    damage(copy)
    r = cli_verify(str(copy))
    assert r.exit_code == 1, r.output
    assert r.output.startswith(expected), r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


def test_against_a_peer_or_a_head_certificate_catches_deleted_last_blocks(store, tmp_path):
    path, peer, net = store
    top = net.chain.height
    copy = tmp_path / "short.db"
    shutil.copy(path, copy)
    _damage(copy, "DELETE FROM txs WHERE height >= ?", top - 1)
    _damage(copy, "DELETE FROM blocks WHERE height >= ?", top - 1)
    # Alone, a truncated store is a valid shorter chain ...
    assert verify_store(copy).ok
    # ... but a peer's store, or a head certificate saved earlier, proves the rest exists.
    r = cli_verify(str(copy), "--against", str(peer))
    assert r.exit_code == 1 and r.output.startswith(f"FAILED at height {top - 1}"), r.output
    assert "truncated" in r.output
    head = tmp_path / "head.json"
    assert runner.invoke(app, ["ledger", "head", str(path), "-o", str(head)]).exit_code == 0
    r = cli_verify(str(copy), "--against", str(head))
    assert r.exit_code == 1 and r.output.startswith(f"FAILED at height {top - 1}"), r.output
    # The intact store agrees with both.
    assert cli_verify(str(path), "--against", str(peer)).exit_code == 0
    assert cli_verify(str(path), "--against", str(head)).exit_code == 0
    # A forged head (votes not from the validators) proves nothing: a clear error, exit 2.
    cert = head_certificate(path)
    forged = tmp_path / "forged.json"
    fake_net = make_net(4)
    from testbed.ledger.blocks import Vote, encode_certificate
    from testbed.ledger.chain import HeadCertificate
    votes = [Vote.cast(k, net.chain.id, cert.block.height, cert.block.hash)
             for k in fake_net.validators[:0]] + [
        Vote.cast(net.outsider, net.chain.id, cert.block.height, cert.block.hash)]
    forged.write_bytes(HeadCertificate(cert.block, encode_certificate(votes)).encode())
    r = cli_verify(str(copy), "--against", str(forged))
    assert r.exit_code == 2 and "no valid commit certificate" in r.output, r.output
    # Nonsense as OTHER is refused plainly.
    junk = tmp_path / "junk.json"
    junk.write_text("{}")
    r = cli_verify(str(copy), "--against", str(junk))
    assert r.exit_code == 2 and "not a head certificate" in r.output
    assert load_against(peer).hashes[top] == cert.block.hash


def test_a_rewritten_block_differs_from_the_peer(store, tmp_path):
    """Both stores verify alone; against each other a different block at one height shows."""
    path, _, net = store
    other = make_net(4, stores=[str(tmp_path / "o.db")])
    other.commit([other.reading(other.validators[0], 0.1, 0.2)])
    other.chains[0].store.close()
    r = cli_verify(str(path), "--against", str(tmp_path / "o.db"))
    assert r.exit_code == 1 and r.output.startswith("FAILED at height 1"), r.output
    assert "two blocks certified at one height" in r.output
    # a peer of another chain proves nothing about this one
    foreign = make_net(4, stores=[str(tmp_path / "f.db")], params=Params(max_skew_s=301))
    foreign.commit([foreign.reading(foreign.validators[0], 0.1, 0.2)])
    foreign.chains[0].store.close()
    r = cli_verify(str(path), "--against", str(tmp_path / "f.db"))
    assert r.exit_code == 2 and "OTHER holds chain" in r.output, r.output


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_show_and_wallets_never_modify_the_file(store, tmp_path):
    path, _, net = store
    copy = tmp_path / "ro.db"
    shutil.copy(path, copy)
    before = digest(copy)
    for cmd in (["show", str(copy)], ["wallets", str(copy)],
                ["show", str(copy), "--height", "2"]):
        r = runner.invoke(app, ["ledger", *cmd])
        assert r.exit_code == 0, r.output
    assert digest(copy) == before
    # A WAL-mode store's readers share its -shm index (SQLite's rule); nothing is logged.
    wal = tmp_path / "ro.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    # An unrelated SQLite file: a clear error, and not one byte of it changes.
    foreign = tmp_path / "foreign.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    con.execute("INSERT INTO notes (body) VALUES ('keep me')")
    con.commit()
    con.close()
    before = digest(foreign)
    for cmd in ("show", "wallets"):
        r = runner.invoke(app, ["ledger", cmd, str(foreign)])
        assert r.exit_code == 1, r.output
        assert "not a ledger database" in r.output and "Traceback" not in r.output
    assert digest(foreign) == before
    assert not (tmp_path / "foreign.sqlite-wal").exists()
    con = sqlite3.connect(foreign)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert [r[0] for r in con.execute("SELECT name FROM sqlite_master")] == ["notes"]
    con.close()


@pytest.mark.parametrize("kind", ["invalid UTF-8 in blocks.hash", "block bytes stored as TEXT",
                                  "dropped txs table", "empty file", "truncated mid-page"])
def test_show_and_wallets_on_a_damaged_store_say_so_in_one_line(store, tmp_path, kind):
    path, _, _ = store
    copy = tmp_path / "typed.db"
    shutil.copy(path, copy)
    TYPED[kind][0](copy)
    for cmd in ("show", "wallets"):
        r = runner.invoke(app, ["ledger", cmd, str(copy)])
        assert r.exit_code == 1, r.output
        assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
        assert r.output.startswith("error:") and "Traceback" not in r.output
