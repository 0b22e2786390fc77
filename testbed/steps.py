"""Work cut into steps: a generator that yields between pieces (a transaction of a block,
a power flow of a grid check) and returns its result. Driven to the end at once
(`run_steps`) it is the plain call; driven in slices on an event loop (`drive`) it lets a
real-time run's ticks and device reads run between the pieces."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator
from typing import TypeVar

R = TypeVar("R")
Steps = Generator[None, None, R]


def run_steps(steps: Steps[R]) -> R:
    """Drive steps to the end, without pausing; their result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


async def drive(steps: Steps[R], slice_s: float) -> R:
    """Drive steps to the end, yielding to the event loop after every `slice_s` of work.
    Cancelled midway, the steps are closed (a ledger block's state journal rolls back)."""
    try:
        until = time.perf_counter() + slice_s
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value
            if time.perf_counter() >= until:
                await asyncio.sleep(0)
                until = time.perf_counter() + slice_s
    finally:
        steps.close()
