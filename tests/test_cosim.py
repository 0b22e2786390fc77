"""HELICS co-simulation: emulator shards and the run as federates over a real
`helics_broker` on loopback, each shard its own process serving real Modbus servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from testbed.cli import app
from testbed.config import load_site
from testbed.cosim.errors import CosimError
from testbed.scenarios.engine import Run
from testbed.scenarios.model import load_scenario
from testbed.telemetry.store import dump

runner = CliRunner()


def _broker() -> str | None:
    try:
        from testbed.cosim.run import helics_broker_binary
        return helics_broker_binary()
    except (CosimError, ImportError):
        return None


needs_broker = pytest.mark.skipif(_broker() is None, reason="helics_broker is not installed "
                                  "(pip install helics)")


def rows_of(run_dir: Path) -> list[tuple[str, tuple]]:
    """The store's rows, wall-clock columns aside and the emulators' loopback ports (free
    ones, different in any two runs, named in read-error details) masked."""
    return [(t, tuple(re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", v)
                      if isinstance(v, str) else v for v in row))
            for t, row in dump(run_dir / "run.db")]


def short(name: str, start: str, duration_s: float):
    """A bundled scenario cut to `duration_s` from `start`, grid and ledger on."""
    sc = load_scenario(name)
    return sc.model_copy(update={"start": float(int(start[:2]) * 3600 + int(start[3:]) * 60),
                                 "duration": duration_s})


def test_shards_deal_the_prosumers_round_robin() -> None:
    from testbed.cosim.shard import parse_shard, shard_prosumers, shard_site

    site = load_site("demo")
    assert shard_prosumers(site, 1, 2) == ["house-1", "house-3"]
    assert shard_prosumers(site, 2, 2) == ["house-2"]
    assert sorted(p for k in (1, 2, 3, 4) for p in shard_prosumers(site, k, 4)) == \
        ["house-1", "house-2", "house-3"]
    assert [d.name for _, d in shard_site(site, 2, 2).devices()] == \
        ["house-2-pv", "house-2-battery", "house-2-meter"]
    assert parse_shard("2/4") == (2, 4)
    for bad in ("0/2", "3/2", "2", "a/b", "1/0"):
        with pytest.raises(CosimError, match="expected K/N"):
            parse_shard(bad)


def test_a_forged_endpoint_is_refused_cheaply() -> None:
    from testbed.cosim.run import _endpoint

    assert _endpoint("pv", '{"host": "10.0.0.2", "port": 502, "unit": 1}')["port"] == 502
    for text in ("", "[1]", '{"host": "x", "port": 70000}', '{"host": "", "port": 1}',
                 '{"port": 502}', "{" * 10_000):
        with pytest.raises(CosimError, match="expected JSON with host and port"):
            _endpoint("pv", text)


def test_cli_refuses_a_bad_shard_or_broker() -> None:
    r = runner.invoke(app, ["devices", "serve", "demo", "--shard", "3/2",
                            "--helics", "127.0.0.1:1"])
    assert r.exit_code == 2 and "expected K/N with 1 <= K <= N" in r.output
    r = runner.invoke(app, ["devices", "serve", "demo", "--shard", "1/2"])
    assert r.exit_code == 2 and "--shard K/N needs --helics" in r.output
    r = runner.invoke(app, ["devices", "serve", "demo", "--helics", "nowhere"])
    assert r.exit_code == 2 and "expected HOST:PORT of a helics_broker" in r.output


@needs_broker
async def test_one_and_two_shards_replay_the_single_process_run(tmp_path: Path) -> None:
    """Same seed, fast clock: the run store is the same row for row (wall-clock columns
    aside) without HELICS, with one shard and with two; a device event (a battery that
    stops answering) is played by the shard that serves it. (A `device-offline` event is
    left out: when a device comes back is decided by the driver's reconnect backoff, in
    wall-clock time, so it can differ between any two fast runs, HELICS or not.) With two shards the feeder is
    a federate too (its own process)."""
    sc = short("device-fault", "12:15", 1800.0)
    alone = await Run(sc, out=tmp_path / "a", report=False).execute()
    rows = rows_of(alone.run_dir)
    assert [f["device"] for f in alone.summary["faults"]] == ["house-1-battery"]
    for n, grid in ((1, False), (2, True)):
        run = Run(sc, out=tmp_path / f"s{n}", report=False, shards=n, feeder_federate=grid)
        result = await run.execute()
        assert result.summary["cosim"] == {"broker": "local", "shards": n, "lost_devices": [],
                                           "error": None}
        assert rows_of(result.run_dir) == rows, f"{n} shards"
        assert run.federation is not None
        assert all(p.poll() is not None for p in (run.federation.broker,
                                                  *run.federation.shards.values()))
        logs = (result.run_dir / "cosim" / f"shard-{n}of{n}.log").read_text()
        assert f"the run ended after {sc.steps} steps" in logs
    feeder = (result.run_dir / "cosim" / "feeder.log").read_text()
    assert f"feeder federate: the run ended after {sc.steps} steps" in feeder


def _children() -> list[int]:
    """Processes whose parent is this one."""
    me, out = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            out.append(int(stat.parent.name))
    return out


@needs_broker
async def test_a_killed_shard_ends_the_run_cleanly(tmp_path: Path) -> None:
    """SIGKILL of shard 1/2 at step 10: the run ends at the next step, names the devices
    that shard served, keeps every step before it, and leaves no process behind."""
    sc = short("demo", "11:00", 3600.0)
    before = set(_children())
    run: Run

    def progress(k: int, n: int, info: dict) -> None:
        if k == 10:
            assert run.federation is not None
            os.kill(run.federation.shards[1].pid, signal.SIGKILL)

    run = Run(sc, out=tmp_path, report=False, shards=2, progress=progress)
    result = await run.execute()
    cosim = result.summary["cosim"]
    assert cosim["lost_devices"] == sorted(f"house-{i}-{k}" for i in (1, 3)
                                           for k in ("battery", "meter", "pv"))
    assert "shard 1/2 exited (-9)" in cosim["error"]
    assert result.summary["passed"] is False
    rows = list(dump(result.run_dir / "run.db"))
    steps = [r for t, r in rows if t == "steps"]
    assert [s[0] for s in steps] == list(range(1, 11))
    lost = [r for t, r in rows if t == "events" and r[1] == "federate-lost"]
    assert len(lost) == 1 and "house-1-pv" in lost[0][3]
    t10 = sc.start + 10 * sc.step
    assert max(r[0] for t, r in rows if t == "measurements") == t10
    assert set(_children()) - before == set()


@needs_broker
def test_cli_run_with_shards(tmp_path: Path) -> None:
    scen = tmp_path / "short.yaml"
    text = (Path(__file__).parents[1] / "testbed/scenarios/library/demo.yaml").read_text()
    scen.write_text(text.replace("duration: 4h", "duration: 30m"))
    r = runner.invoke(app, ["run", str(scen), "--shards", "2", "--fast", "-q", "--no-report",
                            "--out", str(tmp_path / "runs")])
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["cosim"]["shards"] == 2 and summary["cosim"]["lost_devices"] == []
    assert "run ended early" not in r.output
    assert "the run ended after 30 steps" in (run / "cosim" / "shard-2of2.log").read_text()


@needs_broker
def test_external_broker_two_shards_and_a_users_grid_federate(tmp_path: Path) -> None:
    """A helics_broker, two `devices serve --shard` processes and the example grid
    federate (examples/feeder_federate.py, V = 1 + k * P) as separate processes; the run
    joins with --helics: every feeder row is the example's model of the measured
    injections, and the shards served every step."""
    import subprocess
    import sys

    from testbed.cosim.federate import CORE
    from testbed.cosim.run import free_port, helics_broker_binary

    sc = short("demo", "11:00", 1800.0)
    site = load_site(sc.site)
    port = free_port()
    addr = f"127.0.0.1:{port}"
    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    logs = {n: tmp_path / f"{n}.log" for n in ("broker", "s1", "s2", "feeder")}
    cmds = {"broker": [helics_broker_binary(), "--coretype", CORE, "-f", "4", "--port",
                       str(port), "--local_interface", "127.0.0.1", "--loglevel", "error"],
            "s1": [sys.executable, "-m", "testbed", "devices", "serve", sc.site, "--shard",
                   "1/2", "--helics", addr, "--free-ports", "--seed", str(sc.seed), "-q"],
            "s2": [sys.executable, "-m", "testbed", "devices", "serve", sc.site, "--shard",
                   "2/2", "--helics", addr, "--free-ports", "--seed", str(sc.seed), "-q"],
            "feeder": [sys.executable, str(root / "examples" / "feeder_federate.py"),
                       site.name, "--helics", addr]}
    procs = {}
    try:
        for name, cmd in cmds.items():
            with open(logs[name], "wb") as out:
                procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                               env=env, cwd=tmp_path)
        result = asyncio.run(Run(sc, out=tmp_path / "runs", report=False, helics=addr,
                                 feeder_federate=True).execute())
        for p in procs.values():
            p.wait(20)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    assert result.summary["cosim"]["lost_devices"] == []
    rows = list(dump(result.run_dir / "run.db"))
    feeder = {r[0]: r for t, r in rows if t == "feeder"}
    meters: dict[float, list[float]] = {}
    for t, r in rows:
        if t == "measurements" and r[3] == "meter" and r[4] == "p_w":
            meters.setdefault(r[0], []).append(-r[5])
    assert len(feeder) == sc.steps == len(meters)
    for t, inj in meters.items():
        _, light, vm_min, vm_max, _, _, losses, import_w = feeder[t]
        assert light == "green" and losses == 0.0
        assert vm_max == pytest.approx(1 + 0.002 * max(inj) / 1000, abs=1e-9)
        assert vm_min == pytest.approx(1 + 0.002 * min(inj) / 1000, abs=1e-9)
        assert import_w == pytest.approx(-sum(inj), abs=1e-6)
    assert f"example feeder: {sc.steps} steps" in logs["feeder"].read_text()
    assert f"the run ended after {sc.steps} steps" in logs["s2"].read_text()


@needs_broker
async def test_four_shards_replay_the_single_process_run(tmp_path: Path) -> None:
    """Eight prosumers dealt over four shard processes (two each) and the Kerber village
    feeder in a feeder federate process: the same store as in one process (pandapower
    draws the Kerber house cables at random: every process must build the same feeder)."""
    import yaml

    from testbed.scenarios.model import Scenario

    prosumers = [{"name": f"p{i}", "load": {"base_w": 250 + 10 * i, "peak_w": 2200 + 100 * i},
                  "devices": [
                      {"name": f"p{i}-pv", "kind": "pv", "port": 20000 + i, "unit": 1,
                       "params": {"rating_w": 3000 + 500 * (i % 5)}},
                      {"name": f"p{i}-battery", "kind": "battery", "port": 20000 + i,
                       "unit": 2, "params": {"capacity_wh": 8000, "soc_init": 0.4 + 0.1 * (i % 5)}},
                      {"name": f"p{i}-meter", "kind": "meter", "port": 20000 + i, "unit": 3}]}
                 for i in range(8)]
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"name": "eight", "prosumers": prosumers,
                                    "grid": {"network": "kerber-dorfnetz"}}))
    sc = Scenario.model_validate({"name": "eight", "site": str(site), "seed": 5,
                                  "start": "11:00", "duration": "15m", "step": 60,
                                  "forecast": {"pv_bias_pct": 15},
                                  "market": {"buy_price": 0.4}, "ledger": {"validators": 4}})
    alone = await Run(sc, out=tmp_path / "a", report=False).execute()
    assert alone.summary["grid"]["steps"] == 15
    four = await Run(sc, out=tmp_path / "b", report=False, shards=4,
                     feeder_federate=True).execute()
    assert four.summary["cosim"]["lost_devices"] == []
    assert rows_of(four.run_dir) == rows_of(alone.run_dir)
    logs = sorted((four.run_dir / "cosim").glob("shard-*of4.log"))
    assert len(logs) == 4 and all("the run ended after 15 steps" in p.read_text() for p in logs)
    assert "the run ended after 15 steps" in (four.run_dir / "cosim" / "feeder.log").read_text()


def test_a_malformed_feeder_check_ends_the_run_naming_the_key() -> None:
    from testbed.cosim.errors import FederateLost
    from testbed.cosim.feeder import _check

    good = {"converged": True, "light": "amber", "vm_min_pu": 0.95, "vm_max_pu": 1.02,
            "max_line_pct": None, "max_trafo_pct": 40, "losses_w": 12.5, "import_w": -3e3,
            "vm_pu": {"house-1": 1.01, "house-2": None}}
    assert _check(json.dumps(good)) == good
    for bad, why in (({**good, "converged": 1}, "converged must be true or false"),
                     ({**good, "light": "blue"}, "light must be green, amber or red"),
                     ({**good, "losses_w": "1"}, "losses_w must be a finite number"),
                     ({**good, "vm_min_pu": 1e400}, "vm_min_pu must be a finite number"),
                     ({**good, "vm_pu": {"house-1": "1.0"}}, "vm_pu must map prosumers"),
                     ({**good, "vm_pu": [1.0]}, "vm_pu must map prosumers")):
        with pytest.raises(FederateLost, match=why):
            _check(json.dumps(bad))
    with pytest.raises(FederateLost, match="feeder/check"):
        _check("not json")


@needs_broker
async def test_a_killed_feeder_federate_ends_the_run_cleanly(tmp_path: Path) -> None:
    sc = short("demo", "11:00", 1800.0)
    run: Run

    def progress(k: int, n: int, info: dict) -> None:
        if k == 5:
            assert run.federation is not None and run.federation.feeder is not None
            os.kill(run.federation.feeder.pid, signal.SIGKILL)

    run = Run(sc, out=tmp_path, report=False, shards=1, feeder_federate=True,
              progress=progress)
    result = await run.execute()
    cosim = result.summary["cosim"]
    assert "the feeder federate exited (-9)" in cosim["error"]
    assert cosim["lost_devices"] == []  # the shard still answers
    steps = [r for t, r in dump(result.run_dir / "run.db") if t == "steps"]
    assert len(steps) == 5
    assert all(p.poll() is not None for p in (run.federation.broker, run.federation.feeder,
                                              *run.federation.shards.values()))


@needs_broker
def test_no_shard_outlives_a_killed_run(tmp_path: Path) -> None:
    """SIGKILL of `testbed run --shards 2` itself: its broker, shards and ledger store
    audit worker end too."""
    import subprocess
    import sys
    import time

    root = Path(__file__).parents[1]
    run = subprocess.Popen([sys.executable, "-m", "testbed", "run", "demo", "--fast",
                            "--shards", "2", "-q", "--no-report", "--out", str(tmp_path)],
                           env={**os.environ, "PYTHONPATH": str(root)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        kids: list[int] = []
        for _ in range(600):  # until the broker, both shards and the audit worker are up
            kids = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
                    if _ppid(p) == run.pid]
            if len(kids) == 4 and _steps(tmp_path) >= 3:
                break
            time.sleep(0.05)
        assert len(kids) == 4
    finally:
        run.kill()
        run.wait()
    for _ in range(600):
        alive = [k for k in kids if Path(f"/proc/{k}").exists()
                 and _state(k) != "Z"]
        if not alive:
            break
        time.sleep(0.1)
    assert alive == []


def _steps(out: Path) -> int:
    """Steps the run in `out` has committed so far (0 before its store exists)."""
    import sqlite3
    for db in out.glob("*/run.db"):
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:
                return int(c.execute("SELECT COUNT(*) FROM steps").fetchone()[0])
        except sqlite3.Error:
            return 0
    return 0


def _ppid(stat: Path) -> int:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"
