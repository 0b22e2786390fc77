"""Scenario sweeps on Dask: many runs of one base scenario with overrides, one table and
one report at the end.

A run is a pure function of its scenario, site and seed, writing its own folder on free
ports, so points are independent Dask tasks: a `LocalCluster` sized to the machine by
default, or any Dask scheduler (`dask-jobqueue` on SLURM/PBS) given its address. Nothing
here schedules: Dask does.
"""

from .model import Point, Sweep, load_sweep, plan
from .results import sweep_table, write_results
from .runner import SweepOutcome, run_sweep

__all__ = ["Point", "Sweep", "SweepOutcome", "load_sweep", "plan", "run_sweep", "sweep_table",
           "write_results"]
