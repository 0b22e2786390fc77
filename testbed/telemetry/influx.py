"""The InfluxDB sink: mirrors a run store into any server with `/api/v2/write`.

The run store stays the source of truth. An acknowledgement log beside it
(`telemetry.db`) records, per target (url, org, bucket) and table, the row ranges the
server has acknowledged; "send what is not acknowledged yet" (`sync`) is the one code
path of both the live sink and `testbed telemetry backfill`. So:

- a server that is down never stops or slows a run: the sink writes from its own
  thread, and after a batch has failed all its retries it leaves the server alone for
  `probe_s`, then resumes from the first unacknowledged row (catching up by itself if the
  server comes back during the run);
- nothing is lost: whatever is still unacknowledged when the run ends is written by
  `backfill` later, and a second backfill finds nothing to write;
- a point written twice (a batch whose acknowledgement was lost) is the same point with
  the same timestamp, which InfluxDB overwrites (VictoriaMetrics: with deduplication on).

Retries use influxdb-client's `WritesRetry` (exponential backoff with jitter). Its
`max_retry_time` is measured from when the retry object was created, not per request,
so a long-lived client would stop retrying after it; the sink bounds retries by count.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from testbed.config import InfluxConfig

from .schema import TABLES, Context, last_rowid, points

log = logging.getLogger(__name__)
logging.getLogger("influxdb_client.client.write.retry").setLevel(logging.ERROR)
"""Each retry is counted in the sink's report; a warning per retry would flood a run's log."""

ACKS = """
CREATE TABLE IF NOT EXISTS acks (target TEXT NOT NULL, tbl TEXT NOT NULL, lo INTEGER NOT NULL,
    hi INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS acks_by_target ON acks (target, tbl);
"""


class TelemetryError(Exception):
    """A write the server did not take (after retries); says which server and why."""


def target_key(cfg: InfluxConfig) -> str:
    return f"{cfg.url.rstrip('/')}|{cfg.org}|{cfg.bucket}"


# ---------------------------------------------------------------- acknowledgements

class AckLog:
    """Which row ranges `(lo, hi]` of each run-store table a target has acknowledged."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(ACKS)

    def add(self, target: str, table: str, lo: int, hi: int) -> None:
        if hi > lo:
            self.db.execute("INSERT INTO acks VALUES (?, ?, ?, ?)", (target, table, lo, hi))

    def ranges(self, target: str, table: str) -> list[tuple[int, int]]:
        """Acknowledged ranges, merged."""
        out: list[tuple[int, int]] = []
        for lo, hi in self.db.execute("SELECT lo, hi FROM acks WHERE target = ? AND tbl = ? "
                                      "ORDER BY lo, hi", (target, table)):
            if out and lo <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], hi))
            else:
                out.append((lo, hi))
        return out

    def forget(self, target: str) -> None:
        self.db.execute("DELETE FROM acks WHERE target = ?", (target,))

    def close(self) -> None:
        self.db.close()


def gaps(acked: list[tuple[int, int]], last: int) -> list[tuple[int, int]]:
    """The parts of `(0, last]` not covered by the merged ranges `acked`."""
    out: list[tuple[int, int]] = []
    pos = 0
    for lo, hi in acked:
        if lo > pos:
            out.append((pos, min(lo, last)))
        pos = max(pos, hi)
        if pos >= last:
            break
    if pos < last:
        out.append((pos, last))
    return [(a, b) for a, b in out if b > a]


def missing(store: sqlite3.Connection, acks: AckLog, target: str
            ) -> dict[str, list[tuple[int, int]]]:
    """Per table, the row ranges the target has not acknowledged."""
    return {t: g for t in TABLES if (g := gaps(acks.ranges(target, t), last_rowid(store, t)))}


def count_points(store: sqlite3.Connection, table: str, ranges: list[tuple[int, int]]) -> int:
    """Points the rows in `ranges` make (a device's readings of a step are one point)."""
    inner = "SELECT 1 FROM measurements WHERE rowid > ? AND rowid <= ? GROUP BY t, device" \
        if table == "measurements" else f"SELECT 1 FROM {table} WHERE rowid > ? AND rowid <= ?"
    return sum(store.execute(f"SELECT count(*) FROM ({inner})", r).fetchone()[0] for r in ranges)


def pending(store: sqlite3.Connection, acks: AckLog, target: str) -> dict[str, int]:
    """Per table, the points the target has not acknowledged."""
    return {t: count_points(store, t, rs) for t, rs in missing(store, acks, target).items()}


# ---------------------------------------------------------------- writing

class Writer:
    """Line-protocol batches through influxdb-client's synchronous write API."""

    def __init__(self, cfg: InfluxConfig, token: str | None) -> None:
        from influxdb_client import InfluxDBClient
        from influxdb_client.client.write.retry import WritesRetry
        from influxdb_client.client.write_api import SYNCHRONOUS

        self.cfg = cfg
        self.retries = 0

        def retried(exc: Exception) -> None:
            self.retries += 1

        retry = WritesRetry(total=cfg.retries, retry_interval=cfg.retry_interval_s,
                            max_retry_delay=cfg.max_retry_delay_s, exponential_base=2,
                            jitter_interval=0.1, max_retry_time=10 ** 9,
                            retry_callback=retried) if cfg.retries else False
        self.client = InfluxDBClient(url=cfg.url, token=token or "", org=cfg.org,
                                     timeout=int(cfg.timeout_s * 1000), retries=retry)
        self.api = self.client.write_api(write_options=SYNCHRONOUS)

    def write(self, lines: list[str]) -> None:
        from influxdb_client import WritePrecision
        from influxdb_client.rest import ApiException

        try:
            self.api.write(bucket=self.cfg.bucket, org=self.cfg.org, record=lines,
                           write_precision=WritePrecision.MS)
        except ApiException as exc:
            body = (exc.body or "")[:300] if isinstance(exc.body, str) else ""
            hint = {401: " (check the token)", 403: " (the token may not write this bucket)",
                    404: f" (does bucket {self.cfg.bucket!r} exist in org {self.cfg.org!r}?)"}
            raise TelemetryError(f"{self.cfg.url}: HTTP {exc.status} {exc.reason}"
                                 f"{hint.get(exc.status or 0, '')} {body}".rstrip()) from None
        except Exception as exc:  # connection refused, timeouts, retries exhausted
            reason = getattr(exc, "reason", None) or exc
            text = re.sub(r"<[^>]*>: ", "", str(reason))  # urllib3 puts the object's repr first
            raise TelemetryError(f"{self.cfg.url}: {type(reason).__name__}: {text} "
                                 f"(after {self.cfg.retries} retries)") from None

    def close(self) -> None:
        self.api.close()
        self.client.close()


@dataclass
class SyncStats:
    points: int = 0
    batches: int = 0
    tables: dict[str, int] = field(default_factory=dict)
    """Points written per run-store table."""


def sync(store: sqlite3.Connection, ctx: Context, acks: AckLog, target: str,
         write: Callable[[list[str]], None], *, batch_size: int,
         progress: Callable[[int, int], None] | None = None) -> SyncStats:
    """Write every unacknowledged row of the store; acknowledge each batch once written.

    One batch is written (in a worker thread: the HTTP wait releases the GIL) while the
    next is mapped. Acknowledgements are made in order, each reported to
    `progress(points, rows)`. Raises TelemetryError at the first batch the server does
    not take; what was acknowledged before stays so."""
    stats = SyncStats()
    pool = ThreadPoolExecutor(1, thread_name_prefix="influx-write")
    inflight: list[tuple[Future[None], str, int, int, int]] = []

    def settle() -> None:
        fut, table, a, b, n = inflight.pop()
        fut.result()
        acks.add(target, table, a, b)
        if n:
            stats.points += n
            stats.batches += 1
            stats.tables[table] = stats.tables.get(table, 0) + n
        if progress and (n or b > a):
            progress(n, b - a)

    def submit(table: str, a: int, b: int, batch: list[str]) -> None:
        fut: Future[None] = pool.submit(write, batch) if batch else _done()
        if inflight:
            settle()
        inflight.append((fut, table, a, b, len(batch)))

    try:
        for table, ranges in missing(store, acks, target).items():
            for lo, hi in ranges:
                first, batch = lo, []
                for last, line in points(store, table, lo, hi, ctx):
                    batch.append(line)
                    if len(batch) >= batch_size:
                        submit(table, first, last, batch)
                        first, batch = last, []
                submit(table, first, hi, batch)
        while inflight:
            settle()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return stats


def _done() -> Future[None]:
    f: Future[None] = Future()
    f.set_result(None)
    return f


def open_run(run_dir: Path) -> tuple[sqlite3.Connection, Context]:
    """The run store (read-only) and the mapping context of a run directory."""
    import json

    from .store import RunStore

    path = Path(run_dir) / "run.db"
    if not path.is_file():
        raise TelemetryError(f"{run_dir}: no run store (run.db) here; pass a run directory "
                             "written by `testbed run`")
    db = RunStore.open_readonly(path)
    site_path = Path(run_dir) / "site.json"
    site = json.loads(site_path.read_text()) if site_path.is_file() else None
    return db, Context.of(db, site)


def token_for(cfg: InfluxConfig, token: str | None = None) -> str | None:
    return token if token is not None else os.environ.get(cfg.token_env)


# ---------------------------------------------------------------- the live sink

@dataclass
class SinkReport:
    """What the sink did during a run (goes into summary.json)."""

    target: str
    points: int = 0
    batches: int = 0
    retries: int = 0
    failed_batches: int = 0
    pending_points: int = 0
    """Not acknowledged when the run ended: `testbed telemetry backfill` writes them."""
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class InfluxSink:
    """Follows a run store from its own thread and mirrors its committed rows.

    Reads the store through its own read-only connection (WAL: it sees whole committed
    steps), so the run's event loop does no telemetry work at all."""

    def __init__(self, cfg: InfluxConfig, run_dir: Path, *, token: str | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.target = target_key(cfg)
        self.report = SinkReport(self.target)
        self._token = token_for(cfg, token)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._down_until = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="influx-sink", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> SinkReport:
        """Stop following; one last pass (unless the server is in its back-off), and
        count what stays for `backfill`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        return self.report

    def _run(self) -> None:
        store, ctx = open_run(self.run_dir)
        acks = AckLog(self.run_dir / "telemetry.db")
        writer = Writer(self.cfg, self._token)
        try:
            while not self._stop.wait(self.cfg.flush_s):
                self._pass(store, ctx, acks, writer)
            self._pass(store, ctx, acks, writer)
            self.report.pending_points = sum(pending(store, acks, self.target).values())
        finally:
            self.report.retries = writer.retries
            writer.close()
            acks.close()
            store.close()

    def _pass(self, store: sqlite3.Connection, ctx: Context, acks: AckLog, writer: Writer
              ) -> None:
        if time.monotonic() < self._down_until:
            return
        stats = SyncStats()

        def counted(n: int, rows: int) -> None:
            if n:
                stats.points += n
                stats.batches += 1

        try:
            sync(store, ctx, acks, self.target, writer.write, batch_size=self.cfg.batch_size,
                 progress=counted)
        except TelemetryError as exc:
            self._down_until = time.monotonic() + self.cfg.probe_s
            self.report.failed_batches += 1
            msg = str(exc)
            if msg not in self.report.errors:
                self.report.errors.append(msg)
                log.warning("telemetry: %s; the run goes on, rows stay in the run store "
                            "(retrying in %.0f s; `testbed telemetry backfill` writes the rest)",
                            msg, self.cfg.probe_s)
        self.report.points += stats.points
        self.report.batches += stats.batches


# ---------------------------------------------------------------- backfill

@dataclass
class BackfillResult:
    target: str
    points: int
    batches: int
    tables: dict[str, int]
    """Points per table: missing (a dry run) or written."""


def backfill(run_dir: Path, cfg: InfluxConfig, *, token: str | None = None,
             rewrite: bool = False, dry_run: bool = False,
             progress: Callable[[int, int], None] | None = None) -> BackfillResult:
    """Write every row of a run the target has not acknowledged (all of them with
    `rewrite`, e.g. after the bucket was wiped). Idempotent: a second call writes nothing.

    `progress(rows done, rows in all)`: rows, not points, so nothing is counted twice
    (a device's readings of one step are several rows and one point)."""
    store, ctx = open_run(run_dir)
    acks = AckLog(Path(run_dir) / "telemetry.db")
    key = target_key(cfg)
    try:
        if dry_run:
            tables = {t: count_points(store, t, [(0, last_rowid(store, t))]) for t in TABLES} \
                if rewrite else pending(store, acks, key)
            return BackfillResult(key, 0, 0, {t: n for t, n in tables.items() if n})
        if rewrite:
            acks.forget(key)
        total = sum(b - a for ranges in missing(store, acks, key).values() for a, b in ranges)
        if total == 0:
            return BackfillResult(key, 0, 0, {})
        writer = Writer(cfg, token_for(cfg, token))
        done = 0

        def step(points: int, rows: int) -> None:
            nonlocal done
            done += rows
            if progress:
                progress(done, total)

        try:
            stats = sync(store, ctx, acks, key, writer.write, batch_size=cfg.batch_size,
                         progress=step)
        finally:
            writer.close()
        return BackfillResult(key, stats.points, stats.batches, stats.tables)
    finally:
        acks.close()
        store.close()


def lines(run_dir: Path, tables: Iterable[str] | None = None) -> list[str]:
    """Every point of a run, in line protocol (for export and benchmarks)."""
    store, ctx = open_run(run_dir)
    try:
        return [p for t in (tables or TABLES)
                for _, p in points(store, t, 0, last_rowid(store, t), ctx)]
    finally:
        store.close()
