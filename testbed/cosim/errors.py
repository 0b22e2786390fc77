"""The federation's errors (no HELICS import: the engine catches them without it)."""

from __future__ import annotations


class CosimError(RuntimeError):
    """A federation failure, in one line (which federate, what happened)."""


class FederateLost(CosimError):
    """A federate left mid-run; `devices` are the emulated devices that went with it."""

    def __init__(self, message: str, devices: list[str]) -> None:
        super().__init__(message)
        self.devices = devices
