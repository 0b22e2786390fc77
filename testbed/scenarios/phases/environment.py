"""The environment: the scenario's profiles (irradiance with clouds, household load with
spikes) driving the emulated physics of every emulated prosumer, on the run's clock.

Pure physics (`physics.models`) under pure profiles (`scenarios.profiles`); the emulated
devices serve whatever state this phase leaves. Each step takes the voltage the feeder's
power flow computed at each prosumer's bus and the measured power of the real devices
beside the emulated ones, so an emulated meter sees its real battery and the feeder."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from testbed.config import SiteConfig
from testbed.devices.driver import DeviceKind
from testbed.devices.emulator import EmulatedSite
from testbed.physics.models import LoadParams

from ..model import (
    CloudEvent,
    FrequencyStepEvent,
    LoadSpikeEvent,
    Scenario,
    VoltageRampEvent,
    VoltageStepEvent,
)


class Environment:
    def __init__(self, physics: EmulatedSite, irradiance: Callable[[float], float],
                 load: Callable[[str, LoadParams, float], float],
                 events: Sequence[object] = ()) -> None:
        self.physics = physics
        physics.irradiance = irradiance
        physics.load = load
        self.grid_events = [e for e in events if isinstance(
            e, VoltageStepEvent | VoltageRampEvent | FrequencyStepEvent)]
        """Voltage and frequency events: they override the feeder at the terminals."""

    def step(self, t: float, dt: float, *, vm_pu: Mapping[str, float] | None = None,
             measured: Mapping[str, Mapping[str, tuple[float, float]]] | None = None) -> None:
        """Advance the emulated physics to `t` (by `dt`). `vm_pu`: prosumer -> voltage at
        its bus from the last power flow (p.u.); `measured`: prosumer -> kind -> (P, Q) of
        its real devices, read in the last step."""
        volts, freqs = self.volts(vm_pu or {}), None
        if self.grid_events:
            volts, freqs = self.grid_at(t, volts)
        self.physics.step(dt, external_w=external_w(measured or {}), voltage_v=volts,
                          frequency_hz=freqs)

    def grid_at(self, t: float, volts: dict[str, float]) -> tuple[dict[str, float],
                                                                  dict[str, float]]:
        """Terminal voltages and frequencies at `t` with the active grid events applied."""
        volts, freqs = dict(volts), {}
        for e in self.grid_events:
            if not e.active(t):  # type: ignore[attr-defined]
                continue
            for name, pr in self.physics.prosumers.items():
                if e.prosumer not in (None, name):  # type: ignore[attr-defined]
                    continue
                if isinstance(e, FrequencyStepEvent):
                    freqs[name] = e.f_hz
                else:
                    v_pu = e.v_pu if isinstance(e, VoltageStepEvent) else e.v_pu(t)  # type: ignore[union-attr]
                    volts[name] = float(v_pu) * pr.params.meter.v_nominal
        return volts, freqs

    def volts(self, vm_pu: Mapping[str, float]) -> dict[str, float]:
        """Per-unit bus voltages in volts at each emulated prosumer's meter."""
        out = {}
        for name, vm in vm_pu.items():
            pr = self.physics.prosumers.get(name)
            if pr is not None and math.isfinite(vm):
                out[name] = vm * pr.params.meter.v_nominal
        return out


def external_w(measured: Mapping[str, Mapping[str, tuple[float, float]]]) -> dict[str, float]:
    """What the real PV inverters and batteries behind each emulated meter put out (W,
    + = generation or discharge); a real meter measures itself and adds nothing."""
    return {name: sum(p for kind, (p, _) in kinds.items() if kind in ("pv", "battery"))
            for name, kinds in measured.items()}


def unreached(sc: Scenario, site: SiteConfig) -> list[str]:
    """Profiles and events that cannot reach a real device (they drive emulated physics
    only): irradiance and clouds miss a real PV inverter, household load and load spikes
    a real meter. Reported in the run's summary."""
    clouds = any(isinstance(e, CloudEvent) for e in sc.events)
    grid = [e for e in sc.events
            if isinstance(e, VoltageStepEvent | VoltageRampEvent | FrequencyStepEvent)]
    out = []
    for p, d in site.devices():
        if d.emulated:
            continue
        if d.kind != DeviceKind.METER and any(e.prosumer in (None, p.name) for e in grid):
            out.append(f"{d.name}: voltage/frequency events do not reach a real device "
                       "(drive it from a grid simulator)")
        if d.kind == DeviceKind.PV:
            out.append(f"{d.name}: irradiance profile{' and cloud events' if clouds else ''} "
                       "do not reach a real PV inverter")
        elif d.kind == DeviceKind.METER:
            spikes = any(isinstance(e, LoadSpikeEvent) and e.prosumer in (None, p.name)
                         for e in sc.events)
            out.append(f"{d.name}: household load profile{' and load spikes' if spikes else ''}"
                       " do not reach a real meter")
    return out
