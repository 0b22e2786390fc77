"""Sweep benchmark: 16 demo runs one after the other vs `testbed sweep` on a LocalCluster.

Run:  python bench/sweep.py [--hours 4] [--workers N] [--quick] [--json PATH] [--check]

What is measured
    The 16 points of 4 seeds x 2 pricings x 2 thresholds of the bundled demo (3 prosumers,
    grid check and 4 PoE validators on, `--hours` simulated at 1-minute steps, fast clock,
    each run writing its store, summary and report.html):
    1. serial: the 16 runs one after the other in this process (imports already paid: the
       strictest baseline; a shell loop of `testbed run` would also pay an interpreter
       start per run);
    2. sweep: `run_sweep` on a fresh Dask LocalCluster of `--workers` processes (default
       one per core), one thread each, cluster start-up included (the workers fork from
       a server that imported testbed once; that import is not in the CPU figure).
    Speed-up = serial wall / sweep wall (target >= 1.8 on 2 cores). The CPU time of the
    runs on both sides shows whether a run costs more in a worker than alone (it should
    not): on a machine shared with other work, wall-clock ratios move with that work. The two sides' summaries
    are compared (wall-clock fields aside): they must be equal, run for run.
    The machine's load average before each side is printed: on a shared machine other
    work takes cores from both sides alike only if it is steady.

Output: a table (rich) and, as the last line on stdout, one JSON object with all figures
(also written to `--json PATH`). `--check` exits 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from testbed.scenarios.engine import Run
from testbed.scenarios.model import Scenario
from testbed.sweeps import load_sweep, plan, run_sweep
from testbed.sweeps.runner import completed_run

console = Console(width=None if sys.stdout.isatty() else 120)
TARGET = 1.8
VOLATILE = ("run_id", "clock")


def sweep_file(folder: Path, hours: float) -> Path:
    path = folder / "bench.yaml"
    path.write_text(
        "name: bench\nbase: demo\n"
        f"set: {{duration: {int(hours * 3600)}}}\n"
        "grid:\n  seed: [1, 2, 3, 4]\n  market.pricing: [pay_as_bid, pay_as_clear]\n"
        "  market.threshold_kwh: [0.2, 0.5]\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hours", type=float, default=4.0, help="simulated hours per run")
    ap.add_argument("--workers", type=int, default=None, help="LocalCluster processes")
    ap.add_argument("--quick", action="store_true", help="1-hour runs (about a minute)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    hours = 1.0 if args.quick else args.hours
    with tempfile.TemporaryDirectory(prefix="bench-sweeps-") as tmp:
        folder = Path(tmp)
        sweep = load_sweep(sweep_file(folder, hours))
        points = plan(sweep)
        load_serial = os.getloadavg()[0]
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        serial = []
        for p in points:
            sc = Scenario.model_validate(p.scenario)
            serial.append(asyncio.run(Run(sc, out=folder / "serial").execute()).summary)
        serial_s = time.perf_counter() - t0
        serial_cpu = time.process_time() - cpu0
        load_sweep_avg = os.getloadavg()[0]
        t0 = time.perf_counter()
        res = run_sweep(sweep, points, folder / "sweeps", workers=args.workers)
        sweep_s = time.perf_counter() - t0
        sweep_cpu = res.worker_cpu_s + time.process_time() - cpu0 - serial_cpu
        equal = res.count("done") == len(points)
        for p, want in zip(points, serial, strict=True):
            run = completed_run(res.folder / "points" / p.key)
            got = json.loads((run / "summary.json").read_text()) if run else {}
            equal = equal and ({k: v for k, v in got.items() if k not in VOLATILE}
                               == {k: v for k, v in json.loads(json.dumps(want)).items()
                                   if k not in VOLATILE})
    figures: dict[str, Any] = {
        "runs": len(points), "hours_per_run": hours, "cores": os.cpu_count(),
        "workers": res.workers, "serial_s": round(serial_s, 2),
        "serial_cpu_s": round(serial_cpu, 2), "sweep_s": round(sweep_s, 2),
        "sweep_cpu_s": round(sweep_cpu, 2),
        "sweep_run_wall_s": round(sum(s["wall_s"] for s in res.status.values()), 2),
        "sweep_run_cpu_s": round(sum(s.get("cpu_s", 0.0) for s in res.status.values()), 2),
        "speedup": round(serial_s / sweep_s, 2), "target": TARGET,
        "summaries_equal": equal, "load_before_serial": round(load_serial, 2),
        "load_before_sweep": round(load_sweep_avg, 2)}
    t = Table(title=f"{len(points)} demo runs of {hours:g} h: serial vs sweep")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("serial wall (one process)", f"{serial_s:.1f} s ({serial_s / len(points):.2f} s/run)")
    t.add_row("sweep wall (LocalCluster, start-up included)",
              f"{sweep_s:.1f} s on {res.workers} workers")
    t.add_row("CPU of the runs: serial / in the workers",
              f"{serial_cpu:.1f} s / {figures['sweep_run_cpu_s']:.1f} s")
    t.add_row("CPU of the whole sweep (workers and this process)", f"{sweep_cpu:.1f} s")
    t.add_row("speed-up", f"{serial_s / sweep_s:.2f} x (target >= {TARGET})")
    t.add_row("summaries equal run for run", str(equal))
    t.add_row("load average before serial / sweep", f"{load_serial:.2f} / {load_sweep_avg:.2f}")
    console.print(t)
    print(json.dumps(figures, separators=(",", ":")), flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if args.check and (figures["speedup"] < TARGET or not equal) else 0


if __name__ == "__main__":
    sys.exit(main())
