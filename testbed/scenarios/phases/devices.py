"""Device I/O: every device read over its protocol each step, faults detected from
failed reads, scenario device events played on the emulators, battery setpoints written.

Does network I/O (the drivers) and writes its measurements and events to the run store;
returns each prosumer's measured powers (`Metered`) for the other phases. Real and
emulated devices go through the same drivers; only the emulated ones can be faulted by
a scenario event (refused at load otherwise)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from testbed.config import SiteConfig
from testbed.devices.driver import Device, DeviceError, Reading
from testbed.devices.modbus_link import ModbusLink
from testbed.telemetry.store import RunStore

from ..model import DeviceEvent
from .accounting import Metered

log = logging.getLogger(__name__)

FAULT_AFTER = 2
"""Consecutive failed reads before a device counts as faulted."""
MEASUREMENT_COLS = ("t", "device", "prosumer", "kind", "name", "value")


class DeviceEvents(Protocol):
    """Who plays device events: the run's emulators, or the HELICS shards serving them
    (`cosim.run.RunFederate`)."""

    def silence(self, device: str, silent: bool = True) -> None: ...

    async def offline(self, device: str) -> None: ...

    async def online(self, device: str) -> None: ...


@dataclass(frozen=True)
class StepReadings:
    """One step's readings, as the other phases need them."""

    metered: Mapping[str, Metered]
    """prosumer -> measured powers (last good readings; a stale meter beats none)."""
    soc: Mapping[str, float | None]
    """prosumer -> battery state of charge (0..1), None when unknown."""
    real: Mapping[str, Mapping[str, tuple[float, float]]]
    """prosumer -> kind -> (P W, Q var) of its real (not emulated) devices read this step:
    what the emulated meter beside them must see."""
    faulted: tuple[str, ...] = ()
    """Prosumers whose battery just faulted (they leave the market)."""
    recovered: tuple[str, ...] = ()


@dataclass
class _Prosumer:
    name: str
    devices: dict[str, str] = field(default_factory=dict)
    """kind -> device name."""
    last: dict[str, Reading] = field(default_factory=dict)
    faulted_at: float | None = None
    setpoint_w: float = 0.0


def _num(values: Mapping[str, Any], key: str) -> float:
    v = values.get(key)
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else 0.0


class DeviceIO:
    def __init__(self, site: SiteConfig, devices: Mapping[str, Device], store: RunStore,
                 emulators: DeviceEvents | None = None) -> None:
        self.devices = dict(devices)
        self.store = store
        self.emulators = emulators
        self.prosumers: dict[str, _Prosumer] = {}
        self.owner: dict[str, tuple[str, str]] = {}
        """device -> (prosumer, kind)."""
        self.real: set[str] = set()
        for p, d in site.devices():
            self.prosumers.setdefault(p.name, _Prosumer(p.name)).devices[d.kind.value] = d.name
            self.owner[d.name] = (p.name, d.kind.value)
            if not d.emulated:
                self.real.add(d.name)
        self.read_errors = 0
        self.setpoint_errors = 0
        self.faults: list[dict[str, Any]] = []
        self._fails: dict[str, int] = {}
        self._active: set[int] = set()
        self._groups = _by_link(self.devices)
        piped = {x.endpoint: x.window for _, x in self._links() if x.window > 1}
        if piped:
            log.info("Modbus links pipelined (requests in flight): %s",
                     ", ".join(f"{e} ({n})" for e, n in piped.items()))

    async def connect(self) -> None:
        await asyncio.gather(*(d.connect() for d in self.devices.values()),
                             return_exceptions=True)

    async def close(self) -> None:
        for d in self.devices.values():
            with contextlib.suppress(Exception):
                await d.close()

    def battery(self, prosumer: str) -> str | None:
        return self.prosumers[prosumer].devices.get("battery")

    # ------------------------------------------------------------------ events

    async def events(self, t: float, events: list[DeviceEvent]) -> None:
        """Start or end the scenario's device events due at `t` (emulated devices only)."""
        for i, e in enumerate(events):
            on = e.active(t)
            if on == (i in self._active):
                continue
            (self._active.add if on else self._active.discard)(i)
            assert self.emulators is not None
            if e.kind == "device-silent":
                self.emulators.silence(e.device, on)
            elif on:
                await self.emulators.offline(e.device)
            else:
                await self.emulators.online(e.device)
            what = {"device-offline": "gateway off the network",
                    "device-silent": "stops answering"}[e.kind]
            self.store.event(t, e.kind if on else f"{e.kind}-end", e.device,
                             f"{e.device}: {what}" if on else f"{e.device}: back")

    # ------------------------------------------------------------------ reads

    async def step(self, t: float, dt: float) -> StepReadings:
        """Read every device; record the measurements; detect faults and recoveries."""
        names = list(self.devices)
        read = await asyncio.gather(*(self._read_all(g) for g in self._groups))
        by_name = {n: r for group, rs in zip(self._groups, read, strict=True)
                   for n, r in zip(group, rs, strict=True)}
        results = [by_name[n] for n in names]
        rows = []
        isfinite = math.isfinite
        faulted: list[str] = []
        recovered: list[str] = []
        real: dict[str, dict[str, tuple[float, float]]] = {}
        for name, r in zip(names, results, strict=True):
            owner, kind = self.owner[name]
            pr = self.prosumers[owner]
            if isinstance(r, BaseException):
                if not isinstance(r, DeviceError):
                    raise r
                if self._failed(pr, name, kind, t, r):
                    faulted.append(owner)
                continue
            if self._answered(pr, name, t):
                recovered.append(owner)
            pr.last[kind] = r
            if name in self.real:
                real.setdefault(owner, {})[kind] = (_num(r.values, "p_w"),
                                                    _num(r.values, "q_var"))
            for key, v in r.values.items():
                cls = v.__class__  # float and int first: a type test is a third of isinstance's
                if (cls is float or cls is int or (cls is not bool and isinstance(v, int | float))) \
                        and isfinite(v):
                    rows.append((t, name, owner, kind, key, float(v)))
        self.store.insert_many("measurements", MEASUREMENT_COLS, rows)
        metered, soc = {}, {}
        for name, pr in self.prosumers.items():
            last = pr.last
            m, pv, bat = last.get("meter"), last.get("pv"), last.get("battery")
            metered[name] = Metered(
                import_w=_num(m.values, "p_w") if m else 0.0,
                pv_w=_num(pv.values, "p_w") if pv else 0.0,
                battery_w=_num(bat.values, "p_w") if bat else 0.0,
                q_var=_reactive(m, pv, bat), has_meter=m is not None)
            s = bat.values.get("soc_pct") if bat else None
            soc[name] = None if s is None else float(s) / 100.0
        return StepReadings(metered, soc, real, tuple(faulted), tuple(recovered))

    async def _read_all(self, names: list[str]) -> list[Reading | Exception]:
        """Read the devices sharing a link: at once on a pipelined link (their requests
        leave in one write), else one after another (the link carries one request at a
        time anyway): a task per link, not per device waiting on the link."""
        devices = self.devices
        if len(names) > 1 and devices[names[0]].link.window > 1:  # type: ignore[attr-defined]
            # the others' tasks start in the next loop pass, before the link's flush that
            # the first device's request scheduled: all leave in the one write
            loop = asyncio.get_running_loop()
            rest = [loop.create_task(_read(devices[n])) for n in names[1:]]
            return [await _read(devices[names[0]]), *[await t for t in rest]]
        return [await _read(devices[n]) for n in names]

    def links(self) -> dict[str, Any]:
        """The Modbus links by the devices on them (not by endpoint: the emulators' ports
        are free ones, and a summary must not differ between two runs of a seed):
        pipelined ones with their requests in flight, and those carrying one at a time."""
        pipelined, single = [], []
        for names, link in self._links():
            if link.window > 1:
                pipelined.append({"devices": names, "in_flight": link.window})
            else:
                single.append(names)
        return {"pipelined": pipelined, "one_at_a_time": single}

    def _links(self) -> list[tuple[list[str], ModbusLink]]:
        """The Modbus links with the devices on them, in site order (`_by_link`'s groups)."""
        return [(names, link) for names in self._groups
                if isinstance(link := getattr(self.devices[names[0]], "link", None), ModbusLink)]

    def _failed(self, pr: _Prosumer, device: str, kind: str, t: float,
                exc: Exception) -> bool:
        """Count a failed read; True when it faults the prosumer's battery."""
        self.read_errors += 1
        n = self._fails.get(device, 0) + 1
        self._fails[device] = n
        if n == 1:
            self.store.event(t, "read-failed", device, str(exc)[:300])
        faulted = False
        if n == FAULT_AFTER and kind == "battery" and pr.faulted_at is None:
            pr.faulted_at = t
            pr.setpoint_w = 0.0
            faulted = True
            self.faults.append({"device": device, "prosumer": pr.name, "t": t,
                                "reason": str(exc)[:200]})
            self.store.event(t, "fault", device, f"{pr.name} leaves the market: its battery "
                             f"does not answer ({str(exc)[:200]})")
        if n == FAULT_AFTER and kind != "meter":  # a stale meter value beats none
            pr.last.pop(kind, None)
        return faulted

    def _answered(self, pr: _Prosumer, device: str, t: float) -> bool:
        """Reset the device's failure count; True when its prosumer's battery recovers."""
        n = self._fails.get(device, 0)
        if not n:
            return False
        self._fails[device] = 0
        if n >= FAULT_AFTER:
            self.store.event(t, "recovered", device, f"{device} answers again")
            if pr.devices.get("battery") == device and pr.faulted_at is not None:
                pr.faulted_at = None
                return True
        return False

    # ------------------------------------------------------------------ commands

    async def command(self, t: float, setpoints: Mapping[str, float]) -> None:
        """Write battery setpoints (W, + discharge) through the same drivers, real or
        emulated; a faulted battery is skipped, an unchanged zero is not re-sent."""
        for name, w in setpoints.items():
            pr = self.prosumers[name]
            device = pr.devices.get("battery")
            if device is None or pr.faulted_at is not None:
                continue
            if w == 0.0 and pr.setpoint_w == 0.0:
                continue
            try:
                await self.devices[device].write("power_w", round(w, 1))
                pr.setpoint_w = w
                self.store.event(t, "setpoint", device, f"{w:.1f} W")
            except DeviceError as exc:
                self.setpoint_errors += 1
                self.store.event(t, "setpoint-failed", device, str(exc)[:300])

    def summary(self) -> dict[str, Any]:
        return {"real": sorted(self.real), "links": self.links(),
                "faulted_at": {n: p.faulted_at for n, p in self.prosumers.items()}}


async def _read(device: Device) -> Reading | Exception:
    try:
        return await device.read()
    except Exception as exc:  # noqa: BLE001 - sorted out by the caller, as gather's
        return exc


def _by_link(devices: Mapping[str, Device]) -> list[list[str]]:
    """Device names grouped by the Modbus link they share, in site order; any other
    device alone (an OPC UA session takes concurrent requests)."""
    groups: dict[int, list[str]] = {}
    for name, d in devices.items():
        link = getattr(d, "link", None)
        key = id(link) if isinstance(link, ModbusLink) else id(d)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def _reactive(meter: Reading | None, pv: Reading | None, bat: Reading | None) -> float:
    """Reactive injection (var, + into the grid) at the connection point: the meter's when
    it reports one, else the inverters'; 0 (unity power factor) where none is reported."""
    if meter is not None and isinstance(meter.values.get("q_var"), int | float):
        return -float(meter.values["q_var"])  # the meter counts + import
    return sum(float(r.values["q_var"]) for r in (pv, bat)
               if r is not None and isinstance(r.values.get("q_var"), int | float)
               and math.isfinite(r.values["q_var"]))
