"""Run store (SQLite, the source of truth of a run) and, later, mirrors of it."""

from .store import WALL_CLOCK_COLUMNS, RunStore

__all__ = ["WALL_CLOCK_COLUMNS", "RunStore"]
