"""Time origin and the run's clock (ground floor: any room may import this module).

Simulated time is seconds since midnight of day 0; what agents sign and nodes record is
EPOCH + simulated time, so message dates look like real timestamps and replay exactly."""

from __future__ import annotations

import asyncio
import math
import time as _time
from datetime import UTC, datetime

EPOCH = datetime(2026, 6, 21, tzinfo=UTC).timestamp()
"""Day 0 of every scenario: a midsummer Sunday."""


class Clock:
    """Simulated time, and in realtime mode the wall-clock deadlines of the steps.

    Deadlines are absolute (start + k x step / speed): a late tick does not push later
    ones back, so the run never drifts; each tick's lateness is recorded. Emulated
    devices are stepped by the run on this clock, so they need no alignment of their own."""

    def __init__(self, start_s: float, step_s: float, mode: str, speed: float) -> None:
        self.start_s, self.step_s, self.mode, self.speed = start_s, step_s, mode, speed
        self.sim_s = start_s
        self.lateness_ms: list[float] = []
        self._t0 = 0.0

    @property
    def realtime(self) -> bool:
        return self.mode == "realtime"

    def begin(self) -> None:
        self._t0 = _time.monotonic()

    def now(self) -> float:
        """What agents and nodes sign with: simulated seconds since day-0 midnight, offset
        to a fixed epoch so message dates are real-looking timestamps."""
        if self.realtime:
            return EPOCH + self.start_s + (_time.monotonic() - self._t0) * self.speed
        return EPOCH + self.sim_s

    def advance_to(self, sim_s: float) -> None:
        """Set simulated time (fast mode: the step loop at each step, the market round past
        an auction gate); never backwards."""
        self.sim_s = max(self.sim_s, sim_s)

    def sim_now(self) -> float:
        """Simulated seconds since day-0 midnight (what `now` says, without the epoch)."""
        return self.now() - EPOCH

    async def tick(self, k: int) -> float | None:
        """Wait for step k's deadline (realtime); returns its lateness in ms."""
        if not self.realtime:
            return None
        deadline = self._t0 + k * self.step_s / self.speed
        delay = deadline - _time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        late = max(0.0, (_time.monotonic() - deadline) * 1000.0)
        self.lateness_ms.append(late)
        return late

    def lateness(self) -> dict[str, float] | None:
        if not self.lateness_ms:
            return None
        xs = sorted(self.lateness_ms)
        return {"p50_ms": percentile(xs, 50), "p99_ms": percentile(xs, 99), "max_ms": xs[-1],
                "ticks": len(xs)}


def percentile(xs: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted `xs` (0 when empty)."""
    if not xs:
        return 0.0
    k = min(len(xs) - 1, max(0, math.ceil(p / 100 * len(xs)) - 1))
    return xs[k]
