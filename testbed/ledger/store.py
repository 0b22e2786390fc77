"""One node's chain on disk: SQLite in WAL mode, raw canonical bytes only.

Blocks, certificates and transactions are stored exactly as they were hashed and
signed, so `verify` can recompute everything from the file and a change of any byte is
detected. A block and its transactions are written in one SQLite transaction: a node
killed mid-write keeps the previous height.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

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
CREATE INDEX IF NOT EXISTS txs_id ON txs (id);
"""


@dataclass(frozen=True)
class StoredBlock:
    height: int
    hash: str
    raw: bytes
    cert: bytes
    txs: list[tuple[str, bytes]]


class Store:
    def __init__(self, path: Path | str, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"{self.path}: no ledger database")
            uri = f"file:{self.path}?mode=ro"
            self.db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        try:
            self.db.execute("SELECT 1 FROM blocks LIMIT 1").fetchall()
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{self.path}: not a ledger database ({exc})") from None

    def height(self) -> int:
        row = self.db.execute("SELECT MAX(height) FROM blocks").fetchone()
        return -1 if row[0] is None else row[0]

    def append(self, height: int, block_hash: str, raw: bytes, cert: bytes,
               txs: Sequence[tuple[str, bytes]]) -> None:
        with self.db:
            self.db.execute("INSERT INTO blocks VALUES (?, ?, ?, ?)",
                            (height, block_hash, raw, cert))
            self.db.executemany("INSERT INTO txs VALUES (?, ?, ?, ?)",
                                [(height, i, tid, traw) for i, (tid, traw) in enumerate(txs)])

    def block(self, height: int) -> StoredBlock | None:
        row = self.db.execute("SELECT height, hash, raw, cert FROM blocks WHERE height = ?",
                              (height,)).fetchone()
        if row is None:
            return None
        txs = self.db.execute("SELECT id, raw FROM txs WHERE height = ? ORDER BY idx",
                              (height,)).fetchall()
        return StoredBlock(row[0], row[1], bytes(row[2]), bytes(row[3]),
                           [(t[0], bytes(t[1])) for t in txs])

    def blocks(self, start: int = 0, stop: int | None = None) -> Iterator[StoredBlock]:
        top = self.height() if stop is None else stop
        for h in range(start, top + 1):
            b = self.block(h)
            if b is None:
                return
            yield b

    def heights(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT height FROM blocks ORDER BY height")]

    def tx_location(self, tx_id: str) -> tuple[int, int] | None:
        row = self.db.execute("SELECT height, idx FROM txs WHERE id = ?", (tx_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def close(self) -> None:
        self.db.close()
