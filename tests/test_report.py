"""`testbed report`: the self-contained HTML run report, opened in headless Chromium.

One demo run (module fixture) feeds every test; variants (no summary, empty tables, hostile
text) are copies of it, edited. The browser checks say the page works offline without a
console error and that every plot rendered its traces from the store's numbers.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from testbed.cli import app
from testbed.clock import EPOCH
from testbed.dashboards import report as rep
from testbed.dashboards.report import ReportError, build_report, figures, open_run, write_report
from testbed.scenarios.engine import Run
from testbed.scenarios.model import load_scenario

CHROMIUM = shutil.which("chromium")
PAGE_BG = {(245, 247, 250), (255, 255, 255)}
"""The page's and the sections' background colours."""
PLOTLY_BLUE = (31, 119, 180)
"""#1f77b4: the metered line, V min, house-1's colour."""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    return asyncio.run(Run(load_scenario("demo"), out=out).execute()).run_dir


@pytest.fixture(scope="module")
def summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def sql(run: Path) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(f"file:{run / 'run.db'}?mode=ro", uri=True)
    yield db
    db.close()


def copy_run(run: Path, dest: Path) -> Path:
    """The run's files without its ledger folder (the report does not read it)."""
    dest.mkdir(parents=True)
    for name in ("run.db", "summary.json", "scenario.json", "site.json"):
        shutil.copy(run / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def browser(run: Path) -> Iterator[Any]:
    """Chromium via playwright; after the run: sync playwright keeps an event loop running."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium; CI installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Opened:
    """A report loaded in a page, with what the page complained about or fetched."""

    def __init__(self, browser: Any, path: Path) -> None:
        self.errors: list[str] = []
        self.remote: list[str] = []
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error"
                     else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: None if r.url.startswith(("file:", "data:"))
                     else self.remote.append(r.url))
        self.page.goto(path.as_uri())
        self.page.wait_for_selector(".main-svg")
        self.page.wait_for_function(
            "[...document.querySelectorAll('div.plot')].every(d => d._fullLayout)")

    def trace(self, div: str, name: str) -> dict[str, Any]:
        """x/y of the named trace of a plot, as plotly.js holds them."""
        return self.page.evaluate(
            "([div, name]) => { const t = document.getElementById(div).data"
            ".find(t => t.name === name); return t && {x: Array.from(t.x), "
            "y: Array.from(t.y)}; }", [div, name])


@pytest.fixture(scope="module")
def opened(browser: Any, run: Path) -> Opened:
    return Opened(browser, write_report(run))


def test_report_renders_every_figure_offline_without_errors(opened: Opened, run: Path
                                                            ) -> None:
    db, files = open_run(run)
    n_figures = sum(s.figure is not None for s in figures(db, files))
    db.close()
    assert n_figures == 6
    assert opened.errors == []
    assert opened.remote == []  # nothing fetched: no CDN, fonts or tiles
    page = opened.page
    assert page.locator("div.plot").count() == n_figures
    assert page.locator("div.plot.js-plotly-plot").count() == n_figures
    traces = page.evaluate("[...document.querySelectorAll('div.plot')].map(d => "
                           "d.querySelectorAll('.scatterlayer .trace, .barlayer .trace')"
                           ".length)")
    assert all(n > 0 for n in traces), traces


def test_report_is_one_self_contained_file(run: Path) -> None:
    from plotly.offline import get_plotlyjs

    text = build_report(run)
    assert text.count(get_plotlyjs()) == 1  # inlined once, not per figure
    ours = text.replace(get_plotlyjs(), "")  # the bundle names map tile servers it never asks
    assert "* plotly.js v" not in ours and "<script src" not in ours and "<link" not in ours
    assert "http:" not in ours and "https:" not in ours
    assert ours.count("Plotly.newPlot(") == 6


def test_screenshot_is_not_blank(opened: Opened, tmp_path: Path) -> None:
    from PIL import Image

    png = tmp_path / "report.png"
    opened.page.screenshot(path=str(png), full_page=True)
    img = Image.open(png).convert("RGB")
    w, h = img.size
    assert w >= 1200 and h > 3000  # header, tables and five figures, one under the other
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 500
    counts = {c: n for n, c in colours}
    ink = 1 - sum(counts.get(c, 0) for c in PAGE_BG) / (w * h)
    assert ink > 0.08, f"only {ink:.1%} of the page is not background"
    assert counts.get(PLOTLY_BLUE, 0) > 200, "no plotly trace colour on the page"
    assert counts.get((30, 125, 50), 0) > 1000  # the green PASS banner


def test_report_shows_the_store_and_summary_numbers(opened: Opened, summary: dict[str, Any],
                                                    sql: sqlite3.Connection) -> None:
    page = opened.page

    def kpi(key: str) -> str:
        return page.inner_text(f"[data-kpi={key}] td:last-child").strip()

    assert kpi("covered_share") == f"{summary['deviation']['covered_share']:.1%}"
    assert kpi("cleared") == str(summary["market"]["cleared"])
    assert kpi("blocks").startswith(str(summary["ledger"]["blocks"]))
    text = page.inner_text("body")
    assert "PASS: every expectation met" in text
    for v in summary["expectations"]:
        row = page.inner_text(f"[data-expectation={v['name']}]")
        assert v["message"] in row and ("PASS" if v["ok"] else "FAIL") in row
    for name, p in summary["prosumers"].items():
        assert f"{p['cpf']:.3f}" in page.inner_text(f'[data-prosumer="{name}"]')

    def column(query: str) -> list[float]:
        return [r[0] for r in sql.execute(query)]

    vmin = opened.trace("fig-feeder", "V min")
    assert vmin["y"] == pytest.approx(column("SELECT vm_min_pu FROM feeder ORDER BY t"))
    first = sql.execute("SELECT MIN(t) FROM feeder").fetchone()[0]
    assert vmin["x"][0] == datetime.fromtimestamp(EPOCH + first, UTC).strftime(
        "%Y-%m-%d %H:%M:%S")
    cleared = opened.trace("fig-auctions", "cleared")["y"]
    assert len(cleared) == sql.execute("SELECT COUNT(*) FROM auctions").fetchone()[0]
    assert sum(cleared) == pytest.approx(sum(column("SELECT cleared_kwh FROM auctions")))
    assert opened.trace("fig-auctions", "requested")["y"] == pytest.approx(
        column("SELECT requested_kwh FROM auctions ORDER BY t"))
    residual = opened.trace("fig-schedule", "after market (residual)")["y"]
    assert residual == pytest.approx(column("SELECT residual_kwh FROM intervals "
                                            "ORDER BY interval"))
    soc = opened.trace("fig-batteries", "house-1-battery")["y"]
    assert soc == pytest.approx(column("SELECT value FROM measurements WHERE device = "
                                       "'house-1-battery' AND name = 'soc_pct' ORDER BY t"))
    txs = sum(sum(opened.trace("fig-ledger", p)["y"]) for p in summary["ledger"]["proposers"])
    assert txs == sql.execute("SELECT SUM(txs) FROM blocks").fetchone()[0]


def test_unfinished_run_renders_from_the_store_with_a_notice(run: Path, tmp_path: Path
                                                             ) -> None:
    d = copy_run(run, tmp_path / "killed")
    (d / "summary.json").unlink()
    text = build_report(d)
    assert "run did not finish (no summary.json)" in text
    assert "INCOMPLETE" in text and "PASS: every" not in text
    assert text.count("Plotly.newPlot(") == 6


def test_empty_tables_say_so_instead_of_plotting(run: Path, tmp_path: Path) -> None:
    d = copy_run(run, tmp_path / "bare")
    db = sqlite3.connect(d / "run.db")
    for table in ("auctions", "blocks", "cpf", "feeder", "grid_checks", "events"):
        db.execute(f"DELETE FROM {table}")
    db.commit()
    db.close()
    s = json.loads((d / "summary.json").read_text())
    s["grid"]["enabled"] = s["ledger"]["enabled"] = False
    (d / "summary.json").write_text(json.dumps(s))
    sc = json.loads((d / "scenario.json").read_text())
    (d / "scenario.json").write_text(json.dumps({**sc, "events": []}))
    text = build_report(d)
    assert "No auction was held in this run" in text
    assert "The grid check is disabled for this run" in text
    assert "The ledger is disabled for this run" in text
    assert "No faults or other events in this run" in text
    assert text.count("Plotly.newPlot(") == 3  # schedule, batteries, prosumers


def test_store_text_is_escaped(run: Path, tmp_path: Path) -> None:
    d = copy_run(run, tmp_path / "hostile")
    db = sqlite3.connect(d / "run.db")
    db.execute("INSERT INTO events VALUES (45000, 'fault', '<b>bat</b>', "
               "'</script><script>window.pwned=1</script>')")
    db.commit()
    db.close()
    text = build_report(d)
    assert "<script>window.pwned" not in text and "<b>bat</b>" not in text
    assert "&lt;/script&gt;&lt;script&gt;window.pwned=1" in text  # the events table


def test_long_runs_and_big_fleets_are_aggregated(run: Path, sql: sqlite3.Connection,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rep, "MAX_POINTS", 100)  # the demo's 240 steps now need buckets
    monkeypatch.setattr(rep, "MAX_TRACES", 2)  # and its 3 batteries are a fleet
    db, files = open_run(run)
    sections = {s.key: s for s in figures(db, files)}
    db.close()
    feeder = {t.name: t for t in sections["feeder"].figure.data}
    assert 0 < len(feeder["V min"].y) < 100
    lo, hi = sql.execute("SELECT MIN(vm_min_pu), MAX(vm_max_pu) FROM feeder").fetchone()
    assert min(feeder["V min"].y) == pytest.approx(lo)  # envelopes keep the extremes
    assert max(feeder["V max"].y) == pytest.approx(hi)
    names = [t.name for t in sections["batteries"].figure.data]
    assert "SOC of 3 batteries: mean" in names and "house-1-battery" not in names
    assert "3 batteries: shown as a fleet" in sections["batteries"].note


def test_bad_run_directories_are_clear_errors(run: Path, tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=f"{tmp_path}: not a run directory .*no run.db"):
        build_report(tmp_path)
    with pytest.raises(ReportError, match="no such run directory"):
        build_report(tmp_path / "nope")
    (tmp_path / "run.db").write_text("not sqlite")
    with pytest.raises(ReportError, match="run.db: not a readable run store"):
        build_report(tmp_path)


def test_cli_writes_the_report_and_exits_2_on_a_bad_dir(run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "sub" / "r.html"
    r = runner.invoke(app, ["report", str(run), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert str(out) in r.output.replace("\n", "") and out.stat().st_size > 1_000_000
    assert "<title>demo - " in out.read_text()
    r = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no such run directory" in r.output
    r = runner.invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "no run.db" in r.output
