"""Scenario benchmark: the whole run loop, fast and in real time.

Run:  python bench/scenario.py [--prosumers 50] [--hours 24] [--devices 200]
                               [--realtime-s 120] [--quick] [--json PATH] [--check]
                               [--fast-only] [--cold] [--profile PATH] [--shards N [N ...]]
                               [--big-prosumers 500 --big-shards 2 4 --big-hours H]
                               [--realtime-shards 2 --rt-shard-devices 1000 --rt-shard-s 600]

What is measured
    1. fast: a synthetic site of N prosumers (PV + battery + meter each, Modbus/SunSpec
       emulators on loopback, one port per prosumer) on the Kerber village feeder (57
       houses), `--hours` of simulated time at 1-minute steps as fast as possible, with
       the grid check, the market over the embedded MQTT broker and 4 PoE validators
       committing a block every 15-minute interval. Target: 24 h, 50 prosumers, < 30 s
       wall. Reported with the per-step cost, the work done, and the process's CPU time
       against the wall time: in the fast clock nothing should sleep or poll, so the
       ratio CPU / wall shows how much of the run waits; `idle s` is the event loop's
       blocking waits (nothing ready to run: sleeping on a timer, polling), the part of
       the wall time the code itself spends not working (the rest of wall - CPU is the
       machine's other load).
       `gc` is the CPU time the garbage collector took (`gc.callbacks`).
       `--profile PATH` runs it under cProfile and prints the top functions.
       The feeder set-up (`grid.feeder.checker_for`: pandapower imported, the Kerber net
       built) is timed in a fresh process twice against a bench-private feeder cache
       (`grid.cache`): cold (no entry yet) and warm (the entry the cold one wrote). The runs
       start warm, as every run after a site's first does; `--cold` runs them with the
       cache off. The run's phases outside the step loop (`Run.timings`: feeder, emulators
       start, ledger stop, waiting for the store's index, ...) are printed in wall seconds.
    2. realtime: ~`--devices` emulated devices (devices / 3 prosumers) at a 1 s step in
       real time (speed 1) for `--realtime-s` seconds, market interval 60 s, grid and
       ledger on. Tick lateness p50/p99/max (target p99 < 10 ms) and drift (the last
       tick's wall time against its deadline: the clock uses absolute deadlines).

    3. sharded (`--shards N ...`): the fast run again with its emulators in N HELICS
       shard processes (`testbed run --shards N`: a helics_broker and N
       `testbed devices serve --shard K/N --helics` federates), the drivers still reading
       every device over Modbus. CPU counts the children (shards, broker); the ratio is
       the single-process wall time over the sharded one (> 1: sharding pays); the run
       store is compared with the single-process one (wall-clock columns aside).
       `--feeder-federate`: the feeder's power flow in its own federate process too.
    4. big (`--big-prosumers 500 --big-shards 2 4`): the fast run for a site of that many
       prosumers (3 devices each) on a feeder big enough for one house per prosumer (the
       Schutterwald LV grid of pandapower, 1,506 houses on 14 transformers fed from one
       20 kV slack, written to a pandapower JSON file the site names), only sharded; `--big-hours` (default: as the
       fast run) with the projection to 24 h when shorter (the start-up as measured plus
       1,440 steps at the step loop's pace, from the run store's step wall clocks). The
       scaling ratio is the wall time with the fewest shards over the wall time with N.
    5. realtime sharded (`--realtime-shards N`): the real-time run at a 1 s step with
       `--rt-shard-devices` (default 1,000) devices in N shards for `--rt-shard-s`
       (default 600) on the same big feeder: tick lateness p50/p99/max and drift, how far
       the steps' wall-clock offset from the simulated clock moved from the first tenth
       of the run to the last (medians, from the run store's step wall clocks).

Output: tables (rich) and, as the last line on stdout, one JSON object with all figures
(also written to `--json PATH`). `--check` exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import re
import resource
import selectors
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from testbed.scenarios.engine import Run
from testbed.scenarios.model import Scenario

console = Console(width=None if sys.stdout.isatty() else 120)
TARGET_FAST_S, TARGET_P99_MS = 30.0, 10.0


def site_file(folder: Path, prosumers: int, network: str) -> Path:
    ps = []
    for i in range(prosumers):
        port = 20000 + i
        ps.append({"name": f"p{i:03d}", "load": {"base_w": 250 + 10 * (i % 7),
                                                  "peak_w": 2200 + 100 * (i % 9)},
                   "devices": [
                       {"name": f"p{i:03d}-pv", "kind": "pv", "port": port, "unit": 1,
                        "params": {"rating_w": 3000 + 500 * (i % 5)}},
                       {"name": f"p{i:03d}-battery", "kind": "battery", "port": port,
                        "unit": 2, "params": {"capacity_wh": 8000 + 1000 * (i % 6),
                                              "soc_init": 0.4 + 0.1 * (i % 5)}},
                       {"name": f"p{i:03d}-meter", "kind": "meter", "port": port,
                        "unit": 3}]})
    path = folder / f"site-{prosumers}.yaml"
    path.write_text(yaml.safe_dump({"name": f"bench{prosumers}", "prosumers": ps,
                                    "grid": {"network": network, "background": 0.5}}))
    return path


def big_network(folder: Path) -> Path:
    """pandapower's Schutterwald LV grid (1,506 houses behind 14 transformers) as a JSON
    file: a feeder with a house connection for each of hundreds of prosumers. Its 14
    transformers are fed from one 20 kV slack (the fast power flow takes exactly one)."""
    import warnings

    import pandapower as pp
    import pandapower.networks as pn
    import pandapower.toolbox as tb
    path = folder / "schutterwald.json"
    if path.exists():
        return path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = pn.lv_schutterwald()
        slack, others = int(net.ext_grid.bus.iloc[0]), [int(b) for b in net.ext_grid.bus.iloc[1:]]
        net.trafo["hv_bus"] = slack
        net.ext_grid = net.ext_grid.iloc[:1]
        tb.drop_buses(net, others)
        pp.to_json(net, str(path))
    return path


def step_walls(run_dir: str) -> list[tuple[float, float]]:
    """(simulated t, wall clock) of each step, from the run store."""
    import sqlite3
    with sqlite3.connect(Path(run_dir) / "run.db") as db:
        return db.execute("SELECT t, wall FROM steps ORDER BY step").fetchall()


def loop_ms_per_step(run_dir: str) -> float | None:
    """Wall ms per step of the step loop alone (start-up and shutdown aside)."""
    rows = step_walls(run_dir)
    return (rows[-1][1] - rows[0][1]) / (len(rows) - 1) * 1e3 if len(rows) > 1 else None


def drift_s(run_dir: str, speed: float = 1.0) -> float | None:
    """How far the steps' wall clock moved from the simulated clock over the run: the
    offset wall - t / speed of the last tenth of the steps minus that of the first tenth
    (medians, so one late step is lateness, not drift); 0: no drift."""
    import statistics
    rows = step_walls(run_dir)
    if len(rows) < 20:
        return None
    off = [w - t / speed for t, w in rows]
    n = len(off) // 10
    return statistics.median(off[-n:]) - statistics.median(off[:n])


def scenario(site: Path, **kw: Any) -> Scenario:
    base: dict[str, Any] = {"name": "bench", "site": str(site), "seed": 1,
                            "forecast": {"pv_bias_pct": 15, "noise_pct": 3},
                            "events": [{"kind": "cloud", "at": "13:00", "duration": "1h",
                                        "depth": 0.6}],
                            "market": {"buy_price": 0.4}, "ledger": {"validators": 4}}
    base.update(kw)
    return Scenario.model_validate(base)


class IdleSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The event loop's selector, timing every blocking wait: with the broker, agents,
    nodes and emulators on one loop, a blocking select means nothing was ready to run,
    i.e. wall time spent sleeping on a timer or polling (or waiting on another thread)."""

    idle_s = 0.0
    waits = 0

    def select(self, timeout: float | None = None) -> Any:
        if timeout == 0:
            return super().select(0)
        t = time.perf_counter()
        try:
            return super().select(timeout)
        finally:
            IdleSelector.idle_s += time.perf_counter() - t
            IdleSelector.waits += 1


class GCTimer:
    """CPU time the garbage collector takes during a run (`gc.callbacks`): with the
    broker, agents, nodes and emulators in one process, full collections of a large heap
    were a visible share of a step."""

    def __init__(self) -> None:
        self.cpu_s, self.full, self._t = 0.0, 0, 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t = time.process_time()
        else:
            self.cpu_s += time.process_time() - self._t
            self.full += info["generation"] == 2

    def __enter__(self) -> GCTimer:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def proc_cpu_s(pid: int) -> float | None:
    """CPU time (user + system) of a live process (Linux /proc), None when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class StepLoopCPU:
    """CPU per step of the step loop alone (start-up and shutdown aside), per process:
    the run's, each shard's, the broker's (and the feeder federate's), from the first
    step's end to the last's (`Run(progress=...)`), and the run's wall time waiting for
    HELICS grants over the same steps (the step loop blocked on them)."""

    def __init__(self) -> None:
        self.run: Run | None = None
        self.marks: list[tuple[int, float, float, dict[str, float | None], float]] = []

    def __call__(self, k: int, n: int, info: dict[str, Any]) -> None:
        if k != 1 and k != n:
            return
        procs: dict[str, float | None] = {}
        fed = self.run.federation if self.run is not None else None
        if fed is not None:
            if fed.broker is not None:
                procs["broker"] = proc_cpu_s(fed.broker.pid)
            if fed.feeder is not None:
                procs["feeder"] = proc_cpu_s(fed.feeder.pid)
            for i, p in fed.shards.items():
                procs[f"shard {i}"] = proc_cpu_s(p.pid)
        cosim = self.run.cosim if self.run is not None else None
        self.marks.append((k, time.perf_counter(), time.process_time(), procs,
                           cosim.wait_s if cosim is not None else 0.0))

    def per_step(self) -> dict[str, Any] | None:
        """ms per step: wall, run (this process), each child, grant wait."""
        if len(self.marks) < 2:
            return None
        (k0, w0, c0, p0, g0), (k1, w1, c1, p1, g1) = self.marks[0], self.marks[-1]
        n = k1 - k0
        out: dict[str, Any] = {"steps": n, "wall_ms": (w1 - w0) / n * 1e3,
                               "run_cpu_ms": (c1 - c0) / n * 1e3,
                               "grant_wait_ms": (g1 - g0) / n * 1e3}
        for name, a in p0.items():
            b = p1.get(name)
            out[f"{name}_cpu_ms"] = (b - a) / n * 1e3 if a is not None and b is not None else None
        return out


FEEDER_SETUP = """
import json, sys, time
from testbed.config import load_site
site = load_site(sys.argv[1])
w, c = time.perf_counter(), time.process_time()
from testbed.grid.feeder import checker_for
checker = checker_for(site)
print(json.dumps({"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c,
                  "restored": checker.restored}))
"""


def feeder_setup(site: Path) -> dict[str, Any]:
    """A fresh process's feeder set-up for `site` (`grid.feeder.checker_for`, its imports
    included), against the feeder cache in $TESTBED_CACHE_DIR: cold when the cache has no
    entry yet (pandapower imported, the network built, the entry written), warm after."""
    import subprocess
    out = subprocess.run([sys.executable, "-c", FEEDER_SETUP, str(site)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def same_store(a: str, b: str) -> bool:
    """Row for row, wall-clock columns aside and loopback ports masked."""
    from testbed.telemetry.store import dump

    def rows(d: str) -> list[Any]:
        return [(t, tuple(re.sub(r"127\.0\.0\.1:\d+", "PORT", v) if isinstance(v, str)
                          else v for v in row)) for t, row in dump(Path(d) / "run.db")]
    return rows(a) == rows(b)


def run(sc: Scenario, out: Path, profile: str | None = None,
        shards: int | None = None, feeder_federate: bool = False) -> dict[str, Any]:
    IdleSelector.idle_s, IdleSelector.waits = 0.0, 0
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    t0, c0, k0 = time.perf_counter(), time.process_time(), children_cpu_s()
    loop_cpu = StepLoopCPU()
    with GCTimer() as gct, asyncio.Runner(
            loop_factory=lambda: asyncio.SelectorEventLoop(IdleSelector())) as r:
        the_run = loop_cpu.run = Run(sc, out=out, report=False, shards=shards,
                                     feeder_federate=feeder_federate, progress=loop_cpu)
        res = r.run(the_run.execute())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    children = children_cpu_s() - k0
    cpu += children
    if prof is not None:
        import pstats
        prof.disable()
        prof.dump_stats(profile)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(20)
    s = res.summary
    return {"wall_s": wall, "cpu_s": cpu, "children_cpu_s": children, "shards": shards,
            "cosim": s.get("cosim"), "uncommitted": s["ledger"]["uncommitted"], "cpu_share": cpu / wall if wall else None,
            "idle_s": IdleSelector.idle_s, "idle_waits": IdleSelector.waits,
            "gc_s": gct.cpu_s, "gc_full_collections": gct.full,
            "steps": s["steps"], "ms_per_step": wall / s["steps"] * 1e3,
            "auctions": s["market"]["auctions"], "cleared": s["market"]["cleared"],
            "blocks": s["ledger"]["blocks"], "txs": s["ledger"]["submitted"],
            "ledger_verifies": s["ledger"]["verifies"],
            "grid_steps": s["grid"]["steps"], "lateness": s["clock"]["lateness"],
            "covered_share": s["deviation"]["covered_share"], "run_dir": str(res.run_dir),
            "loop_per_step": loop_cpu.per_step(), "timings": dict(the_run.timings)}


def main() -> int:
    ap = argparse.ArgumentParser(description="Times whole scenario runs.")
    ap.add_argument("--prosumers", type=int, default=50)
    ap.add_argument("--hours", type=float, default=None,
                    help="fast run (default 24; quick 2; 0: no single-process fast run, e.g. "
                         "for the big runs alone)")
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--realtime-s", type=int, default=None,
                    help="real-time run length (default 120; quick 60)")
    ap.add_argument("--quick", action="store_true", help="shorter runs (~1.5 min)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures to PATH")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    ap.add_argument("--fast-only", action="store_true", help="skip the real-time run")
    ap.add_argument("--cold", action="store_true",
                    help="runs without the feeder cache (pandapower builds the feeder in each)")
    ap.add_argument("--profile", metavar="PATH", help="cProfile the fast run into PATH")
    ap.add_argument("--shards", type=int, nargs="+", default=[],
                    help="also the fast run with its emulators in N HELICS shard processes")
    ap.add_argument("--feeder-federate", action="store_true",
                    help="with --shards: the feeder's power flow in its own federate too")
    ap.add_argument("--big-prosumers", type=int, default=0,
                    help="also the fast run for this many prosumers, sharded (e.g. 500)")
    ap.add_argument("--big-shards", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--big-hours", type=float, default=None,
                    help="simulated hours of the big runs (default: as the fast run)")
    ap.add_argument("--realtime-shards", type=int, default=0,
                    help="also the real-time run with its devices in N shards")
    ap.add_argument("--rt-shard-devices", type=int, default=1000)
    ap.add_argument("--rt-shard-s", type=int, default=None,
                    help="sharded real-time run length (default 600; quick 60)")
    args = ap.parse_args()
    hours = args.hours if args.hours is not None else (2.0 if args.quick else 24.0)
    if hours == 0 and args.shards:
        ap.error("--shards compares with the single-process fast run: give --hours > 0")
    rt_s = args.realtime_s or (60 if args.quick else 120)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        big = site_file(folder, args.prosumers, "kerber-dorfnetz")
        start = "00:00" if hours >= 24 else "11:00"
        # the bench's own feeder cache (`grid.cache`): empty at first, so the first set-up
        # is cold; the runs then start warm, like any run after the first (or --cold)
        os.environ["TESTBED_CACHE_DIR"] = "" if args.cold else str(folder / "feeder-cache")
        setup = ({"cold": feeder_setup(big), "warm": feeder_setup(big)} if not args.cold
                 else {"cold": feeder_setup(big)})
        fast = (run(scenario(big, start=start, duration=hours * 3600, step=60),
                    folder / "fast", args.profile) if hours else None)
        sharded = []
        for n in args.shards:
            sh = run(scenario(big, start=start, duration=hours * 3600, step=60),
                     folder / f"fast-{n}", shards=n, feeder_federate=args.feeder_federate)
            sh["same_store"] = same_store(fast["run_dir"], sh["run_dir"])
            sh["ratio"] = fast["wall_s"] / sh["wall_s"]
            fast["loop_ms_per_step"] = loop_ms_per_step(fast["run_dir"])
            sh["loop_ms_per_step"] = loop_ms_per_step(sh["run_dir"])
            sharded.append(sh)
        bigs = []
        big_hours = args.big_hours or hours or 24.0
        if args.big_prosumers:
            net = big_network(folder)
            bsite = site_file(folder, args.big_prosumers, str(net))
            bstart = "00:00" if big_hours >= 24 else "11:00"
            for n in args.big_shards:
                b = run(scenario(bsite, start=bstart, duration=big_hours * 3600, step=60),
                        folder / f"big-{n}", shards=n)
                b["prosumers"], b["devices"] = args.big_prosumers, 3 * args.big_prosumers
                b["loop_ms_per_step"] = loop_ms_per_step(b["run_dir"]) or b["ms_per_step"]
                b["hours"] = big_hours  # 24 h: start-up as measured, 1,440 steps at the loop's pace
                b["projected_24h_s"] = b["wall_s"] + (1440 - b["steps"]) * b["loop_ms_per_step"] / 1e3
                b["ms_per_device_step"] = b["loop_ms_per_step"] / b["devices"]
                bigs.append(b)
            for b in bigs:
                b["ratio"] = bigs[0]["wall_s"] / b["wall_s"]
        rts: dict[str, Any] | None = None
        if args.realtime_shards:
            rts_s = args.rt_shard_s or (60 if args.quick else 600)
            n_p = -(-args.rt_shard_devices // 3)
            rts_site = site_file(folder, n_p, str(big_network(folder)))
            rts = run(scenario(rts_site, start="12:00", duration=rts_s, step=1,
                               clock={"mode": "realtime", "speed": 1.0},
                               market={"buy_price": 0.4, "interval_s": 60}),
                      folder / "rt-sharded", shards=args.realtime_shards)
            rts.update(prosumers=n_p, devices=3 * n_p, seconds=rts_s,
                       drift_s=drift_s(rts["run_dir"]))
        n_rt = max(1, args.devices // 3)
        rt: dict[str, Any] = {"wall_s": 0.0, "cpu_s": 0.0, "steps": 0, "ms_per_step": 0.0,
                              "auctions": 0, "cleared": 0, "blocks": 0, "txs": 0,
                              "lateness": None}
        if not args.fast_only:
            rt_site = site_file(folder, n_rt, "kerber-vorstadtnetz")
            rt = run(scenario(rt_site, start="12:00", duration=rt_s, step=1,
                              clock={"mode": "realtime", "speed": 1.0},
                              market={"buy_price": 0.4, "interval_s": 60}), folder / "rt")
    lat = rt["lateness"] or {}
    t = Table(title="Scenario runs")
    for col in ("run", "prosumers", "steps", "wall s", "CPU s", "CPU/wall", "idle s", "ms/step",
                "auctions (cleared)",
                "blocks", "ledger txs", "lateness p50/p99/max ms"):
        t.add_column(col, justify="left" if col == "run" else "right")
    if fast is not None:
        t.add_row(f"fast {hours:g} h @ 60 s", str(args.prosumers), str(fast["steps"]),
                  f"{fast['wall_s']:.1f}", f"{fast['cpu_s']:.1f}", f"{fast['cpu_share']:.2f}",
                  f"{fast['idle_s']:.2f}",
                  f"{fast['ms_per_step']:.1f}",
                  f"{fast['auctions']} ({fast['cleared']})", str(fast["blocks"]),
                  str(fast["txs"]), "-")
    for sh in sharded:
        t.add_row(f"fast, {sh['shards']} HELICS shards"
                  + (" + feeder federate" if args.feeder_federate else ""), str(args.prosumers), str(sh["steps"]),
                  f"{sh['wall_s']:.1f}", f"{sh['cpu_s']:.1f}", f"{sh['cpu_share']:.2f}",
                  f"{sh['idle_s']:.2f}", f"{sh['ms_per_step']:.1f}",
                  f"{sh['auctions']} ({sh['cleared']})", str(sh["blocks"]), str(sh["txs"]), "-")
    t.add_row(f"realtime {rt_s} s @ 1 s", f"{n_rt} ({3 * n_rt} devices)", str(rt["steps"]),
              f"{rt['wall_s']:.1f}", f"{rt['cpu_s']:.1f}",
              f"{rt['cpu_s'] / rt['wall_s']:.2f}" if rt["wall_s"] else "-",
              f"{rt.get('idle_s', 0.0):.1f}",
              f"{rt['ms_per_step']:.1f}", f"{rt['auctions']} ({rt['cleared']})", str(rt["blocks"]), str(rt["txs"]),
              f"{lat.get('p50_ms', 0):.2f} / {lat.get('p99_ms', 0):.2f} / "
              f"{lat.get('max_ms', 0):.2f}")
    for b in bigs:
        t.add_row(f"fast {big_hours:g} h, {b['shards']} HELICS shards", str(b["prosumers"]),
                  str(b["steps"]), f"{b['wall_s']:.1f}", f"{b['cpu_s']:.1f}",
                  f"{b['cpu_share']:.2f}", f"{b['idle_s']:.2f}", f"{b['ms_per_step']:.1f}",
                  f"{b['auctions']} ({b['cleared']})", str(b["blocks"]), str(b["txs"]), "-")
    if rts is not None:
        lr = rts["lateness"] or {}
        t.add_row(f"realtime {rts['seconds']} s @ 1 s, {rts['shards']} HELICS shards",
                  f"{rts['prosumers']} ({rts['devices']} devices)", str(rts["steps"]),
                  f"{rts['wall_s']:.1f}", f"{rts['cpu_s']:.1f}", f"{rts['cpu_share']:.2f}",
                  f"{rts['idle_s']:.1f}", f"{rts['ms_per_step']:.1f}",
                  f"{rts['auctions']} ({rts['cleared']})", str(rts["blocks"]), str(rts["txs"]),
                  f"{lr.get('p50_ms', 0):.2f} / {lr.get('p99_ms', 0):.2f} / "
                  f"{lr.get('max_ms', 0):.2f}")
    console.print(t)
    console.print("feeder set-up (a fresh process's `checker_for`, imports included): cold "
                  f"{setup['cold']['wall_s']:.2f} s wall / {setup['cold']['cpu_s']:.2f} s CPU"
                  + (f", warm (feeder cache) {setup['warm']['wall_s']:.2f} s / "
                     f"{setup['warm']['cpu_s']:.2f} s; the runs above started "
                     + ("warm" if setup["warm"]["restored"] else "COLD (the cache was not used)")
                     if "warm" in setup else "; the runs above started cold (--cold)"),
                  highlight=False)
    if fast is not None:
        tm = fast["timings"]
        outside = sum(v for k, v in tm.items() if k != "step loop")
        console.print(f"fast, the run's phases (wall s; `Run.timings`): outside the step loop "
                      f"{outside:.2f} s = " + ", ".join(f"{k} {v:.2f}" for k, v in tm.items()
                                                         if k != "step loop")
                      + f"; the step loop {tm.get('step loop', 0.0):.1f} s", highlight=False)
        console.print(f"fast: garbage collector {fast['gc_s']:.1f} s CPU "
                      f"({fast['gc_full_collections']} full collections), "
                      f"{fast['cpu_s'] / fast['steps'] * 1e3:.1f} ms CPU per step",
                      highlight=False)
    for b in bigs:
        console.print(f"{b['prosumers']} prosumers ({b['devices']} devices), {b['shards']} shards: "
                      f"{b['wall_s']:.1f} s for {big_hours:g} h"
                      + (f" (-> {b['projected_24h_s']:.0f} s for 24 h)" if big_hours < 24 else "")
                      + f", {b['loop_ms_per_step']:.0f} ms per step of the loop "
                      f"({b['ms_per_device_step'] * 1e3:.0f} us per device), x{b['ratio']:.2f} "
                      f"the {bigs[0]['shards']}-shard speed; {b['uncommitted']} ledger "
                      "transactions uncommitted", highlight=False)
    if rts is not None:
        lr = rts["lateness"] or {}
        console.print(f"realtime, {rts['devices']} devices over {rts['shards']} shards, "
                      f"{rts['seconds']} s: lateness p50 {lr.get('p50_ms', float('nan')):.2f} / "
                      f"p99 {lr.get('p99_ms', float('nan')):.2f} / max "
                      f"{lr.get('max_ms', float('nan')):.2f} ms (target p99 < "
                      f"{TARGET_P99_MS:.0f} ms: "
                      f"{'met' if lr and lr['p99_ms'] < TARGET_P99_MS else 'MISSED'}); drift "
                      f"{(rts['drift_s'] or 0) * 1e3:+.1f} ms over the run; "
                      f"{rts['uncommitted']} ledger transactions uncommitted", highlight=False)
    for sh in sharded:
        assert fast is not None
        console.print(f"{sh['shards']} shards: x{sh['ratio']:.2f} the single-process speed "
                      f"(wall {fast['wall_s']:.1f} s -> {sh['wall_s']:.1f} s; CPU of the shards "
                      f"and broker {sh['children_cpu_s']:.1f} s; the step loop "
                      f"{fast['loop_ms_per_step']:.0f} -> {sh['loop_ms_per_step']:.0f} ms per "
                      "step); run store "
                      f"{'identical' if sh['same_store'] else 'DIFFERENT'}; "
                      f"{sh['uncommitted']} ledger transactions uncommitted", highlight=False)
    for label, r in ([("fast", fast)] if fast is not None else []) + [
            (f"{sh['shards']} shards", sh) for sh in sharded] + [
            (f"{b['prosumers']} prosumers, {b['shards']} shards", b) for b in bigs]:
        ps = r.get("loop_per_step")
        if ps:
            cpus = ", ".join(f"{k.removesuffix('_cpu_ms')} {v:.1f}" for k, v in ps.items()
                             if k.endswith("_cpu_ms") and k != "run_cpu_ms" and v is not None)
            console.print(f"{label}, per step of the loop: wall {ps['wall_ms']:.1f} ms; CPU ms: "
                          f"run {ps['run_cpu_ms']:.1f}" + (f", {cpus}" if cpus else "")
                          + (f"; the run waiting for HELICS grants {ps['grant_wait_ms']:.1f} ms"
                             if r.get("shards") else ""), highlight=False)
    projected = fast["wall_s"] * 24 / hours if fast is not None else None
    ok_fast = projected is not None and projected < TARGET_FAST_S
    ok_rt = bool(lat) and lat["p99_ms"] < TARGET_P99_MS
    console.print((f"fast: {fast['wall_s']:.1f} s for {hours:g} h"
                   + (f" (x{24 / hours:g} -> {projected:.0f} s for 24 h)" if hours < 24 else "")
                   + f", target < {TARGET_FAST_S:.0f} s: {'met' if ok_fast else 'MISSED'}; "
                   if fast is not None else "fast: not run (--hours 0); ")
                  + f"realtime p99 {lat.get('p99_ms', float('nan')):.2f} ms, target < "
                  f"{TARGET_P99_MS:.0f} ms: {'met' if ok_rt else 'MISSED'}")
    figures = {"bench": "scenario", "python": platform.python_version(), "cpus": os.cpu_count(),
               "fast": ({**fast, "hours": hours, "prosumers": args.prosumers,
                         "projected_24h_s": projected} if fast is not None else None),
               "realtime": {**rt, "devices": 3 * n_rt, "seconds": rt_s},
               "sharded": sharded, "big": bigs, "realtime_sharded": rts,
               "feeder_setup": setup, "feeder_cache": not args.cold,
               "targets": {"fast_24h_s": TARGET_FAST_S, "p99_ms": TARGET_P99_MS},
               "targets_met": {"fast": ok_fast, "realtime": ok_rt}}
    print(json.dumps(figures, separators=(",", ":"), default=str), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return 1 if args.check and not (ok_fast and ok_rt) else 0


if __name__ == "__main__":
    raise SystemExit(main())
