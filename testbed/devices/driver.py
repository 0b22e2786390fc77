"""The protocol-agnostic device interface the engine talks to.

Whether a device is emulated or real, Modbus/SunSpec or OPC UA, the engine sees a
`Device`: `read()` returns a `Reading` of neutral, unit-suffixed measurement names and
`write()` takes a neutral setpoint name. Each protocol driver maps those onto its own
points; the names below are the contract.

Sign conventions: `p_w` of an inverter or battery is + delivered to the AC bus (battery
+ discharge / - charge); `p_w` of a meter is + import / - export.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class DeviceKind(StrEnum):
    PV = "pv"
    BATTERY = "battery"
    METER = "meter"


MEASUREMENTS: dict[DeviceKind, tuple[str, ...]] = {
    DeviceKind.PV: ("p_w", "q_var", "dc_w", "energy_wh", "voltage_v", "frequency_hz",
                    "limit_pct", "limit_enabled", "rating_w", "temperature_c"),
    DeviceKind.BATTERY: ("p_w", "setpoint_w", "soc_pct", "capacity_wh", "max_charge_w",
                         "max_discharge_w", "soc_min_pct", "soc_max_pct", "voltage_v",
                         "current_a"),
    DeviceKind.METER: ("p_w", "import_wh", "export_wh", "voltage_v", "frequency_hz", "current_a"),
}


@dataclass(frozen=True)
class SetpointSpec:
    """A writable neutral point: what it means and which values a device accepts."""

    name: str
    unit: str
    description: str


SETPOINTS: dict[DeviceKind, dict[str, SetpointSpec]] = {
    DeviceKind.PV: {
        "limit_pct": SetpointSpec("limit_pct", "%", "active-power limit, % of rating (enables it)"),
        "limit_enabled": SetpointSpec("limit_enabled", "0/1", "apply (1) or lift (0) the limit"),
    },
    DeviceKind.BATTERY: {
        "power_w": SetpointSpec("power_w", "W", "AC power, + discharge / - charge"),
    },
    DeviceKind.METER: {},
}


class DeviceError(Exception):
    """Base of everything a driver raises; the message names the device and endpoint."""


class DeviceUnavailable(DeviceError):
    """The device does not answer (connection refused, timeout, dropped); retried later."""


class SetpointRejected(DeviceError):
    """A write refused before sending (out of range) or by the device (Modbus exception)."""


class NotSunSpec(DeviceError):
    """The endpoint answers but has no SunSpec map at any base address."""


@dataclass(frozen=True)
class Reading:
    device: str
    kind: DeviceKind
    time: float
    """Unix time the reading completed."""
    values: dict[str, Any]
    status: dict[str, Any] = field(default_factory=dict)
    """Device state in words: operating state, clamp flags, events."""


class Device(abc.ABC):
    """A device the orchestrator reads and commands."""

    name: str
    kind: DeviceKind

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the connection and discover what the device offers."""

    @abc.abstractmethod
    async def read(self) -> Reading:
        """One consistent snapshot of the device's measurements and status."""

    @abc.abstractmethod
    async def write(self, point: str, value: float) -> None:
        """Command a setpoint (a neutral name from `SETPOINTS`, or a protocol point)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the connection."""

    @property
    @abc.abstractmethod
    def endpoint(self) -> str:
        """Where the device is, for messages and tables."""

    def _err(self, msg: object) -> str:
        """An error message that names the device and where it is."""
        return f"{self.name} ({self.endpoint}): {msg}"

    async def __aenter__(self) -> Device:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
