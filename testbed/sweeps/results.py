"""A sweep's results: one table of every point's overrides and KPIs (Parquet and CSV),
and a self-contained HTML report (plotly.js inlined, like the run report): each KPI's
distribution, each KPI against each swept parameter, links to every run's report.

Everything is read back from the points' folders (summary.json), so the table and the
report can be made again at any time, with other KPIs, without running anything.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from testbed import __version__
from testbed.dashboards.report import CSS, PLOT_CONFIG, _script_json

from .model import Point, Sweep, _tokens
from .runner import completed_run

MAX_AXIS_PLOTS = 6
"""Swept parameters plotted against each KPI (the first ones; the table has them all)."""
MAX_CATEGORIES = 12
"""A swept parameter with at most this many values plots as a box per value."""


def _short(path: str, n: int = 30) -> str:
    return path if len(path) <= n else "…" + path[-(n - 1):]


def kpi_value(summary: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of summary.json (None where it has none); lists and
    mappings are kept as JSON text so the table stays flat."""
    node: Any = summary
    for tok in _tokens(path):
        if tok.startswith("[") and isinstance(node, list):
            sel = tok[1:-1]
            node = node[int(sel)] if sel.isdigit() and int(sel) < len(node) else None
        elif tok.startswith("[") and isinstance(node, dict):  # a key with dots: [house.1]
            node = node.get(tok[1:-1])
        elif isinstance(node, dict):
            node = node.get(tok)
        else:
            node = None
        if node is None:
            return None
    return json.dumps(node, sort_keys=True) if isinstance(node, dict | list) else node


def _cell(v: Any) -> Any:
    return json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v


def sweep_table(sweep: Sweep, points: list[Point], folder: Path) -> pd.DataFrame:
    """One row per point: key, status, its overrides, its KPIs, error, run folder."""
    swept = swept_paths(points)
    rows = []
    for p in points:
        d = folder / "points" / p.key
        run = completed_run(d)
        row: dict[str, Any] = {"point": p.key}
        row.update({k: _cell(p.overrides.get(k)) for k in swept})
        summary: dict[str, Any] = {}
        if run is not None:
            summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
            status, error = "done", ""
        elif (d / "error.txt").exists():
            status = "failed"
            error = (d / "error.txt").read_text(encoding="utf-8", errors="replace").split(
                "\n", 1)[0]
        else:
            status, error = "pending", ""
        row["status"] = status
        row.update({k: kpi_value(summary, k) if summary else None for k in sweep.kpis})
        row["wall_s"] = kpi_value(summary, "clock.wall_s") if summary else None
        row["error"] = error
        row["run_dir"] = str(run.relative_to(folder)) if run is not None else ""
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in df.columns:  # mixed columns (numbers and None are fine) as text for Parquet
        kinds = {type(v) for v in df[col] if v is not None and not (
            isinstance(v, float) and math.isnan(v))}
        if len(kinds - {int, float}) and len(kinds) > 1:
            df[col] = df[col].map(lambda v: None if v is None else str(v))
    return df


def missing_kpis(sweep: Sweep, df: pd.DataFrame) -> list[str]:
    """KPIs that no finished run's summary.json has (a misspelt path, most likely)."""
    done = df[df["status"] == "done"]
    return [k for k in sweep.kpis if len(done) and done[k].isna().all()]


def swept_paths(points: list[Point]) -> list[str]:
    """Override paths, in first-seen order (those constant over all points included)."""
    out: dict[str, None] = {}
    for p in points:
        out.update(dict.fromkeys(p.overrides))
    return list(out)


def varied_paths(points: list[Point]) -> list[str]:
    return [k for k in swept_paths(points)
            if len({json.dumps(p.overrides.get(k), sort_keys=True, default=str)
                    for p in points}) > 1]


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values if
               v is not None)


def kpi_figure(df: pd.DataFrame, kpi: str, params: list[str]) -> go.Figure | None:
    """The KPI's distribution, then the KPI against each swept parameter."""
    done = df[df["status"] == "done"]
    ys = list(done[kpi])
    if not ys or all(v is None for v in ys):
        return None
    if all(isinstance(v, bool) for v in ys if v is not None):
        ys = [None if v is None else int(v) for v in ys]
    if not _numeric(ys):
        return None
    params = params[:MAX_AXIS_PLOTS]
    fig = make_subplots(rows=1, cols=1 + len(params), shared_yaxes=True,
                        subplot_titles=["distribution", *map(_short, params)],
                        horizontal_spacing=0.04)
    fig.add_trace(go.Histogram(y=ys, name=kpi, marker_color="#1f77b4", showlegend=False,
                               nbinsy=min(30, max(5, len(ys)))), row=1, col=1)
    links = list(done["run_dir"].map(lambda r: f"{r}/report.html" if r else ""))
    hover = list(done["point"])
    for c, param in enumerate(params, start=2):
        xs = list(done[param])
        values = sorted({x for x in xs if x is not None}, key=lambda v: (str(type(v)), v))
        common = {"y": ys, "customdata": links, "text": hover, "showlegend": False,
                  "name": param, "marker_color": "#ff7f0e",
                  "hovertemplate": f"{param}=%{{x}}<br>{kpi}=%{{y}}<br>point %{{text}}"
                                   "<extra></extra>"}
        if _numeric(xs) and len(values) > MAX_CATEGORIES:  # a scatter over a number line
            fig.add_trace(go.Scatter(x=xs, mode="markers", **common), row=1, col=c)
        else:  # a box per value, every point shown
            fig.add_trace(go.Box(x=[str(x) for x in xs], boxpoints="all", jitter=0.3,
                                 pointpos=0, **common), row=1, col=c)
            fig.update_xaxes(type="category", categoryorder="array",
                             categoryarray=[str(v) for v in values], row=1, col=c)
    fig.update_yaxes(title_text=kpi, row=1, col=1)
    fig.update_layout(template="plotly_white", height=340, margin={"l": 60, "r": 20,
                                                                   "t": 40, "b": 40})
    return fig


def _table_html(df: pd.DataFrame) -> str:
    e = html.escape
    head = "".join(f'<th title="{e(str(c))}">{e(_short(str(c), 24))}</th>'
                   for c in df.columns if c != "run_dir")
    body = []
    for _, row in df.iterrows():
        cells = []
        for c in df.columns:
            if c == "run_dir":
                continue
            v = row[c]
            text = "" if v is None or (isinstance(v, float) and math.isnan(v)) else (
                f"{v:.4g}" if isinstance(v, float) else str(v))
            if c == "point" and row["run_dir"]:
                text = f'<a href="{e(str(row["run_dir"]))}/report.html">{e(text)}</a>'
            else:
                text = e(text)
            cells.append(f"<td>{text}</td>")
        body.append(f"<tr class='{e(str(row['status']))}'>{''.join(cells)}</tr>")
    return (f"<div class='tablewrap'><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


CLICK_JS = ("document.querySelectorAll('.plot').forEach(function(d){d.on('plotly_click',"
            "function(ev){var p=ev.points[0];if(p&&p.customdata){window.open(p.customdata);}});"
            "});")


def render_report(sweep: Sweep, points: list[Point], df: pd.DataFrame) -> str:
    e = html.escape
    params = varied_paths(points)
    n_done = int((df["status"] == "done").sum())
    n_failed = int((df["status"] == "failed").sum())
    head = (f"<p>{e(sweep.description)}</p>" if sweep.description else "") + (
        f"<p>{len(points)} points: {n_done} done, {n_failed} failed, "
        f"{len(points) - n_done - n_failed} pending. Base scenario: {e(sweep.base)}. "
        f"Swept: {e(', '.join(params) or 'nothing')}. Click a point to open its run's "
        "report; the table links them too.</p>")
    sections = [("overview", "Sweep", head)]
    calls = []
    for i, kpi in enumerate(sweep.kpis):
        fig = kpi_figure(df, kpi, params)
        if fig is None:
            sections.append((f"kpi{i}", kpi, "<p class='note'>No numeric values.</p>"))
            continue
        div = f"fig-kpi{i}"
        sections.append((f"kpi{i}", kpi, f'<div class="plot" id="{div}"></div>'))
        calls.append(f'Plotly.newPlot("{div}",{_script_json(fig.to_json())},'
                     f"{_script_json(PLOT_CONFIG)});")
    sections.append(("points", "Points", _table_html(df)))
    nav = "".join(f'<a href="#{k}">{e(t)}</a>' for k, t, _ in sections)
    body = "".join(f'<section id="{k}"><h2>{e(t)}</h2>{b}</section>' for k, t, b in sections)
    css = CSS + ("table{font-size:12px}.tablewrap{overflow-x:auto}tr.failed td{color:#d62728}"
                 "tr.pending td{color:#7f7f7f}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta name="generator" content="testbed {e(__version__)}">'
            f"<title>{e(sweep.name)} - testbed sweep report</title>"
            f"<style>{css}</style></head><body>"
            f"<header><h1>Sweep report: {e(sweep.name)}</h1>"
            f"<div class='sub'>{e(sweep.source)}</div></header>"
            f"<nav>{nav}</nav><main>{body}</main>"
            f"<footer>testbed {e(__version__)}</footer>"
            f"<script>{get_plotlyjs()}</script>"
            f"<script>{''.join(calls)}{CLICK_JS}</script></body></html>\n")


def write_results(sweep: Sweep, points: list[Point], folder: Path) -> dict[str, Path]:
    """results.parquet, results.csv and report.html in the sweep's folder."""
    from testbed.dashboards.report import write_report

    for p in points:  # a sweep killed between a run's summary and its report
        run = completed_run(folder / "points" / p.key)
        if sweep.report and run is not None and not (run / "report.html").exists():
            write_report(run)
    df = sweep_table(sweep, points, folder)
    out = {"parquet": folder / "results.parquet", "csv": folder / "results.csv",
           "report": folder / "report.html"}
    df.to_parquet(out["parquet"], index=False)
    df.to_csv(out["csv"], index=False)
    out["report"].write_text(render_report(sweep, points, df), encoding="utf-8")
    return out
