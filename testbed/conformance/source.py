"""Grid sources: what sets the voltage and frequency at the device's terminals.

A conformance test needs to step the grid. `GridSource` is the interface: set V, set f,
let time pass. `EmulatorSource` holds an emulated device's terminal and advances its
physics on the simulated clock (a test runs in seconds of wall time); `ManualSource`
asks an operator to set a programmable AC source by hand and runs in real time. A
programmable source or a HIL simulator plugs in by implementing the four members (e.g.
SCPI `VOLT 253.0` / `FREQ 50.30` over its socket in `set_voltage` / `set_frequency`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from testbed.devices.emulator import EmulatedSite
from testbed.devices.emulator1547 import Ieee1547Device


class GridSource(Protocol):
    nominal_v: float
    """Phase-to-neutral nominal voltage (V)."""
    nominal_f: float

    async def set_voltage(self, v: float) -> None:
        """Phase-to-neutral RMS voltage at the device's terminals (V)."""

    async def set_frequency(self, f: float) -> None:
        """Frequency at the device's terminals (Hz)."""

    async def wait(self, seconds: float) -> None:
        """Let `seconds` pass at the device (simulated or real time)."""

    def now(self) -> float:
        """Seconds on the source's clock."""


class EmulatorSource:
    """The terminal of an emulated IEEE 1547 device, on its site's simulated clock (the
    emulators' own real-time clock must be off: `start(clock=False)`)."""

    def __init__(self, physics: EmulatedSite, device: Ieee1547Device, dt_s: float = 1.0) -> None:
        self.physics, self.device, self.dt_s = physics, device, dt_s
        meter = device.prosumer.params.meter
        self.nominal_v, self.nominal_f = meter.v_nominal, meter.f_nominal
        self._v, self._f = self.nominal_v, self.nominal_f
        device.set_terminal(self._v, self._f)

    async def set_voltage(self, v: float) -> None:
        self._v = v
        self.device.set_terminal(self._v, self._f)

    async def set_frequency(self, f: float) -> None:
        self._f = f
        self.device.set_terminal(self._v, self._f)

    async def wait(self, seconds: float) -> None:
        for _ in range(max(1, round(seconds / self.dt_s))):
            self.physics.step(self.dt_s)
            await asyncio.sleep(0)

    def now(self) -> float:
        return self.physics.t_s

    def release(self) -> None:
        """Give the terminal back to the feeder and meter."""
        self.device.set_terminal(None, None)


class ManualSource:
    """An operator sets a programmable AC source (or a grid simulator) by hand: each change
    is printed and the test waits for Enter; time is real time."""

    def __init__(self, nominal_v: float, nominal_f: float, *,
                 ask: Callable[[str], str] = input, settle_s: float = 0.0) -> None:
        self.nominal_v, self.nominal_f = nominal_v, nominal_f
        self.ask, self.settle_s = ask, settle_s

    async def _prompt(self, what: str) -> None:
        await asyncio.to_thread(self.ask, f"Set the grid source to {what}, then press Enter: ")
        if self.settle_s:
            await asyncio.sleep(self.settle_s)

    async def set_voltage(self, v: float) -> None:
        await self._prompt(f"{v:.1f} V phase-to-neutral ({v / self.nominal_v:.3f} p.u.)")

    async def set_frequency(self, f: float) -> None:
        await self._prompt(f"{f:.3f} Hz")

    async def wait(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def now(self) -> float:
        return time.monotonic()
