"""The InfluxDB sink against a real server: VictoriaMetrics (Debian `victoria-metrics`),
which serves InfluxDB's `/api/v2/write`, started on a loopback port by the tests.

Points are read back through VictoriaMetrics' export API (`<measurement>_<field>` series)
and compared with the run store, row by row."""

from __future__ import annotations

import json
import math
import os
import random
import re
import sqlite3
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from typer.testing import CliRunner

from testbed.cli import app
from testbed.config import InfluxConfig
from testbed.dashboards.grafana import run_link
from testbed.scenarios.engine import Run
from testbed.scenarios.model import load_scenario
from testbed.telemetry.influx import (
    AckLog,
    VictoriaReader,
    backfill,
    count_points,
    gaps,
    head_of,
    missing,
    split_line,
    target_key,
)
from testbed.telemetry.schema import MEASUREMENTS, TABLES, last_rowid, line
from testbed.telemetry.store import RunStore, dump, set_delivered
from testbed.telemetry.victoria import VictoriaMetrics, find_victoria_metrics

pytestmark = pytest.mark.skipif(
    find_victoria_metrics() is None,
    reason="victoria-metrics not installed (apt-get install victoria-metrics); .ci/run "
           "installs it")

runner = CliRunner()


@pytest.fixture
def vm(tmp_path: Path):
    with VictoriaMetrics(tmp_path / "vm") as server:
        yield server


def quick(url: str) -> InfluxConfig:
    """A sink that gives up on a dead server quickly (the defaults are for real labs)."""
    return InfluxConfig(url=url, flush_s=0.2, retries=1, retry_interval_s=0.05,
                        max_retry_delay_s=0.1, probe_s=0.5, timeout_s=2.0)


def run_demo(out: Path, influx: InfluxConfig | None, **kw) -> tuple[Path, dict]:
    import asyncio
    res = asyncio.run(Run(load_scenario("demo"), out=out, influx=influx, report=False,
                          **kw).execute())
    return res.run_dir, res.summary


def series(server: VictoriaMetrics, run: str) -> dict[tuple[str, frozenset], dict[int, float]]:
    """(metric, labels other than run) -> {timestamp ms: value} for one run."""
    out: dict[tuple[str, frozenset], dict[int, float]] = {}
    for s in server.export(f'{{run="{run}"}}'):
        labels = dict(s["metric"])
        name = labels.pop("__name__")
        labels.pop("run")
        ts = dict(zip(s["timestamps"], s["values"], strict=True))
        assert len(ts) == len(s["timestamps"]), f"{name} has two samples at one time"
        out[(name, frozenset(labels.items()))] = ts
    return out


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)  # VictoriaMetrics keeps 12 digits


def assert_server_equals_store(server: VictoriaMetrics, run_dir: Path) -> int:
    """Every row of the store is on the server with its values and time, and the server
    holds nothing else for the run. Returns the number of samples compared."""
    db = sqlite3.connect(run_dir / "run.db")
    db.row_factory = sqlite3.Row
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    run, origin, start = meta["run_id"], int(meta["time_origin_ms"]), float(meta["sim_start_s"])

    def ts(t: float) -> int:
        return origin + round((t - start) * 1000)

    want: dict[tuple[str, frozenset], dict[int, float]] = defaultdict(dict)
    for r in db.execute("SELECT * FROM measurements"):
        key = (f"reading_{r['name']}", frozenset({"prosumer": r["prosumer"], "device": r["device"],
                                                  "kind": r["kind"]}.items()))
        want[key][ts(r["t"])] = r["value"]
    for r in db.execute("SELECT * FROM feeder"):
        for f in ("vm_min_pu", "vm_max_pu", "max_line_pct", "max_trafo_pct", "losses_w",
                  "import_w"):
            want[(f"feeder_{f}", frozenset())][ts(r["t"])] = r[f]
        want[("feeder_light", frozenset())][ts(r["t"])] = {"green": 0, "amber": 1, "red": 2}[
            r["light"]]
        want[("feeder_limit_vm_max_pu", frozenset())][ts(r["t"])] = 1.10
    for r in db.execute("SELECT * FROM intervals"):
        for f in MEASUREMENTS["interval"].fields:
            want[(f"interval_{f}", frozenset())][ts(r["start"])] = r[f]
    for r in db.execute("SELECT * FROM auctions"):
        tags = frozenset({"side": r["side"], "outcome": r["outcome"]}.items())
        for f in ("requested_kwh", "cleared_kwh", "orders", "grid_passed"):
            want[(f"auction_{f}", tags)][ts(r["t"])] = r[f]
    for r in db.execute("SELECT * FROM cpf"):
        want[("cpf_cpf", frozenset({"prosumer": r["prosumer"]}.items()))][ts(r["t"])] = r["cpf"]
    for r in db.execute("SELECT * FROM blocks"):
        tags = frozenset({"proposer": r["proposer_name"]}.items())
        want[("block_txs", tags)][ts(r["t"])] = r["txs"]
        want[("block_cpf", tags)][ts(r["t"])] = json.loads(r["cpf"])["cpf"]
    for r in db.execute("SELECT * FROM awards"):
        tags = frozenset({"prosumer": r["prosumer"], "side": r["side"]}.items())
        want[("award_energy_kwh", tags)][ts(r["t"])] = r["energy_kwh"]
    for r in db.execute("SELECT * FROM steps"):
        want[("clock_step", frozenset())][ts(r["t"])] = r["step"]
    counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
              for t in ("orders", "settlements", "grid_checks", "events")}
    db.close()

    got = series(server, run)
    n = 0
    for key, points in want.items():
        assert key in got, f"{key} not on the server"
        assert set(got[key]) == set(points), f"{key}: timestamps differ"
        bad = [t for t, v in points.items() if not close(got[key][t], v)]
        assert not bad, f"{key}: values differ at {bad[:3]}"
        n += len(points)
    # Whole tables: one sample per row for a field every row has.
    for metric, table in (("order_energy_kwh", "orders"), ("settlement_awarded_kwh",
                          "settlements"), ("grid_check_violations", "grid_checks"),
                          ("event_count", "events")):
        on_server = sum(len(v) for (name, _), v in got.items() if name == metric)
        assert on_server == counts[table], f"{metric}: {on_server} samples, {counts[table]} rows"
    # Nothing on the server that the schema does not define.
    fields = {f"{m.name}_{f}" for m in MEASUREMENTS.values() for f in m.fields}
    assert {name for name, _ in got} <= fields
    return n


def test_a_run_mirrored_live_equals_its_run_store(vm: VictoriaMetrics, tmp_path: Path) -> None:
    run_dir, summary = run_demo(tmp_path / "runs", quick(vm.url))
    tel = summary["telemetry"]
    assert tel["pending_points"] == 0 and tel["failed_batches"] == 0 and not tel["errors"]
    assert tel["points"] > 2500  # 9 devices x 240 steps, feeder, clock, market, ledger
    n = assert_server_equals_store(vm, run_dir)
    assert n > 10_000
    # Everything was acknowledged: a backfill has nothing to do.
    again = backfill(run_dir, quick(vm.url))
    assert again.points == 0 and again.tables == {}
    # The dashboard link picks the run and spans exactly its points (plus the margin).
    link = urlsplit(run_link(run_dir, "http://grafana.lab:3000/"))
    assert (link.scheme, link.netloc, link.path) == ("http", "grafana.lab:3000",
                                                     "/d/testbed-run/testbed-run")
    q = {k: v for k, (v,) in parse_qs(link.query).items()}
    assert q["var-run"] == summary["run_id"]
    stamps = [t for s in vm.export(f'{{run="{summary["run_id"]}"}}') for t in s["timestamps"]]
    assert int(q["from"]) == min(stamps) - 60_000
    events = sqlite3.connect(run_dir / "run.db").execute("SELECT count(*) FROM events")
    assert 0 <= int(q["to"]) - 60_000 - max(stamps) <= events.fetchone()[0]  # 1 ms spreads


def test_server_stopped_mid_run_then_backfill_makes_it_whole(vm: VictoriaMetrics,
                                                            tmp_path: Path) -> None:
    stopped: list[int] = []

    def kill_at(k: int, n: int, info: dict) -> None:
        if k >= 80 and not stopped:
            # mid-run, once the server holds some of it (a fast run reaches step 80 before
            # the sink's first write): bounded, the run waits here at most 20 s
            deadline = time.monotonic() + 20
            while not vm.export() and time.monotonic() < deadline:
                time.sleep(0.05)
            vm.stop()
            stopped.append(k)

    run_dir, summary = run_demo(tmp_path / "runs", quick(vm.url), progress=kill_at)
    assert stopped and summary["steps"] == 240  # the run went on to its end
    tel = summary["telemetry"]
    assert tel["points"] > 0, "some points were written before the server stopped"
    assert tel["pending_points"] > 0 and tel["failed_batches"] >= 1
    # the first failure may be a write cut mid-request (reset) or one refused; then refused
    assert all(vm.url in e for e in tel["errors"])
    assert any("refused" in e.lower() for e in tel["errors"]), tel["errors"]

    vm.start()
    before = sum(len(v) for v in series(vm, summary_run(run_dir)).values())
    res = runner.invoke(app, ["telemetry", "backfill", str(run_dir)])  # target from the run
    assert res.exit_code == 0, res.output
    assert f"wrote {tel['pending_points']} points" in res.output
    assert_server_equals_store(vm, run_dir)
    after = sum(len(v) for v in series(vm, summary_run(run_dir)).values())
    assert after > before

    res = runner.invoke(app, ["telemetry", "backfill", str(run_dir)])
    assert res.exit_code == 0 and "wrote 0 points" in res.output and "nothing was missing" \
        in res.output
    assert sum(len(v) for v in series(vm, summary_run(run_dir)).values()) == after

    # --all writes every point again; the server still holds each once.
    res = runner.invoke(app, ["telemetry", "backfill", str(run_dir), "--all"])
    assert res.exit_code == 0, res.output
    assert sum(len(v) for v in series(vm, summary_run(run_dir)).values()) == after
    # The API: every point again, progress counted in run-store rowids up to the last
    # (an interval row is replaced, with a new rowid, when its cover is known).
    every = backfill(run_dir, quick(vm.url), rewrite=True, dry_run=True)
    seen: list[tuple[int, int]] = []
    again = backfill(run_dir, quick(vm.url), rewrite=True,
                     progress=lambda done, total: seen.append((done, total)))
    db = sqlite3.connect(run_dir / "run.db")
    rows = sum(db.execute(f"SELECT max(rowid) FROM {t}").fetchone()[0] or 0 for t in
               {m.table for m in MEASUREMENTS.values()})
    assert again.tables == every.tables and again.points == sum(every.tables.values())
    assert seen[-1] == (rows, rows) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def summary_run(run_dir: Path) -> str:
    return json.loads((run_dir / "summary.json").read_text())["run_id"]


def test_a_dead_server_never_stops_a_run_and_backfill_names_it(tmp_path: Path) -> None:
    dead = quick("http://127.0.0.1:9")  # discard port: nothing listens
    run_dir, summary = run_demo(tmp_path / "runs", dead)
    assert summary["passed"] and summary["steps"] == 240
    tel = summary["telemetry"]
    assert tel["points"] == 0 and tel["pending_points"] > 2500
    # Every point is still owed: the dry run counts them per measurement.
    res = runner.invoke(app, ["telemetry", "backfill", str(run_dir), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert f"{tel['pending_points']} points not acknowledged by http://127.0.0.1:9" in res.output
    res = runner.invoke(app, ["telemetry", "backfill", str(run_dir)])
    assert res.exit_code == 2 and "http://127.0.0.1:9" in res.output
    # Not a run directory: says which path and what is missing.
    res = runner.invoke(app, ["telemetry", "backfill", str(tmp_path)])
    assert res.exit_code == 2 and "no run store (run.db)" in res.output


def test_run_store_carries_summary_run_id_and_cli_flags(vm: VictoriaMetrics, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRAFANA_URL", raising=False)
    out = tmp_path / "runs"
    res = runner.invoke(app, ["run", "demo", "--out", str(out), "-q", "--no-report",
                              "--influx-url", vm.url, "--influx-bucket", "lab"])
    assert res.exit_code == 0, res.output
    (run_dir,) = out.iterdir()
    assert "telemetry:" in res.output and vm.url in res.output
    assert "dashboard: http://localhost:3000/d/testbed-run/testbed-run?var-run=" in res.output
    res = runner.invoke(app, ["dashboards", "link", str(run_dir)],
                        env={"GRAFANA_URL": "https://grafana.example:3443"})
    assert res.exit_code == 0 and res.output.startswith(
        f"https://grafana.example:3443/d/testbed-run/testbed-run?var-run={run_dir.name}&from=")
    res = runner.invoke(app, ["dashboards", "link", str(run_dir), "--grafana-url", "grafana"])
    assert res.exit_code == 2 and "expected http(s)://host[:port]" in res.output
    db = sqlite3.connect(run_dir / "run.db")
    (cfg,) = db.execute("SELECT value FROM meta WHERE key = 'influx'").fetchone()
    assert json.loads(cfg)["bucket"] == "lab" and "token" not in json.loads(cfg)  # only its env
    acks = AckLog(run_dir / "telemetry.db")
    assert missing(db, acks, target_key(InfluxConfig(url=vm.url, bucket="lab"))) == {}
    # Another bucket has acknowledged nothing: all of it is missing there.
    assert len(missing(db, acks, target_key(InfluxConfig(url=vm.url)))) == len(MEASUREMENTS)


def test_gaps_and_line_protocol() -> None:
    assert gaps([], 10) == [(0, 10)]
    assert gaps([(0, 4), (6, 10)], 10) == [(4, 6)]
    assert gaps([(0, 12)], 10) == []
    assert gaps([(2, 3)], 5) == [(0, 2), (3, 5)]
    # Tag values are escaped; NaN and None fields are left out; no field, no point.
    assert line("reading", {"run": "a b", "device": "pv,1"}, {"p_w": 1, "x": None,
                "y": float("nan")}, 5) == r"reading,device=pv\,1,run=a\ b p_w=1.0 5"
    assert line("reading", {"run": "r"}, {"x": None}, 5) is None


def test_site_file_names_the_target_and_bad_ones_say_where(tmp_path: Path) -> None:
    from testbed.config import ConfigError, bundled_path, load_site

    text = bundled_path("demo").read_text()
    good = tmp_path / "site.yaml"
    good.write_text(text + "telemetry:\n  influx: {url: 'http://influx.lab:8086', "
                    "bucket: runs, token_env: LAB_TOKEN}\n")
    cfg = load_site(good).telemetry.influx
    assert (cfg.url, cfg.org, cfg.bucket, cfg.token_env) == ("http://influx.lab:8086",
                                                             "testbed", "runs", "LAB_TOKEN")
    # A run of a scenario on that site mirrors to it unless flags say otherwise.
    sc = load_scenario("demo").model_copy(update={"site": str(good)})
    assert Run(sc, out=tmp_path).influx == cfg
    other = InfluxConfig(url="http://127.0.0.1:1")
    assert Run(sc, out=tmp_path, influx=other).influx == other
    bad = tmp_path / "bad.yaml"
    bad.write_text(text + "telemetry:\n  influx:\n    url: influx.lab\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: telemetry.influx.url: String should "
                                          r"match pattern"):
        load_site(bad)
    bad.write_text(text + "telemetry:\n  influx:\n    url: http://x\n    token: s3cret\n")
    with pytest.raises(ConfigError, match=r"telemetry.influx.token: Extra inputs"):
        load_site(bad)  # a token does not belong in a site file: token_env names it


KILL_TRIALS = int(os.environ.get("TESTBED_KILL_TRIALS", "3"))
"""SIGKILL trials (the issue's acceptance runs 10: TESTBED_KILL_TRIALS=10)."""


def test_server_killed_at_random_moments_ends_up_holding_every_point_once(
        tmp_path: Path) -> None:
    """VictoriaMetrics SIGKILLed mid-run (it loses what it acknowledged in its last
    second or so) and restarted on the same data folder, at random steps, sometimes only
    after the run: after the run and at most one backfill the server holds every point
    of the store exactly once, and a second backfill writes nothing."""
    rng = random.Random(18)
    repaired = 0
    for trial in range(KILL_TRIALS):
        vm = VictoriaMetrics(tmp_path / f"vm-{trial}").start()
        kill_at = rng.randrange(20, 230)
        back_at = rng.choice([kill_at, kill_at + 3, kill_at + 40, None])  # None: after the run
        events: list[str] = []

        def chaos(k: int, n: int, info: dict, vm=vm, kill_at=kill_at, back_at=back_at,
                  events=events) -> None:
            if k == kill_at:
                vm.kill()
                events.append(f"killed at step {k}")
            if k == back_at and vm.proc is None:
                vm.start()
                events.append(f"restarted at step {k}")

        try:
            run_dir, summary = run_demo(tmp_path / f"runs-{trial}", quick(vm.url),
                                        progress=chaos)
            assert events and events[0] == f"killed at step {kill_at}"
            tel = summary["telemetry"]
            if vm.proc is None:  # still down when the run ended: it could not verify
                assert not tel["verified"]
                vm.start()
            else:
                assert tel["verified"] and tel["pending_points"] == 0, tel
            repaired += tel["rewritten"]
            res = runner.invoke(app, ["telemetry", "backfill", str(run_dir)])
            assert res.exit_code == 0, res.output
            wrote = int(re.search(r"wrote (\d+) points", res.output).group(1))
            repaired += wrote
            if tel["verified"]:
                assert wrote == 0, f"trial {trial} ({events}): the run's verification " \
                    f"left {wrote} points missing: {tel}\n{res.output}"
            assert_server_equals_store(vm, run_dir)  # every point, each once
            res = runner.invoke(app, ["telemetry", "backfill", str(run_dir)])
            assert res.exit_code == 0 and "wrote 0 points" in res.output, res.output
            store = sqlite3.connect(run_dir / "run.db")
            n_store = sum(count_points(store, t, [(0, last_rowid(store, t))]) for t in TABLES)
            assert f"the server holds {n_store} of the run store's {n_store} points" \
                in res.output, res.output
        finally:
            vm.stop()
    # Points acknowledged and then lost in the kills were found and written again.
    assert repaired > 0


def test_backfill_reports_what_the_server_and_the_store_hold(vm: VictoriaMetrics,
                                                              tmp_path: Path) -> None:
    run_dir, summary = run_demo(tmp_path / "runs", None)  # no sink: the server has nothing
    cfg = quick(vm.url)
    dry = backfill(run_dir, cfg, dry_run=True)
    assert dry.api == VictoriaReader.api and dry.points == 0
    assert sum(dry.held.values()) == 0 and dry.tables == {t: n for t, n in dry.store.items() if n}
    first = backfill(run_dir, cfg)
    assert first.points == sum(dry.store.values()) and first.held == dry.held
    # Delete some series on the server: exactly those points are written again.
    match = f'{{__name__="clock_step",run="{summary["run_id"]}"}}'
    urllib.request.urlopen(f"{vm.url}/internal/force_flush").close()  # then delete all of it
    urllib.request.urlopen(f"{vm.url}/api/v1/admin/tsdb/delete_series?"
                           + urllib.parse.urlencode({"match[]": match})).close()
    again = backfill(run_dir, cfg)
    assert again.tables == {"steps": summary["steps"]}
    assert again.held["steps"] == 0 and again.held["measurements"] == first.store["measurements"]
    assert_server_equals_store(vm, run_dir)
    assert backfill(run_dir, cfg).points == 0


def test_split_line_reads_back_what_line_writes() -> None:
    ln = line("grid_check", {"run": "r 1", "round": 2, "x": ""}, {"light": 0, "vm_min_pu": 0.98},
              1234)
    assert split_line(ln) == (head_of("grid_check", {"run": "r 1", "round": "2"}),
                              ["light", "vm_min_pu"], 1234)
    assert head_of("reading", {"run": "a,b", "device": "d=1"}) == r"reading,device=d\=1,run=a\,b"


def test_victoriametrics_runs_with_deduplication_everywhere_we_start_it() -> None:
    """A point written twice must be stored once: the lab stack and the tests' server."""
    import yaml

    lab = Path(__file__).parent.parent / "lab" / "docker-compose.yml"
    vm_service = yaml.safe_load(lab.read_text())["services"]["victoriametrics"]
    assert "-dedup.minScrapeInterval=1ms" in vm_service["command"]
    import inspect

    from testbed.telemetry import victoria
    assert '"-dedup.minScrapeInterval=1ms"' in inspect.getsource(victoria.VictoriaMetrics.start)


def _fill(store: RunStore) -> None:
    store.put_meta("run_id", "x")
    for step in range(1, 40):
        store.insert_many("measurements", ("t", "device", "prosumer", "kind", "name", "value"),
                          ((60.0 * step, f"d{i}", f"p{i}", "pv", "p_w", step * 0.5 + i)
                           for i in range(30)))
        store.insert("steps", {"step": step, "t": 60.0 * step, "late_ms": None, "wall": 0.0})
        store.event(60.0 * step, "setpoint", "d1", f"{step} W")
        if step == 20:
            store.insert("awards", {"t": 1.0, "request_id": "r", "order_id": "o",
                                    "prosumer": "p1", "side": "sell", "energy_kwh": 1.0,
                                    "price": 0.1, "amount_eur": 0.1, "delivery": 2,
                                    "delivered_kwh": None})
        if step == 30:
            set_delivered(store, "r", "o", 0.75)
        store.commit()


def test_run_store_with_a_writer_thread_holds_what_a_direct_one_holds(tmp_path: Path) -> None:
    """A real-time run writes its store from a thread of its own: same rows, same order
    of writes (the update lands on the award inserted before it), readable after
    `flush`."""
    direct, threaded = RunStore(tmp_path / "a.db"), RunStore(tmp_path / "b.db", writer=True)
    _fill(direct)
    _fill(threaded)
    assert threaded.db.execute("SELECT COUNT(*) FROM measurements").fetchone()[0] == 39 * 30
    direct.close()
    threaded.close()
    rows = list(dump(tmp_path / "b.db"))
    assert rows == list(dump(tmp_path / "a.db")) and len(rows) > 39 * 30
    assert ("awards", (1.0, "r", "o", "p1", "sell", 1.0, 0.1, 0.1, 2, 0.75)) in rows


def test_a_failed_write_in_the_writer_thread_is_raised_to_the_run(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run.db", writer=True)
    store.insert("no_such_table", {"t": 1.0})
    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        store.flush()
    store.insert("steps", {"step": 1, "t": 60.0, "late_ms": None, "wall": 0.0})
    store.close()
    assert [r for r in dump(tmp_path / "run.db") if r[0] == "steps"] == [("steps", (1, 60.0))]


def _plan(path: Path) -> str:
    db = RunStore.open_readonly(path)
    try:
        return " ".join(str(tuple(r)) for r in db.execute(
            "EXPLAIN QUERY PLAN SELECT t, value FROM measurements WHERE device = 'd3' "
            "AND name = 'p_w' ORDER BY t"))
    finally:
        db.close()


@pytest.mark.parametrize("writer", [False, True])
def test_the_by_device_index_is_built_by_its_first_reader(tmp_path: Path, writer: bool) -> None:
    """A run store closes without the (device, name, t) index; `ensure_indexes` (the
    report's open) builds it once, changing no row; a read-only store keeps scanning."""
    store = RunStore(tmp_path / "run.db", writer=writer)
    _fill(store)
    store.put_meta("passed", "true")
    store.close()
    before = list(dump(tmp_path / "run.db"))
    assert "measurements_by_device" not in _plan(tmp_path / "run.db")
    assert RunStore.ensure_indexes(tmp_path / "run.db") is True
    assert "measurements_by_device" in _plan(tmp_path / "run.db")
    assert RunStore.ensure_indexes(tmp_path / "run.db") is True  # already there: nothing to do
    assert list(dump(tmp_path / "run.db")) == before
    assert RunStore.ensure_indexes(tmp_path / "missing.db") is False
    assert not (tmp_path / "missing.db").exists()


def test_the_report_builds_the_by_device_index(tmp_path: Path) -> None:
    """Opening a run for its report leaves the store indexed (the run itself does not)."""
    from testbed.dashboards.report import open_run
    store = RunStore(tmp_path / "run.db")
    _fill(store)
    store.close()
    assert "measurements_by_device" not in _plan(tmp_path / "run.db")
    db, _ = open_run(tmp_path)
    db.close()
    assert "measurements_by_device" in _plan(tmp_path / "run.db")


@pytest.mark.parametrize("n", [0, 1, 7, 1024, 1300, 2600])
def test_insert_many_writes_the_rows_in_order_as_executemany_would(tmp_path: Path,
                                                                   n: int) -> None:
    cols = ("t", "device", "prosumer", "kind", "name", "value")
    rows = [(60.0 * (i // 13), f"d{i % 13}", f"p{i % 5}", "meter", f"v{i % 3}",
             i * 0.25 - 7.0) for i in range(n)]
    store = RunStore(tmp_path / "run.db")
    store.insert_many("measurements", cols, iter(rows))
    store.insert_many("measurements", cols, rows[:3])
    store.commit()
    got = store.db.execute("SELECT rowid, * FROM measurements ORDER BY rowid").fetchall()
    assert got == [(i + 1, *r) for i, r in enumerate(rows + rows[:3])]
    with pytest.raises(ValueError, match=r"measurements: a row of 5 values for 6 columns"):
        store.insert_many("measurements", cols, [rows[0], rows[0][:5]] if rows else
                          [(1.0, "d", "p", "k", "n")])
    store.close()
