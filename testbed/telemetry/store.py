"""The run store: one SQLite file per run (`runs/<run-id>/run.db`), the source of truth.

Written in WAL mode and committed after every step, so a run killed mid-way leaves
everything recorded up to its last step readable. Simulated time (`t`, seconds since
day-0 midnight) keys every row; wall-clock values live only in the columns listed in
`WALL_CLOCK_COLUMNS`, so two runs of a scenario with the same seed in fast mode have
identical stores apart from those.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS steps (step INTEGER PRIMARY KEY, t REAL NOT NULL,
    late_ms REAL, wall REAL);
CREATE TABLE IF NOT EXISTS measurements (t REAL NOT NULL, device TEXT NOT NULL,
    prosumer TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, value REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (t REAL NOT NULL, kind TEXT NOT NULL, subject TEXT,
    detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS intervals (interval INTEGER PRIMARY KEY, start REAL NOT NULL,
    schedule_kwh REAL NOT NULL, metered_kwh REAL NOT NULL, market_kwh REAL NOT NULL,
    raw_deviation_kwh REAL NOT NULL, requested_kwh REAL NOT NULL, covered_kwh REAL NOT NULL,
    residual_kwh REAL NOT NULL);
CREATE TABLE IF NOT EXISTS auctions (t REAL NOT NULL, interval INTEGER NOT NULL, delivery INTEGER NOT NULL,
    request_id TEXT PRIMARY KEY, side TEXT NOT NULL, requested_kwh REAL NOT NULL,
    price REAL NOT NULL, orders INTEGER NOT NULL, outcome TEXT NOT NULL,
    market_kwh REAL NOT NULL, cleared_kwh REAL NOT NULL, clearing_price REAL,
    grid_rounds INTEGER NOT NULL, grid_passed INTEGER NOT NULL, award_id TEXT NOT NULL,
    reclear TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS awards (t REAL NOT NULL, request_id TEXT NOT NULL, order_id TEXT NOT NULL,
    prosumer TEXT NOT NULL, side TEXT NOT NULL, energy_kwh REAL NOT NULL, price REAL NOT NULL,
    amount_eur REAL NOT NULL, delivery INTEGER NOT NULL, delivered_kwh REAL,
    PRIMARY KEY (request_id, order_id));
CREATE TABLE IF NOT EXISTS orders (t REAL NOT NULL, request_id TEXT NOT NULL, prosumer TEXT NOT NULL,
    order_id TEXT NOT NULL, side TEXT NOT NULL, energy_kwh REAL NOT NULL,
    price REAL NOT NULL, lost INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS grid_checks (t REAL NOT NULL, request_id TEXT NOT NULL,
    round INTEGER NOT NULL, light TEXT NOT NULL, acceptable INTEGER NOT NULL,
    vm_min_pu REAL, vm_max_pu REAL, max_line_pct REAL, max_trafo_pct REAL, losses_w REAL,
    violations INTEGER NOT NULL, report TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS feeder (t REAL PRIMARY KEY, light TEXT NOT NULL,
    vm_min_pu REAL, vm_max_pu REAL, max_line_pct REAL, max_trafo_pct REAL, losses_w REAL,
    import_w REAL);
CREATE TABLE IF NOT EXISTS settlements (t REAL NOT NULL, request_id TEXT NOT NULL, order_id TEXT NOT NULL,
    prosumer TEXT NOT NULL, awarded_kwh REAL NOT NULL, delivered_kwh REAL NOT NULL,
    paid_kwh REAL NOT NULL, shortfall_kwh REAL NOT NULL, transfers TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (t REAL NOT NULL, msg_id TEXT NOT NULL,
    operation TEXT NOT NULL, sender TEXT NOT NULL, status TEXT NOT NULL, detail TEXT);
CREATE TABLE IF NOT EXISTS blocks (height INTEGER PRIMARY KEY, t REAL NOT NULL,
    hash TEXT NOT NULL, proposer TEXT NOT NULL, proposer_name TEXT NOT NULL,
    round INTEGER NOT NULL, txs INTEGER NOT NULL, cpf TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cpf (t REAL NOT NULL, prosumer TEXT NOT NULL,
    production_kwh REAL NOT NULL, consumption_kwh REAL NOT NULL, cpf REAL NOT NULL);
"""

INDEXES = """
CREATE INDEX IF NOT EXISTS measurements_by_device ON measurements (device, name, t);
"""
"""Built by the first reader that asks by device (`ensure_indexes`: the HTML report), not
while the run records: keeping a (device, name, t) index up to date cost ~10 ms of inserts
and ~10 ms of commit a step at 50 prosumers (1,500 rows), 20x the rows themselves, and
building it at the end of the run held the run's last writes ~1.3 s (24 h, 50 prosumers)
for an index that a run without a report (CI, sweeps, benches) never reads. Nothing reads
by device while a run is recorded (the InfluxDB sink follows rowids)."""

_MAX_ROWS = 1024
"""Rows per INSERT at most (x 6 columns: well inside SQLite's 32,766 variables)."""

WALL_CLOCK_COLUMNS = {("steps", "late_ms"), ("steps", "wall"), ("meta", "started_at"),
                      ("meta", "finished_at"), ("meta", "wall_s"), ("meta", "run_id"),
                      ("meta", "out"), ("meta", "broker"),
                      ("meta", "time_origin_ms")}
"""(table, column) pairs - or (meta, key) - that depend on the wall clock or the machine."""


class RunStore:
    """The run's SQLite file. With `writer=True` the writes go to a thread of their own,
    in order (a real-time run: a step's thousands of measurement rows and its commit cost
    tens of ms, more when the disk is busy, on the loop that must keep the next tick);
    `flush` waits for them, and reading `db` flushes first."""

    def __init__(self, path: Path, *, writer: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # 8 kB pages (a new file's; SQLite's default is 4 kB): a step's rows and commit
        # touch half the pages, 0.81 -> 0.70 ms a step at 50 prosumers (same rows)
        self._db.execute("PRAGMA page_size=8192")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Checkpoint the WAL every ~40 MB instead of SQLite's 4 MB: each checkpoint syncs
        # the files, which at ~150 kB of rows a step (50 prosumers) cost a fast run ~10 ms
        # a step; commits stay per step, so a killed run keeps everything to its last step.
        self._db.execute("PRAGMA wal_autocheckpoint=5000")  # pages of 8 kB
        self._db.executescript(SCHEMA)
        self._db.execute("BEGIN")
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] \
            | None = None
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._idle = threading.Condition()
        self._error: BaseException | None = None
        self._sql: dict[tuple[str, tuple[str, ...], int], str] = {}
        if writer:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._write, name=f"run-store-{self.path}",
                                            daemon=True)
            self._thread.start()

    @property
    def db(self) -> sqlite3.Connection:
        """The connection, once every write so far is done."""
        self.flush()
        return self._db

    def _write(self) -> None:
        assert self._queue is not None
        while (item := self._queue.get()) is not None:
            fn, args = item
            try:
                if self._error is None:
                    fn(*args)
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
                self._error = exc
            finally:
                with self._idle:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.notify_all()

    def _do(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._queue is None:
            fn(*args)
            return
        with self._idle:
            self._pending += 1
        self._queue.put((fn, args))

    def flush(self) -> None:
        """Wait until the writer thread has done every write handed to it; raise what
        one of them raised."""
        if self._queue is not None:
            with self._idle:
                self._idle.wait_for(lambda: self._pending == 0)
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    @classmethod
    def open_readonly(cls, path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        return db

    def put_meta(self, key: str, value: Any) -> None:
        self._do(self._db.execute, "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                 (key, value if isinstance(value, str) else json.dumps(value)))

    def insert(self, table: str, row: dict[str, Any]) -> None:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self._do(self._db.execute, f"INSERT OR REPLACE INTO {table} ({cols}) VALUES ({marks})",
                 [json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v
                  for v in row.values()])

    def insert_many(self, table: str, cols: Iterable[str], rows: Iterable[tuple[Any, ...]]
                    ) -> None:
        """The rows in order, as multi-row INSERTs of power-of-two sizes (a step's ~1,300
        measurement rows: 4 statements instead of `executemany`'s 1,300 executions of one,
        1.4 -> 0.8 ms a step with the commit; the same rows, rowids and order)."""
        cols = tuple(cols)
        rows = rows if isinstance(rows, list) else list(rows)
        k = len(cols)
        if rows and set(map(len, rows)) != {k}:  # flattened, a short row would shift the rest
            bad = next(row for row in rows if len(row) != k)
            raise ValueError(f"{table}: a row of {len(bad)} values for {k} columns: {bad!r}")
        at, left = 0, len(rows)
        while left:
            n = min(_MAX_ROWS, 1 << (left.bit_length() - 1))
            self._do(self._db.execute, self._insert_sql(table, cols, n),
                     list(chain.from_iterable(rows[at:at + n])))
            at, left = at + n, left - n

    def _insert_sql(self, table: str, cols: tuple[str, ...], n: int) -> str:
        key = (table, cols, n)
        sql = self._sql.get(key)
        if sql is None:
            one = f"({', '.join('?' for _ in cols)})"
            sql = self._sql[key] = (f"INSERT INTO {table} ({', '.join(cols)}) VALUES "
                                    + ", ".join([one] * n))
        return sql

    def execute(self, sql: str, params: Iterable[Any] = ()) -> None:
        """Any other write (in order with the inserts)."""
        self._do(self._db.execute, sql, tuple(params))

    def event(self, t: float, kind: str, subject: str | None, detail: str) -> None:
        self._do(self._db.execute, "INSERT INTO events VALUES (?, ?, ?, ?)",
                 (t, kind, subject, detail))

    def commit(self) -> None:
        """Make everything so far durable (called once per step)."""
        self._do(self._commit)

    def _commit(self) -> None:
        self._db.execute("COMMIT")
        self._db.execute("BEGIN")

    def close(self) -> None:
        self.flush()
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._queue = None
        self._db.execute("COMMIT")
        self._db.close()

    @staticmethod
    def ensure_indexes(path: Path) -> bool:
        """Build `INDEXES` in the store at `path` if they are missing (once, by the first
        reader that queries by device). False when the store cannot be written (a
        read-only copy): its queries then scan, slower but with the same answers."""
        try:
            db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None)
        except sqlite3.OperationalError:
            return False
        try:
            db.executescript(INDEXES)
            return True
        except sqlite3.DatabaseError:  # read-only file or folder, locked, not a database
            return False
        finally:
            db.close()


def dump(path: Path, *, skip_wall_clock: bool = True) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """Every row of a store, table by table in a fixed order (for comparing runs)."""
    db = RunStore.open_readonly(path)
    try:
        tables = [r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        for table in tables:
            cols = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
            keep = [c for c in cols if not (skip_wall_clock and (table, c) in WALL_CLOCK_COLUMNS)]
            for row in db.execute(f"SELECT {', '.join(keep)} FROM {table} ORDER BY "
                                  f"{', '.join(keep)}"):
                if table == "meta" and skip_wall_clock and ("meta", row[0]) in WALL_CLOCK_COLUMNS:
                    continue
                yield table, tuple(row)
    finally:
        db.close()


# ---------------------------------------------------------------------- queries
# What a run's summary reads back from its store (the store is the source of truth).


def market_totals(db: sqlite3.Connection) -> dict[str, Any]:
    """Auctions, what they cleared and what the awards traded (EUR, kWh)."""
    n, requested, market, cleared = db.execute(
        "SELECT COUNT(*), SUM(requested_kwh), SUM(market_kwh), SUM(cleared_kwh) "
        "FROM auctions").fetchone()
    prices = [r[0] for r in db.execute("SELECT price FROM awards")]
    traded, value, delivered = db.execute(
        "SELECT COALESCE(SUM(energy_kwh), 0), COALESCE(SUM(amount_eur), 0), "
        "COALESCE(SUM(delivered_kwh), 0) FROM awards").fetchone()
    return {"auctions": n, "requested_kwh": requested or 0.0, "market_kwh": market or 0.0,
            "cleared_kwh": cleared or 0.0, "energy_traded_kwh": traded, "value_eur": value,
            "delivered_kwh": delivered, "prices": prices}


def traded_by_prosumer(db: sqlite3.Connection) -> dict[str, tuple[float, float]]:
    """prosumer -> (awarded kWh, amount EUR)."""
    return {r[0]: (r[1], r[2]) for r in db.execute(
        "SELECT prosumer, SUM(energy_kwh), SUM(amount_eur) FROM awards GROUP BY prosumer")}


def last_cpf(db: sqlite3.Connection) -> dict[str, float]:
    """prosumer -> CPF of its last certified interval."""
    return {r[0]: r[1] for r in db.execute("SELECT prosumer, cpf FROM cpf ORDER BY t")}


def blocks_by_proposer(db: sqlite3.Connection) -> dict[str, int]:
    return dict(db.execute("SELECT proposer_name, COUNT(*) FROM blocks GROUP BY "
                           "proposer_name").fetchall())


def feeder_lights(db: sqlite3.Connection) -> dict[str, int]:
    return dict(db.execute("SELECT light, COUNT(*) FROM feeder GROUP BY light").fetchall())


def set_delivered(db: sqlite3.Connection | RunStore, request_id: str, order_id: str,
                  kwh: float) -> None:
    """An award's delivered energy, once its delivery interval is metered."""
    db.execute("UPDATE awards SET delivered_kwh = ? WHERE request_id = ? AND order_id = ?",
               (kwh, request_id, order_id))
