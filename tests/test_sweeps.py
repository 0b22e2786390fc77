"""Scenario sweeps on real Dask processes (LocalCluster, and a separately started
`dask scheduler` and `dask worker` on loopback), against runs made without the sweep."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from testbed.bus.broker import free_port
from testbed.cli import app
from testbed.scenarios.engine import Run
from testbed.scenarios.model import load_scenario
from testbed.sweeps import load_sweep, plan, run_sweep, write_results
from testbed.sweeps.runner import completed_run

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
BIN = Path(sys.executable).parent
VOLATILE = ("run_id", "clock")
"""Summary fields that differ between two identical runs (id, wall-clock timings)."""

DEMO_16 = """\
name: demo-16
description: 4 seeds x 2 pricings x 2 thresholds
base: demo
set: {duration: 1h}
grid:
  seed: [1, 2, 3, 4]
  market.pricing: [pay_as_bid, pay_as_clear]
  market.threshold_kwh: [0.2, 1.0]
report: false
kpis: [deviation.covered_share, deviation.after_kwh, market.cleared,
       market.energy_traded_kwh, market.value_eur, market.price_mean, ledger.blocks,
       grid.vm_min_pu, prosumers.house-1.revenue_eur, passed]
"""


def _stable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in VOLATILE}


@pytest.mark.timeout(600)
def test_16_point_sweep_equals_16_separate_runs(tmp_path):
    (tmp_path / "demo16.yaml").write_text(DEMO_16)
    sweep = load_sweep(tmp_path / "demo16.yaml")
    points = plan(sweep)
    assert len(points) == 16 and len({p.key for p in points}) == 16
    res = run_sweep(sweep, points, tmp_path / "out", workers=2)
    assert res.count("done") == 16 and res.workers == 2
    files = write_results(sweep, points, res.folder)
    table = pd.read_parquet(files["parquet"])
    assert table.equals(pd.read_parquet(files["parquet"]))  # readable, and stable
    assert len(table) == 16 and set(table["status"]) == {"done"}

    # the same overrides, applied by hand to the scenario model, run one by one
    base = load_scenario("demo")
    separate = {}
    for seed in (1, 2, 3, 4):
        for pricing in ("pay_as_bid", "pay_as_clear"):
            for thr in (0.2, 1.0):
                sc = base.model_copy(update={
                    "duration": 3600.0, "seed": seed,
                    "market": base.market.model_copy(update={"pricing": pricing,
                                                             "threshold_kwh": thr})})
                r = asyncio.run(Run(sc, out=tmp_path / "separate", report=False).execute())
                separate[(seed, pricing, thr)] = json.loads(json.dumps(r.summary))
    assert len(separate) == 16
    kpis = sweep.kpis
    for _, row in table.iterrows():
        want = separate[(row["seed"], row["market.pricing"], row["market.threshold_kwh"])]
        got = json.loads((res.folder / row["run_dir"] / "summary.json").read_text())
        assert _stable(got) == _stable(want)  # the whole summary, not only the KPIs
        for k in kpis:
            node = want
            for part in k.split("."):
                node = node[part]
            assert pd.isna(row[k]) if node is None else row[k] == node, k
    # the sweep did vary something: pricing changes what the same energy costs, and a
    # higher threshold leaves smaller deviations unauctioned
    by = table.set_index(["seed", "market.threshold_kwh", "market.pricing"])
    assert any(by.loc[(seed, 0.2, "pay_as_bid"), "market.value_eur"]
               != by.loc[(seed, 0.2, "pay_as_clear"), "market.value_eur"] for seed in (1, 2, 3, 4))
    cleared = table.groupby("market.threshold_kwh")["market.cleared"].sum()
    assert cleared[1.0] < cleared[0.2]


def _sweep_file(tmp_path: Path, seeds: list[int], name: str = "small") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nbase: demo\nset: {{duration: 30m}}\n"
                    f"grid:\n  seed: {seeds}\n  market.pricing: [pay_as_bid, pay_as_clear]\n"
                    "kpis: [market.value_eur, deviation.covered_share]\n")
    return path


def _run_dirs(folder: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for d in sorted((folder / "points").iterdir()):
        run = completed_run(d)
        if run is not None:
            out[d.name] = (run.name, (run / "summary.json").stat().st_mtime_ns)
    return out


@pytest.mark.timeout(300)
def test_killed_sweep_resumes_without_rerunning_done_points(tmp_path):
    path = _sweep_file(tmp_path, [1, 2, 3, 4])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "testbed", "sweep", str(path), "--out", str(out),
           "--workers", "2", "-q"]
    proc = subprocess.Popen(cmd, env=ENV, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    folder = out / "small"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (folder / "points").exists() and len(_run_dirs(folder)) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read().decode()
        os.kill(proc.pid, signal.SIGKILL)  # the sweep process, as an OOM killer would
        proc.wait(timeout=30)
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its orphaned worker processes
        proc.stdout.close()
    time.sleep(0.5)
    before = _run_dirs(folder)
    assert 2 <= len(before) < 8
    r = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{8 - len(before)} run, {len(before)} already done, 0 failed" in r.stdout
    after = _run_dirs(folder)
    assert len(after) == 8
    for key, (run, mtime) in before.items():  # untouched: same folder, same summary
        assert after[key] == (run, mtime)
    for d in (folder / "points").iterdir():  # one run each: half-written ones cleared
        assert len([c for c in d.iterdir() if c.is_dir()]) == 1
    table = pd.read_csv(folder / "results.csv")
    assert list(table["status"]) == ["done"] * 8
    html = (folder / "report.html").read_text()
    for run in table["run_dir"]:  # every run's own report, linked from the sweep report
        assert (folder / run / "report.html").exists()
        assert f'href="{run}/report.html"' in html
    assert "Plotly.newPlot" in html and "<script src=" not in html  # self-contained


@pytest.mark.timeout(300)
def test_sweep_on_a_separately_started_scheduler_and_worker(tmp_path):
    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--no-dashboard"], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        procs.append(subprocess.Popen(
            [str(BIN / "dask"), "worker", addr, "--nthreads", "1", "--nworkers", "1",
             "--no-dashboard", "--host", "127.0.0.1", "--name", "lab-worker"],
            env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(addr, timeout="60s") as c:
            c.wait_for_workers(1, timeout=120)
        sweep = load_sweep(_sweep_file(tmp_path, [5]))
        points = plan(sweep)
        res = run_sweep(sweep, points, tmp_path / "out", scheduler=addr)
        assert res.workers == 1 and res.count("done") == 2
        with Client(addr, timeout="30s") as c:  # the scheduler ran them on its worker
            assert [w["name"] for w in c.scheduler_info()["workers"].values()] == ["lab-worker"]
        table = write_results(sweep, points, res.folder)
        df = pd.read_parquet(table["parquet"])
        base = load_scenario("demo")
        for _, row in df.iterrows():
            sc = base.model_copy(update={"duration": 1800.0, "seed": 5, "market": (
                base.market.model_copy(update={"pricing": row["market.pricing"]}))})
            want = asyncio.run(Run(sc, out=tmp_path / "sep", report=False).execute()).summary
            assert row["market.value_eur"] == want["market"]["value_eur"]
            assert row["deviation.covered_share"] == want["deviation"]["covered_share"]
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


BAD = [
    ("name: b\ngrid:\n  market.pricng: [pay_as_bid]\n", "bad.yaml:3: grid.market.pricng",
     "unknown field"),
    ("name: b\ngrid:\n  seed: [1]\n  market.pricing: [pay_as_bid, pay_as_nothing]\n",
     "bad.yaml:4: grid.market.pricing[1]", "'pay_as_bid' or 'pay_as_clear'"),
    ("name: b\ngrid:\n  site.prosumers[*].devices[kind=battery].params.capacity_wh: [1, -5]\n",
     "bad.yaml:3:", "greater than 0 (got -5)"),
    ("name: b\ngrid:\n  site.prosumers[house-9].load.base_w: [1]\n", "bad.yaml:3:",
     "matches no item of 3 (names: house-1, house-2, house-3)"),
    ("name: b\nset: {step: 7m}\n", "bad.yaml:2: set", "must divide the market interval"),
    ("name: b\nkpis: [foo.bar]\n", "bad.yaml:2: kpis[0]", "not in a run's summary.json"),
    ("name: b\nbase: nosuch\n", "bad.yaml:2: base", "no such scenario file"),
    ("name: b\ngrid: {seed: &a [1]}\nset: {x: *a}\n", "bad.yaml:3:", "aliases"),
    ("name: b\ngrid:\n  market.threshold_kwh: [.nan]\n", "bad.yaml:3:", "finite number"),
    ("name: b\nfoo: 1\n", "bad.yaml:2: foo", "Extra inputs"),
    ("name: b\ngrid:\n  'market..x': [1]\n", "bad.yaml:3:", "expected a dotted path"),
    ("name: b\ngrid: {seed: [1, 2]}\npoints:\n  - {seed: 3}\n", "bad.yaml:4: points[0].seed",
     "also given in grid"),
    ("name: b\ngrid:\n  seed: [1, 2]\n  site.prosumers[house-2].devices[house-2-pv].emulated: "
     "[false]\n", "bad.yaml:4:", "has real devices (house-2-pv; emulated: false)"),
    ("name: b\npoints:\n  - {events: [{kind: device-offline, at: '12:00', device: nope}]}\n",
     "bad.yaml:3: points[0]", "unknown device 'nope'"),
    ("name: b\ngrid:\n  seed: " + str(list(range(200))) + "\n  market.threshold_kwh: "
     + str([0.1 * (i + 1) for i in range(60)]) + "\n", "bad.yaml:2: grid", "12000 points"),
]


@pytest.mark.parametrize(("text", "where", "what"), BAD)
def test_bad_sweep_files_exit_2_with_one_line(tmp_path, text, where, what):
    (tmp_path / "bad.yaml").write_text(text)
    r = CliRunner().invoke(app, ["sweep", str(tmp_path / "bad.yaml"), "--out",
                                 str(tmp_path / "out")], env={"COLUMNS": "400"})
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and "Traceback" not in line
    assert where in line and what in line, line
    assert not (tmp_path / "out").exists()  # nothing created before the file is valid


def test_plan_keys_sample_and_site_overrides(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: s\nbase: demo\nset: {duration: 1h}\n"
        "grid:\n  seed: [1, 2, 3, 4, 5]\n  market.pricing: [pay_as_bid, pay_as_clear]\n"
        "  site.prosumers[*].devices[kind=battery].params.capacity_wh: [5000, 20000]\n"
        "points:\n  - {}\n  - site.prosumers[house-2].load.peak_w: 5000\n"
        "sample: {n: 7, seed: 3}\n")
    points = plan(load_sweep(path))
    assert len(points) == 7
    again = plan(load_sweep(path))
    assert [p.key for p in again] == [p.key for p in points]  # seeded, stable keys
    path.write_text(path.read_text().replace("seed: 3}", "seed: 4}"))
    assert [p.key for p in plan(load_sweep(path))] != [p.key for p in points]
    for p in points:
        assert p.scenario["duration"] == 3600.0 and p.scenario["seed"] == p.overrides["seed"]
        assert p.scenario["market"]["pricing"] == p.overrides["market.pricing"]
        cap = p.overrides["site.prosumers[*].devices[kind=battery].params.capacity_wh"]
        bats = [d for q in p.site["prosumers"] for d in q["devices"] if d["kind"] == "battery"]
        assert [b["params"]["capacity_wh"] for b in bats] == [cap] * 3
        peaks = [q["load"]["peak_w"] for q in p.site["prosumers"]]
        assert peaks[1] == (5000 if "site.prosumers[house-2].load.peak_w" in p.overrides
                            else 3500)
        assert peaks[0] == 2800  # only house-2's load was overridden
    # the whole grid without a sample: 5 x 2 x 2 x 2 points, all distinct
    path.write_text(path.read_text().replace("sample: {n: 7, seed: 4}\n", ""))
    full = plan(load_sweep(path))
    assert len({p.key for p in full}) == 40
    assert {p.key for p in points} <= {p.key for p in full}


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    csv = tmp_path / "irr.csv"
    csv.write_text("time,ghi\n0,0\n43200,900\n86400,0\n")
    path = tmp_path / "f.yaml"
    path.write_text("name: f\nbase: demo\nset: {duration: 15m}\ngrid: {seed: [1]}\n"
                    "points:\n  - {}\n  - {profiles.irradiance: {file: irr.csv}}\n"
                    "kpis: [market.auctions]\n")
    out = tmp_path / "out"
    cmd = ["sweep", str(path), "--out", str(out), "--workers", "2", "-q"]
    csv.rename(tmp_path / "gone.csv")
    r = CliRunner().invoke(app, cmd, env={"COLUMNS": "400"})  # checked up front: exit 2
    assert r.exit_code == 2 and "f.yaml:7: points[1].profiles.irradiance" in r.output
    assert "irr.csv" in r.output and not out.exists()
    (tmp_path / "gone.csv").rename(csv)
    sweep = load_sweep(path)
    points = plan(sweep)  # the file is there when the sweep is planned
    csv.unlink()  # and gone when its run starts
    res = run_sweep(sweep, points, out, workers=2)
    assert res.count("done") == 1 and res.count("failed") == 1
    write_results(sweep, points, res.folder)
    table = pd.read_csv(out / "f" / "results.csv").set_index("status")
    assert table.loc["failed", "error"].startswith("ConfigError: ")
    assert "irr.csv" in table.loc["failed", "error"]
    assert table.loc["done", "market.auctions"] == 1
    failed = out / "f" / "points" / table.loc["failed", "point"]
    assert "Traceback" in (failed / "error.txt").read_text()
    csv.write_text("time,ghi\n0,0\n43200,900\n86400,0\n")  # fixed: a rerun retries it only
    r = CliRunner().invoke(app, cmd, env={"COLUMNS": "400"})
    assert r.exit_code == 0 and "2 points, 1 run, 1 already done, 0 failed" in r.output
    assert not (failed / "error.txt").exists()
