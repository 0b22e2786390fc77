"""Modbus TCP: the SunSpec emulator server and the SunSpec client driver (pymodbus).

Server: one pymodbus TCP server per (host, port), hosting any number of emulated devices
under distinct unit ids, built with pymodbus' SimData/SimDevice API. A SimDevice
`action` hook refreshes a device's registers from its physics before a read and passes
a write through the device's checks before pymodbus stores it; a refused write answers
with exception 03 (illegal data value) and changes nothing.

Client: `ModbusLink` is one TCP connection to an endpoint shared by every unit id behind
it (as with a gateway), with per-request timeouts and reconnection with exponential
backoff. `SunSpecDevice` discovers the SunSpec map (40000, then 0, then 50000), reads
the models it needs in as few requests as possible and applies scale factors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.client.base import ModbusBaseClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import (
    ConnectionException,
    ModbusException,
    ModbusIOException,
    NoSuchIdException,
)
from pymodbus.framer import FramerType
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator.simcore import SimCore

from .driver import (
    Device,
    DeviceError,
    DeviceKind,
    DeviceUnavailable,
    NotSunSpec,
    Reading,
    SetpointRejected,
)
from .emulator import EmulatedDevice, WriteRefused
from .sunspec import (
    BASE_ADDRESSES,
    END_MODEL_ID,
    MAX_READ,
    SUNS_MARKER,
    ModelDef,
    ModelValues,
    SunSpecError,
    decode_model,
    encode_raw,
    fit,
    model_def,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# =========================================================================== server


@dataclass(frozen=True)
class SerialSettings:
    """An RS-485 port as pyserial opens it (Modbus RTU)."""

    port: str
    baudrate: int = 19200
    bytesize: int = 8
    parity: str = "N"
    stopbits: int = 1


class _StrictSimCore(SimCore):
    """SimCore that answers an unknown unit id like a gateway (exception 0x0B), instead of
    failing on a missing default device. Units in `silent` answer the same way: a device
    behind a gateway that stopped answering (a scenario's fault event)."""

    silent: set[int] = set()

    async def async_getValues(self, device_id: int, func_code: int, address: int, count: int = 1):
        if device_id not in self.devices or device_id in self.silent:
            raise NoSuchIdException(f"unit {device_id}")
        return await super().async_getValues(device_id, func_code, address, count)

    async def async_setValues(self, device_id: int, func_code: int, address: int, values):
        if device_id not in self.devices or device_id in self.silent:
            raise NoSuchIdException(f"unit {device_id}")
        return await super().async_setValues(device_id, func_code, address, values)


class _Refusal(ModbusPDU):
    """A request the server answers with an exception without touching the data store."""

    def __init__(self, function_code: int, code: ExcCodes) -> None:
        super().__init__()
        self.function_code, self.code = function_code, code

    def encode(self) -> bytes:
        return b""

    def decode(self, data: bytes) -> None:
        pass

    async def datastore_update(self, context: Any, device_id: int) -> ModbusPDU:
        return ExceptionResponse(self.function_code, self.code)


_MAX_QUANTITY = {3: 125, 4: 125, 16: 123, 23: 125}
"""Registers per request as the Modbus specification allows (FC23: the read part)."""


class _StrictDecoder(DecodePDU):
    """Request decoding as the Modbus specification says, where pymodbus 3.16 answers a
    malformed request with a wrong function code or not at all: an unknown function code
    is exception 01, a quantity of 0 or above the maximum exception 03."""

    def decode(self, frame: bytes) -> ModbusPDU | None:
        fc = frame[0] if frame else 0
        if fc < 0x80:
            if fc not in self.pdu_table:
                return _Refusal(fc, ExcCodes.ILLEGAL_FUNCTION)
            if fc in _MAX_QUANTITY and len(frame) >= 5:
                (count,) = struct.unpack_from(">H", frame, 3)
                if not 1 <= count <= _MAX_QUANTITY[fc]:
                    return _Refusal(fc, ExcCodes.ILLEGAL_VALUE)
        return super().decode(frame)


def sim_device(unit: int, dev: EmulatedDevice) -> SimDevice:
    """A pymodbus SimDevice presenting `dev`'s SunSpec map, read-only where SunSpec says R."""
    m = dev.map
    spans: list[tuple[int, int, bool]] = [(m.base, 2, True)]  # SunS marker
    for inst in m.models:
        spans.append((inst.address, 2, True))  # ID and L
        spans += [(inst.address + p.offset, p.size, not p.writable)
                  for p in inst.definition.points.values() if p.offset >= 2]
    spans.append((m.base + m.size - 2, 2, True))  # end model
    merged: list[list] = []  # [address, size, readonly], adjacent spans of equal access joined
    for addr, size, ro in spans:
        if merged and merged[-1][2] == ro and merged[-1][0] + merged[-1][1] == addr:
            merged[-1][1] += size
        else:
            merged.append([addr, size, ro])
    blocks = [SimData(a, values=m.registers[a - m.base: a - m.base + n],
                      datatype=DataType.REGISTERS, readonly=ro) for a, n, ro in merged]

    async def action(fc: int, start: int, address: int, count: int,
                     registers: list[int], values: list[int] | list[bool] | None) -> ExcCodes | None:
        if m.registers is not registers:  # adopt pymodbus' register list: no copy per read
            registers[: m.size] = m.registers[: m.size]
            m.registers = registers
        if not values:
            dev.refresh()
            return None
        try:
            dev.write(address, [int(v) for v in values])
        except (WriteRefused, SunSpecError) as exc:
            log.warning("%s: write at %d refused: %s", dev.name, address, exc)
            return ExcCodes.ILLEGAL_VALUE
        return None

    return SimDevice(id=unit, simdata=blocks, action=action)


class ModbusEmulatorServer:
    """A Modbus server with emulated devices by unit id: Modbus TCP on (host, port), RTU
    frames over TCP (`framer="rtu"`, as behind a serial-to-Ethernet gateway), or RTU on a
    serial port (`serial`), so a user's CI can test an RS-485 controller."""

    def __init__(self, host: str, port: int, devices: Mapping[int, EmulatedDevice], *,
                 framer: str = "socket", serial: SerialSettings | None = None) -> None:
        if not devices:
            raise ValueError("a server needs at least one device")
        if framer not in ("socket", "rtu"):
            raise ValueError(f"framer must be 'socket' (Modbus TCP) or 'rtu', not {framer!r}")
        self.host = host
        self.requested_port = port
        self.devices = dict(devices)
        self.framer = "rtu" if serial is not None else framer
        self.serial = serial
        self.port: int | None = None
        self._server: ModbusTcpServer | ModbusSerialServer | None = None
        self.silent: set[int] = set()
        """Unit ids that stop answering (gateway exception 0x0B) until removed."""

    async def start(self) -> int:
        """Listen; returns the TCP port (0 on a serial port)."""
        sims = [sim_device(unit, dev) for unit, dev in sorted(self.devices.items())]
        server: ModbusTcpServer | ModbusSerialServer
        if self.serial is not None:
            s = self.serial
            server = ModbusSerialServer(sims, framer=FramerType.RTU, port=s.port, baudrate=s.baudrate,
                                        bytesize=s.bytesize, parity=s.parity, stopbits=s.stopbits)
        else:
            framer = FramerType.RTU if self.framer == "rtu" else FramerType.SOCKET
            server = ModbusTcpServer(sims, framer=framer, address=(self.host, self.requested_port))
        server.context.__class__ = _StrictSimCore
        server.context.silent = self.silent
        server.decoder.__class__ = _StrictDecoder
        if self.serial is not None:
            try:
                await server.serve_forever(background=True)
            except RuntimeError as exc:
                raise OSError(f"cannot open serial port {self.serial.port}: {exc}") from None
            if server.transport is None:
                raise OSError(f"cannot open serial port {self.serial.port}")
            self.port = 0
            self._server = server
            return 0
        try:
            await server.serve_forever(background=True)
        except RuntimeError:  # pymodbus hides the OS error: find it by binding ourselves
            reason = "cannot listen"
            try:
                socket.create_server((self.host, self.requested_port)).close()
            except OSError as exc:
                reason = exc.strerror or str(exc)
            raise OSError(f"cannot listen on {self.host}:{self.requested_port}: {reason}") from None
        sockets = getattr(server.transport, "sockets", None)
        if not sockets:
            raise OSError(f"could not listen on {self.host}:{self.requested_port}")
        self.port = sockets[0].getsockname()[1]
        self._server = server
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()
            self._server = None

    async def __aenter__(self) -> ModbusEmulatorServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# =========================================================================== client

_pymodbus_log = logging.getLogger("pymodbus")
_pymodbus_log.propagate = False  # its errors carry raw frames; never on the user's console
_pymodbus_log.addHandler(logging.NullHandler())


def _serial_reason(s: SerialSettings) -> str:
    """Why a serial port did not open (pymodbus only says it did not): open it ourselves."""
    try:
        import serial  # pyserial, installed with pymodbus[serial]
    except ImportError:
        return "pyserial is not installed (pip install 'pymodbus[serial]')"
    try:
        serial.serial_for_url(s.port, baudrate=s.baudrate, bytesize=s.bytesize, parity=s.parity,
                              stopbits=s.stopbits).close()
    except (serial.SerialException, ValueError, OSError) as exc:
        return f"cannot open the serial port: {exc}"
    return "cannot open the serial port"


RTU_QUIET_S = 0.5
"""After an RTU timeout the link stays quiet this long (at most the timeout): RTU frames
carry no transaction id, so a late answer must not be taken for the next request's."""


class ModbusLink:
    """One connection to an endpoint (TCP host:port, RTU over TCP, or a serial port), shared
    by the unit ids behind it, as with a gateway or an RS-485 bus.

    Requests are paced: one in flight at a time (pymodbus serializes a client's requests,
    and real gateways want no more), at least `min_gap_s` between the end of one and the
    start of the next. Each request carries its own timeout and retry count (a device's
    site-file fields). A lost connection fails only the request in flight; the next request
    reconnects at once, and only a failed connect starts the backoff (doubling from
    `backoff_s` to `backoff_max_s`) during which requests fail fast, so a dead endpoint
    never stalls a poll loop.
    """

    def __init__(self, host: str, port: int, *, timeout_s: float = 1.0, min_gap_s: float = 0.0,
                 framer: str = "socket", serial: SerialSettings | None = None,
                 backoff_s: float = 0.5, backoff_max_s: float = 10.0) -> None:
        if framer not in ("socket", "rtu"):
            raise ValueError(f"framer must be 'socket' (Modbus TCP) or 'rtu', not {framer!r}")
        self.host, self.port, self.timeout_s, self.min_gap_s = host, port, timeout_s, min_gap_s
        self.framer = "rtu" if serial is not None else framer
        self.serial = serial
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self._client: ModbusBaseClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._delay = 0.0
        self._retry_at = 0.0
        self._lock: asyncio.Lock | None = None
        self._last_done = 0.0
        self._quiet_until = 0.0
        self.generation = 0
        """Bumped on every new connection (reconnects, for figures and tests)."""
        self.last_error: str | None = None
        self.requests = 0
        self.failures = 0

    @property
    def endpoint(self) -> str:
        if self.serial is not None:
            return self.serial.port
        return f"{self.host}:{self.port}" + ("/rtu" if self.framer == "rtu" else "")

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    @property
    def backing_off(self) -> bool:
        """Not connected, and the next connect attempt not yet due: requests fail fast."""
        return not self.connected and time.monotonic() < self._retry_at

    def _usable(self) -> bool:
        """Connected, and under the running event loop (not a previous asyncio.run's)."""
        client = self._client
        return client is not None and client.connected and self._loop is asyncio.get_running_loop()

    def _new_client(self) -> ModbusBaseClient:
        kw: dict[str, Any] = {"timeout": self.timeout_s, "retries": 0, "reconnect_delay": 0}
        if self.serial is not None:
            s = self.serial
            client: ModbusBaseClient = AsyncModbusSerialClient(
                s.port, framer=FramerType.RTU, baudrate=s.baudrate, bytesize=s.bytesize,
                parity=s.parity, stopbits=s.stopbits, **kw)
        else:
            framer = FramerType.RTU if self.framer == "rtu" else FramerType.SOCKET
            client = AsyncModbusTcpClient(self.host, port=self.port, framer=framer, **kw)
        ctx = client.ctx
        lost = ctx.callback_disconnected

        def on_lost(exc: Exception | None) -> None:
            """pymodbus lets the request in flight wait for its timeout when the connection
            drops; fail it now so the retry reconnects at once."""
            lost(exc)
            future = ctx.response_future
            if not future.done():
                future.set_exception(ConnectionException(f"connection lost ({exc or 'closed'})"))

        ctx.callback_disconnected = on_lost  # type: ignore[method-assign]
        return client

    async def ensure(self) -> ModbusBaseClient:
        if self._usable():
            return self._client  # type: ignore[return-value]
        if self._client is not None and self._loop is not asyncio.get_running_loop():
            with contextlib.suppress(RuntimeError):  # its loop may be closed already
                self._client.close()
            self._client = None
        if self._client is not None and self._client.connected:
            return self._client
        now = time.monotonic()
        if now < self._retry_at:
            raise DeviceUnavailable(
                f"{self.endpoint}: not connected ({self.last_error}); "
                f"next attempt in {self._retry_at - now:.1f} s")
        client = self._new_client()
        try:
            ok = await asyncio.wait_for(client.connect(), self.timeout_s + 0.5)
        except (TimeoutError, OSError) as exc:
            ok, self.last_error = False, str(exc) or type(exc).__name__
        except Exception as exc:  # termios.error and the like: a port refusing its settings
            ok, self.last_error = False, (
                f"the serial port refused baudrate/parity/stopbits/bytesize ({exc})"
                if self.serial else f"{type(exc).__name__}: {exc}")
        if not ok:
            client.close()
            self.last_error = self.last_error or (
                _serial_reason(self.serial) if self.serial else "connection refused")
            self._fail()
            raise DeviceUnavailable(f"{self.endpoint}: cannot connect ({self.last_error})")
        self._client = client
        self._loop = asyncio.get_running_loop()
        self._delay = 0.0
        self.last_error = None
        self.generation += 1
        return client

    def _fail(self) -> None:
        self._delay = min(self.backoff_max_s, max(self.backoff_s, self._delay * 2))
        self._retry_at = time.monotonic() + self._delay

    def drop(self, reason: str) -> None:
        """Close after a failure; the next request reconnects."""
        self.last_error = reason
        if self._client is not None:
            self._client.close()
            self._client = None

    def _pacer(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._loop_of_lock is not loop:
            self._lock, self._loop_of_lock = asyncio.Lock(), loop
        return self._lock

    _loop_of_lock: asyncio.AbstractEventLoop | None = None

    async def _request(self, fn: str, address: int, arg: Any, unit: int,
                       timeout_s: float | None, retries: int, hint: str) -> Any:
        """One request, paced, with its own timeout; retried on no answer."""
        timeout = timeout_s or self.timeout_s
        count = arg if isinstance(arg, int) else len(arg)
        for attempt in range(retries + 1):
            async with self._pacer():
                client = self._client if self._usable() else await self.ensure()
                assert client is not None
                if self.min_gap_s or self._quiet_until:
                    wait = max(self._last_done + self.min_gap_s, self._quiet_until) - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                client.comm_params.timeout_connect = timeout
                self.requests += 1
                try:
                    if fn == "read":
                        rr = await client.read_holding_registers(address, count=arg, device_id=unit)
                    else:
                        rr = await client.write_registers(address, list(arg), device_id=unit)
                except ModbusException as exc:
                    self.failures += 1
                    error = self._failed(client, unit, exc, timeout, hint)
                    if attempt < retries:
                        continue
                    raise error from exc
                finally:
                    self._last_done = time.monotonic()
            if rr.isError():
                code = _exc_code(rr)
                if code in GATEWAY_SILENT and attempt < retries:
                    continue
                cls = GatewayTargetSilent if code in GATEWAY_SILENT else ModbusExceptionReply
                raise cls(address, count, unit, code)
            return rr.registers if fn == "read" else None
        raise AssertionError("unreachable")

    async def read(self, address: int, count: int, unit: int, *, timeout_s: float | None = None,
                   retries: int = 0, hint: str = "") -> list[int]:
        """Holding registers; `hint` says which site-file field raises the timeout."""
        return await self._request("read", address, count, unit, timeout_s, retries, hint)

    async def write(self, address: int, values: Sequence[int], unit: int, *,
                    timeout_s: float | None = None, retries: int = 0, hint: str = "") -> None:
        await self._request("write", address, values, unit, timeout_s, retries, hint)

    def _failed(self, client: ModbusBaseClient, unit: int, exc: ModbusException,
                timeout: float, hint: str) -> DeviceUnavailable:
        """A request without an answer: a timeout on a live connection leaves it open (one
        unit may be silent while others answer); a lost connection is dropped."""
        if isinstance(exc, ModbusIOException) and client.connected:
            if self.framer == "rtu":  # no transaction ids: let a late answer pass unread
                self._quiet_until = time.monotonic() + min(timeout, RTU_QUIET_S)
            return RequestTimeout(
                f"{self.endpoint} unit {unit}: timeout, no response within {timeout:g} s"
                f" ({hint or 'raise timeout_s in the site file'})")
        self.drop(str(exc))
        return DeviceUnavailable(f"{self.endpoint} unit {unit}: connection lost ({exc})")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class RequestTimeout(DeviceUnavailable):
    """No answer within the request's timeout on a live connection."""


EXCEPTION_NAMES = {1: "illegal function", 2: "illegal data address", 3: "illegal data value",
                   4: "device failure", 6: "device busy", 10: "gateway path unavailable",
                   11: "gateway target failed to respond"}


def _exc_code(rr: Any) -> int:
    return int(getattr(rr, "exception_code", 0)) if isinstance(rr, ExceptionResponse) else 0


class ModbusExceptionReply(DeviceError):
    """The device answered with a Modbus exception."""

    def __init__(self, address: int, count: int, unit: int, code: int) -> None:
        self.address, self.count, self.unit, self.code = address, count, unit, code
        name = EXCEPTION_NAMES.get(code, f"code {code}")
        super().__init__(f"unit {unit} answered exception {code:02d} ({name}) "
                         f"for registers {address}..{address + count - 1}")


VENDOR_MODELS = 64000
"""Model ids from here on are vendor-specific: walked over, never decoded."""
GATEWAY_SILENT = (10, 11)
"""Gateway exceptions: the unit behind it did not answer (or has no path): unavailable."""


class GatewayTargetSilent(ModbusExceptionReply, DeviceUnavailable):
    """The gateway answered for a unit that did not: retried, and counted as unavailable."""


@dataclass(frozen=True)
class DiscoveredModel:
    id: int
    address: int
    length: int
    definition: ModelDef | None

    @property
    def name(self) -> str:
        return self.definition.name if self.definition else "(unknown model)"


async def discover(link: ModbusLink, unit: int, bases: Iterable[int] = BASE_ADDRESSES, *,
                   timeout_s: float | None = None, retries: int = 0,
                   hint: str = "") -> tuple[int, list[DiscoveredModel]]:
    """Find the `SunS` marker and walk the model list up to the end model.

    A timeout or exception at one base address is not a failure: the next is tried. An end
    model without its length register (some devices stop at the ID) ends the walk, as in
    pysunspec2's scan. Raises NotSunSpec naming what each base answered, or RequestTimeout
    when no base answered in time.
    """
    kw: dict[str, Any] = {"timeout_s": timeout_s, "retries": retries, "hint": hint}
    tried: list[str] = []
    timeout: RequestTimeout | None = None
    for base in bases:
        try:
            regs = await link.read(base, 2, unit, **kw)
        except ModbusExceptionReply as exc:
            tried.append(f"{base}: exception {exc.code:02d}")
            continue
        except RequestTimeout as exc:
            if not link.connected:
                raise
            timeout = timeout or exc
            tried.append(f"{base}: no answer")
            continue
        if tuple(regs) != SUNS_MARKER:
            tried.append(f"{base}: {regs[0]:#06x} {regs[1]:#06x} is not 'SunS'")
            continue
        models: list[DiscoveredModel] = []
        addr = base + 2
        for _ in range(256):
            try:
                mid, length = await link.read(addr, 2, unit, **kw)
            except ModbusExceptionReply:  # the end model may stop at its ID register
                (mid,) = await link.read(addr, 1, unit, **kw)
                if mid != END_MODEL_ID:
                    raise
                length = 0
            if mid == END_MODEL_ID:
                return base, models
            try:  # vendor models (64xxx) are skipped by their length, defined or not
                md: ModelDef | None = model_def(mid) if mid < VENDOR_MODELS else None
            except SunSpecError:
                md = None  # unknown: skipped the same way
            models.append(DiscoveredModel(mid, addr, length, md))
            addr += length + 2
        raise NotSunSpec(f"{link.endpoint} unit {unit}: no end model after 256 models at base {base}")
    if timeout is not None:
        raise timeout
    raise NotSunSpec(f"{link.endpoint} unit {unit}: no SunSpec device "
                     f"(no 'SunS' marker; {'; '.join(tried)})")


def plan_reads(models: Sequence[DiscoveredModel], wanted: set[int],
               max_count: int = MAX_READ) -> list[tuple[int, int]]:
    """Cover the wanted models with as few reads of <= max_count registers as possible.

    Models in between are read along (and discarded) when that saves a request: every
    register between the marker and the end model is valid in a SunSpec map.
    """
    spans = sorted((m.address, m.address + m.length + 2) for m in models if m.id in wanted)
    reads: list[tuple[int, int]] = []
    for start, end in spans:
        if reads and end - reads[-1][0] <= max_count:
            reads[-1] = (reads[-1][0], end - reads[-1][0])
            continue
        while end - start > max_count:
            reads.append((start, max_count))
            start += max_count
        reads.append((start, end - start))
    return reads


INVERTER_MODELS = (103, 102, 101, 113, 112, 111)  # integer+SF and float variants
IEEE1547_MODELS = tuple(range(701, 714))
"""IEEE 1547-2018 information model: 701 measurements, 702 ratings, 704 controls, 713 storage."""
METER_MODELS = (203, 204, 202, 201, 213, 214, 212, 211)
STORAGE_MODELS = (802, 124, 713)
LEGACY_DER = (*INVERTER_MODELS, 120, 121, 123)
KIND_MODELS: dict[DeviceKind, tuple[int, ...]] = {
    DeviceKind.PV: (*LEGACY_DER, 701, 702, 704),
    DeviceKind.BATTERY: (*STORAGE_MODELS, *LEGACY_DER, 701, 702, 704),
    DeviceKind.METER: METER_MODELS,
}
KIND_NEEDS = {
    DeviceKind.PV: "an inverter model: 101-103, 111-113 or 701",
    DeviceKind.BATTERY: "802, or 124 or 713 beside an inverter model 101-103, 111-113 or 701",
    DeviceKind.METER: "a meter model: 201-204 or 211-214",
}
STATIC_MODELS = (1, 120, 121, 702)
"""Read once at discovery: identity and ratings do not change while connected."""
MODEL_PREFERENCES = ("ieee1547", "legacy")


def kind_models(kind: DeviceKind, ids: Iterable[int], prefer: str = "ieee1547") -> set[int]:
    """The models a device of `kind` is read through; empty when it has none that fit.

    A device offering both the legacy (1xx) and the IEEE 1547 (70x) models is read through
    the 70x ones unless `prefer` is "legacy"; a battery needs a storage model (802, 124
    or 713), a PV inverter an inverter model (101-103, 111-113 or 701).
    """
    have = set(ids)
    wanted = set(KIND_MODELS[kind]) & have
    if kind is DeviceKind.METER:
        return wanted
    inverter = have & {*INVERTER_MODELS, 701}
    if kind is DeviceKind.BATTERY and 802 in have:
        pass  # a battery model of its own (802) needs no inverter model beside it
    elif not inverter or (kind is DeviceKind.BATTERY and not have & set(STORAGE_MODELS)):
        return set()
    legacy, ieee = have & set(INVERTER_MODELS), 701 in have
    if legacy and ieee:
        drop = set(LEGACY_DER) - {120, 121} if prefer != "legacy" else {701, 704}
        wanted -= drop
    return wanted


def infer_kind(model_ids: Iterable[int]) -> DeviceKind | None:
    ids = set(model_ids)
    if ids & set(STORAGE_MODELS):
        return DeviceKind.BATTERY
    if ids & {*INVERTER_MODELS, 701}:
        return DeviceKind.PV
    if ids & set(METER_MODELS):
        return DeviceKind.METER
    return None


_HEADER = struct.Struct(">HH")


class MapChanged(NotSunSpec):
    """A model's ID and L registers no longer match the map discovered."""


class SunSpecDevice(Device):
    """A SunSpec device over Modbus (TCP, RTU over TCP, or RTU on a serial port).

    Discovery runs once. A reconnect keeps the map: every poll checks, for free, that each
    model it reads still starts with the ID and L registers discovered there, and only a
    mismatch discovers again; so a link that drops now and then costs no extra requests.
    """

    def __init__(self, name: str, link: ModbusLink, unit: int = 1,
                 kind: DeviceKind | str | None = None, *, timeout_s: float | None = None,
                 retries: int = 1, prefer: str = "ieee1547") -> None:
        self.name = name
        self.link = link
        self.unit = unit
        self.kind = DeviceKind(kind) if kind else None  # type: ignore[assignment]
        self.timeout_s = timeout_s or link.timeout_s
        self.retries = retries
        self.prefer = prefer
        self.base: int | None = None
        self.models: list[DiscoveredModel] = []
        self.static: dict[int, ModelValues] = {}
        self.last: dict[int, ModelValues] = {}
        self._reads: list[tuple[int, int]] = []
        self._wanted: set[int] = set()

    @property
    def endpoint(self) -> str:
        return f"{self.link.endpoint} unit {self.unit}"

    @property
    def _kw(self) -> dict[str, Any]:
        """Per-request settings of this device, and where to change them (built once per
        timeout value: this is on every request's path)."""
        kw = self._kw_cache
        if kw is None or kw["timeout_s"] != self.timeout_s:
            kw = self._kw_cache = {"timeout_s": self.timeout_s, "retries": 0,
                                   "hint": f"raise timeout_s of device {self.name!r} in the site file"}
        return kw

    _kw_cache: dict[str, Any] | None = None

    def _named(self, exc: DeviceError) -> DeviceError:
        """The same kind of error, its message prefixed with this device's name and endpoint."""
        if str(exc).startswith(f"{self.name} ("):
            return exc
        msg = str(exc)
        for where in (f"{self.endpoint}: ", f"{self.link.endpoint}: "):
            msg = msg.removeprefix(where)  # the prefix names it already
        if isinstance(exc, GatewayTargetSilent):
            return DeviceUnavailable(self._err(msg))
        cls = DeviceError if isinstance(exc, ModbusExceptionReply) else type(exc)
        return cls(self._err(msg))

    async def connect(self) -> None:
        await self._retrying(self._discover)

    async def _retrying(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run fn, again up to `retries` times when the device did not answer (a timeout
        or a dropped connection); anything else fails at once."""
        for attempt in range(self.retries + 1):
            try:
                return await fn()
            except DeviceUnavailable as exc:
                if attempt == self.retries or self.link.backing_off:
                    raise self._named(exc) from exc
            except DeviceError as exc:
                raise self._named(exc) from exc
        raise AssertionError("unreachable")

    async def _discover(self) -> None:
        self.base, self.models = await discover(self.link, self.unit, **self._kw)
        ids = [m.id for m in self.models]
        kind = infer_kind(ids)
        if self.kind is None:
            if kind is None:
                raise NotSunSpec(self._err(f"models {ids} fit no known device kind"))
            self.kind = kind
        wanted = kind_models(self.kind, ids, self.prefer)
        if not wanted:
            raise NotSunSpec(self._err(
                f"configured as {self.kind.value} but offers models {ids} "
                f"(needs {KIND_NEEDS[self.kind]})"))
        static = {m.id for m in self.models if m.id in STATIC_MODELS}
        self.static = await self._read_models(plan_reads(self.models, static), static)
        self._wanted = wanted - static
        self._reads = plan_reads(self.models, self._wanted)

    async def _read_models(self, reads: list[tuple[int, int]], ids: set[int]) -> dict[int, ModelValues]:
        """Read the planned spans and view each wanted model's registers (decoded lazily)."""
        chunks = []
        for address, count in reads:
            regs = await self.link.read(address, count, self.unit, **self._kw)
            chunks.append((address, len(regs), struct.pack(f">{len(regs)}H", *regs)))
        out: dict[int, ModelValues] = {}
        for i, m in enumerate(self.models):
            if m.id not in ids or m.definition is None or m.id in out:
                continue
            for start, n, data in chunks:
                k = m.address - start
                if k >= 0 and k + m.length + 2 <= n:
                    data, offset = data, 2 * k
                    break
            else:  # a model longer than one read: join the consecutive pieces that cover it
                end = m.address + m.length + 2
                pieces = [c for c in chunks if c[0] < end and c[0] + c[1] > m.address]
                first = pieces[0][0] if pieces else end
                data = b"".join(c[2] for c in pieces)
                if first > m.address or first + len(data) // 2 < end:
                    raise NotSunSpec(self._err(f"model {m.id} at {m.address} is not covered by the reads"))
                offset = 2 * (m.address - first)
            if _HEADER.unpack_from(data, offset) != (m.id, m.length):
                raise MapChanged(self._err(
                    f"model {m.id} is no longer at {m.address} (the device's map changed)"))
            md = m.definition
            if md.repeating or md.length != m.length:
                md = fit(md, m.length, ModelValues(fit(md, m.length, None), data, offset))
                self.models[i] = m = replace(m, definition=md)
            out[m.id] = ModelValues(md, data, offset)
        return out

    async def read_models(self) -> dict[int, ModelValues]:
        """Every dynamic model this device's kind uses, decoded with scale factors."""
        if self.models:  # the usual poll, without the retry machinery around it
            try:
                self.last = await self._read_models(self._reads, self._wanted)
                return self.last
            except MapChanged:
                pass
            except DeviceUnavailable as exc:
                if not self.retries or self.link.backing_off:
                    raise self._named(exc) from exc
            except DeviceError as exc:
                raise self._named(exc) from exc

        async def once() -> dict[int, ModelValues]:
            if not self.models:
                await self._discover()
            try:
                return await self._read_models(self._reads, self._wanted)
            except MapChanged as exc:  # another device (or firmware) behind the same address
                log.info("%s; discovering again", exc)
                await self._discover()
                return await self._read_models(self._reads, self._wanted)

        self.last = await self._retrying(once)
        return self.last

    async def read_model(self, model_id: int) -> ModelValues:
        """One whole model, any of the device's, its repeating groups laid out."""
        if not self.models:
            await self.connect()
        m = self._model(model_id)
        if m.definition is None:
            raise SunSpecError(self._err(f"model {model_id} has no SunSpec definition (vendor model)"))

        async def once() -> ModelValues:
            return (await self._read_models(plan_reads([m], {model_id}), {model_id}))[model_id]
        return await self._retrying(once)

    def _model(self, model_id: int) -> DiscoveredModel:
        m = next((m for m in self.models if m.id == model_id), None)
        if m is None:
            raise SetpointRejected(self._err(
                f"no model {model_id} on this device (has {[m.id for m in self.models]})"))
        return m

    def _values(self, model_id: int) -> Mapping[str, Any]:
        return self.last.get(model_id) or self.static.get(model_id) or {}

    @property
    def layout(self) -> set[int]:
        """The models this device is read and commanded through."""
        return self._wanted | set(self.static)

    async def read(self) -> Reading:
        models = await self.read_models()
        assert self.kind is not None
        values, status = NEUTRAL[self.kind](models, self.static)
        return Reading(self.name, self.kind, time.time(), values, status)

    async def write(self, point: str, value: float) -> None:
        """A neutral setpoint (`power_w`, `limit_pct`, ...) or a SunSpec point:
        `MODEL.POINT`, `MODEL.GROUP.POINT`, `MODEL.GROUP[i].SUB[j].POINT` (1-based)."""
        if not self.models:
            await self.connect()
        assert self.kind is not None
        if not self.last:
            await self.read_models()
        writes = SETPOINT_WRITERS.get((self.kind, point))
        try:
            if writes is not None:
                for model_id, pname, v in writes(self, float(value)):
                    await self.write_point(model_id, pname, v)
            else:
                model_id, pname = await self.resolve_point(point)
                await self.write_point(model_id, pname, value)
        except ModbusExceptionReply as exc:
            raise SetpointRejected(self._err(exc)) from exc

    async def resolve_point(self, point: str) -> tuple[int, str]:
        """`123.WMaxLimPct`, `705.Crv[1].Pt[2].V`, or a point name unique on the device."""
        head, _, rest = point.partition(".")
        if head.isdigit() and rest:
            mid = int(head)
            m = self._model(mid)
            if m.definition is None:
                raise SetpointRejected(self._err(f"model {mid} is a vendor model: no definition"))
            if rest not in m.definition.points and m.definition.repeating:
                await self.read_model(mid)  # lays out its repeating groups
                m = self._model(mid)
            assert m.definition is not None
            if rest not in m.definition.points:
                raise SetpointRejected(self._err(f"no point {point!r} on this device"))
            return mid, rest
        hits = [(m.id, point) for m in self.models if m.definition and point in m.definition.points]
        if len(hits) != 1:
            known = sorted(SETPOINT_NAMES.get(self.kind, ())) if self.kind else []
            why = "no such point" if not hits else f"ambiguous, in models {[h[0] for h in hits]}"
            raise SetpointRejected(self._err(
                f"{point!r}: {why}; use a setpoint {known} or MODEL.POINT"))
        return hits[0]

    async def write_point(self, model_id: int, point: str, value: float | int | str) -> None:
        """Write one SunSpec point in engineering units, scaled with the device's own SF."""
        m = self._model(model_id)
        if m.definition is None or point not in m.definition.points:
            raise SetpointRejected(self._err(f"no point {model_id}.{point} on this device"))
        p = m.definition.point(point)
        if not p.writable:
            raise SetpointRejected(self._err(f"{model_id}.{point} is read-only"))
        raw: int | float | str = value
        if isinstance(value, str) and not p.is_string:
            raw = p.symbols.get(value, value)  # an enum's symbol, e.g. ENABLED
        if p.sf is not None and not isinstance(raw, str):
            if isinstance(p.sf, int):
                sf: Any = p.sf
            else:
                values = self._values(model_id)
                if p.sf not in values:
                    values = await self.read_model(model_id)
                sf = values.get(p.sf)
            raw = round(float(raw) / 10.0 ** int(sf or 0))
        elif not p.is_string and p.type not in ("float32", "float64"):
            try:
                raw = round(float(raw))
            except ValueError:
                raise SetpointRejected(self._err(
                    f"{model_id}.{point}: {value!r} is not a number"
                    + (f" or one of {sorted(p.symbols)}" if p.symbols else ""))) from None
        try:
            regs = encode_raw(p, raw)
        except SunSpecError as exc:
            raise SetpointRejected(self._err(exc)) from exc
        try:
            await self.link.write(m.address + p.offset, regs, self.unit,
                                  **{**self._kw, "retries": self.retries})
        except GatewayTargetSilent as exc:
            raise self._named(exc) from exc
        except ModbusExceptionReply as exc:
            raise SetpointRejected(self._err(exc)) from exc
        except DeviceError as exc:
            raise self._named(exc) from exc

    async def close(self) -> None:
        self.link.close()


# --------------------------------------------------------------------------- neutral mapping


def _first(models: Mapping[int, Mapping[str, Any]], ids: Iterable[int]) -> Mapping[str, Any]:
    for i in ids:
        if i in models:
            return models[i]
    return {}


def _pick(*sources: tuple[Mapping[str, Any], str]) -> Any:
    """The first implemented value among (model values, point) pairs, decoded lazily: a
    fallback is decoded only when what precedes it is missing."""
    for values, point in sources:
        v = values.get(point)
        if v is not None:
            return v
    return None


INV_STATES = {1: "OFF", 2: "SLEEPING", 3: "STARTING", 4: "MPPT", 5: "THROTTLED",
              6: "SHUTTING_DOWN", 7: "FAULT", 8: "STANDBY"}
DER_STATES = {0: "OFF", 1: "SLEEPING", 2: "STARTING", 3: "MPPT", 4: "THROTTLED",
              5: "SHUTTING_DOWN", 6: "FAULT", 7: "STANDBY"}
"""701 InvSt, named as the legacy states (701 RUNNING is the legacy MPPT)."""


def _ac(models: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """AC measurements from 701 when read, else from the legacy inverter model."""
    d = models.get(701)
    if d is not None:
        return {"p_w": d.get("W"), "q_var": d.get("Var"), "voltage_v": _pick((d, "LNV"), (d, "VL1")),
                "frequency_hz": d.get("Hz"), "energy_wh": d.get("TotWhInj"),
                "temperature_c": d.get("TmpCab"), "current_a": d.get("A"),
                "state": DER_STATES.get(d.get("InvSt"), d.get("InvSt")), "events": d.get("Alrm")}
    inv = _first(models, INVERTER_MODELS)
    return {"p_w": inv.get("W"), "q_var": inv.get("VAr"), "voltage_v": inv.get("PhVphA"),
            "frequency_hz": inv.get("Hz"), "energy_wh": inv.get("WH"),
            "temperature_c": inv.get("TmpCab"), "current_a": inv.get("A"), "dc_w": inv.get("DCW"),
            "state": INV_STATES.get(inv.get("St"), inv.get("St")), "events": inv.get("Evt1")}


def _pv_values(models: Mapping[int, dict], static: Mapping[int, dict]) -> tuple[dict, dict]:
    ac = _ac(models)
    ctl, der = models.get(123, {}), models.get(704, {})
    if 704 in models:
        limit, enabled = der.get("WMaxLimPct"), der.get("WMaxLimPctEna")
    else:
        limit, enabled = ctl.get("WMaxLimPct"), ctl.get("WMaxLim_Ena")
    values = {
        "p_w": ac["p_w"], "q_var": ac["q_var"], "dc_w": ac.get("dc_w"),
        "energy_wh": ac["energy_wh"], "voltage_v": ac["voltage_v"],
        "frequency_hz": ac["frequency_hz"], "limit_pct": limit, "limit_enabled": enabled,
        "rating_w": _pick((static.get(702, {}), "WMaxRtg"), (static.get(120, {}), "WRtg")),
        "temperature_c": ac["temperature_c"],
    }
    return values, {"state": ac["state"], "events": ac["events"]}


def _ratings(models: Mapping[int, Mapping[str, Any]],
             static: Mapping[int, Mapping[str, Any]]) -> tuple[Any, Any]:
    """(max charge W, max discharge W) from 802, 124, 702, 120 or 121, first stated wins."""
    b, s = models.get(802, {}), models.get(124, {})
    r702, r120, r121 = static.get(702, {}), static.get(120, {}), static.get(121, {})
    ch = _pick((s, "WChaMax"), (b, "WChaRteMax"), (r702, "WChaRteMax"), (r702, "WChaRteMaxRtg"),
               (r120, "MaxChaRte"))
    dis = _pick((b, "WDisChaRteMax"), (r702, "WDisChaRteMax"), (r702, "WDisChaRteMaxRtg"),
                (r120, "MaxDisChaRte"), (r121, "WMax"), (r702, "WMaxRtg"), (r120, "WRtg"))
    return ch, dis


def _battery_values(models: Mapping[int, dict], static: Mapping[int, dict]) -> tuple[dict, dict]:
    b, s, st = models.get(802, {}), models.get(124, {}), models.get(713, {})
    ac = _ac(models) if not b else {}
    max_ch, max_dis = _ratings(models, static)
    values = {
        "p_w": _pick((b, "W"), (ac, "p_w")), "setpoint_w": _setpoint(models, max_ch, max_dis),
        "soc_pct": _pick((b, "SoC"), (st, "SoC"), (s, "ChaState")),
        "capacity_wh": _pick((b, "WHRtg"), (st, "WHRtg"), (static.get(120, {}), "WHRtg")),
        "max_charge_w": max_ch, "max_discharge_w": max_dis,
        "soc_min_pct": _pick((b, "SoCMin"), (s, "MinRsvPct")), "soc_max_pct": b.get("SoCMax"),
        "voltage_v": _pick((b, "V"), (ac, "voltage_v")),
        "current_a": _pick((b, "A"), (ac, "current_a")),
    }
    evt = int(b.get("Evt1") or 0)
    clamps = [name for name, bit in (("charge_rate", 6), ("discharge_rate", 8),
                                     ("soc_min", 14), ("soc_max", 16)) if evt >> bit & 1]
    states = {1: "DISCONNECTED", 2: "INITIALIZING", 3: "CONNECTED", 4: "STANDBY",
              5: "SOC PROTECTION", 6: "SUSPENDING", 99: "FAULT"}
    cha = {1: "OFF", 2: "EMPTY", 3: "DISCHARGING", 4: "CHARGING", 5: "FULL", 6: "HOLDING", 7: "TESTING"}
    cha_st = _pick((b, "ChaSt"), (s, "ChaSt"))
    return values, {
        "state": states.get(b.get("State"), b.get("State")) if b else ac.get("state"),
        "charge_status": cha.get(cha_st, cha_st),
        "clamped": bool(clamps), "clamp": clamps[0] if clamps else None,
        "storctl_mod": s.get("StorCtl_Mod"),
    }


def _setpoint(models: Mapping[int, Mapping[str, Any]], max_ch: Any, max_dis: Any) -> Any:
    """The commanded power, + discharge: 802 ReqW, else 704 WSet, else 124's rates."""
    b, der, s = models.get(802, {}), models.get(704, {}), models.get(124, {})
    if b.get("ReqW") is not None:
        return b["ReqW"]
    if 704 in models and der.get("WSetEna") == 1:
        return der.get("WSet")
    mode = s.get("StorCtl_Mod")
    if mode is None:
        return None
    if mode & 2 and s.get("OutWRte") is not None and max_dis:
        return s["OutWRte"] / 100 * max_dis
    if mode & 1 and s.get("InWRte") is not None and max_ch:
        return -s["InWRte"] / 100 * max_ch
    return 0.0


def _meter_values(models: Mapping[int, dict], static: Mapping[int, dict]) -> tuple[dict, dict]:
    m = _first(models, METER_MODELS)
    return {
        "p_w": m.get("W"), "import_wh": m.get("TotWhImp"), "export_wh": m.get("TotWhExp"),
        "voltage_v": m.get("PhVphA", m.get("PhV")), "frequency_hz": m.get("Hz"),
        "current_a": m.get("A"),
    }, {"events": m.get("Evt")}


NEUTRAL = {DeviceKind.PV: _pv_values, DeviceKind.BATTERY: _battery_values,
           DeviceKind.METER: _meter_values}


def _cannot(dev: SunSpecDevice, what: str, needs: str) -> SetpointRejected:
    return SetpointRejected(dev._err(
        f"{what}: this device's models {sorted(m.id for m in dev.models)} cannot carry it "
        f"(needs {needs})"))


def _pv_limit(dev: SunSpecDevice, value: float) -> list[tuple[int, str, float]]:
    if not 0.0 <= value <= 100.0:
        raise SetpointRejected(dev._err(f"limit_pct {value:g} outside 0..100 %"))
    if 704 in dev.layout:
        return [(704, "WMaxLimPct", value), (704, "WMaxLimPctEna", 1)]
    if 123 in dev.layout:
        return [(123, "WMaxLimPct", value), (123, "WMaxLim_Ena", 1)]
    raise _cannot(dev, "limit_pct", "123 or 704")


def _pv_enable(dev: SunSpecDevice, value: float) -> list[tuple[int, str, float]]:
    if value not in (0.0, 1.0):
        raise SetpointRejected(dev._err(f"limit_enabled must be 0 or 1, got {value:g}"))
    if 704 in dev.layout:
        return [(704, "WMaxLimPctEna", value)]
    if 123 in dev.layout:
        return [(123, "WMaxLim_Ena", value)]
    raise _cannot(dev, "limit_enabled", "123 or 704")


def _battery_power(dev: SunSpecDevice, value: float) -> list[tuple[int, str, float]]:
    """+W discharge / -W charge: on a 1547 device 704 WSet (watts, enabled); else 124:
    StorCtl_Mod=DISCHARGE with OutWRte (% of the discharge rating) or CHARGE with InWRte."""
    max_ch, max_dis = _ratings(dev.last, dev.static)
    if 704 in dev.layout:
        lo = -max_ch if max_ch else -math.inf
        hi = max_dis if max_dis else math.inf
        if not lo <= value <= hi:
            raise SetpointRejected(dev._err(
                f"power_w {value:g} W outside {lo:g} (charge) .. +{hi:g} (discharge) W"))
        return [(704, "WSetMod", 1), (704, "WSet", value), (704, "WSetEna", 1)]
    if 124 not in dev.layout:
        raise _cannot(dev, "power_w", "124 or 704")
    if not max_dis or not max_ch:
        raise SetpointRejected(dev._err(
            "device does not state its charge/discharge ratings (124 WChaMax, 802, 702 or 120)"))
    if not -max_ch <= value <= max_dis:
        raise SetpointRejected(dev._err(
            f"power_w {value:g} W outside -{max_ch:g} (charge) .. +{max_dis:g} (discharge) W"))
    if value > 0:
        return [(124, "OutWRte", value / max_dis * 100), (124, "InWRte", 0), (124, "StorCtl_Mod", 2)]
    if value < 0:
        return [(124, "OutWRte", 0), (124, "InWRte", -value / max_ch * 100), (124, "StorCtl_Mod", 1)]
    return [(124, "StorCtl_Mod", 0), (124, "OutWRte", 0), (124, "InWRte", 0)]


SETPOINT_WRITERS = {
    (DeviceKind.PV, "limit_pct"): _pv_limit,
    (DeviceKind.PV, "limit_enabled"): _pv_enable,
    (DeviceKind.BATTERY, "power_w"): _battery_power,
}
SETPOINT_NAMES: dict[DeviceKind, set[str]] = {}
for _kind, _name in SETPOINT_WRITERS:
    SETPOINT_NAMES.setdefault(_kind, set()).add(_name)


async def scan(host: str, port: int, unit: int = 1, timeout_s: float = 1.0, *,
               framer: str = "socket", serial: SerialSettings | None = None) -> dict[str, Any]:
    """SunSpec discovery of one endpoint (TCP, RTU over TCP, or a serial port): base
    address, models, identity."""
    link = ModbusLink(host, port, timeout_s=timeout_s, framer=framer, serial=serial)
    try:
        base, models = await discover(link, unit)
        common = next((m for m in models if m.id == 1), None)
        ident: dict[str, Any] = {}
        if common is not None and common.definition is not None:
            regs = await link.read(common.address, common.length + 2, unit)
            ident = decode_model(fit(common.definition, common.length, None), regs)
        return {"endpoint": link.endpoint, "unit": unit, "base": base, "models": models,
                "kind": infer_kind(m.id for m in models), "common": ident}
    finally:
        link.close()
