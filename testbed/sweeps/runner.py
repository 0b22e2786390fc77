"""Running a sweep's points as Dask tasks, and knowing which are done.

Folder of a sweep (`OUT/NAME/`): `sweep.json` (what it was made from), `points/KEY/`
per point with `point.json` (its overrides) and the run's own folder (run.db,
summary.json, report.html), or `error.txt` when the run failed. A point is done when its
run folder holds a complete summary.json (the engine writes it last but the report): a
rerun skips those, clears half-written run folders of a killed sweep and runs the rest.
Workers elsewhere (`--scheduler`) must see the sweep folder at the same path (a shared
file system, as on any cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from testbed.config import ConfigError

from .model import Point, Sweep, first_error

FORKSERVER = ("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
              else "spawn")
"""How local workers start: forked from a server process that imported testbed once."""
SITE_FILE = "site.json"
"""A point's overridden site (JSON is YAML: the site loader reads it with its checks)."""


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def completed_run(point_dir: Path) -> Path | None:
    """The point's finished run folder: one with a summary.json that parses whole."""
    for summary in sorted(point_dir.glob("*/summary.json")):
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "run_id" in data:
            return summary.parent
    return None


def run_point(point_dir: str, scenario: dict[str, Any], source: str,
              site: dict[str, Any] | None, report: bool) -> dict[str, Any]:
    """One point, on a Dask worker: clear what a killed attempt left, run, and say how it
    went. A failed run is an outcome (status 'failed' with its error), not an exception,
    so the sweep goes on."""
    from testbed.scenarios.engine import Run
    from testbed.scenarios.model import Scenario

    folder = Path(point_dir)
    done = completed_run(folder)
    if done is not None:  # a resubmitted task (a worker lost after the run) is not rerun
        return {"status": "done", "run_dir": done.name, "error": "", "wall_s": 0.0}
    for child in folder.iterdir():
        if child.is_dir():  # a half-written run of a killed sweep
            shutil.rmtree(child)
    (folder / "error.txt").unlink(missing_ok=True)
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        if site is not None:
            _write_atomic(folder / SITE_FILE, json.dumps(site, indent=1, sort_keys=True))
            scenario = {**scenario, "site": str((folder / SITE_FILE).resolve())}
        sc = Scenario.model_validate(scenario, context={"base": Path(source).parent})
        sc._source = source
        result = asyncio.run(Run(sc, out=folder, report=report).execute())
    except Exception as exc:  # recorded with its error; the sweep goes on
        error = _describe(exc, source)
        _write_atomic(folder / "error.txt", error + "\n\n" + traceback.format_exc())
        return {"status": "failed", "run_dir": "", "error": error,
                "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0}
    return {"status": "done", "run_dir": result.run_dir.name, "error": "",
            "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0}


def _describe(exc: BaseException, source: str) -> str:
    """One line for the results table (the traceback goes to error.txt)."""
    if isinstance(exc, ValidationError):  # the scenario changed under the sweep (a file)
        return f"ConfigError: {source}: {first_error(exc)}"[:2000]
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:2000]


@dataclass
class SweepOutcome:
    folder: Path
    points: list[Point]
    status: dict[str, dict[str, Any]] = field(default_factory=dict)
    """key -> {status: done|failed|skipped, run_dir, error, wall_s, cpu_s (the worker
    process's CPU time over the run)}"""
    wall_s: float = 0.0
    workers: int = 0
    worker_cpu_s: float = 0.0
    """CPU time of the worker processes since they started (all their work, Dask's too)."""

    def count(self, status: str) -> int:
        return sum(1 for s in self.status.values() if s["status"] == status)


Progress = Callable[[str, int, int, int, int], None]
"""(event, done, failed, skipped, total) after each point."""


def prepare(sweep: Sweep, points: list[Point], out: Path) -> Path:
    """The sweep's folder with its points' folders; refuses one made from another base."""
    folder = Path(out) / sweep.name
    (folder / "points").mkdir(parents=True, exist_ok=True)
    base = points[0].base if points else ""
    meta = folder / "sweep.json"
    if meta.exists():
        try:
            old = json.loads(meta.read_text(encoding="utf-8")).get("base")
        except (OSError, ValueError, AttributeError):
            old = None
        if old not in (None, base):
            raise ConfigError(f"{sweep.source}: base: {folder} holds a sweep of another base "
                              "scenario or site; give another --out (or remove that folder)")
    _write_atomic(meta, json.dumps({"name": sweep.name, "base": base, "source": sweep.source,
                                    "sweep": sweep.model_dump(mode="json")}, indent=1))
    for p in points:
        d = folder / "points" / p.key
        d.mkdir(exist_ok=True)
        if not (d / "point.json").exists():
            _write_atomic(d / "point.json", json.dumps({"key": p.key, "overrides": p.overrides},
                                                       indent=1, sort_keys=True, default=str))
    return folder


class SchedulerError(RuntimeError):
    """The Dask scheduler given cannot be reached."""


def _client(scheduler: str | None, workers: int | None) -> Any:
    import dask
    from distributed import Client, LocalCluster
    from distributed.utils import get_mp_context

    if scheduler:
        try:
            return Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise SchedulerError(f"--scheduler {scheduler}: cannot reach it ({exc})") from None
    n = workers or os.cpu_count() or 1
    if dask.config.get("distributed.worker.multiprocessing-method") == "forkserver":
        # the workers fork from a server that has imported the run engine once, instead
        # of each starting an interpreter and importing it again
        ctx = get_mp_context()
        ctx.set_forkserver_preload(["distributed", "testbed.sweeps.runner",
                                    "testbed.scenarios.engine", "testbed.grid.feeder",
                                    "testbed.dashboards.report"])
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.CRITICAL)
    return Client(cluster)


def _close(client: Any, own: bool) -> None:
    cluster = getattr(client, "cluster", None)
    client.close()
    if own and cluster is not None:
        cluster.close()


def run_sweep(sweep: Sweep, points: list[Point], out: Path = Path("sweeps"), *,
              scheduler: str | None = None, workers: int | None = None,
              progress: Progress | None = None) -> SweepOutcome:
    """Run the points not done yet on Dask (a LocalCluster of `workers` processes, one
    thread each, by default one per core; or the scheduler at `scheduler`)."""
    folder = prepare(sweep, points, out)
    res = SweepOutcome(folder, points)
    todo = []
    for p in points:
        done = completed_run(folder / "points" / p.key)
        if done is not None:
            res.status[p.key] = {"status": "skipped", "run_dir": done.name, "error": "",
                                 "wall_s": 0.0}
        else:
            todo.append(p)

    def tick(event: str) -> None:
        if progress is not None:
            progress(event, res.count("done"), res.count("failed"), res.count("skipped"),
                     len(points))

    tick("start")
    t0 = time.perf_counter()
    if todo:
        import dask
        from distributed import as_completed

        with contextlib.ExitStack() as stack:
            # local workers (restarted ones too): non-daemonic, as a run may start
            # processes of its own (the ledger's batch verifier), which a daemonic process
            # may not; and quiet beside the run's thread: no statistical profiler (100
            # stack samples a second), event-loop health checks every 1 s instead of 20 ms,
            # the system monitor every 5 s (measured: runs cost 9-28 % more CPU in a
            # worker with the defaults, 6 % without)
            stack.enter_context(dask.config.set({
                "distributed.worker.daemon": False,
                "distributed.worker.profile.enabled": False,
                "distributed.admin.tick.interval": "1s",
                "distributed.admin.system-monitor.interval": "5s",
                "distributed.worker.multiprocessing-method": FORKSERVER}))
            client = _client(scheduler, workers)
            stack.callback(_close, client, own=not scheduler)
            res.workers = len(client.scheduler_info().get("workers", {}))
            futures, keys = [], {}
            # the folder in the task key: two sweeps of the same name into two folders,
            # on one shared scheduler, are two sets of tasks (Dask shares equal keys)
            where = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]
            for p in todo:
                fut = client.submit(run_point, str((folder / "points" / p.key).resolve()),
                                    p.scenario, p.source, p.site, sweep.report,
                                    key=f"sweep-{sweep.name}-{p.key}-{where}", pure=False,
                                    retries=0)
                futures.append(fut)
                keys[fut.key] = p.key
            for fut in as_completed(futures):
                key = keys[fut.key]
                try:
                    outcome = fut.result()
                except Exception as exc:  # the worker died (KilledWorker) or similar
                    error = _describe(exc, todo[0].source)
                    _write_atomic(folder / "points" / key / "error.txt", error + "\n")
                    outcome = {"status": "failed", "run_dir": "", "error": error,
                               "wall_s": 0.0}
                res.status[key] = outcome
                tick(outcome["status"])
            with contextlib.suppress(Exception):  # a figure, not a result
                res.worker_cpu_s = sum(client.run(time.process_time).values())
    res.wall_s = time.perf_counter() - t0
    return res

