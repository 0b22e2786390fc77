"""Telemetry benchmark: points per second into VictoriaMetrics through the sink, against
a bare influxdb-client batch write of the same points, in the same run.

Run:  python bench/telemetry.py [--devices 150] [--steps 1440] [--quick] [--json PATH]

What is measured (a VictoriaMetrics started on a loopback port; Debian `victoria-metrics`)
    1. A synthetic run store: `--devices` devices (PV, battery, meter in turn, each with
       its kind's readings) over `--steps` one-minute steps, plus the feeder and clock
       rows of every step: the shape of a 24 h, 50-prosumer run.
    2. sink: `telemetry.influx.backfill` on it: the server is asked what it holds for
       the run (nothing yet), then rows are read from SQLite, mapped to line protocol,
       written in batches of 5,000 with retries, and acknowledged in telemetry.db.
    2b. verification: `backfill` again once the server holds everything: the server's
       export of the run read back and compared point by point with the store (what
       the sink does at the end of every run and after an outage); writes nothing.
    3. bare: the same lines (pre-made, run tag renamed so nothing is deduplicated)
       through influxdb-client's batching WriteApi (batch 5,000), flushed and closed.
    4. mapping only: store rows to line protocol, no network (where the sink's time goes).
    5. a whole run: `testbed run demo` (fast) with and without the live sink, wall time
       (alternated, best of two).
    6. real time: `--rt-prosumers` prosumers (3 devices each, bench/scenario.py's site) at
       a 1 s step, speed 1, for `--realtime-s` seconds, with and without the live sink
       (flush every 0.5 s): tick lateness p50/p99/max, i.e. whether the sink's thread
       holds up the run's clock.

Output: a table (rich) and, as the last line on stdout, one JSON object with all figures
(also written to `--json PATH`). Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from testbed.config import InfluxConfig
from testbed.devices.driver import MEASUREMENTS, DeviceKind
from testbed.scenarios.engine import Run
from testbed.scenarios.model import load_scenario
from testbed.telemetry.influx import backfill, lines
from testbed.telemetry.store import RunStore
from testbed.telemetry.victoria import VictoriaMetrics, find_victoria_metrics

sys.path.insert(0, str(Path(__file__).parent))
from scenario import scenario, site_file  # noqa: E402  (the scenario bench's site, shared)

console = Console(stderr=True)


def synthetic_run(folder: Path, devices: int, steps: int) -> Path:
    """A run store shaped like a real one (what the sink reads), quickly."""
    run = folder / "bench-run"
    st = RunStore(run / "run.db")
    st.put_meta("run_id", "bench-run")
    st.put_meta("sim_start_s", "0")
    st.put_meta("time_origin_ms", str(int(time.time()) * 1000))
    kinds = [DeviceKind.PV, DeviceKind.BATTERY, DeviceKind.METER]
    for k in range(1, steps + 1):
        t = 60.0 * k
        rows = []
        for d in range(devices):
            kind = kinds[d % 3]
            for i, name in enumerate(MEASUREMENTS[kind]):
                rows.append((t, f"dev-{d}", f"house-{d // 3}", kind.value, name,
                             1000.0 * ((k * 7 + d * 13 + i) % 97) / 97.0))
        st.insert_many("measurements", ("t", "device", "prosumer", "kind", "name", "value"), rows)
        st.insert("feeder", {"t": t, "light": "green", "vm_min_pu": 0.97 + k * 1e-6,
                             "vm_max_pu": 1.01, "max_line_pct": 40.0, "max_trafo_pct": 50.0,
                             "losses_w": 900.0, "import_w": 5e4})
        st.insert("steps", {"step": k, "t": t, "late_ms": None, "wall": time.time()})
        st.commit()
    st.close()
    return run


def bare_write(url: str, records: list[str], batch: int) -> float:
    """influxdb-client's own batching writer, as a user would call it."""
    from influxdb_client import InfluxDBClient, WriteOptions, WritePrecision

    t0 = time.perf_counter()
    with InfluxDBClient(url=url, token="", org="testbed") as client:
        api = client.write_api(write_options=WriteOptions(batch_size=batch, flush_interval=1000))
        api.write(bucket="testbed", org="testbed", record=records,
                  write_precision=WritePrecision.MS)
        api.close()  # flushes every batch
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description="Times the InfluxDB sink against VictoriaMetrics.")
    ap.add_argument("--devices", type=int, default=150)
    ap.add_argument("--steps", type=int, default=1440)
    ap.add_argument("--rt-prosumers", type=int, default=30)
    ap.add_argument("--realtime-s", type=int, default=None, help="default 120; quick 60 "
                    "(at least one 60 s market interval)")
    ap.add_argument("--quick", action="store_true", help="30 devices x 240 steps, 60 s real time")
    ap.add_argument("--json", metavar="PATH", help="also write the figures to PATH")
    args = ap.parse_args()
    if args.quick:
        args.devices, args.steps = 30, 240
    rt_s = args.realtime_s or (60 if args.quick else 120)
    if find_victoria_metrics() is None:
        console.print("victoria-metrics not installed (apt-get install victoria-metrics): "
                      "nothing to measure")
        return 0
    figures: dict[str, Any] = {"machine": platform.machine(), "python": sys.version.split()[0],
                               "devices": args.devices, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp, VictoriaMetrics(Path(tmp) / "vm") as vm:
        t0 = time.perf_counter()
        run = synthetic_run(Path(tmp), args.devices, args.steps)
        figures["store_build_s"] = time.perf_counter() - t0
        cfg = InfluxConfig(url=vm.url)

        t0 = time.perf_counter()
        made = lines(run)
        map_s = time.perf_counter() - t0
        n = len(made)
        figures["points"] = n

        t0 = time.perf_counter()
        res = backfill(run, cfg)
        sink_s = time.perf_counter() - t0
        assert res.points == n, (res.points, n)

        t0 = time.perf_counter()
        again = backfill(run, cfg)
        verify_s = time.perf_counter() - t0
        assert again.points == 0 and sum(again.held.values()) == n, again
        figures.update({"verify_s": verify_s, "verify_points_per_s": n / verify_s,
                        "verify_vs_sink_write": verify_s / sink_s})

        bare_s = bare_write(vm.url, [p.replace("run=bench-run", "run=bench-bare", 1)
                                     for p in made], cfg.batch_size)
        on_server = sum(len(s["values"]) for s in vm.export('{run="bench-bare",'
                                                            '__name__="clock_step"}'))
        figures.update({
            "mapping_s": map_s, "mapping_points_per_s": n / map_s,
            "sink_s": sink_s, "sink_points_per_s": n / sink_s, "sink_batches": res.batches,
            "bare_s": bare_s, "bare_points_per_s": n / bare_s,
            "sink_vs_bare": (n / sink_s) / (n / bare_s), "bare_clock_points_on_server": on_server,
        })

        walls = {"without": float("inf"), "with": float("inf")}
        for _ in range(2):  # alternated, best of two: the first run also warms up imports
            for label, influx in (("without", None), ("with", InfluxConfig(url=vm.url,
                                                                           flush_s=0.5))):
                t0 = time.perf_counter()
                out = asyncio.run(Run(load_scenario("demo"), out=Path(tmp) / f"runs-{label}",
                                      influx=influx, report=False).execute())
                walls[label] = min(walls[label], time.perf_counter() - t0)
                if influx is not None:
                    figures["demo_points"] = out.summary["telemetry"]["points"]
                    figures["demo_end_verify_s"] = out.summary["telemetry"]["verify_s"]
        figures["demo_wall_s_without_sink"] = walls["without"]
        figures["demo_wall_s_with_sink"] = walls["with"]
        figures["demo_wall_ratio"] = walls["with"] / walls["without"]

        rt_site = site_file(Path(tmp), args.rt_prosumers, "kerber-vorstadtnetz")
        rt_sc = scenario(rt_site, start="12:00", duration=rt_s, step=1,
                         clock={"mode": "realtime", "speed": 1.0},
                         market={"buy_price": 0.4, "interval_s": 60})
        lateness: dict[str, Any] = {}
        for label, influx in (("without", None), ("with", InfluxConfig(url=vm.url,
                                                                       flush_s=0.5))):
            out = asyncio.run(Run(rt_sc, out=Path(tmp) / f"rt-{label}", influx=influx,
                                  report=False).execute())
            lateness[label] = {**out.summary["clock"]["lateness"],
                               "uncommitted": out.summary["ledger"]["uncommitted"]}
            if influx is not None:
                lateness["points"] = out.summary["telemetry"]["points"]
        figures["realtime"] = {"prosumers": args.rt_prosumers, "seconds": rt_s, **lateness}

    t = Table(title=f"telemetry: {n:,} points ({args.devices} devices x {args.steps} steps "
                    f"+ feeder + clock) into VictoriaMetrics")
    t.add_column("path")
    t.add_column("wall s", justify="right")
    t.add_column("points/s", justify="right")
    t.add_row("sink (store -> line protocol -> batches of 5,000, acknowledged)",
              f"{sink_s:.2f}", f"{n / sink_s:,.0f}")
    t.add_row("bare influxdb-client batching WriteApi, same lines", f"{bare_s:.2f}",
              f"{n / bare_s:,.0f}")
    t.add_row("mapping only (store -> line protocol, no network)", f"{map_s:.2f}",
              f"{n / map_s:,.0f}")
    t.add_row("verification (server read back, compared; nothing missing)", f"{verify_s:.2f}",
              f"{n / verify_s:,.0f}")
    console.print(t)
    r = Table(title=f"real time: {3 * args.rt_prosumers} devices at a 1 s step for {rt_s} s "
                    f"({lateness['points']:,} points live)")
    for c in ("live sink", "lateness p50 ms", "p99 ms", "max ms", "txs not committed"):
        r.add_column(c, justify="right" if c != "live sink" else "left")
    for label in ("without", "with"):
        lat = lateness[label]
        r.add_row(label, f"{lat['p50_ms']:.2f}", f"{lat['p99_ms']:.2f}", f"{lat['max_ms']:.2f}",
                  str(lat["uncommitted"]))
    console.print(r)
    console.print(f"sink / bare throughput: {figures['sink_vs_bare']:.2f}x; "
                  f"`testbed run demo` fast: {walls['without']:.2f} s without the sink, "
                  f"{walls['with']:.2f} s with it ({figures['demo_points']} points live, "
                  f"end-of-run verification {figures['demo_end_verify_s']:.2f} s), "
                  f"ratio {figures['demo_wall_ratio']:.2f}")
    print(json.dumps(figures, separators=(",", ":"), default=str), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
