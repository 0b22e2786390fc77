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

Acknowledgements are not trusted for good: a server may lose points it acknowledged
(VictoriaMetrics buffers them for about a second before they are durable; a SIGKILL or a
power cut drops them). So after an outage, at the end of every run and in `backfill`,
the sink *verifies*: it asks the server what it holds for the run, per measurement and
time range, through the server's own read API (`ServerReader`: VictoriaMetrics'
`/api/v1/export`, InfluxDB's Flux query API), and rewrites exactly the points the server
lacks. A point counts as held when every field it carries is stored at its series and
timestamp (values are not compared: a rewrite of a point is the same point). Rewriting a
held point would be harmless on InfluxDB (same series and time: overwritten) but adds a
sample on VictoriaMetrics unless it runs with `-dedup.minScrapeInterval` (the lab stack
and the tests do); verification writes only what is missing, so it needs neither.

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

from .schema import TABLES, Context, Measurement, _key, last_rowid, points

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


# ---------------------------------------------------------------- verification

Held = dict[tuple[str, int], set[str]]
"""What a server holds: (series head in line protocol, timestamp ms) -> field names."""


def head_of(measurement: str, tags: dict[str, str]) -> str:
    """`measurement,tag=value,...` as `schema.line` writes it (tags sorted, empty left out)."""
    ts = ",".join(f"{_key(k)}={_key(str(v))}" for k, v in sorted(tags.items()) if v)
    return f"{_key(measurement)},{ts}" if ts else _key(measurement)


def split_line(line: str) -> tuple[str, list[str], int]:
    """(series head, field names, timestamp) of one of our points. Field names are
    identifiers and values numbers, so the last two spaces are the separators."""
    rest, ts = line.rsplit(" ", 1)
    head, fields = rest.rsplit(" ", 1)
    return head, [f.partition("=")[0] for f in fields.split(",")], int(ts)


def _http(url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None,
          timeout: float) -> bytes:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - http(s) only
            return r.read()  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:
        raise TelemetryError(f"{url.split('?')[0]}: HTTP {exc.code} {exc.reason}") from None
    except OSError as exc:
        reason = getattr(exc, "reason", None) or exc
        raise TelemetryError(f"{url.split('?')[0]}: {type(reason).__name__}: {reason}") from None


class VictoriaReader:
    """What a VictoriaMetrics server holds, from its export API (`/api/v1/export`: raw
    samples, no rollup cache). `/internal/force_flush` first, so points it acknowledged
    a moment ago are searchable (it buffers them ~1 s)."""

    api = "VictoriaMetrics /api/v1/export"
    settle_s = 8.0
    """VictoriaMetrics 1.79 made points of series it registered a moment before (after
    a restart) searchable up to ~5 s after acknowledging them, force_flush or not."""

    def __init__(self, cfg: InfluxConfig, token: str | None) -> None:
        self.url = cfg.url.rstrip("/")
        self.timeout = max(cfg.timeout_s, 30.0)
        self.headers = {"Authorization": f"Token {token}"} if token else {}

    def flush(self) -> None:
        try:
            _http(f"{self.url}/internal/force_flush", headers=self.headers, timeout=self.timeout)
        except TelemetryError as exc:
            if "HTTP" not in str(exc):  # refused, timed out: the server is not there
                raise
            # a server that does not offer it (behind a proxy, vmauth): the reads may miss
            # points of the last second, which the next verification rewrites

    def held(self, run: str, m: Measurement, start_ms: int, end_ms: int) -> Held:
        import json
        import urllib.parse

        names = "|".join(f"{m.name}_{f}" for f in m.fields)
        esc = run.replace("\\", "\\\\").replace('"', '\\"')
        body = urllib.parse.urlencode({
            "match[]": f'{{__name__=~"{names}",run="{esc}"}}',
            "start": str(start_ms // 1000), "end": str(end_ms // 1000 + 1)}).encode()
        out: Held = {}
        cut = len(m.name) + 1
        for raw in _http(f"{self.url}/api/v1/export", data=body, headers=self.headers,
                         timeout=self.timeout).splitlines():
            if not raw.strip():
                continue
            item = json.loads(raw)
            labels = item["metric"]
            field_name = labels.pop("__name__")[cut:]
            head = head_of(m.name, labels)
            for ts in item["timestamps"]:
                out.setdefault((head, ts), set()).add(field_name)
        return out


class FluxReader:
    """What an InfluxDB 2.x/3.x server holds, through influxdb-client's query API (Flux):
    per measurement and time range, the (series, time, field) of every point of the run."""

    api = "InfluxDB Flux query API"
    settle_s = 0.0
    """InfluxDB makes a write queryable before it acknowledges it."""

    def __init__(self, cfg: InfluxConfig, token: str | None) -> None:
        from influxdb_client import InfluxDBClient

        self.cfg = cfg
        self.client = InfluxDBClient(url=cfg.url, token=token or "", org=cfg.org,
                                     timeout=int(max(cfg.timeout_s, 30.0) * 1000))

    def flush(self) -> None:
        """InfluxDB makes a write queryable before it acknowledges it."""

    def held(self, run: str, m: Measurement, start_ms: int, end_ms: int) -> Held:
        from datetime import UTC, datetime, timedelta

        def rfc(ms: int) -> str:
            return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
                    ).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

        q = (f'from(bucket: "{_flux_str(self.cfg.bucket)}")'
             f" |> range(start: {rfc(start_ms)}, stop: {rfc(end_ms + 1)})"
             f' |> filter(fn: (r) => r._measurement == "{_flux_str(m.name)}"'
             f' and r.run == "{_flux_str(run)}")'
             ' |> drop(columns: ["_start", "_stop", "_value"])')
        skip = {"result", "table", "_time", "_field", "_measurement"}
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        out: Held = {}
        try:
            for rec in self.client.query_api().query_stream(q, org=self.cfg.org):
                v = rec.values
                tags = {k: str(x) for k, x in v.items() if k not in skip and x is not None}
                ts = (rec.get_time() - epoch) // timedelta(milliseconds=1)
                out.setdefault((head_of(m.name, tags), ts), set()).add(str(v["_field"]))
        except Exception as exc:  # HTTP errors, connection refused
            raise TelemetryError(f"{self.cfg.url}: Flux query failed: "
                                 f"{type(exc).__name__}: {str(exc)[:200]}") from None
        return out

    def close(self) -> None:
        self.client.close()


def _flux_str(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


ServerReader = VictoriaReader | FluxReader


def reader_for(cfg: InfluxConfig, token: str | None) -> ServerReader:
    """The read API of the target: `cfg.read_api`, or (auto) asked from `/health`, which
    InfluxDB answers with JSON naming itself and VictoriaMetrics with `OK`."""
    kind = cfg.read_api
    if kind == "auto":
        import json

        body = _http(f"{cfg.url.rstrip('/')}/health", timeout=cfg.timeout_s)
        try:
            name = str(json.loads(body).get("name", ""))
        except (ValueError, AttributeError):
            name = ""
        kind = "influxdb" if "influx" in name.lower() else "victoriametrics"
    return FluxReader(cfg, token) if kind == "influxdb" else VictoriaReader(cfg, token)


@dataclass
class Verification:
    """What a verification found and did, per table (points)."""

    api: str = ""
    store: dict[str, int] = field(default_factory=dict)
    """Points of the run store."""
    held: dict[str, int] = field(default_factory=dict)
    """Of those, points the server holds (every field at its series and time)."""
    written: dict[str, int] = field(default_factory=dict)
    """Points written because the server lacked them (to be written, in a dry run)."""
    batches: int = 0
    seconds: float = 0.0


def _time_range(store: sqlite3.Connection, m: Measurement, ctx: Context) -> tuple[int, int]:
    lo, hi = store.execute(f"SELECT min({m.time}), max({m.time}) FROM {m.table}").fetchone()
    dup = 0
    if m.table == "events":  # events of one time are spread by 1 ms each
        dup = store.execute("SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM "
                            "events GROUP BY t, kind, subject)").fetchone()[0]
    return ctx.ts(lo), ctx.ts(hi) + dup


def _lacking(held: Held, lines: Iterable[str]) -> list[str]:
    out = []
    for line in lines:
        head, names, ts = split_line(line)
        got = held.get((head, ts))
        if got is None or not got.issuperset(names):
            out.append(line)
    return out


def verify(store: sqlite3.Connection, ctx: Context, reader: ServerReader,
           write: Callable[[list[str]], None] | None, *, batch_size: int,
           acks: AckLog | None = None, target: str = "",
           progress: Callable[[int, int], None] | None = None) -> Verification:
    """Compare what the server holds for the run with the store; write what it lacks
    (nothing with `write=None`: a dry run). Each table is checked up to its last row at
    the start; once its missing points are written, `(0, last]` is acknowledged.

    A table the server holds nothing of is written as it is read. Points missing from a
    table it holds part of are re-read for up to `reader.settle_s` first: a server may
    make points searchable some seconds after acknowledging them (VictoriaMetrics 1.79
    does, for a series it registered just before), and a point that shows up is not
    written again.

    `progress(rows done, rows in all)` as for `sync`. Raises TelemetryError when the
    server cannot be read or does not take a write."""
    t0 = time.perf_counter()
    res = Verification(api=reader.api)
    lasts = {t: last_rowid(store, t) for t in TABLES}
    total, done = sum(lasts.values()), 0
    ranges: dict[str, tuple[int, int]] = {}
    suspects: dict[str, list[str]] = {}
    batch: list[str] = []

    def send(lines: list[str], table: str) -> None:
        assert write is not None
        for i in range(0, len(lines), batch_size):
            write(lines[i:i + batch_size])
            res.batches += 1
        res.written[table] = res.written.get(table, 0) + len(lines)

    reader.flush()
    for table, last in lasts.items():
        if last == 0:
            continue
        m = TABLES[table]
        ranges[table] = _time_range(store, m, ctx)
        held = reader.held(ctx.run, m, *ranges[table])
        n = 0
        if held:  # compare point by point; keep what is missing for a second look
            rows = [line for _, line in points(store, table, 0, last, ctx)]
            n = len(rows)
            lacking = _lacking(held, rows)
            if lacking:
                suspects[table] = lacking
            res.held[table] = n - len(lacking)
        else:
            res.held[table] = 0
            for _, line in points(store, table, 0, last, ctx):
                n += 1
                if write is not None:
                    batch.append(line)
                    if len(batch) >= batch_size:
                        send(batch, table)
                        batch = []
            if write is not None and batch:
                send(batch, table)
                batch = []
            if write is None:
                res.written[table] = n
        res.store[table] = n
        done += last
        if progress:
            progress(done, total)
    deadline = time.monotonic() + reader.settle_s
    while suspects and time.monotonic() < deadline:
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        reader.flush()
        for table in list(suspects):
            held = reader.held(ctx.run, TABLES[table], *ranges[table])
            still = _lacking(held, suspects[table])
            res.held[table] += len(suspects[table]) - len(still)
            if still:
                suspects[table] = still
            else:
                del suspects[table]
    for table, lacking in suspects.items():
        if write is None:
            res.written[table] = len(lacking)
        else:
            send(lacking, table)
    if write is not None and acks is not None:
        for table, last in lasts.items():
            acks.add(target, table, 0, last)
    res.seconds = time.perf_counter() - t0
    return res


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
    verified: bool = False
    """The end-of-run verification read the server back: it held every point (after
    rewriting `rewritten`); False: the server could not be read, `backfill` verifies."""
    rewritten: int = 0
    """Points verifications found missing on the server (acknowledged, then lost, or
    never acknowledged) and wrote again; included in `points`."""
    verifications: int = 0
    verify_s: float = 0.0
    """Wall time the verifications took (the sink's thread, not the run's)."""
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
        self._outage = False
        """A write failed: what the server acknowledged before may be lost too."""
        self._reader: ServerReader | None = None

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
            self.report.verified = self._verify(store, ctx, acks, writer)
            self.report.pending_points = sum(pending(store, acks, self.target).values())
        finally:
            self.report.retries = writer.retries
            writer.close()
            acks.close()
            store.close()
            if isinstance(self._reader, FluxReader):
                self._reader.close()

    def _failed(self, exc: TelemetryError) -> None:
        self._down_until = time.monotonic() + self.cfg.probe_s
        self._outage = True
        self.report.failed_batches += 1
        msg = str(exc)
        if msg not in self.report.errors:
            self.report.errors.append(msg)
            log.warning("telemetry: %s; the run goes on, rows stay in the run store "
                        "(retrying in %.0f s; `testbed telemetry backfill` writes the rest)",
                        msg, self.cfg.probe_s)

    def _verify(self, store: sqlite3.Connection, ctx: Context, acks: AckLog, writer: Writer
                ) -> bool:
        """Read the server back and rewrite what it lacks; False if it cannot be read."""
        try:
            if self._reader is None:
                self._reader = reader_for(self.cfg, self._token)
            v = verify(store, ctx, self._reader, writer.write, batch_size=self.cfg.batch_size,
                       acks=acks, target=self.target)
        except TelemetryError as exc:
            self._failed(exc)
            return False
        self._outage = False
        n = sum(v.written.values())
        if n:
            log.warning("telemetry: %s held %d of %d points of the run; rewrote the %d missing",
                        self.cfg.url, sum(v.held.values()), sum(v.store.values()), n)
        self.report.rewritten += n
        self.report.points += n
        self.report.batches += v.batches
        self.report.verifications += 1
        self.report.verify_s += v.seconds
        return True

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
            self._failed(exc)
        self.report.points += stats.points
        self.report.batches += stats.batches
        if self._outage and time.monotonic() >= self._down_until:
            self._verify(store, ctx, acks, writer)  # the server is back: what did it keep?


# ---------------------------------------------------------------- backfill

@dataclass
class BackfillResult:
    target: str
    points: int
    batches: int
    tables: dict[str, int]
    """Points per table: written, or missing (a dry run)."""
    store: dict[str, int] = field(default_factory=dict)
    """Points per table in the run store (verified backfills)."""
    held: dict[str, int] = field(default_factory=dict)
    """Of those, points the server held before the backfill wrote anything."""
    api: str = ""
    """The read API the server was verified through; '' if it was not (--all, or a dry
    run against a server that cannot be read: then `tables` counts what the server has
    not acknowledged)."""


def backfill(run_dir: Path, cfg: InfluxConfig, *, token: str | None = None,
             rewrite: bool = False, dry_run: bool = False,
             progress: Callable[[int, int], None] | None = None) -> BackfillResult:
    """Make the server hold every point of a run exactly once: ask it what it holds for
    the run (`verify`) and write exactly what it lacks, acknowledged or not. With
    `rewrite`, write every point again without asking (e.g. to refresh values). A second
    call writes nothing. A dry run only counts.

    `progress(rows done, rows in all)`: rows, not points, so nothing is counted twice
    (a device's readings of one step are several rows and one point)."""
    store, ctx = open_run(run_dir)
    acks = AckLog(Path(run_dir) / "telemetry.db")
    key = target_key(cfg)
    token = token_for(cfg, token)
    try:
        if rewrite:
            return _rewrite(store, ctx, acks, cfg, key, token, dry_run, progress)
        try:
            reader = reader_for(cfg, token)
        except TelemetryError:
            if not dry_run:
                raise
            tables = pending(store, acks, key)  # say what the acknowledgements say
            return BackfillResult(key, 0, 0, {t: n for t, n in tables.items() if n})
        writer = None if dry_run else Writer(cfg, token)
        try:
            v = verify(store, ctx, reader, writer.write if writer else None,
                       batch_size=cfg.batch_size, acks=acks, target=key, progress=progress)
        finally:
            if writer is not None:
                writer.close()
            if isinstance(reader, FluxReader):
                reader.close()
        tables = {t: n for t, n in v.written.items() if n}
        return BackfillResult(key, 0 if dry_run else sum(tables.values()), v.batches, tables,
                              v.store, v.held, v.api)
    finally:
        acks.close()
        store.close()


def _rewrite(store: sqlite3.Connection, ctx: Context, acks: AckLog, cfg: InfluxConfig,
             key: str, token: str | None, dry_run: bool,
             progress: Callable[[int, int], None] | None) -> BackfillResult:
    """Every point again, trusting nothing (`backfill --all`)."""
    if dry_run:
        tables = {t: count_points(store, t, [(0, last_rowid(store, t))]) for t in TABLES}
        return BackfillResult(key, 0, 0, {t: n for t, n in tables.items() if n})
    acks.forget(key)
    total = sum(b - a for ranges in missing(store, acks, key).values() for a, b in ranges)
    if total == 0:
        return BackfillResult(key, 0, 0, {})
    writer = Writer(cfg, token)
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


def lines(run_dir: Path, tables: Iterable[str] | None = None) -> list[str]:
    """Every point of a run, in line protocol (for export and benchmarks)."""
    store, ctx = open_run(run_dir)
    try:
        return [p for t in (tables or TABLES)
                for _, p in points(store, t, 0, last_rowid(store, t), ctx)]
    finally:
        store.close()
