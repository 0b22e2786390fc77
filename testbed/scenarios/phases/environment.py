"""The environment: the scenario's profiles (irradiance with clouds, household load with
spikes) driving the emulated physics of every emulated prosumer, on the run's clock.

Pure physics (`physics.models`) under pure profiles (`scenarios.profiles`); the emulated
devices serve whatever state this phase leaves. Each step takes the voltage the feeder's
power flow computed at each prosumer's bus and the measured power of the real devices
beside the emulated ones, so an emulated meter sees its real battery and the feeder."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from testbed.config import SiteConfig
from testbed.devices.driver import DeviceKind
from testbed.devices.emulator import EmulatedSite
from testbed.physics.models import LoadParams

from ..model import CloudEvent, LoadSpikeEvent, Scenario


class Environment:
    def __init__(self, physics: EmulatedSite, irradiance: Callable[[float], float],
                 load: Callable[[str, LoadParams, float], float]) -> None:
        self.physics = physics
        physics.irradiance = irradiance
        physics.load = load

    def step(self, t: float, dt: float, *, vm_pu: Mapping[str, float] | None = None,
             measured: Mapping[str, Mapping[str, tuple[float, float]]] | None = None) -> None:
        """Advance the emulated physics to `t` (by `dt`). `vm_pu`: prosumer -> voltage at
        its bus from the last power flow (p.u.); `measured`: prosumer -> kind -> (P, Q) of
        its real devices, read in the last step."""
        self.physics.step(dt, external_w=external_w(measured or {}),
                          voltage_v=self.volts(vm_pu or {}))

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
    out = []
    for p, d in site.devices():
        if d.emulated:
            continue
        if d.kind == DeviceKind.PV:
            out.append(f"{d.name}: irradiance profile{' and cloud events' if clouds else ''} "
                       "do not reach a real PV inverter")
        elif d.kind == DeviceKind.METER:
            spikes = any(isinstance(e, LoadSpikeEvent) and e.prosumer in (None, p.name)
                         for e in sc.events)
            out.append(f"{d.name}: household load profile{' and load spikes' if spikes else ''}"
                       " do not reach a real meter")
    return out
