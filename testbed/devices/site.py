"""A site's devices, as a whole: start its emulators, or open drivers to all of them.

`SiteEmulators` builds the physics of every emulated prosumer, serves each emulated
device over its protocol (devices sharing host:port share one server, by unit id) and
runs the simulated clock. `open_devices` gives the orchestrator one `Device` per site
device, emulated or real, sharing one connection per endpoint.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from ..config import ProsumerConfig, SiteConfig
from ..physics.models import ProsumerParams
from .driver import Device, DeviceKind
from .emulator import EmulatedDevice, EmulatedSite
from .modbus import ModbusEmulatorServer, ModbusLink, SerialSettings, SunSpecDevice
from .modbus_link import MAX_IN_FLIGHT
from .opcua import OpcUaDevice, OpcUaEmulatorServer, OpcUaLink, OpcUaSecurity

T = TypeVar("T")


@dataclass(frozen=True)
class Endpoint:
    """Where a device answers."""

    name: str
    kind: DeviceKind
    prosumer: str
    protocol: str
    host: str
    port: int
    unit: int | None
    """Modbus unit id; None for OPC UA (the device is Objects/Devices/<name>)."""
    emulated: bool
    transport: str = "tcp"
    """Modbus: tcp, rtu-over-tcp, or rtu (on `serial_port`)."""
    serial_port: str | None = None

    @property
    def address(self) -> str:
        if self.protocol == "opcua":
            return f"opc.tcp://{self.host}:{self.port}/ Devices/{self.name}"
        if self.serial_port is not None:
            return f"rtu://{self.serial_port}/{self.unit}"
        scheme = "rtu+tcp" if self.transport == "rtu-over-tcp" else self.protocol
        return f"{scheme}://{self.host}:{self.port}/{self.unit}"

    @property
    def where(self) -> str:
        """host:port, with the framing when it is not plain Modbus TCP; or the serial port."""
        if self.serial_port is not None:
            return f"{self.serial_port} (RTU)"
        return f"{self.host}:{self.port}" + (" (RTU over TCP)" if self.transport == "rtu-over-tcp" else "")


def emulated_physics(p: ProsumerConfig, seed: int) -> ProsumerParams:
    """A prosumer's physics without its real devices: those are hardware, measured by the
    run and added to the emulated meter beside them (`EmulatedSite.step(external_w=)`)."""
    params = p.physics(seed)
    real = {d.kind for d in p.devices if not d.emulated}
    return replace(params, pv=None if DeviceKind.PV in real else params.pv,
                   battery=None if DeviceKind.BATTERY in real else params.battery)


FUNCTION_MODELS = {"volt-var": 705, "volt-watt": 706, "watt-var": 712, "freq-droop": 711}
"""Site-file names of the IEEE 1547 functions -> the SunSpec model whose `Ena` starts them."""


class SiteEmulators:
    """Every emulated device of a site, served on its configured (or a free) port.

    With `free_ports=True` each configured host:port is replaced by a free loopback port
    (devices that shared a port still share one), which is what tests and CI want.
    """

    def __init__(self, site: SiteConfig, *, free_ports: bool = False, host: str | None = None,
                 start_s: float | None = None) -> None:
        self.site = site
        self.free_ports = free_ports
        self.host_override = host
        self.physics = EmulatedSite(site.emulation.start_s if start_s is None else start_s)
        self.servers: list[ModbusEmulatorServer | OpcUaEmulatorServer] = []
        self.endpoints: dict[str, Endpoint] = {}
        self._clock: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        seed = site.emulation.seed
        for p in site.prosumers:
            if any(d.emulated for d in p.devices):
                self.physics.add_prosumer(p.name, emulated_physics(p, seed))

    @property
    def devices(self) -> Mapping[str, EmulatedDevice]:
        return self.physics.devices

    async def start(self, *, clock: bool = True) -> dict[str, Endpoint]:
        """Start the servers (and the real-time physics clock unless `clock=False`)."""
        # One server per (protocol, host, port); Modbus devices by unit id, OPC UA by name.
        groups: dict[tuple[str, str, str, str | int], dict[int | str, tuple[str, EmulatedDevice]]] = {}
        configs = {}
        for p, d in self.site.devices():
            serial_port = d.serial.port if d.serial is not None else None
            if not d.emulated:
                self.endpoints[d.name] = Endpoint(d.name, d.kind, p.name, d.protocol, d.host,
                                                  d.port, d.unit, False, d.transport, serial_port)
                continue
            dev = self.physics.add_device(d.name, d.kind.value, p.name,
                                          maps=getattr(d, "emulated_models", "legacy"))
            for function in getattr(d, "emulated_functions", ()):
                dev.write_point(FUNCTION_MODELS[function], "Ena", 1)
            host = self.host_override or d.host
            where: str | int = serial_port or (d.port if d.port else f"auto:{p.name}")
            key = (d.protocol, d.transport, host, where)
            members = groups.setdefault(key, {})
            slot: int | str = d.name if d.protocol == "opcua" else (d.unit or 1)
            if slot in members:
                raise ValueError(f"{d.name} and {members[slot][0]} share unit {slot} on {host}")
            members[slot] = (d.name, dev)
            configs[d.name] = (p, d)
        self.physics.step(0.0)  # settle: readings are meaningful from the first request
        security = OpcUaSecurity.from_config(self.site.opcua)
        try:
            for (protocol, transport, host, port), members in groups.items():
                want = 0 if self.free_ports or isinstance(port, str) else int(port)
                server: ModbusEmulatorServer | OpcUaEmulatorServer
                d0 = configs[next(iter(members.values()))[0]][1]
                if protocol == "opcua":
                    server = OpcUaEmulatorServer(host, want, {n: dev for n, dev in members.values()}, security)
                else:
                    server = ModbusEmulatorServer(
                        host, want, {u: dev for u, (_, dev) in members.items()},  # type: ignore[misc]
                        framer="socket" if transport == "tcp" else "rtu", serial=serial_settings(d0))
                try:
                    actual = await server.start()
                except OSError as exc:
                    raise OSError(f"cannot serve {', '.join(n for n, _ in members.values())}: {exc}") from exc
                self.servers.append(server)
                for slot, (name, _) in members.items():
                    p, d = configs[name]
                    self.endpoints[name] = Endpoint(
                        name, d.kind, p.name, d.protocol, host, actual if d.serial is None else d.port,
                        slot if isinstance(slot, int) else None, True, d.transport,
                        d.serial.port if d.serial is not None else None)
        except BaseException:
            await self.stop()
            raise
        if clock:
            em = self.site.emulation
            self._clock = asyncio.create_task(self.physics.run(em.tick_s, em.speed, self._stop))
        return dict(self.endpoints)

    def _server_of(self, device: str) -> ModbusEmulatorServer | OpcUaEmulatorServer:
        ep = self.endpoints.get(device)
        if ep is None or not ep.emulated:
            raise ValueError(f"{device!r} is not an emulated device of this site")
        for server in self.servers:
            serial = getattr(server, "serial", None)
            if ep.serial_port is not None:
                if serial is not None and serial.port == ep.serial_port:
                    return server
            elif getattr(server, "port", None) == ep.port and getattr(server, "host", ep.host) \
                    == ep.host:
                return server
        raise ValueError(f"no running server for {device!r}")

    def silence(self, device: str, silent: bool = True) -> None:
        """Make an emulated Modbus device stop answering (or answer again), as a unit
        behind a gateway does when it fails: its gateway replies exception 0x0B."""
        server = self._server_of(device)
        unit = self.endpoints[device].unit
        if not isinstance(server, ModbusEmulatorServer) or unit is None:
            raise ValueError(f"{device!r}: only Modbus devices can be silenced")
        (server.silent.add if silent else server.silent.discard)(unit)

    async def offline(self, device: str) -> None:
        """Take the server hosting `device` off the network (connections refused)."""
        await self._server_of(device).stop()

    async def online(self, device: str) -> None:
        """Serve `device` again on the same port after `offline`."""
        server = self._server_of(device)
        if self.endpoints[device].serial_port is None:
            server.requested_port = self.endpoints[device].port
        await server.start()

    def resolved_site(self) -> SiteConfig:
        """The site file with the ports actually in use (for drivers and `devices read`),
        the links to our emulators pipelined (`pipeline_emulated`)."""
        prosumers = []
        for p in self.site.prosumers:
            devices = []
            for d in p.devices:
                ep = self.endpoints.get(d.name)
                devices.append(d.model_copy(update={"host": ep.host, "port": ep.port}) if ep else d)
            prosumers.append(p.model_copy(update={"devices": devices}))
        return pipeline_emulated(self.site.model_copy(update={"prosumers": prosumers}))

    async def stop(self) -> None:
        self._stop.set()
        if self._clock is not None:
            await self._clock
            self._clock = None
        for server in self.servers:
            await server.stop()
        self.servers.clear()

    async def __aenter__(self) -> SiteEmulators:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def pipeline_emulated(site: SiteConfig) -> SiteConfig:
    """The site with every emulated Modbus TCP endpoint's devices at `max_in_flight` =
    the number of units behind it (at most MAX_IN_FLIGHT): our emulator server answers
    every request of a read, so a link to it keeps one request per unit in flight. Real
    devices keep the site file's value (default 1), and so does a device with a
    `min_gap_s` (one request at a time by its own wish)."""
    units: dict[tuple[str, int], int] = {}
    for _, d in site.devices():
        if _pipelines(d):
            units[(d.host, d.port)] = units.get((d.host, d.port), 0) + 1
    if not any(n > 1 for n in units.values()):
        return site
    prosumers = []
    for p in site.prosumers:
        devices = [d.model_copy(update={"max_in_flight": min(MAX_IN_FLIGHT, units[(d.host, d.port)])})
                   if _pipelines(d) else d for d in p.devices]
        prosumers.append(p.model_copy(update={"devices": devices}))
    return site.model_copy(update={"prosumers": prosumers})


def _pipelines(d: Any) -> bool:
    return (d.emulated and d.protocol == "modbus" and d.transport == "tcp"
            and d.serial is None and not d.min_gap_s)


def serial_settings(d: Any) -> SerialSettings | None:
    """A site-file device's serial port settings, for the driver and the emulator."""
    if d.serial is None:
        return None
    s = d.serial
    return SerialSettings(s.port, s.baudrate, s.bytesize, s.parity, s.stopbits)


def modbus_link_key(d: Any) -> tuple[Any, ...]:
    """Devices with the same key share one Modbus link (a gateway, a serial bus)."""
    if d.serial is not None:
        return ("rtu", d.serial.port)
    return (d.transport, d.host, d.port)


def open_devices(site: SiteConfig, names: list[str] | None = None) -> dict[str, Device]:
    """A driver per device (all, or `names`), one shared connection (Modbus) or session
    (OPC UA) per endpoint. A Modbus link is paced by the largest `min_gap_s` and the
    smallest `max_in_flight` of the devices on it; timeouts and retries stay each
    device's own."""
    links: dict[tuple[Any, ...], ModbusLink] = {}
    sessions: dict[tuple[str, int], OpcUaLink] = {}
    security = OpcUaSecurity.from_config(site.opcua)
    out: dict[str, Device] = {}
    for _, d in site.devices():
        if names is not None and d.name not in names:
            continue
        if d.protocol == "opcua":
            session = sessions.get((d.host, d.port))
            if session is None:
                session = sessions[(d.host, d.port)] = OpcUaLink(d.host, d.port, security, timeout_s=d.timeout_s)
            out[d.name] = OpcUaDevice(d.name, session, d.kind, config=d.opcua)
            continue
        key = modbus_link_key(d)
        link = links.get(key)
        if link is None:
            link = links[key] = ModbusLink(d.host, d.port, timeout_s=d.timeout_s,
                                           framer="rtu" if d.transport != "tcp" else "socket",
                                           serial=serial_settings(d),
                                           max_in_flight=d.max_in_flight)
        link.min_gap_s = max(link.min_gap_s, d.min_gap_s)
        link.max_in_flight = min(link.max_in_flight, d.max_in_flight)
        out[d.name] = SunSpecDevice(d.name, link, d.unit or 1, d.kind, timeout_s=d.timeout_s,
                                    retries=d.retries, prefer=d.sunspec_models)
    return out


class BackgroundEmulators:
    """A site's emulators on a private event loop in a daemon thread.

    For callers that are not async themselves or must not share their loop with the
    servers: pytest fixtures, notebooks, a CI job's controller under test. `step()` lets
    a test advance the physics deterministically when the real-time clock is off.
    """

    def __init__(self, site: SiteConfig, *, free_ports: bool = True, clock: bool = True,
                 start_s: float | None = None) -> None:
        self.emulators = SiteEmulators(site, free_ports=free_ports, start_s=start_s)
        self.clock = clock
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="testbed-emulators", daemon=True)
        self.endpoints: dict[str, Endpoint] = {}

    def start(self) -> dict[str, Endpoint]:
        self._thread.start()
        self.endpoints = self.call(self.emulators.start(clock=self.clock))
        return self.endpoints

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the emulators' loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def step(self, dt_s: float, n: int = 1) -> None:
        """Advance the physics by n steps of dt_s (thread-safe)."""
        async def _step() -> None:
            for _ in range(n):
                self.emulators.physics.step(dt_s)
        self.call(_step())

    @property
    def site(self) -> SiteConfig:
        """The site with the ports actually served; pass it to `open_devices`."""
        return self.emulators.resolved_site()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.call(self.emulators.stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
        self.loop.close()

    def __enter__(self) -> BackgroundEmulators:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
