"""The run as a pipeline of phases (docs/architecture.md, "one step").

Each phase is an object with its own state and a small uniform interface:

- `step(t, dt, ...)`  once per clock step, with the data it needs passed in;
- `interval_end(i, t, ...)`  at the end of each market interval;
- `summary()`  its part of the run's summary.

A phase returns what others need (readings, voltages, setpoints, transfers); `Run` passes
it on, so no phase reaches into another's state. Phases that only compute (accounting,
settlement, the feeder's statistics, expectations) are pure and tested with numbers;
the ones that do I/O (device I/O, market round, ledger) say so in their docstrings.
"""

from __future__ import annotations

from typing import Any, Protocol


class Phase(Protocol):
    def summary(self) -> dict[str, Any]: ...
