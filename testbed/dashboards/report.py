"""The HTML run report (`testbed report RUN`): one file to mail, archive or open offline.

It shows what the Grafana dashboards show - schedule vs metered energy, the auctions, the
batteries, the feeder, the ledger - but from the run store alone (`run.db`, plus
`summary.json`, `scenario.json`, `site.json` when present), with plotly.js inlined once so
the file needs no server, no CDN and no network. Series are read with SQL, only what is
plotted; runs with more steps than `MAX_POINTS` are bucketed in SQL (envelopes for the
feeder), and sites with more than `MAX_TRACES` batteries plot as a fleet.
"""

from __future__ import annotations

import html
import json
import math
import re
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from testbed import __version__
from testbed.clock import EPOCH
from testbed.grid.limits import GridLimits
from testbed.telemetry.store import RunStore

MAX_POINTS = 1500
"""Points per time series; longer runs are averaged (or enveloped) into buckets in SQL."""
MAX_TRACES = 12
"""More batteries (or prosumers, for the CPF) than this plot as a fleet: the mean and the
min-max band, instead of one line each."""
MAX_EVENT_ROWS = 500
"""Rows of the events table; the rest are counted, not listed."""

DAY0 = datetime.fromtimestamp(EPOCH, UTC).replace(tzinfo=None)
PALETTE = qualitative.D3
OUTCOMES = {"exact": ("#2ca02c", "circle", "exact"),
            "partial": ("#ff7f0e", "diamond", "partial"),
            "no_match": ("#d62728", "x", "no match")}
LIGHTS = {"green": "#2ca02c", "amber": "#ff9f1c", "red": "#d62728"}
EVENT_STYLE = {"fault": ("#d62728", "x"), "read-failed": ("#ff7f0e", "triangle-down"),
               "recovered": ("#2ca02c", "triangle-up"), "setpoint-failed": ("#ff7f0e", "star"),
               "message-lost": ("#7f7f7f", "square"), "block-missing": ("#000000", "square-x")}
NUMBER_W = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*W\b")


class ReportError(ValueError):
    """The folder is not a run directory the report can be made from."""


@dataclass(frozen=True)
class RunFiles:
    """The run's JSON files and meta table: everything but the time series."""

    run_dir: Path
    summary: dict[str, Any] | None
    """None when the run did not finish (killed mid-way: no summary.json)."""
    scenario: dict[str, Any]
    site: dict[str, Any]
    meta: dict[str, str]


@dataclass(frozen=True)
class Section:
    """A part of the report: a figure, or a note saying why there is none."""

    key: str
    title: str
    figure: go.Figure | None = None
    note: str = ""
    """Plain text, shown above the figure (or instead of it)."""


# --------------------------------------------------------------------------- loading


def open_run(run_dir: Path) -> tuple[sqlite3.Connection, RunFiles]:
    """The store (read-only) and the run's files; ReportError if it is not a run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    db_path = run_dir / "run.db"
    if not db_path.is_file():
        raise ReportError(f"{run_dir}: not a run directory (no run.db: the run store "
                          "`testbed run` writes)")
    RunStore.ensure_indexes(db_path)  # the run leaves its by-device index to its reader
    try:
        db = RunStore.open_readonly(db_path)
        meta = {r[0]: r[1] for r in _q(db, "SELECT key, value FROM meta")}
    except sqlite3.DatabaseError as exc:
        raise ReportError(f"{db_path}: not a readable run store ({exc})") from None
    return db, RunFiles(run_dir, _json(run_dir / "summary.json"),
                        _json(run_dir / "scenario.json") or {},
                        _json(run_dir / "site.json") or {}, meta)


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: unreadable ({exc})") from None
    return data if isinstance(data, dict) else None


def _q(db: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Rows of a query; a table an older store lacks reads as empty."""
    try:
        return [tuple(r) for r in db.execute(sql, params)]
    except sqlite3.OperationalError as exc:
        if str(exc).startswith("no such table"):
            return []
        raise


def _bucket(db: sqlite3.Connection) -> float | None:
    """Seconds per plotted point when the run has more steps than MAX_POINTS, else None."""
    rows = _q(db, "SELECT COUNT(*), MIN(t), MAX(t) FROM steps")
    n, t0, t1 = rows[0] if rows else (0, None, None)
    if n <= MAX_POINTS:
        return None
    return (t1 - t0) / (n - 1) * math.ceil(n / (MAX_POINTS - 1))  # buckets straddle t0


def _bucket_note(bucket: float | None, how: str) -> str:
    return "" if bucket is None else f"Averaged over {bucket / 60:g} min buckets{how}. "


def _tcol(bucket: float | None) -> str:
    """SQL for the plotted time: `t`, or the start of its bucket."""
    return "t" if bucket is None else f"(CAST(t / {bucket!r} AS INTEGER) * {bucket!r})"


# --------------------------------------------------------------------------- helpers


def _x(ts: Iterable[float]) -> list[str]:
    """Simulated seconds -> datetimes of day 0 (plotly's date axis shows clock time)."""
    return [(DAY0 + timedelta(seconds=t)).isoformat(sep=" ") for t in ts]


def clock(t: float | None) -> str:
    """HH:MM of simulated time, with the day when it is not day 0."""
    if t is None:
        return "-"
    d, rest = divmod(int(round(t)), 86400)
    return f"{rest // 3600:02d}:{rest % 3600 // 60:02d}" + (f" (day {d})" if d else "")


def _fmt(x: Any, spec: str = ".3f", unit: str = "") -> str:
    return "-" if x is None else format(x, spec) + unit


def _col(rows: Sequence[tuple[Any, ...]], i: int) -> list[Any]:
    return [r[i] for r in rows]


def _colours(names: Iterable[str]) -> dict[str, str]:
    """A fixed colour per prosumer, the same in every figure."""
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(sorted(set(names)))}


def _style(fig: go.Figure, height: int, span_s: float, hovermode: str = "x unified") -> None:
    fig.update_layout(template="plotly_white", height=height, hovermode=hovermode,
                      margin={"l": 70, "r": 30, "t": 50, "b": 40},
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.04, "x": 0},
                      font={"family": "system-ui, -apple-system, Segoe UI, sans-serif",
                            "size": 12})
    day = span_s <= 86400  # day 0 is a made-up date: show clock time only
    fig.update_xaxes(type="date", hoverformat="%H:%M" if day else "%b %d %H:%M",
                     tickformat="%H:%M" if day else None)
    fig.update_annotations(font_size=13)


def _span(db: sqlite3.Connection, files: RunFiles) -> tuple[float | None, float | None]:
    """Start and end of the simulated time recorded (end: the last step written)."""
    s = files.summary or {}
    start = s.get("start_s", files.scenario.get("start"))
    if start is None and "sim_start_s" in files.meta:
        start = float(files.meta["sim_start_s"])
    last = _q(db, "SELECT MAX(t) FROM steps")
    end = last[0][0] if last else None
    if end is None and start is not None and s.get("duration_s") is not None:
        end = start + s["duration_s"]
    return start, end


def scenario_label(e: dict[str, Any]) -> str:
    """A scenario event in a few words: "cloud 60%", "+2,000 W load house-1"."""
    kind = str(e.get("kind", "event"))
    who = e.get("prosumer") or e.get("device") or ""
    what = {"cloud": f"cloud {e.get('depth', 0):.0%}",
            "load-spike": f"+{e.get('extra_w', 0):,.0f} W load {who}",
            "message-loss": f"message loss {e.get('share', 1):.0%} {who}"}
    return what.get(kind, f"{kind} {who}").strip()


def _shade_scenario(fig: go.Figure, scenario: dict[str, Any], end: float | None) -> None:
    """What the scenario injected (clouds, load spikes, device and message faults)."""
    for e in scenario.get("events") or []:
        at = e.get("at")
        if at is None:
            continue
        to = at + e["duration"] if e.get("duration") else (end if end is not None else at)
        fig.add_vrect(x0=_x([at])[0], x1=_x([max(to, at + 60)])[0], fillcolor="#9e9e9e",
                      opacity=0.13, line_width=0, annotation_text=html.escape(scenario_label(e)),
                      annotation_position="top left", annotation_font_color="#555")


# --------------------------------------------------------------------------- figures


def figures(db: sqlite3.Connection, files: RunFiles) -> list[Section]:
    """The plotted sections, in report order."""
    bucket = _bucket(db)
    start, end = _span(db, files)
    span = (end or 0) - (start or 0)
    prosumers = [p.get("name", "") for p in files.site.get("prosumers", [])]
    prosumers += [r[0] for r in _q(db, "SELECT DISTINCT prosumer FROM cpf")]
    colours = _colours(prosumers)
    return [_schedule(db, files, span, end), _auctions(db, span),
            _batteries(db, files, bucket, colours, span, end),
            _prosumers_pqv(db, files, bucket, colours, span, end),
            _feeder(db, files, bucket, span), _ledger(db, files, colours, span)]


def _schedule(db: sqlite3.Connection, files: RunFiles, span: float, end: float | None
              ) -> Section:
    title = "Schedule vs actual, per market interval"
    rows = _q(db, "SELECT interval, start, schedule_kwh, metered_kwh, raw_deviation_kwh, "
                  "residual_kwh, requested_kwh, covered_kwh FROM intervals ORDER BY interval")
    if not rows:
        return Section("schedule", title, note="No market interval was completed in this run.")
    iv = (files.scenario.get("market") or {}).get("interval_s", 900)
    x = _x(r[1] + iv / 2 for r in rows)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12,
                        subplot_titles=("Net energy at the connection point (kWh, + import / "
                                        "- export)", "Deviation from the schedule (kWh)"))
    fig.add_scatter(x=x, y=_col(rows, 2), name="schedule", mode="lines+markers",
                    line={"color": "#7f7f7f", "dash": "dash"}, row=1, col=1)
    fig.add_scatter(x=x, y=_col(rows, 3), name="metered", mode="lines+markers",
                    line={"color": "#1f77b4"}, row=1, col=1)
    fig.add_bar(x=x, y=_col(rows, 4), name="before market (raw)", marker_color="#ff9896",
                row=2, col=1)
    fig.add_bar(x=x, y=_col(rows, 5), name="after market (residual)", marker_color="#d62728",
                row=2, col=1)
    fig.add_scatter(x=x, y=_col(rows, 6), name="requested", mode="markers",
                    marker={"symbol": "line-ew-open", "size": 16, "color": "#000",
                            "line": {"width": 2}}, row=2, col=1)
    fig.add_scatter(x=x, y=_col(rows, 7), name="covered by the market", mode="markers",
                    marker={"symbol": "diamond", "size": 8, "color": "#2ca02c"}, row=2, col=1)
    fig.update_layout(barmode="group")
    _shade_scenario(fig, files.scenario, end)
    _style(fig, 560, span)
    return Section("schedule", title, fig)


def _auctions(db: sqlite3.Connection, span: float) -> Section:
    title = "Auctions"
    rows = _q(db, "SELECT t, interval, side, requested_kwh, price, outcome, market_kwh, "
                  "cleared_kwh, clearing_price, orders, grid_rounds FROM auctions ORDER BY t")
    if not rows:
        return Section("auctions", title, note="No auction was held in this run (no "
                       "deviation above the threshold, or no interval completed).")
    x = _x(_col(rows, 0))
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12,
                        subplot_titles=("Price (EUR/kWh): limit and clearing price by outcome",
                                        "Volume per auction (kWh)"))
    fig.add_scatter(x=x, y=_col(rows, 4), name="limit price", mode="lines+markers",
                    line={"color": "#7f7f7f", "dash": "dot", "shape": "hv"},
                    marker={"size": 4}, row=1, col=1)
    for outcome in sorted({r[5] for r in rows}, key=lambda o: list(OUTCOMES).index(o)
                          if o in OUTCOMES else 99):
        colour, symbol, label = OUTCOMES.get(outcome, ("#9467bd", "square", outcome))
        sel = [r for r in rows if r[5] == outcome]
        # no match has no clearing price: its marker sits on the axis
        y = [0.0 if r[8] is None else r[8] for r in sel]
        fig.add_scatter(x=_x(_col(sel, 0)), y=y, mode="markers", name=html.escape(label),
                        marker={"color": colour, "symbol": symbol, "size": 11,
                                "line": {"width": 1, "color": "#fff"}}, cliponaxis=False,
                        customdata=[[r[1], html.escape(r[2]), r[9], r[3], r[7]] for r in sel],
                        hovertemplate="interval %{customdata[0]} (%{customdata[1]}), "
                                      "%{customdata[2]} orders: %{customdata[4]:.3f} of "
                                      "%{customdata[3]:.3f} kWh at %{y:.3f} EUR/kWh",
                        row=1, col=1)
    fig.add_bar(x=x, y=_col(rows, 3), name="requested", marker_color="#c7c7c7",
                offsetgroup="requested", row=2, col=1)
    fig.add_bar(x=x, y=_col(rows, 7), name="cleared", offsetgroup="cleared",
                marker_color=[OUTCOMES.get(r[5], ("#9467bd",))[0] for r in rows], row=2, col=1)
    curtailed = [max(0.0, r[6] - r[7]) for r in rows]
    if any(c > 1e-9 for c in curtailed):
        fig.add_bar(x=x, y=curtailed, base=_col(rows, 7), name="curtailed by the grid check",
                    offsetgroup="cleared", marker={"color": "#fff", "line": {
                        "color": "#d62728", "width": 1.5}, "pattern": {"shape": "/"}},
                    row=2, col=1)
    fig.update_layout(barmode="group")
    fig.update_yaxes(rangemode="tozero", row=1, col=1)
    _style(fig, 560, span)
    return Section("auctions", title, fig, note="Cleared bars are coloured by outcome "
                   "(green exact, orange partial); no-match auctions sit at price 0.")


def _batteries(db: sqlite3.Connection, files: RunFiles, bucket: float | None,
               colours: dict[str, str], span: float, end: float | None) -> Section:
    title = "Batteries: state of charge and power"
    owner = {d["name"]: p.get("name", "") for p in files.site.get("prosumers", [])
             for d in p.get("devices", []) if d.get("kind") == "battery"}
    if not owner:  # no site.json: ask the store (a scan, but only then)
        owner = dict(_q(db, "SELECT DISTINCT device, prosumer FROM measurements "
                            "WHERE kind = 'battery'"))
    if not owner:
        return Section("batteries", title, note="The site has no battery.")
    tc = _tcol(bucket)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12,
                        subplot_titles=("State of charge (%)", "Power (W, + discharge / "
                                        "- charge); dashed: setpoint"))
    fleet = len(owner) > MAX_TRACES
    note = _bucket_note(bucket, "")
    if fleet:
        marks = ", ".join("?" for _ in owner)
        devs = sorted(owner)

        def agg(name: str) -> list[tuple[Any, ...]]:
            return _q(db, f"SELECT {tc} AS tt, AVG(value), MIN(value), MAX(value) FROM "
                          f"measurements WHERE name = ? AND device IN ({marks}) "
                          "GROUP BY tt ORDER BY tt", [name, *devs])

        soc, pw, sp = agg("soc_pct"), agg("p_w"), agg("setpoint_w")
        if not soc:
            return Section("batteries", title, note="No battery measurement was recorded.")
        _band(fig, soc, f"SOC of {len(owner)} batteries", row=1, col=1)
        fig.add_scatter(x=_x(_col(pw, 0)), y=_col(pw, 1), mode="lines", name="mean power",
                        line={"color": "#1f77b4"}, row=2, col=1)
        fig.add_scatter(x=_x(_col(sp, 0)), y=_col(sp, 1), mode="lines",
                        name="mean setpoint", line={"color": "#1f77b4", "dash": "dash"},
                        row=2, col=1)
        note += (f"{len(owner)} batteries: shown as a fleet (mean, and the min-max band of "
                 "the state of charge).")
    else:
        plotted = 0
        for dev in sorted(owner):
            colour = colours.get(owner[dev], "#1f77b4")
            name = html.escape(dev)
            for series, row, dash, legend in (("soc_pct", 1, None, True),
                                              ("p_w", 2, None, False),
                                              ("setpoint_w", 2, "dash", False)):
                pts = _q(db, f"SELECT {tc} AS tt, AVG(value) FROM measurements WHERE "
                             "device = ? AND name = ? GROUP BY tt ORDER BY tt", (dev, series))
                plotted += len(pts)
                fig.add_scatter(x=_x(_col(pts, 0)), y=_col(pts, 1), mode="lines",
                                name=name if series == "soc_pct" else f"{name} {series}",
                                legendgroup=name, showlegend=legend,
                                line={"color": colour, "dash": dash,
                                      "shape": "hv" if series == "setpoint_w" else "linear"},
                                row=row, col=1)
        if not plotted:
            return Section("batteries", title, note="No battery measurement was recorded.")
        sent = _q(db, "SELECT t, subject, detail FROM events WHERE kind = 'setpoint' "
                      "ORDER BY t")
        watts = [NUMBER_W.match(r[2] or "") for r in sent]
        sent = [(r, float(m.group(1))) for r, m in zip(sent, watts, strict=True) if m]
        if sent:
            fig.add_scatter(x=_x(r[0] for r, _ in sent), y=[w for _, w in sent],
                            mode="markers", name="setpoint sent",
                            marker={"symbol": "triangle-right", "size": 8, "color": "#333"},
                            text=[html.escape(f"{r[1]}: {r[2]}") for r, _ in sent],
                            hovertemplate="%{text}<extra>setpoint sent</extra>", row=2, col=1)
    _mark_events(db, fig)
    _shade_scenario(fig, files.scenario, end)
    fig.update_yaxes(range=[0, 105], row=1, col=1)
    _style(fig, 600, span)
    return Section("batteries", title, fig, note=note)


def _prosumers_pqv(db: sqlite3.Connection, files: RunFiles, bucket: float | None,
                   colours: dict[str, str], span: float, end: float | None) -> Section:
    """Per prosumer, where it meets the feeder: net P at the meter, the inverters' Q (the
    IEEE 1547 functions at work) and the voltage the feeder gave it."""
    title = "Prosumers: P, Q and V at the connection point"
    tc = _tcol(bucket)
    p_rows = _q(db, f"SELECT {tc} AS tt, prosumer, AVG(value) FROM measurements WHERE "
                    "kind = 'meter' AND name = 'p_w' GROUP BY prosumer, tt ORDER BY tt")
    q_rows = _q(db, f"SELECT {tc} AS tt, prosumer, SUM(value) / COUNT(DISTINCT t) FROM "
                    "measurements WHERE kind IN ('pv', 'battery') AND name = 'q_var' "
                    "GROUP BY prosumer, tt ORDER BY tt")
    v_rows = _q(db, f"SELECT {tc} AS tt, prosumer, AVG(value) FROM measurements WHERE "
                    "kind = 'meter' AND name = 'voltage_v' GROUP BY prosumer, tt ORDER BY tt")
    if not (p_rows or q_rows or v_rows):
        return Section("prosumers", title, note="No meter or inverter measurement was recorded.")
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.09,
                        subplot_titles=("Net power at the meter (W, + import / - export)",
                                        "Reactive power of the inverters (var, + injected)",
                                        "Voltage at the meter (V)"))
    names = sorted({r[1] for rows in (p_rows, q_rows, v_rows) for r in rows})
    fleet = len(names) > MAX_TRACES
    note = _bucket_note(bucket, "")
    for row, rows in ((1, p_rows), (2, q_rows), (3, v_rows)):
        if fleet:
            by_t: dict[Any, list[float]] = {}
            for t, _, v in rows:
                by_t.setdefault(t, []).append(v)
            ts = sorted(by_t)
            band = [(t, sum(by_t[t]) / len(by_t[t]), min(by_t[t]), max(by_t[t])) for t in ts]
            _band(fig, band, f"{len(names)} prosumers", row=row, col=1)
            continue
        for name in names:
            pts = [(t, v) for t, n, v in rows if n == name]
            fig.add_scatter(x=_x(_col(pts, 0)), y=_col(pts, 1), mode="lines",
                            name=html.escape(name), legendgroup=name, showlegend=row == 1,
                            line={"color": colours.get(name, "#1f77b4")}, row=row, col=1)
    if fleet:
        note += f"{len(names)} prosumers: shown as a fleet (mean and min-max band)."
    _mark_events(db, fig)
    _shade_scenario(fig, files.scenario, end)
    _style(fig, 700, span)
    return Section("prosumers", title, fig, note=note)


def _band(fig: go.Figure, rows: Sequence[tuple[Any, ...]], name: str, row: int, col: int
          ) -> None:
    """A fleet as its mean line inside its min-max band; rows are (t, mean, min, max)."""
    xs = _x(_col(rows, 0))
    fig.add_scatter(x=xs, y=_col(rows, 2), mode="lines", line={"width": 0}, showlegend=False,
                    hoverinfo="skip", row=row, col=col)
    fig.add_scatter(x=xs, y=_col(rows, 3), mode="lines", line={"width": 0}, fill="tonexty",
                    fillcolor="rgba(31,119,180,0.2)", name=f"{name}: min-max", row=row, col=col)
    fig.add_scatter(x=xs, y=_col(rows, 1), mode="lines", name=f"{name}: mean",
                    line={"color": "#1f77b4"}, row=row, col=col)


def _mark_events(db: sqlite3.Connection, fig: go.Figure) -> None:
    """Faults and other incidents: markers along the top of the SOC plot, faults as lines."""
    rows = _q(db, "SELECT t, kind, subject, detail FROM events WHERE kind != 'setpoint' "
                  "AND kind NOT LIKE 'device-%' ORDER BY t LIMIT ?", (MAX_EVENT_ROWS,))
    by_kind: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for r in rows:
        by_kind[r[1]].append(r)
    for kind, sel in by_kind.items():
        colour, symbol = EVENT_STYLE.get(kind, ("#9467bd", "circle"))
        fig.add_scatter(x=_x(_col(sel, 0)), y=[102.0] * len(sel), mode="markers",
                        name=html.escape(kind), marker={"symbol": symbol, "size": 11,
                                                        "color": colour},
                        text=[html.escape(f"{r[2] or ''}: {r[3]}"[:200]) for r in sel],
                        hovertemplate="%{text}<extra>" + html.escape(kind) + "</extra>",
                        row=1, col=1)
    for r in by_kind.get("fault", []):
        fig.add_vline(x=_x([r[0]])[0], line={"color": "#d62728", "dash": "dash", "width": 1.5},
                      annotation_text=html.escape(f"fault: {r[2] or ''}"),
                      annotation_font_color="#d62728", annotation_position="bottom right")


def _feeder(db: sqlite3.Connection, files: RunFiles, bucket: float | None, span: float
            ) -> Section:
    title = "Feeder: voltage band and loading"
    tc = _tcol(bucket)
    rows = _q(db, f"SELECT {tc} AS tt, MIN(vm_min_pu), MAX(vm_max_pu), MAX(max_line_pct), "
                  "MAX(max_trafo_pct), AVG(losses_w), AVG(import_w) FROM feeder "
                  "GROUP BY tt ORDER BY tt")
    if not rows:
        enabled = (files.summary or {}).get("grid", {}).get("enabled",
                                                           files.site.get("grid", {}).get(
                                                               "enabled"))
        return Section("feeder", title, note="The grid check is disabled for this run: no "
                       "power flow was computed." if enabled is False else
                       "No power flow was recorded in this run.")
    lim = limits(files.site)
    x = _x(_col(rows, 0))
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.09,
                        row_heights=[0.45, 0.33, 0.22],
                        specs=[[{}], [{}], [{"secondary_y": True}]],
                        subplot_titles=("Voltage (p.u.): min and max over the buses",
                                        "Max loading (%)", "Losses (kW, left) and feeder "
                                        "import (kW, right)"))
    fig.add_scatter(x=x, y=_col(rows, 1), name="V min", mode="lines",
                    line={"color": "#1f77b4"}, row=1, col=1)
    fig.add_scatter(x=x, y=_col(rows, 2), name="V max", mode="lines",
                    line={"color": "#9467bd"}, row=1, col=1)
    checks = _q(db, "SELECT t, round, light, acceptable, vm_min_pu, violations FROM "
                    "grid_checks ORDER BY t, round")
    if checks:
        fig.add_scatter(x=_x(_col(checks, 0)), y=_col(checks, 4), mode="markers",
                        name="dispatch check (V min)",
                        marker={"symbol": "diamond-open", "size": 9,
                                "color": [LIGHTS.get(r[2], "#7f7f7f") for r in checks]},
                        customdata=[[r[1], html.escape(r[2]), r[5]] for r in checks],
                        hovertemplate="round %{customdata[0]}: %{customdata[1]}, "
                                      "%{customdata[2]} violations", row=1, col=1)
    off = _q(db, "SELECT t, light, vm_min_pu FROM feeder WHERE light != 'green' ORDER BY t "
                 "LIMIT ?", (MAX_POINTS,))
    if off:
        fig.add_scatter(x=_x(_col(off, 0)), y=_col(off, 2), mode="markers",
                        name="amber/red step", marker={
                            "color": [LIGHTS.get(r[1], "#7f7f7f") for r in off], "size": 7},
                        text=[html.escape(r[1]) for r in off], row=1, col=1)
    # bands after the traces: plotly leaves shapes off subplots that have no trace yet
    fig.add_hrect(y0=lim.plan_vm_min_pu, y1=lim.plan_vm_max_pu, fillcolor="#2ca02c",
                  opacity=0.07, line_width=0, row=1, col=1)
    for y, colour, dash, label in ((lim.vm_min_pu, "#d62728", "dash", "hard"),
                                   (lim.vm_max_pu, "#d62728", "dash", "hard"),
                                   (lim.plan_vm_min_pu, "#ff9f1c", "dot", "planning"),
                                   (lim.plan_vm_max_pu, "#ff9f1c", "dot", "planning")):
        fig.add_hline(y=y, line={"color": colour, "dash": dash, "width": 1.2},
                      annotation_text=f"{label} {y:g}", annotation_font_color=colour,
                      annotation_position="top right" if y > 1 else "bottom right",
                      row=1, col=1)
    fig.add_scatter(x=x, y=_col(rows, 3), name="line", mode="lines",
                    line={"color": "#8c564b"}, row=2, col=1)
    fig.add_scatter(x=x, y=_col(rows, 4), name="transformer", mode="lines",
                    line={"color": "#e377c2"}, row=2, col=1)
    same = lim.line_max_pct == lim.trafo_max_pct
    for y, label in ([(lim.line_max_pct, "line and transformer limit")] if same else
                     [(lim.line_max_pct, "line limit"), (lim.trafo_max_pct, "transformer limit")]):
        fig.add_hline(y=y, line={"color": "#d62728", "dash": "dash", "width": 1.2},
                      annotation_text=f"{label} {y:g} %", annotation_font_color="#d62728",
                      annotation_position="bottom right", row=2, col=1)
    fig.add_scatter(x=x, y=[None if v is None else v / 1000 for v in _col(rows, 5)],
                    name="losses", mode="lines", line={"color": "#bcbd22"}, row=3, col=1)
    fig.add_scatter(x=x, y=[None if v is None else v / 1000 for v in _col(rows, 6)],
                    name="import", mode="lines", line={"color": "#17becf", "dash": "dot"},
                    row=3, col=1, secondary_y=True)
    vals = [v for r in rows for v in r[1:3] if v is not None]
    fig.update_yaxes(range=[min([lim.vm_min_pu - 0.02, *vals]),
                            max([lim.vm_max_pu + 0.02, *vals])], row=1, col=1)
    top = max([v for r in rows for v in r[3:5] if v is not None] or [0.0])
    fig.update_yaxes(range=[0, max(lim.line_max_pct, lim.trafo_max_pct, top) * 1.1],
                     row=2, col=1)
    _style(fig, 720, span)
    return Section("feeder", title, fig, note=_bucket_note(
        bucket, " (voltage and loading: the bucket's extremes)"))


def limits(site: dict[str, Any]) -> GridLimits:
    """The site's grid limits (the model's defaults when the site file has none)."""
    try:
        return GridLimits(**((site.get("grid") or {}).get("limits") or {}))
    except ValueError:
        return GridLimits()


def _ledger(db: sqlite3.Connection, files: RunFiles, colours: dict[str, str], span: float
            ) -> Section:
    title = "Ledger: blocks, proposers and the CPF"
    blocks = _q(db, "SELECT height, t, proposer_name, txs, round FROM blocks ORDER BY height")
    cpf = _q(db, "SELECT t, prosumer, cpf FROM cpf ORDER BY prosumer, t")
    if not blocks and not cpf:
        enabled = ((files.summary or {}).get("ledger", {}).get("enabled",
                   (files.scenario.get("ledger") or {}).get("enabled")))
        return Section("ledger", title, note="The ledger is disabled for this run."
                       if enabled is False else "No block was committed in this run.")
    fig = make_subplots(rows=2, cols=2, specs=[[{"colspan": 2}, None], [{}, {}]],
                        column_widths=[0.7, 0.3], vertical_spacing=0.16,
                        subplot_titles=("Transactions per block (colour: proposer)",
                                        "Consumption-production factor (CPF) per prosumer",
                                        "Blocks proposed"))
    names = sorted({r[2] for r in blocks})
    for name in names:
        sel = [b for b in blocks if b[2] == name]
        fig.add_bar(x=_x(_col(sel, 1)), y=_col(sel, 3), name=html.escape(name),
                    legendgroup=html.escape(name), marker_color=colours.get(name, "#7f7f7f"),
                    customdata=[[b[0], b[4]] for b in sel],
                    hovertemplate="height %{customdata[0]} (round %{customdata[1]}): "
                                  "%{y} txs", row=1, col=1)
    cpf_names = sorted({r[1] for r in cpf})
    if len(cpf_names) > MAX_TRACES:
        _band(fig, _q(db, "SELECT t, AVG(cpf), MIN(cpf), MAX(cpf) FROM cpf GROUP BY t "
                          "ORDER BY t"), f"CPF of {len(cpf_names)} prosumers", row=2, col=1)
    for name in cpf_names if len(cpf_names) <= MAX_TRACES else ():
        sel = [c for c in cpf if c[1] == name]
        fig.add_scatter(x=_x(_col(sel, 0)), y=_col(sel, 2), mode="lines+markers",
                        name=html.escape(name), legendgroup=html.escape(name),
                        showlegend=name not in names, marker={"size": 5},
                        line={"color": colours.get(name, "#7f7f7f")}, row=2, col=1)
    if names:
        fig.add_bar(x=[html.escape(n) for n in names],
                    y=[sum(1 for b in blocks if b[2] == n) for n in names],
                    marker_color=[colours.get(n, "#7f7f7f") for n in names],
                    name="blocks proposed", showlegend=False, row=2, col=2)
    fig.update_yaxes(range=[0, 1.05], row=2, col=1)
    _style(fig, 620, span, hovermode="closest")
    fig.update_xaxes(type="category", tickformat=None, hoverformat=None, row=2, col=2)
    fig.update_layout(legend_title_text="prosumer ")
    return Section("ledger", title, fig, note="" if blocks else "No block was committed.")


# --------------------------------------------------------------------------- HTML parts


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "",
           attrs: Sequence[str] | None = None) -> str:
    """An HTML table; cells are already-escaped HTML (callers escape store text)."""
    out = [f'<table class="{cls}"><thead><tr>'
           + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        extra = f" {attrs[i]}" if attrs else ""
        out.append(f"<tr{extra}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return "".join(out) + "</tbody></table>"


def _header(db: sqlite3.Connection, files: RunFiles) -> str:
    s, m, sc = files.summary, files.meta, files.scenario
    e = html.escape
    start, end = _span(db, files)
    steps = _q(db, "SELECT COUNT(*) FROM steps")[0][0]
    if s is None:
        banner = ('<div class="banner incomplete">INCOMPLETE: run did not finish (no '
                  "summary.json)</div>")
    elif s.get("passed"):
        banner = '<div class="banner pass">PASS: every expectation met</div>'
    else:
        failed = [x.get("name", "?") for x in s.get("expectations", []) if not x.get("ok")]
        banner = (f'<div class="banner fail">FAIL: {len(failed)} expectation(s) not met '
                  f"({e(', '.join(failed))})</div>")
    wall = (s or {}).get("clock", {}).get("wall_s", m.get("wall_s"))
    mode = (s or {}).get("clock", {}).get("mode", (sc.get("clock") or {}).get("mode"))
    dur = None if start is None or end is None else end - start
    facts = [
        ("scenario", e(str((s or {}).get("scenario", m.get("scenario", sc.get("name", "?")))))
         + (f' <span class="dim">{e(sc["description"])}</span>' if sc.get("description")
            else "")),
        ("run", e(str((s or {}).get("run_id", m.get("run_id", files.run_dir.name))))),
        ("seed", e(str((s or {}).get("seed", m.get("seed", sc.get("seed", "?")))))),
        ("site", e(str((s or {}).get("site", files.site.get("name", "?"))))
         + (f' <span class="dim">{e(files.site["description"])}</span>'
            if files.site.get("description") else "")),
        ("simulated", f"{clock(start)} - {clock(end)} ("
         + ("" if dur is None else f"{dur / 3600:g} h, ") + f"{steps} steps)"),
        ("wall time", "-" if wall is None else f"{float(wall):.1f} s"
         + (f" ({e(str(mode))} clock)" if mode else "")),
    ]
    grid = "".join(f"<div><span class='k'>{k}</span><span class='v'>{v}</span></div>"
                   for k, v in facts)
    notice = ("" if s is not None else '<p class="notice">The run did not finish (no '
              "summary.json): its KPIs and expectation verdicts are computed at the end of a "
              "run. The plots below show everything the store recorded up to the last step "
              f"({e(clock(end))}).</p>")
    return f'{banner}<div class="facts">{grid}</div>{notice}'


def _verdicts(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return '<p class="note">No verdicts: the run did not finish.</p>'
    exp = summary.get("expectations") or []
    if not exp:
        return '<p class="note">The scenario states no expectations.</p>'
    rows = [(f'<span class="tag {"pass" if x.get("ok") else "fail"}">'
             f'{"PASS" if x.get("ok") else "FAIL"}</span>', html.escape(str(x.get("name", ""))),
             html.escape(str(x.get("message", "")))) for x in exp]
    return _table(("verdict", "expectation", "message"), rows, "verdicts",
                  [f'data-expectation="{html.escape(str(x.get("name", "")))}"' for x in exp])


def kpis(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(key, label, value) rows of the KPI table, from summary.json."""
    d, mk = summary.get("deviation", {}), summary.get("market", {})
    g, led, msg = summary.get("grid", {}), summary.get("ledger", {}), summary.get("messages", {})
    rows = [
        ("deviation", "deviation before -> after the market",
         f"{_fmt(d.get('before_kwh'))} -> {_fmt(d.get('after_kwh'))} kWh"),
        ("covered_share", "share of the deviation covered", _fmt(d.get("covered_share"), ".1%")),
        ("requested", "requested / delivered", f"{_fmt(d.get('requested_kwh'))} / "
         f"{_fmt(d.get('delivered_kwh'))} kWh"),
        ("auctions", "auctions held", _fmt(mk.get("auctions"), "d")),
        ("cleared", "auctions cleared", _fmt(mk.get("cleared"), "d")),
        ("traded", "energy traded", f"{_fmt(mk.get('energy_traded_kwh'))} kWh for "
         f"{_fmt(mk.get('value_eur'), '.2f')} EUR"),
        ("prices", "award prices (min / mean / max)", f"{_fmt(mk.get('price_min'))} / "
         f"{_fmt(mk.get('price_mean'))} / {_fmt(mk.get('price_max'))} EUR/kWh"),
    ]
    if g.get("enabled"):
        lights = ", ".join(f"{k} {v}" for k, v in sorted((g.get("lights") or {}).items()))
        rows += [
            ("in_band", "steps inside the hard voltage band", _fmt(g.get("in_band_share"),
                                                                   ".1%")),
            ("voltage", "voltage range", f"{_fmt(g.get('vm_min_pu'), '.4f')} - "
             f"{_fmt(g.get('vm_max_pu'), '.4f')} p.u. (lights: {html.escape(lights)})"),
            ("grid_reclear", "auctions re-cleared / curtailed",
             f"{_fmt(g.get('auctions_re_cleared'), 'd')} / "
             f"{_fmt(mk.get('grid_curtailed_kwh'))} kWh"),
            ("losses", "feeder losses", f"{_fmt(g.get('losses_kwh'))} kWh")]
    else:
        rows.append(("grid", "grid check", "disabled"))
    if led.get("enabled"):
        proposers = ", ".join(f"{k} {v}" for k, v in sorted((led.get("proposers") or {})
                                                             .items()))
        verified = led.get("verified") or {}
        bad = [f"{k}: {v.get('error')}" for k, v in sorted(verified.items()) if not v.get("ok")]
        rows += [
            ("blocks", "ledger blocks", f"{_fmt(led.get('blocks'), 'd')} (proposers: "
             f"{html.escape(proposers) or '-'})"),
            ("ledger_txs", "ledger transactions submitted / uncommitted",
             f"{_fmt(led.get('submitted'), 'd')} / {_fmt(led.get('uncommitted'), 'd')}"),
            ("verified", "ledger stores verified", ("yes" if led.get("verifies") else "NO")
             + f" ({len(verified)} validator stores"
             + (f"; {html.escape('; '.join(bad))}" if bad else "") + ")")]
    else:
        rows.append(("ledger", "ledger", "disabled"))
    rows.append(("messages", "orders received / published", (
        f"{_fmt(msg.get('orders_received'), 'd')} / {_fmt(msg.get('orders_published'), 'd')} "
        f"({_fmt(msg.get('orders_lost_injected'), 'd')} lost by design); refused "
        f"{_fmt(msg.get('refused_by_agents'), 'd')} by agents, "
        f"{_fmt(msg.get('refused_by_ledger'), 'd')} by the ledger; read errors "
        f"{_fmt(msg.get('read_errors'), 'd')}, setpoint errors "
        f"{_fmt(msg.get('setpoint_errors'), 'd')}")))
    for f in summary.get("faults") or []:
        rows.append(("fault", "fault", html.escape(
            f"{f.get('device')} at {clock(f.get('t'))}: {f.get('prosumer')} left the market "
            f"({f.get('orders_after_fault')} orders after); {f.get('reason', '')}")))
    lat = (summary.get("clock") or {}).get("lateness")
    if lat:
        rows.append(("lateness", "clock lateness (p50 / p99 / max)",
                     f"{_fmt(lat.get('p50_ms'), '.2f')} / {_fmt(lat.get('p99_ms'), '.2f')} / "
                     f"{_fmt(lat.get('max_ms'), '.2f')} ms"))
    return rows


def _kpi_html(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return '<p class="note">No KPIs: the run did not finish (no summary.json).</p>'
    rows = kpis(summary)
    table = _table(("KPI", "value"), [(label, value) for _, label, value in rows], "kpis",
                   [f'data-kpi="{key}"' for key, _, _ in rows])
    pros = summary.get("prosumers") or {}
    prow = [(html.escape(name), _fmt(p.get("pv_kwh"), ".2f"), _fmt(p.get("load_kwh"), ".2f"),
             _fmt(p.get("self_consumption"), ".0%"), _fmt(p.get("self_sufficiency"), ".0%"),
             _fmt(p.get("cpf")), _fmt(p.get("traded_kwh")), _fmt(p.get("revenue_eur"), ".2f"),
             '<span class="tag fail">' + clock(p["faulted_at"]) + "</span>"
             if p.get("faulted_at") is not None else "-")
            for name, p in sorted(pros.items())]
    head = ("prosumer", "PV kWh", "load kWh", "self-consumption", "self-sufficiency", "CPF",
            "traded kWh", "revenue EUR", "fault")
    return table + ("<h3>Prosumers</h3>" + _table(head, prow, "prosumers num",
                                                   [f'data-prosumer="{html.escape(n)}"'
                                                    for n in sorted(pros)]) if pros else "")


def _events_html(db: sqlite3.Connection, scenario: dict[str, Any]) -> str:
    e = html.escape
    rows = _q(db, "SELECT t, kind, subject, detail FROM events WHERE kind != 'setpoint' "
                  "ORDER BY t LIMIT ?", (MAX_EVENT_ROWS + 1,))
    n_set = _q(db, "SELECT COUNT(*) FROM events WHERE kind = 'setpoint'")
    planned = [(ev.get("at", 0), f"scenario: {ev.get('kind', '?')}",
                ev.get("device") or ev.get("prosumer") or "",
                scenario_label(ev) + (f" for {ev['duration'] / 60:g} min" if ev.get("duration")
                                      else " until the end of the run"))
               for ev in scenario.get("events") or []]
    more = len(rows) > MAX_EVENT_ROWS
    allrows = sorted(planned + rows[:MAX_EVENT_ROWS], key=lambda r: r[0])
    parts = []
    setpoints = n_set[0][0] if n_set else 0
    if setpoints:
        parts.append(f'<p class="note">{setpoints} battery setpoints were sent (marked in the '
                     "battery plot); not listed here.</p>")
    if not allrows:
        return "".join(parts) + '<p class="note">No faults or other events in this run.</p>'
    cls = {"fault": "fail", "read-failed": "warn", "setpoint-failed": "warn",
           "block-missing": "warn", "message-lost": "warn", "recovered": "pass"}
    table = _table(("time", "event", "subject", "detail"), [
        (clock(t), f'<span class="tag {cls.get(k, "info")}">{e(str(k))}</span>',
         e(str(s or "")), e(str(d))) for t, k, s, d in allrows], "events")
    if more:
        parts.append(f'<p class="note">Only the first {MAX_EVENT_ROWS} events are listed.</p>')
    return "".join(parts) + table


# --------------------------------------------------------------------------- assembly

CSS = """
:root{--fg:#1d2430;--dim:#5b6573;--line:#e3e7ee;--pass:#1e7d32;--fail:#c62828;--warn:#b26a00}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
 color:var(--fg);background:#f5f7fa}
header{background:#1d2430;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:22px;font-weight:600}
header .sub{color:#b8c2d0;font-size:13px}
nav{position:sticky;top:0;z-index:5;background:#fff;border-bottom:1px solid var(--line);
 padding:8px 32px;font-size:13px}
nav a{color:#1f5fa8;text-decoration:none;margin-right:18px}
main{max-width:1280px;margin:0 auto;padding:18px 32px 40px}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:16px 20px;
 margin:0 0 18px}
h2{margin:0 0 10px;font-size:18px}
h3{margin:16px 0 8px;font-size:15px}
.banner{font-size:20px;font-weight:700;padding:12px 18px;border-radius:8px;margin-bottom:14px;
 color:#fff}
.banner.pass{background:var(--pass)}.banner.fail{background:var(--fail)}
.banner.incomplete{background:var(--warn)}
.facts{display:grid;grid-template-columns:repeat(auto-fit,minmax(360px,1fr));gap:6px 24px}
.facts div{display:flex;gap:10px}.facts .k{flex:0 0 80px;color:var(--dim)}
.dim{color:var(--dim)}
.notice{background:#fff4e0;border-left:4px solid var(--warn);padding:8px 12px;margin:12px 0 0}
.note{color:var(--dim);margin:4px 0 8px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:5px 10px;border-bottom:1px solid var(--line);vertical-align:top}
th{background:#f0f3f7;font-weight:600}
table.kpis td:first-child{color:var(--dim);width:34%}
table.prosumers td:not(:first-child),table.prosumers th:not(:first-child){text-align:right}
table.events td:nth-child(-n+3){white-space:nowrap}
table.events td:last-child{word-break:break-word}
.tag{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;
 color:#fff;background:#6b7380}
.tag.pass{background:var(--pass)}.tag.fail{background:var(--fail)}.tag.warn{background:var(--warn)}
.plot{width:100%}
footer{color:var(--dim);font-size:12px;text-align:center;padding:0 0 24px}
"""

PLOT_CONFIG = {"displaylogo": False, "responsive": True,
               "modeBarButtonsToRemove": ["select2d", "lasso2d"]}


def _script_json(obj: Any) -> str:
    """JSON safe inside <script>: no '</script>' or '<!--' can come out of store text."""
    text = obj if isinstance(obj, str) else json.dumps(obj)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def render(db: sqlite3.Connection, files: RunFiles, sections: Sequence[Section]) -> str:
    """The whole HTML page: text parts, one plot div per figure, plotly.js inlined once."""
    e = html.escape
    name = str((files.summary or {}).get("scenario", files.meta.get("scenario",
                                                                    files.run_dir.name)))
    run_id = str(files.meta.get("run_id", files.run_dir.name))
    parts: list[tuple[str, str, str]] = [
        ("summary", "Run", _header(db, files)),
        ("verdicts", "Expectations", _verdicts(files.summary)),
        ("kpis", "Key figures", _kpi_html(files.summary))]
    calls = []
    for sec in sections:
        body = f'<p class="note">{e(sec.note.strip())}</p>' if sec.note.strip() else ""
        if sec.figure is not None:
            div = f"fig-{sec.key}"
            body += f'<div class="plot" id="{div}" data-title="{e(sec.title)}"></div>'
            calls.append(f'Plotly.newPlot("{div}",{_script_json(sec.figure.to_json())},'
                         f"{_script_json(PLOT_CONFIG)});")
        parts.append((sec.key, sec.title, body))
    parts.append(("events", "Events", _events_html(db, files.scenario)))
    nav = "".join(f'<a href="#{k}">{e(t)}</a>' for k, t, _ in parts)
    body = "".join(f'<section id="{k}"><h2>{e(t)}</h2>{b}</section>' for k, t, b in parts)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="testbed {e(__version__)}">'
        f"<title>{e(name)} - {e(run_id)} - testbed run report</title>"
        f"<style>{CSS}</style></head><body>"
        f"<header><h1>Run report: {e(name)}</h1><div class='sub'>{e(run_id)}</div></header>"
        f"<nav>{nav}</nav><main>{body}</main>"
        f"<footer>testbed {e(__version__)} - from {e(str(files.run_dir))}</footer>"
        f"<script>{get_plotlyjs()}</script>"
        f"<script>{''.join(calls)}</script></body></html>\n")


def build_report(run_dir: Path) -> str:
    """The report of RUN_DIR as one self-contained HTML page."""
    db, files = open_run(Path(run_dir))
    try:
        return render(db, files, figures(db, files))
    finally:
        db.close()


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report (default: RUN_DIR/report.html); returns where it went."""
    run_dir = Path(run_dir)
    text = build_report(run_dir)
    path = Path(out) if out is not None else run_dir / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
