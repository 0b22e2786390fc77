"""The federation's errors (no HELICS import: the engine catches them without it)."""

from __future__ import annotations


class CosimError(RuntimeError):
    """A federation failure, in one line (which federate, what happened)."""


def need_helics() -> None:
    """A clear error instead of an ImportError when the optional `helics` is missing."""
    try:
        import helics  # noqa: F401
    except ImportError:
        raise CosimError("co-simulation needs the helics package (pip install "
                         "'testbed[cosim]', which also brings the helics_broker binary)"
                         ) from None


class FederateLost(CosimError):
    """A federate left mid-run; `devices` are the emulated devices that went with it."""

    def __init__(self, message: str, devices: list[str]) -> None:
        super().__init__(message)
        self.devices = devices
