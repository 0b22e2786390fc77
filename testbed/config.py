"""Site files: which devices exist, where they answer, and how emulated ones behave.

A site is YAML (or JSON) validated with pydantic. Every error names the file, the line,
the field path and what was expected, e.g.::

    demo.yaml:14: prosumers[0].devices[1].params.soc_min: Input should be less than
    or equal to 1 (got 1.5)
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .devices.driver import MEASUREMENTS, SETPOINTS, DeviceKind
from .devices.nodemap import NAMESPACE_URI as OPCUA_NAMESPACE
from .devices.nodemap import check_unit
from .grid.limits import GridLimits
from .physics.models import BatteryParams, LoadParams, MeterParams, ProsumerParams, PVParams

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Strict(BaseModel):
    """Unknown keys refused; every float finite (NaN and infinities are refused by name)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class PVConfig(_Strict):
    rating_w: Annotated[float, Field(gt=0, le=10_000_000)] = 5000.0
    dc_peak_w: Annotated[float, Field(gt=0, le=100_000_000)] | None = None
    efficiency: Annotated[float, Field(gt=0, le=1)] = 0.96
    ramp_pct_per_s: Annotated[float, Field(gt=0, le=100)] = 10.0
    initial_energy_wh: Annotated[float, Field(ge=0, le=1e12)] = 2_000_000.0

    def physics(self) -> PVParams:
        return PVParams(**self.model_dump())


class BatteryConfig(_Strict):
    capacity_wh: Annotated[float, Field(gt=0, le=1e9)] = 10000.0
    soc_min: Annotated[float, Field(ge=0, le=1)] = 0.10
    soc_max: Annotated[float, Field(ge=0, le=1)] = 0.95
    soc_init: Annotated[float, Field(ge=0, le=1)] = 0.5
    max_charge_w: Annotated[float, Field(gt=0, le=1e8)] = 5000.0
    max_discharge_w: Annotated[float, Field(gt=0, le=1e8)] = 5000.0
    eta_ch: Annotated[float, Field(gt=0, le=1)] = 0.95
    eta_dis: Annotated[float, Field(gt=0, le=1)] = 0.95

    @model_validator(mode="after")
    def _bounds(self) -> BatteryConfig:
        if self.soc_min >= self.soc_max:
            raise ValueError(f"soc_min ({self.soc_min}) must be below soc_max ({self.soc_max})")
        if not self.soc_min <= self.soc_init <= self.soc_max:
            raise ValueError(f"soc_init ({self.soc_init}) must lie within soc_min..soc_max "
                             f"({self.soc_min}..{self.soc_max})")
        return self

    def physics(self) -> BatteryParams:
        return BatteryParams(**self.model_dump())


class MeterConfig(_Strict):
    v_nominal: Annotated[float, Field(gt=0, le=1_000_000)] = 230.0
    f_nominal: Literal[50.0, 60.0] = 50.0
    v_drop_per_kw: Annotated[float, Field(ge=0, le=1000)] = 0.4
    initial_import_wh: Annotated[float, Field(ge=0, le=1e12)] = 1_000_000.0
    initial_export_wh: Annotated[float, Field(ge=0, le=1e12)] = 500_000.0


class LoadConfig(_Strict):
    base_w: Annotated[float, Field(ge=0, le=1e8)] = 300.0
    peak_w: Annotated[float, Field(ge=0, le=1e8)] = 2500.0
    noise: Annotated[float, Field(ge=0, le=1)] = 0.08

    @model_validator(mode="after")
    def _order(self) -> LoadConfig:
        if self.peak_w < self.base_w:
            raise ValueError(f"peak_w ({self.peak_w}) must be >= base_w ({self.base_w})")
        return self


PROTOCOL_PORTS = {"modbus": 502, "opcua": 4840}


class SerialConfig(_Strict):
    """An RS-485 port for Modbus RTU (the driver opens it; `devices serve` serves on it)."""

    port: Annotated[str, Field(min_length=1)]
    """/dev/ttyUSB0, COM3, or a pyserial URL."""
    baudrate: Annotated[int, Field(ge=300, le=921600)] = 19200
    parity: Literal["N", "E", "O"] = "E"
    """Modbus RTU's default is even parity (the specification's 8E1)."""
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
class OpcUaPointMap(_Strict):
    """Where one neutral point lives on a foreign OPC UA server, and how its value converts:
    neutral = raw * scale (times the unit's factor) + offset."""

    path: Annotated[str, Field(min_length=1)] | None = None
    """Browse path below the device's `root`, names joined by '/' (namespace: the map's)."""
    node: Annotated[str, Field(min_length=1)] | None = None
    """Or a NodeId: 'nsu=<namespace URI>;s=...' (portable) or 'ns=<index>;i=...'."""
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = None
    """The unit the server serves (kW, kWh, kV, fraction, ...): converted to the neutral one."""
    range: tuple[float, float] | None = None
    """Setpoints: allowed values in neutral units, when the server publishes no EURange."""

    @field_validator("node")
    @classmethod
    def _nodeid(cls, node: str | None) -> str | None:
        if node is not None and not re.fullmatch(
                r"((nsu=[^;]+|ns=\d+);)?(i=\d+|s=.+|g=[0-9A-Fa-f-]{36}|b=.+)", node):
            raise ValueError("not a NodeId: expected e.g. 'nsu=urn:vendor;s=Inverter.P' "
                             "or 'ns=2;i=1017'")
        return node

    @model_validator(mode="after")
    def _where(self) -> OpcUaPointMap:
        if (self.path is None) == (self.node is None):
            raise ValueError("give exactly one of path (a browse path) or node (a NodeId)")
        if self.scale == 0:
            raise ValueError("scale must not be 0")
        if self.range is not None and self.range[0] > self.range[1]:
            raise ValueError(f"range {list(self.range)}: low above high")
        return self


class OpcUaDeviceConfig(_Strict):
    """How the driver finds an OPC UA device: our information model (the default, under
    `namespace`), or a node map of a foreign server's nodes (`points`); poll or subscribe."""

    namespace: Annotated[str, Field(min_length=1)] = OPCUA_NAMESPACE
    """Namespace URI of the server's nodes (browse names of `root` and `path`s)."""
    device: Annotated[str, Field(min_length=1)] | None = None
    """Our model: the device's browse name under Objects/Devices (default: its site name)."""
    root: Annotated[str, Field(min_length=1)] | None = None
    """Node map: browse path from Objects to the device, e.g. 'Plant/Inverter01'."""
    points: dict[str, OpcUaPointMap] = {}
    """Neutral name -> where it is; a plain string is a browse path. Empty: our model."""
    status: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")], OpcUaPointMap] = {}
    """Status words (state, ...) read as served."""
    mode: Literal["poll", "subscribe"] = "poll"
    """poll: one Read per `read()`; subscribe: `read()` answers from monitored items."""
    publishing_interval_s: Annotated[float, Field(gt=0, le=60)] = 1.0

    @field_validator("points", "status", mode="before")
    @classmethod
    def _expand(cls, points: Any) -> Any:
        if not isinstance(points, dict):
            return points
        return {k: {"path": v} if isinstance(v, str) else v for k, v in points.items()}

    @model_validator(mode="after")
    def _mapped(self) -> OpcUaDeviceConfig:
        if self.mapped and self.device is not None:
            raise ValueError("device names a device of our information model; a node map "
                             "(points) uses root instead")
        if self.root is not None and not self.mapped:
            raise ValueError("root is the device of a node map: give its points too")
        for name, pm in self.points.items():
            if pm.unit is not None:
                check_unit(name, pm.unit)
        return self

    @property
    def mapped(self) -> bool:
        """A node map (else our information model)."""
        return bool(self.points or self.status)


class _DeviceBase(_Strict):
    name: Annotated[str, Field(pattern=NAME)]
    protocol: Literal["modbus", "opcua"] = "modbus"
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 502
    """0 = any free port (emulated devices only). Default 502 (Modbus) or 4840 (OPC UA)."""
    unit: Annotated[int, Field(ge=1, le=247)] | None = None
    """Modbus unit id (default 1); OPC UA devices are found by name instead."""
    emulated: bool = True
    """False: real hardware (or an emulator someone else runs) at host:port."""
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    """Per request: how long to wait for an answer before calling it a timeout."""
    retries: Annotated[int, Field(ge=0, le=10)] = 1
    """Modbus: a poll or write that got no answer (timeout, dropped link) is repeated this
    often before it fails; a Modbus exception is never repeated."""
    min_gap_s: Annotated[float, Field(ge=0, le=10)] = 0.0
    """Modbus: least time between two requests on this device's link (slow gateways, RS-485
    buses); devices sharing a link use the largest of their gaps."""
    transport: Literal["tcp", "rtu-over-tcp", "rtu"] = "tcp"
    """Modbus framing: Modbus TCP; RTU frames over TCP (serial-to-Ethernet gateway at
    host:port); or RTU on a serial port (`serial`)."""
    serial: SerialConfig | None = None
    """RS-485 port settings when transport is rtu."""
    max_in_flight: Annotated[int, Field(ge=1, le=32)] = 1
    """Modbus TCP: requests this device's link may have in flight at once (pipelining,
    paired by transaction id); devices sharing a link use the smallest. Default 1: many
    devices and gateways (and pymodbus' own server) answer one request at a time. The
    run's own emulators pipeline regardless (`SiteEmulators.resolved_site`)."""
    sunspec_models: Literal["ieee1547", "legacy"] = "ieee1547"
    """A device offering both IEEE 1547 (701-713) and legacy (101-103, 111-113, 120-124)
    models is read and commanded through the IEEE 1547 ones unless this says legacy."""
    opcua: OpcUaDeviceConfig | None = None
    """OPC UA devices: namespace, node map of a foreign server, poll or subscribe."""

    @model_validator(mode="before")
    @classmethod
    def _protocol_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        protocol = data.get("protocol", "modbus")
        if protocol == "opcua" and data.get("unit") is not None:
            raise ValueError("unit is a Modbus unit id; an OPC UA device is found by its name "
                             "on the server (remove unit)")
        if protocol in PROTOCOL_PORTS:
            data = {"port": PROTOCOL_PORTS[protocol], **data}
            if protocol == "modbus":
                data.setdefault("unit", 1)
        return data

    @field_validator("max_in_flight")
    @classmethod
    def _pipelining(cls, n: int, info: ValidationInfo) -> int:
        """Several requests in flight only where answers can be paired with requests."""
        if n == 1:
            return n
        data = info.data
        if data.get("protocol", "modbus") != "modbus":
            raise ValueError("max_in_flight is a Modbus TCP setting (protocol: modbus)")
        transport = data.get("transport", "tcp")
        if transport != "tcp":
            raise ValueError(f"{n} requests in flight need Modbus TCP: RTU frames (transport: "
                             f"{transport}) carry no transaction id to pair an answer with its "
                             "request (use max_in_flight: 1)")
        if data.get("min_gap_s"):
            raise ValueError(f"{n} requests in flight, but min_gap_s {data['min_gap_s']:g} "
                             "asks for a gap between requests, i.e. one at a time: drop one "
                             "of the two")
        return n

    @model_validator(mode="after")
    def _port(self) -> _DeviceBase:
        if self.port == 0 and not self.emulated:
            raise ValueError("port 0 (any free port) is only meaningful for emulated devices")
        if self.protocol != "modbus" and (self.transport != "tcp" or self.serial is not None):
            raise ValueError("transport and serial are Modbus settings (protocol: modbus)")
        if (self.transport == "rtu") != (self.serial is not None):
            raise ValueError("transport: rtu needs serial: {port: /dev/ttyUSB0, baudrate: ...}, "
                             "and serial needs transport: rtu")
        if self.opcua is not None:
            if self.protocol != "opcua":
                raise ValueError("opcua settings need protocol: opcua")
            kind = DeviceKind(self.kind)  # type: ignore[attr-defined]
            known = (*MEASUREMENTS[kind], *SETPOINTS[kind])
            for name in self.opcua.points:
                if name not in known:
                    raise ValueError(f"opcua.points: {name!r} is not a {kind.value} point "
                                     f"(known: {', '.join(known)})")
            o = self.opcua
            if self.emulated and (o.mapped or o.device
                                  or o.namespace != OPCUA_NAMESPACE):
                raise ValueError("an emulated device serves our information model under its "
                                 f"own name in {OPCUA_NAMESPACE}; namespace, device, root, "
                                 "points and status are for a real server (emulated: false)")
        return self

    @property
    def address(self) -> str:
        """host:port and unit (Modbus) or opc.tcp URL and device name (OPC UA)."""
        if self.protocol == "opcua":
            return f"opc.tcp://{self.host}:{self.port} {self.name}"
        if self.serial is not None:
            return f"{self.serial.port} unit {self.unit}"
        rtu = "/rtu" if self.transport == "rtu-over-tcp" else ""
        return f"{self.host}:{self.port}{rtu} unit {self.unit}"


class _InverterBase(_DeviceBase):
    emulated_models: Literal["legacy", "ieee1547", "both"] = "legacy"
    """The SunSpec maps an emulated inverter or battery serves: legacy (103/120/123,
    802/124), ieee1547 (701-713 with IEEE 1547-2018 behaviour from OpenDER) or both."""

    emulated_functions: list[Literal["volt-var", "volt-watt", "watt-var", "freq-droop"]] = []
    """IEEE 1547 functions an emulated ieee1547/both device starts with enabled (705, 706,
    712, 711 `Ena`), at the standard's Category B default settings."""

    @model_validator(mode="after")
    def _emulated_models(self) -> _InverterBase:
        if self.emulated_models != "legacy" and (not self.emulated or self.protocol != "modbus"):
            raise ValueError("emulated_models: ieee1547/both is served by emulated Modbus "
                             "devices only (emulated: true, protocol: modbus)")
        if self.emulated_functions and self.emulated_models == "legacy":
            raise ValueError("emulated_functions need emulated_models: ieee1547 or both")
        if self.kind == DeviceKind.BATTERY and set(self.emulated_functions) & {  # type: ignore[attr-defined]
                "volt-watt", "watt-var"}:
            raise ValueError("emulated_functions: a battery emulator serves volt-var and "
                             "freq-droop only")
        return self


class PVDevice(_InverterBase):
    kind: Literal[DeviceKind.PV]
    params: PVConfig = PVConfig()


class BatteryDevice(_InverterBase):
    kind: Literal[DeviceKind.BATTERY]
    params: BatteryConfig = BatteryConfig()


class MeterDevice(_DeviceBase):
    kind: Literal[DeviceKind.METER]
    params: MeterConfig = MeterConfig()


DeviceConfig = Annotated[PVDevice | BatteryDevice | MeterDevice, Field(discriminator="kind")]
_KIND_TAGS = {k.value for k in DeviceKind}


class ProsumerConfig(_Strict):
    name: Annotated[str, Field(pattern=NAME)]
    load: LoadConfig = LoadConfig()
    devices: list[DeviceConfig] = Field(min_length=1)

    @field_validator("devices")
    @classmethod
    def _one_per_kind(cls, devices: list[DeviceConfig]) -> list[DeviceConfig]:
        seen: dict[DeviceKind, str] = {}
        for d in devices:
            if d.kind in seen:
                raise ValueError(f"two {d.kind.value} devices ({seen[d.kind]!r}, {d.name!r}); "
                                 "a prosumer has at most one of each kind")
            seen[d.kind] = d.name
        return devices

    def device(self, kind: DeviceKind) -> DeviceConfig | None:
        return next((d for d in self.devices if d.kind == kind), None)

    def physics(self, seed: int) -> ProsumerParams:
        pv, bat, meter = (self.device(k) for k in (DeviceKind.PV, DeviceKind.BATTERY, DeviceKind.METER))
        return ProsumerParams(
            pv=pv.params.physics() if pv else None,
            battery=bat.params.physics() if bat else None,
            meter=MeterParams(**(meter.params if meter else MeterConfig()).model_dump(), seed=seed),
            load=LoadParams(**self.load.model_dump(), seed=seed),
        )


class EmulationConfig(_Strict):
    start: Annotated[str, Field(pattern=r"^([01]?\d|2[0-3]):[0-5]\d(:[0-5]\d)?$")] = "12:00"
    """Simulated time of day when emulators start (`devices serve`)."""
    speed: Annotated[float, Field(gt=0, le=3600)] = 1.0
    tick_s: Annotated[float, Field(gt=0, le=3600)] = 1.0
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] = 0

    @property
    def start_s(self) -> float:
        parts = [int(x) for x in self.start.split(":")]
        return parts[0] * 3600.0 + parts[1] * 60.0 + (parts[2] if len(parts) > 2 else 0)


OPCUA_POLICIES = ("Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss")


class OpcUaConfig(_Strict):
    """Site-wide OPC UA security, for the emulators and for the driver."""

    certs: Path | None = None
    """Folder made by `testbed devices certs DIR` (relative to the site file)."""
    policy: Literal["Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"] = "Basic256Sha256"
    """Security policy of the SignAndEncrypt endpoint."""
    username: str | None = None
    """The driver's login."""
    password: str | None = None
    users: dict[Annotated[str, Field(min_length=1)], str] = {}
    """Accounts the emulators accept (default: the driver's username/password)."""
    allow_insecure: bool = False
    """Also offer (emulators) or use (driver, when no certs) a NoSecurity endpoint."""

    @model_validator(mode="after")
    def _login(self) -> OpcUaConfig:
        if (self.username is None) != (self.password is None):
            raise ValueError("set both opcua.username and opcua.password, or neither")
        return self


class InfluxConfig(_Strict):
    """Where a run's time series go (`testbed.telemetry.influx`): any server with
    InfluxDB's `/api/v2/write` (InfluxDB 2.x/3.x, 1.8+, VictoriaMetrics)."""

    url: Annotated[str, Field(pattern=r"^https?://[^\s/]+")]
    org: Annotated[str, Field(min_length=1)] = "testbed"
    bucket: Annotated[str, Field(min_length=1)] = "testbed"
    token_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = "INFLUX_TOKEN"
    """Environment variable holding the API token (a token does not belong in a site file)."""
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 5000
    flush_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    """How often new rows of the run store are sent."""
    timeout_s: Annotated[float, Field(gt=0, le=120)] = 10.0
    retries: Annotated[int, Field(ge=0, le=20)] = 3
    retry_interval_s: Annotated[float, Field(gt=0, le=60)] = 0.5
    """First retry delay; each further retry doubles it (with jitter), up to max_retry_delay_s."""
    max_retry_delay_s: Annotated[float, Field(gt=0, le=600)] = 8.0
    probe_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    """After a batch fails all its retries: how long the sink leaves the server alone."""
    read_api: Literal["auto", "influxdb", "victoriametrics"] = "auto"
    """How the sink asks the server what it holds (verification): InfluxDB's Flux query
    API or VictoriaMetrics' export API; auto asks the server's `/health` which it is."""


class TelemetryConfig(_Strict):
    influx: InfluxConfig | None = None


class GridConfig(_Strict):
    """The feeder the DSO check runs on (`testbed.grid`)."""

    network: str = "cigre-lv"
    """A bundled feeder (cigre-lv, kerber-landnetz, kerber-dorfnetz, kerber-vorstadtnetz)
    or a pandapower JSON file (relative to the site file)."""
    buses: dict[Annotated[str, Field(pattern=NAME)], str | int] = {}
    """prosumer -> bus name or index; prosumers not listed are connected automatically
    (the feeder's house connection points in order)."""
    limits: GridLimits = GridLimits()
    background: Annotated[float, Field(ge=0, le=10)] = 1.0
    """Scale of the network's own loads and generators (0 = only our prosumers)."""
    engine: Literal["auto", "fast", "pandapower"] = "auto"
    enabled: bool = True

    @field_validator("network")
    @classmethod
    def _network_file(cls, v: str, info: ValidationInfo) -> str:
        """A pandapower JSON file is resolved against the site file's folder and must be a
        regular file of bounded size (checked here, so the error names the field)."""
        if not v.endswith(".json"):
            return v
        path = Path(v).expanduser()
        base = (info.context or {}).get("base")
        if base is not None and not path.is_absolute():
            path = (Path(base) / path).resolve()
        check_regular_file(path, MAX_NETWORK_BYTES)
        return str(path)


class SiteConfig(_Strict):
    name: Annotated[str, Field(pattern=NAME)]
    description: str = ""
    emulation: EmulationConfig = EmulationConfig()
    opcua: OpcUaConfig = OpcUaConfig()
    grid: GridConfig = GridConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    prosumers: list[ProsumerConfig] = Field(min_length=1)
    _source: str = PrivateAttr(default="")

    @property
    def source(self) -> str:
        """The file this site was loaded from ('' if built in code): error messages name it."""
        return self._source

    @model_validator(mode="after")
    def _unique(self) -> SiteConfig:
        names: set[str] = set()
        endpoints: dict[tuple[str, int, int], str] = {}
        protocols: dict[tuple[str, int], tuple[str, str]] = {}
        for p in self.prosumers:
            if p.name in names:
                raise ValueError(f"name {p.name!r} is used twice")
            names.add(p.name)
            for d in p.devices:
                if d.name in names:
                    raise ValueError(f"name {d.name!r} is used twice")
                names.add(d.name)
                if not d.port:
                    continue
                other = protocols.setdefault((d.host, d.port), (d.protocol, d.name))
                if other[0] != d.protocol:
                    raise ValueError(f"devices {other[1]!r} ({other[0]}) and {d.name!r} ({d.protocol}) "
                                     f"both use {d.host}:{d.port}; one port serves one protocol")
                if d.unit is not None:
                    key = (d.host, d.port, d.unit)
                    if key in endpoints:
                        raise ValueError(f"devices {endpoints[key]!r} and {d.name!r} share "
                                         f"{d.host}:{d.port} unit {d.unit}")
                    endpoints[key] = d.name
        opcua = [d.name for _, d in self.devices() if d.protocol == "opcua"]
        if opcua:
            o = self.opcua
            if o.certs is None and not o.allow_insecure:
                raise ValueError(
                    f"OPC UA devices ({', '.join(opcua)}) need opcua.certs: a folder made by "
                    "`testbed devices certs DIR` (or opcua.allow_insecure: true for an "
                    "unencrypted lab network)")
            emulated = [d.name for _, d in self.devices() if d.protocol == "opcua" and d.emulated]
            if emulated and not (o.users or o.username):
                raise ValueError(f"emulated OPC UA devices ({', '.join(emulated)}) need an account: "
                                 "set opcua.username and opcua.password (or opcua.users)")
        return self

    def devices(self) -> Iterator[tuple[ProsumerConfig, DeviceConfig]]:
        for p in self.prosumers:
            for d in p.devices:
                yield p, d

    def find(self, name: str) -> tuple[ProsumerConfig, DeviceConfig]:
        for p, d in self.devices():
            if d.name == name:
                return p, d
        known = ", ".join(d.name for _, d in self.devices())
        raise ConfigError(f"site {self.name!r} has no device {name!r}; devices: {known}")


# --------------------------------------------------------------------------- loading


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message is meant for the user."""


MAX_FILE_BYTES = 1 << 20
"""Site and scenario files: 1 MiB is hundreds of prosumers; more is a mistake or an attack."""
MAX_PROFILE_BYTES = 32 << 20
"""A profile CSV: a year at 1-second steps with a few columns."""
MAX_NETWORK_BYTES = 64 << 20
MAX_DEPTH = 32
"""YAML nesting deeper than any of our models needs."""


def _size(n: int) -> str:
    return f"{n / (1 << 20):g} MiB" if n >= 1 << 20 else f"{n} bytes"


def check_regular_file(path: Path, limit: int) -> int:
    """The size of `path` if it is a regular file no larger than `limit`; else a
    ValueError saying what it is (a device such as /dev/zero reads without end)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "a device, pipe or socket"
        raise ValueError(f"{path}: expected a regular file, got {what}")
    if st.st_size > limit:
        raise ValueError(f"{path}: expected at most {_size(limit)}, got {_size(st.st_size)}")
    return st.st_size


def read_bounded(path: Path, limit: int) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes; ConfigError otherwise.

    Opened without blocking and checked on the open descriptor, so a FIFO or a device
    swapped in after a stat is refused too, and never more than `limit` bytes are read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "a device, pipe or socket"
            raise ConfigError(f"{path}: expected a regular file, got {what}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ConfigError(f"{path}: file too large: expected at most {_size(limit)}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {exc.start})") from None


MAX_NODES = 200_000
"""Values (scalars, lists, mappings) in one file: a 500-prosumer site has ~20,000."""


class _SafeLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """PyYAML's safe loader (LibYAML's parser when installed: ten times faster, and it
    bounds nesting itself) for files from users. `_compose` checks the node graph
    before anything is constructed; the constructor refuses a key given twice in one
    mapping (PyYAML keeps the last one silently: a prosumer listed twice would quietly
    lose its first entry) and turns a scalar that cannot be constructed (an out-of-range
    date, an integer of 5,000 digits) into a YAML error at its line."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError, TypeError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value: {str(exc)[:80]}", node.start_mark) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable key: the base class reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first on line {first})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _check_graph(root: yaml.Node) -> None:
    """Refuse aliases, deep nesting and too many values, walking the composed nodes once
    (iteratively) before anything is constructed. An alias (`*name`) makes a node
    reachable twice: refused, so neither an alias bomb ("billion laughs", 9^9 strings
    from 10 lines) nor a recursive anchor (`&r [*r]`) can be expanded by anything that
    walks the data later (pydantic, the error formatter)."""
    seen: set[int] = set()
    # (node, its path, where it is used: an alias node is the anchored one, whose own
    # mark is the anchor's line; the key or the list holding it is where it is used)
    stack: list[tuple[yaml.Node, tuple[str | int, ...], Any]] = [(root, (), root.start_mark)]
    while stack:
        node, path, used = stack.pop()
        problem = ""
        if id(node) in seen:
            problem = "aliases (*name) are not accepted, write the value out"
        elif len(seen) >= MAX_NODES:
            problem = f"more than {MAX_NODES} values"
        elif len(path) > MAX_DEPTH:
            problem = f"nested deeper than {MAX_DEPTH} levels"
        if problem:
            raise yaml.composer.ComposerError(
                None, None, f"{_fmt_loc(path)}: not valid YAML: {problem}", used)
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in reversed(node.value):
                label = k.value if isinstance(k, yaml.ScalarNode) else "?"
                stack.append((v, (*path, label), k.start_mark))
                stack.append((k, (*path, label), k.start_mark))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, (*path, i), node.start_mark)
                         for i, v in reversed(list(enumerate(node.value))))


def _yaml_error(exc: yaml.YAMLError, source: str) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}" if mark else source
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    if "not valid YAML" not in problem:
        problem = f"not valid YAML: {problem}"
    return ConfigError(f"{where}: {problem}")


def _parse(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """The data of one YAML document and its checked node tree; ConfigError if invalid."""
    loader = None
    try:
        loader = _SafeLoader(text)
        root = loader.get_single_node()
        if root is None:
            return None, None
        _check_graph(root)
        return loader.construct_document(root), root
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    except RecursionError:
        raise ConfigError(f"{source}: (top level): not valid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def _line_index(text: str | yaml.Node | None) -> dict[tuple[str | int, ...], int]:
    """Map each YAML path (keys and list indexes) to its 1-based line, from the checked
    node tree of a parse (or from text, parsed again): each node once, depth bounded,
    so it never costs more than the parse did."""
    lines: dict[tuple[str | int, ...], int] = {}
    if isinstance(text, str):
        try:
            root = _parse(text, "")[1]
        except ConfigError:
            return lines
    else:
        root = text
    if root is None:
        return lines
    stack: list[tuple[yaml.Node, tuple[str | int, ...]]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = (*path, k.value if isinstance(k, yaml.ScalarNode) else "?")
                lines[key] = k.start_mark.line + 1
                stack.append((v, key))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, (*path, i)) for i, v in enumerate(node.value))
    return lines


def locate(source: str | None, loc: tuple[str | int, ...]) -> str:
    """`FILE:LINE: FIELD` for a field of a file already loaded (best effort: `FILE: FIELD`
    if the file cannot be read again; `FIELD` for a model built in code, `source` None),
    for checks made after validation."""
    if source is None:
        return _fmt_loc(loc)
    where = source
    try:
        lines = _line_index(read_bounded(Path(source), MAX_FILE_BYTES))
    except ConfigError:
        lines = {}
    probe = loc
    while probe and probe not in lines:
        probe = probe[:-1]
    if probe in lines:
        where = f"{source}:{lines[probe]}"
    return f"{where}: {_fmt_loc(loc)}"


def _fmt_loc(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _got(value: Any) -> str:
    if isinstance(value, dict | list):
        return ""
    text = repr(value)
    return f" (got {text if len(text) <= 60 else text[:57] + '...'})"


def _data_loc(raw: tuple[str | int, ...], data: Any) -> tuple[str | int, ...]:
    """The path of `raw` through the input `data`: pydantic puts union members and tags in
    loc (`events[0].cloud.at`, `profiles.irradiance.CsvProfile.file`); a part that is not
    a key or index of the data there, but such a label, is dropped."""
    out: list[str | int] = []
    node = data
    for part in raw:
        if isinstance(part, str) and re.search(r"[\[\]()]", part):
            continue  # 'function-after[...]', 'list[...]'
        if (isinstance(node, dict) and part in node) or (
                isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict | list) and isinstance(part, str) and (
                part[:1].isupper() or part in _KIND_TAGS
                or (isinstance(node, dict) and node.get("kind") == part)):
            continue  # a union member (class name) or a discriminator's tag
        else:
            out.append(part)  # a key the input lacks (a required field)
            node = None
    return tuple(out)


def format_validation_error(source: str, exc: ValidationError, text: str | yaml.Node | None,
                            data: Any = None) -> str:
    """One line: the first error as `FILE:LINE: FIELD: what was expected (got ...)`, and
    how many more there are, with their fields. Of a union's alternatives only the
    error that got furthest into the input is kept. `text`: the file's text, or better
    the node tree its parse made (then nothing is parsed again)."""
    lines = _line_index(text)
    msgs = []
    fields = []
    errors = exc.errors()
    locs = [_data_loc(e["loc"], data) if data is not None else tuple(
        p for i, p in enumerate(e["loc"]) if isinstance(p, int) or not (
            re.search(r"[\[\]()]", str(p))
            or (p in _KIND_TAGS and i and isinstance(e["loc"][i - 1], int))))
        for e in errors]
    prefixes = {loc[:k] for loc in locs for k in range(len(loc))}
    keep = [i for i, loc in enumerate(locs) if loc not in prefixes]
    for i in keep:
        err, loc = errors[i], locs[i]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            field = str(err.get("ctx", {}).get("discriminator", "kind")).strip("'")
            loc = (*loc, field)
            msg = f"expected one of {', '.join(sorted(_KIND_TAGS))}"
            if "tag" in err.get("ctx", {}):
                msg += f" (got {err['ctx']['tag']!r})"
        probe = loc
        while probe and probe not in lines:
            probe = probe[:-1]
        where = f"{source}:{lines[probe]}" if probe in lines else source
        got = _got(err["input"]) if "input" in err else ""
        msgs.append(f"{where}: {_fmt_loc(loc)}: {' '.join(msg.split())}{got}")
        fields.append(_fmt_loc(loc))
    if len(msgs) > 1:
        more = ", ".join(fields[1:4]) + (", ..." if len(fields) > 4 else "")
        return f"{msgs[0]} (and {len(msgs) - 1} more: {more})"
    return msgs[0] if msgs else f"{source}: invalid"


def parse_yaml(text: str, source: str) -> Any:
    """The data of a YAML document from a user; ConfigError naming the line if invalid."""
    return _parse(text, source)[0]


def load_model(model: type[BaseModel], text: str, source: str,
               context: dict[str, Any] | None = None) -> Any:
    data, root = _parse(text, source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:1: (top level): expected a mapping, got "
                          f"{type(data).__name__}")
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc, root, data)) from None
    except RecursionError:
        raise ConfigError(f"{source}: (top level): nested too deeply") from None


LIBRARY = "testbed.scenarios.library"
BUNDLED_SITES = {"demo": "demo-site.yaml", "far-end": "far-end-site.yaml"}


def library_file(file: str) -> Path:
    """A file of the bundled library (sites and scenarios)."""
    return Path(str(resources.files(LIBRARY).joinpath(file)))


def bundled_path(name: str) -> Path:
    return library_file(BUNDLED_SITES[name])


def load_model_file(model: type[BaseModel], ref: str | Path, bundled: Mapping[str, str],
                    kind: str) -> tuple[Any, Path]:
    """Parse and validate a YAML file, or a bundled one by name; errors name the file."""
    path = Path(ref)
    if not path.exists() and str(ref) in bundled:
        path = library_file(bundled[str(ref)])
    if not path.exists():
        raise ConfigError(f"{ref}: no such {kind} file (bundled {kind}s: {', '.join(bundled)})")
    text = read_bounded(path, MAX_FILE_BYTES)
    return load_model(model, text, str(path), context={"base": path.parent}), path


def load_site(ref: str | Path) -> SiteConfig:
    """Load a site file, or a bundled site by name (`demo`)."""
    site: SiteConfig
    site, path = load_model_file(SiteConfig, ref, BUNDLED_SITES, "site")
    certs = site.opcua.certs
    if certs is not None:  # relative to the site file
        certs = (path.parent / certs.expanduser()).resolve()
        site = site.model_copy(update={"opcua": site.opcua.model_copy(update={"certs": certs})})
    site._source = str(path)
    return site
