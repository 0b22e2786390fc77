"""The time-series schema: how each run-store table becomes InfluxDB points.

One table, one measurement; one row, at most one point. Every point carries the tag
`run` (the run id) and the tags listed below; every field is a float (booleans 0/1), so
a field never changes type between points (InfluxDB refuses that) and every backend
that speaks `/api/v2/write` stores it alike (VictoriaMetrics keeps numbers only; it
names a series `<measurement>_<field>`). Text (event details, JSON reports) stays in
the run store.

Timestamps: a run's points are stamped at its wall-clock start (`meta.time_origin_ms`)
plus the simulated time elapsed, in milliseconds, so a speed-1 run appears live on
Grafana's "now". Rows that share a measurement, tag set and time (several events in one
step) are spread by 1 ms each, in row order, so no point overwrites another. The
mapping is a pure function of the store: backfilling a run writes the same points again.

The dashboards' queries are checked against `MEASUREMENTS` (tests/test_dashboards.py).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from testbed.clock import EPOCH
from testbed.devices.driver import MEASUREMENTS as DEVICE_MEASUREMENTS

DEFAULT_ORG = "testbed"
DEFAULT_BUCKET = "testbed"
"""Organisation and bucket the sink, the lab stack and the dashboards agree on."""

LIGHTS = {"green": 0.0, "amber": 1.0, "red": 2.0}
"""Traffic light as a number (a field), so a panel can draw it on a value axis."""

READING_FIELDS: tuple[str, ...] = tuple(sorted({n for names in DEVICE_MEASUREMENTS.values()
                                                for n in names}))
LIMIT_FIELDS = ("limit_vm_min_pu", "limit_vm_max_pu", "limit_plan_vm_min_pu",
                "limit_plan_vm_max_pu", "limit_line_pct", "limit_trafo_pct")
"""The site's grid limits, written with every feeder point so panels draw them."""


@dataclass(frozen=True)
class Measurement:
    """One measurement: the table it mirrors, its tags and fields, and what it is for."""

    name: str
    table: str
    tags: tuple[str, ...]
    fields: tuple[str, ...]
    time: str
    """Column with the simulated time (seconds) that stamps the point."""
    doc: str


MEASUREMENTS: dict[str, Measurement] = {m.name: m for m in (
    Measurement("reading", "measurements", ("prosumer", "device", "kind"), READING_FIELDS, "t",
                "Every device reading of a step; one point per device and step, the "
                "fields its kind reports (testbed.devices.driver.MEASUREMENTS)."),
    Measurement("interval", "intervals", (),
                ("schedule_kwh", "metered_kwh", "market_kwh", "raw_deviation_kwh",
                 "requested_kwh", "covered_kwh", "residual_kwh"), "start",
                "Schedule vs actual per market interval, stamped at the interval's start: "
                "metered net import, the day-ahead schedule, the deviation with market "
                "deliveries removed, what was requested and what the next interval's "
                "delivery covered."),
    Measurement("auction", "auctions", ("side", "outcome"),
                ("interval", "delivery", "requested_kwh", "price", "orders", "market_kwh",
                 "cleared_kwh", "clearing_price", "grid_rounds", "grid_passed"), "t",
                "One point per auction: the request, the orders received, what the market "
                "cleared and what the grid check let through."),
    Measurement("order", "orders", ("prosumer", "side"), ("energy_kwh", "price", "lost"), "t",
                "Every order received for an auction."),
    Measurement("award", "awards", ("prosumer", "side"),
                ("energy_kwh", "price", "amount_eur", "delivery"), "t",
                "Every award line of a clearing."),
    Measurement("settlement", "settlements", ("prosumer",),
                ("awarded_kwh", "delivered_kwh", "paid_kwh", "shortfall_kwh"), "t",
                "Delivery against award, settled after the delivery interval."),
    Measurement("grid_check", "grid_checks", ("round",),
                ("light", "acceptable", "vm_min_pu", "vm_max_pu", "max_line_pct",
                 "max_trafo_pct", "losses_w", "violations"), "t",
                "Each power flow of a dispatch's grid check (one per re-clear round)."),
    Measurement("feeder", "feeder", (),
                ("light", "vm_min_pu", "vm_max_pu", "max_line_pct", "max_trafo_pct",
                 "losses_w", "import_w", *LIMIT_FIELDS), "t",
                "The feeder's power flow every step, with the site's limits."),
    Measurement("block", "blocks", ("proposer",), ("height", "txs", "round", "cpf"), "t",
                "Every committed ledger block; `cpf` is the proposer's CPF evidence."),
    Measurement("cpf", "cpf", ("prosumer",), ("production_kwh", "consumption_kwh", "cpf"), "t",
                "Each meter's certified interval and the CPF it gives (eq. 9)."),
    Measurement("event", "events", ("kind", "subject"), ("count",), "t",
                "Scenario and run events (cloud, fault, setpoint, ...): count=1 each."),
    Measurement("clock", "steps", (), ("step", "late_ms"), "t",
                "Each step; late_ms is the tick's lateness in realtime mode."),
)}
TABLES: dict[str, Measurement] = {m.table: m for m in MEASUREMENTS.values()}


@dataclass(frozen=True)
class Context:
    """What the mapping needs besides a row: the run's id, clock origin and limits."""

    run: str
    origin_ms: int
    start_s: float
    limits: dict[str, float]

    def ts(self, t: float) -> int:
        return self.origin_ms + round((t - self.start_s) * 1000.0)

    @classmethod
    def of(cls, db: sqlite3.Connection, site: dict[str, Any] | None = None) -> Context:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        run = meta.get("run_id", "run")
        start = float(meta.get("sim_start_s", 0.0))
        origin = int(meta.get("time_origin_ms", round((EPOCH + start) * 1000)))
        from testbed.grid.limits import GridLimits  # the model's defaults, not copies

        lim = GridLimits(**(((site or {}).get("grid") or {}).get("limits") or {}))
        limits = {"limit_vm_min_pu": lim.vm_min_pu, "limit_vm_max_pu": lim.vm_max_pu,
                  "limit_plan_vm_min_pu": lim.plan_vm_min_pu,
                  "limit_plan_vm_max_pu": lim.plan_vm_max_pu,
                  "limit_line_pct": lim.line_max_pct, "limit_trafo_pct": lim.trafo_max_pct}
        return cls(run, origin, start, limits)


# ---------------------------------------------------------------- line protocol

def _key(s: str) -> str:
    return s.replace("\\", "\\\\").replace(",", r"\,").replace("=", r"\=").replace(" ", r"\ ")


def _num(v: Any) -> str | None:
    if v is None:
        return None
    x = float(v)
    if x != x or x in (float("inf"), float("-inf")):
        return None
    return repr(x)


def line(measurement: str, tags: dict[str, str], fields: dict[str, Any], ts_ms: int
         ) -> str | None:
    """One point in line protocol (ms precision); None if it has no numeric field."""
    fs = ",".join(f"{_key(k)}={s}" for k, v in fields.items() if (s := _num(v)) is not None)
    if not fs:
        return None
    ts = ",".join(f"{_key(k)}={_key(str(v))}" for k, v in sorted(tags.items())
                  if v is not None and str(v) != "")
    return f"{_key(measurement)},{ts} {fs} {ts_ms}" if ts else f"{_key(measurement)} {fs} {ts_ms}"


# ---------------------------------------------------------------- rows to points

def _select(m: Measurement) -> str:
    """Rows of a table by rowid, with `last` the row's (or group's) highest rowid.

    `measurements` rows are grouped per device and step (they are consecutive rows of
    one insert); an event gets `dup`, the number of earlier events with its time, kind
    and subject, which spreads their timestamps."""
    if m.table == "measurements":  # the field set is made in SQL: the hot path
        return ("SELECT max(rowid) AS last, t, prosumer, device, kind, "
                "group_concat(name || '=' || printf('%!.17g', value), ',') AS f "
                "FROM measurements WHERE rowid > ? AND rowid <= ? "
                "AND value BETWEEN -1e308 AND 1e308 GROUP BY t, device ORDER BY min(rowid)")
    if m.table == "events":
        return ("SELECT rowid AS last, *, (SELECT count(*) FROM events e WHERE e.t = events.t "
                "AND e.kind = events.kind AND e.subject IS events.subject "
                "AND e.rowid < events.rowid) AS dup "
                "FROM events WHERE rowid > ? AND rowid <= ? ORDER BY rowid")
    return f"SELECT rowid AS last, * FROM {m.table} WHERE rowid > ? AND rowid <= ? ORDER BY rowid"


def points(db: sqlite3.Connection, table: str, lo: int, hi: int, ctx: Context
           ) -> Iterator[tuple[int, str]]:
    """`(last rowid, line)` for the rows `lo < rowid <= hi` of `table`, in rowid order.

    The engine commits whole steps, so ranges taken between commits never cut through
    a device's readings of one step."""
    m = TABLES[table]
    if m.table == "measurements":
        yield from _readings(db, lo, hi, ctx)
        return
    db.row_factory = sqlite3.Row
    for r in db.execute(_select(m), (lo, hi)):
        row = dict(r)
        fields: dict[str, Any] = {f: row.get(f) for f in m.fields}
        if "light" in fields:
            fields["light"] = LIGHTS.get(str(fields["light"]))
        if m.name == "feeder":
            fields.update(ctx.limits)
        elif m.name == "event":
            fields = {"count": 1.0}
        elif m.name == "block":
            fields["cpf"] = json.loads(row["cpf"]).get("cpf")
        tags = {"run": ctx.run, **{k: row.get(k) for k in m.tags}}
        if m.name == "block":
            tags["proposer"] = row["proposer_name"]
        ts = ctx.ts(row[m.time]) + row.get("dup", 0)
        p = line(m.name, tags, fields, ts)
        if p is not None:
            yield row["last"], p


def _readings(db: sqlite3.Connection, lo: int, hi: int, ctx: Context
              ) -> Iterator[tuple[int, str]]:
    """`reading` points: one per device and step, tags escaped once per device. Field
    names are the drivers' identifiers; values are printed with 17 digits (exact)."""
    db.row_factory = None
    heads: dict[tuple[str, str, str], str] = {}
    for last, t, prosumer, device, kind, fields in db.execute(
            _select(TABLES["measurements"]), (lo, hi)):
        head = heads.get((prosumer, device, kind))
        if head is None:
            tags = {"run": ctx.run, "prosumer": prosumer, "device": device, "kind": kind}
            head = heads[(prosumer, device, kind)] = "reading," + ",".join(
                f"{_key(k)}={_key(str(v))}" for k, v in sorted(tags.items()) if v)
        if fields:
            yield last, f"{head} {fields} {ctx.ts(t)}"


def last_rowid(db: sqlite3.Connection, table: str) -> int:
    return db.execute(f"SELECT coalesce(max(rowid), 0) FROM {table}").fetchone()[0]
