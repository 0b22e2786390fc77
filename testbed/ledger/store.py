"""One node's chain on disk: SQLite in WAL mode, raw canonical bytes only.

Blocks, certificates and transactions are stored exactly as they were hashed and
signed, so `verify` can recompute everything from the file and a change of any byte is
detected. A block and its transactions are written in one SQLite transaction: a node
killed mid-write keeps the previous height.

Reading never trusts the file: every column's storage class is checked (a TEXT column
holding bytes, invalid UTF-8, a BLOB stored as TEXT) and any SQLite error (a damaged
page, a dropped table) becomes a `StoreDamaged` naming the height, so `verify` reports
`FAILED at height N` instead of crashing. A read-only store is opened through SQLite's
`mode=ro` URI: no WAL switch, no tables created, the file is left byte-identical.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (
    height INTEGER PRIMARY KEY,
    hash   TEXT NOT NULL,
    raw    BLOB NOT NULL,
    cert   BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS txs (
    height INTEGER NOT NULL,
    idx    INTEGER NOT NULL,
    id     TEXT NOT NULL,
    raw    BLOB NOT NULL,
    PRIMARY KEY (height, idx)
);
"""
"""No index on `txs.id`: keeping one (random 64-character keys) was ~75 % of a block's
write (1.27 -> 0.33 ms CPU per 96-transaction block, 4 stores per run process); nodes know
the transactions they committed (`LedgerNode.committed_txs`). Stores made with it keep it."""
COLUMNS = {"blocks": ["height", "hash", "raw", "cert"], "txs": ["height", "idx", "id", "raw"]}


class NotALedgerStore(ValueError):
    """The file is not a SQLite database, or lacks the ledger's tables."""


class StoreDamaged(ValueError):
    """A row could not be read as written: wrong storage class, bad text, SQLite error."""

    def __init__(self, height: int, detail: str) -> None:
        self.height = height
        self.detail = detail
        super().__init__(f"height {height}: {detail}")


@dataclass(frozen=True)
class StoredBlock:
    height: int
    hash: str
    raw: bytes
    cert: bytes
    txs: list[tuple[str, bytes]]


def _text(value: bytes, height: int, what: str) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError as exc:
        raise StoreDamaged(height, f"{what} is not valid UTF-8 ({exc.reason} at byte "
                           f"{exc.start})") from None


def _typed(row: Sequence, kinds: Sequence[str], names: Sequence[str], height: int) -> None:
    """Columns come as (typeof, value) pairs; each must have its schema's storage class."""
    for i, (kind, name) in enumerate(zip(kinds, names, strict=True)):
        if row[2 * i] != kind.encode():
            got = row[2 * i].decode(errors="replace")
            raise StoreDamaged(height, f"{name} is stored as {got}, expected {kind}")


class Store:
    def __init__(self, path: Path | str, *, readonly: bool = False,
                 closed: bool = False) -> None:
        """`closed` (read-only): the caller knows no connection has the file open for
        writing (its nodes stopped). Without a WAL file left, it is then read as immutable:
        SQLite creates no -shm/-wal file beside it (a plain read-only connection to a WAL
        store leaves both behind)."""
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"{self.path}: no ledger database")
            uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
            if closed and not Path(f"{self.path}-wal").exists():
                uri += "&immutable=1"
            try:
                self.db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            except sqlite3.Error as exc:
                raise NotALedgerStore(f"{self.path}: cannot open ({exc})") from None
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, check_same_thread=False)
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.executescript(SCHEMA)
            except sqlite3.DatabaseError as exc:
                self.db.close()
                raise NotALedgerStore(f"{self.path}: not a ledger database ({exc})") from None
        # Text comes back as bytes: invalid UTF-8 in a damaged TEXT column is then ours to
        # report, not a crash inside the sqlite3 module.
        self.db.text_factory = bytes
        try:
            for table, cols in COLUMNS.items():
                have = [r[1].decode(errors="replace") for r in self.db.execute(f"PRAGMA table_info({table})")]
                if have != cols:
                    raise NotALedgerStore(f"{self.path}: not a ledger database (table "
                                          f"{table} has columns {have}, expected {cols})")
        except sqlite3.Error as exc:
            self.db.close()
            raise NotALedgerStore(f"{self.path}: not a ledger database ({exc})") from None
        except NotALedgerStore:
            self.db.close()
            raise

    def _query(self, height: int, sql: str, args: Sequence = ()) -> list:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreDamaged(height, f"unreadable ({exc})") from None

    def height(self) -> int:
        row = self._query(0, "SELECT MAX(height) FROM blocks")[0]
        return -1 if row[0] is None else row[0]

    def append(self, height: int, block_hash: str, raw: bytes, cert: bytes,
               txs: Sequence[tuple[str, bytes]]) -> None:
        for _ in self.append_steps(height, block_hash, raw, cert, txs):
            pass

    def append_steps(self, height: int, block_hash: str, raw: bytes, cert: bytes,
                     txs: Sequence[tuple[str, bytes]], chunk: int = 100) -> Iterator[None]:
        """`append` in steps of `chunk` transactions (a node yields to its event loop in
        between), all in one SQLite transaction: the block row goes in last, so a reader
        of this connection never sees a block without all its transactions; stopped
        midway, nothing is written."""
        rows = [(height, i, tid, traw) for i, (tid, traw) in enumerate(txs)]
        try:
            for i in range(0, len(rows), chunk):
                self.db.executemany("INSERT INTO txs VALUES (?, ?, ?, ?)", rows[i:i + chunk])
                yield
            self.db.execute("INSERT INTO blocks VALUES (?, ?, ?, ?)",
                            (height, block_hash, raw, cert))
            self.db.commit()
        except BaseException:
            self.db.rollback()
            raise

    def block(self, height: int) -> StoredBlock | None:
        rows = self._query(height, "SELECT typeof(hash), hash, typeof(raw), raw, typeof(cert), "
                           "cert FROM blocks WHERE height = ?", (height,))
        if not rows:
            return None
        row = rows[0]
        _typed(row, ("text", "blob", "blob"), ("blocks.hash", "blocks.raw", "blocks.cert"),
               height)
        txs = self._query(height, "SELECT typeof(idx), idx, typeof(id), id, typeof(raw), raw "
                          "FROM txs WHERE height = ? ORDER BY idx", (height,))
        out = []
        for i, t in enumerate(txs):
            _typed(t, ("integer", "text", "blob"), ("txs.idx", "txs.id", "txs.raw"), height)
            if t[1] != i:
                raise StoreDamaged(height, f"transaction index {t[1]} where {i} was expected")
            out.append((_text(t[3], height, f"txs.id of transaction {i}"), bytes(t[5])))
        return StoredBlock(height, _text(row[1], height, "blocks.hash"), bytes(row[3]),
                           bytes(row[5]), out)

    def blocks(self, start: int = 0, stop: int | None = None) -> Iterator[StoredBlock]:
        top = self.height() if stop is None else stop
        for h in range(start, top + 1):
            b = self.block(h)
            if b is None:
                return
            yield b

    def read_all(self) -> Iterator[StoredBlock]:
        """Every block with its transactions, in height order, as `block` reads and checks
        them but in a few queries (a read-back of the whole store; SQLite checks the
        storage classes: StoreDamaged at the first height with a bad one). Transactions
        of a height without a block are not returned (`tx_count` counts them)."""
        bad = self._query(0, "SELECT MIN(height) FROM (SELECT height FROM blocks WHERE "
                          "typeof(hash) <> 'text' OR typeof(raw) <> 'blob' OR typeof(cert) "
                          "<> 'blob' UNION ALL SELECT height FROM txs WHERE typeof(height) <> "
                          "'integer' OR typeof(idx) <> 'integer' OR typeof(id) <> 'text' OR "
                          "typeof(raw) <> 'blob')")[0][0]
        if bad is not None:
            if type(bad) is not int:
                raise StoreDamaged(0, "a transaction's height is not an integer")
            self.block(bad)  # raises StoreDamaged naming the column, if the block has it
            raise StoreDamaged(bad, "a transaction row has the wrong storage class")
        txs: dict[int, list[tuple[str, bytes]]] = {}
        for height, idx, tid, raw in self._query(
                0, "SELECT height, idx, id, raw FROM txs ORDER BY height, idx"):
            got = txs.setdefault(height, [])
            if idx != len(got):
                raise StoreDamaged(height, f"transaction index {idx} where {len(got)} was "
                                   "expected")
            got.append((_text(tid, height, f"txs.id of transaction {idx}"), raw))
        for height, block_hash, raw, cert in self._query(
                0, "SELECT height, hash, raw, cert FROM blocks ORDER BY height"):
            yield StoredBlock(height, _text(block_hash, height, "blocks.hash"), raw, cert,
                              txs.get(height, []))

    def heights(self) -> list[int]:
        return [r[0] for r in self._query(0, "SELECT height FROM blocks ORDER BY height")]

    def hashes(self) -> dict[int, str]:
        """Every stored block hash by height (comparing two stores for a fork)."""
        out = {}
        for kind, h, value in self._query(0, "SELECT typeof(hash), height, hash FROM blocks"):
            if kind != b"text":
                raise StoreDamaged(h, f"blocks.hash is stored as {kind.decode()}, expected text")
            out[h] = _text(value, h, "blocks.hash")
        return out

    def snapshot(self) -> None:
        """Read everything that follows from one consistent snapshot (a live node may be
        appending: WAL readers see the database as of their transaction's start)."""
        if not self.db.in_transaction:
            self._query(0, "BEGIN")

    def tx_count(self) -> int:
        return self._query(0, "SELECT COUNT(*) FROM txs")[0][0]

    def tx_location(self, tx_id: str) -> tuple[int, int] | None:
        """(height, index) of a stored transaction (a table scan: no index on ids)."""
        rows = self._query(0, "SELECT height, idx FROM txs WHERE id = ?", (tx_id,))
        return None if not rows else (rows[0][0], rows[0][1])

    def close(self) -> None:
        self.db.close()
