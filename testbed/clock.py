"""Time origin of every run (ground floor: any room may import this module).

Simulated time is seconds since midnight of day 0; what agents sign and nodes record is
EPOCH + simulated time, so message dates look like real timestamps and replay exactly."""

from __future__ import annotations

from datetime import UTC, datetime

EPOCH = datetime(2026, 6, 21, tzinfo=UTC).timestamp()
"""Day 0 of every scenario: a midsummer Sunday."""
