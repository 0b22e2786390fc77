"""The Modbus emulator server: emulated SunSpec devices by unit id on one endpoint.

One pymodbus server per endpoint (Modbus TCP on host:port, RTU frames over TCP, or RTU on
a serial port), hosting any number of emulated devices under distinct unit ids, built with
pymodbus' SimData/SimDevice API. A SimDevice `action` hook refreshes a device's registers
from its physics before a read and passes a write through the device's checks before
pymodbus stores it; a refused write answers with exception 03 (illegal data value) and
changes nothing. Malformed requests get the exceptions the Modbus specification says.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable, Coroutine, Generator, Mapping
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusIOException, NoSuchIdException
from pymodbus.framer import FramerType
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.device import (
    DeviceInformation,
    DeviceInformationFactory,
    ModbusDeviceIdentification,
)
from pymodbus.pdu.mei_message import ReadDeviceInformationRequest, ReadDeviceInformationResponse
from pymodbus.pdu.other_message import ReportDeviceIdRequest, ReportDeviceIdResponse
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadHoldingRegistersResponse,
    ReadInputRegistersRequest,
    ReadInputRegistersResponse,
)
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator.simcore import SimCore
from pymodbus.simulator.simutils import SimUtils
from pymodbus.transaction import TransactionManager

from .emulator import EmulatedDevice, WriteRefused
from .modbus_link import SerialSettings, fast_framer, plain_socket, socket_frame
from .sunspec import SunSpecError

log = logging.getLogger(__name__)


class _StrictSimCore(SimCore):
    """SimCore that answers an unknown unit id like a gateway (exception 0x0B), instead of
    failing on a missing default device. Units in `silent` answer the same way: a device
    behind a gateway that stopped answering (a scenario's fault event)."""

    silent: set[int] = set()
    identities: dict[int, ModbusDeviceIdentification] = {}
    """Unit -> identity from its SunSpec model 1 (FC43/14 and FC17 answer per unit)."""

    spans: dict[int, _ReadSpan] = {}
    """Unit -> its fast read path (set per server, built at the unit's first read)."""

    async def async_getValues(self, device_id: int, func_code: int, address: int, count: int = 1):
        if func_code in (3, 4):  # register reads, the poll path: see _ReadSpan
            if (now := self.read_now(device_id, func_code, address, count)) is not None:
                return now  # read_now refused an unknown or silent unit already
            span = self.spans.get(device_id)
            if span is not None:
                return await span.read(func_code, address, count)
        elif device_id not in self.devices or device_id in self.silent:
            raise NoSuchIdException(f"unit {device_id}")
        return await super().async_getValues(device_id, func_code, address, count)

    def read_now(self, device_id: int, func_code: int, address: int,
                 count: int) -> list[int] | ExcCodes | None:
        """A register read (the poll path, see _ReadSpan) answered without awaiting, as
        our devices refresh synchronously; None: not ours, take `async_getValues`."""
        if device_id not in self.devices or device_id in self.silent:
            raise NoSuchIdException(f"unit {device_id}")
        span = self.spans.get(device_id)
        if span is None:
            span = self.spans[device_id] = _ReadSpan.of(self.devices[device_id])
        if span is None or span.refresh is None:
            return None
        return span.read_now(address, count)


class _ReadSpan:
    """A register read answered as pymodbus' SimRuntime answers it (a register outside
    the device's data is exception 02; the device's `action` runs first), with the
    validity of a span found in one lookup instead of pymodbus' per-register flag loop,
    which was the server's largest own cost per poll. Writes keep pymodbus' checks."""

    __slots__ = ("action", "refresh", "registers", "start", "valid_until")

    def __init__(self, start: int, registers: list[int], flags: list[int], action: Any) -> None:
        self.start, self.registers, self.action = start, registers, action
        self.refresh: Callable[[list[int]], None] | None = getattr(action, "refresh", None)
        """The action's read part as a plain call (`sim_device` gives one)."""
        n = len(registers)
        self.valid_until = [n] * (n + 1)
        """valid_until[i]: the first register at or after i that holds no data."""
        for i in range(n - 1, -1, -1):
            invalid = flags[i] & SimUtils.RunTimeFlag_TYPE == DataType.INVALID
            self.valid_until[i] = i if invalid else self.valid_until[i + 1]

    @classmethod
    def of(cls, runtime: Any) -> _ReadSpan | None:
        """The span of a device built from one list of register blocks (ours); None for
        a layout by function code, which pymodbus' own path serves."""
        block = runtime.block.get("x")
        if block is None or runtime.use_bit_addressing:
            return None
        start, _, registers, flags = block
        return cls(start, registers, flags, runtime.action)

    def _offset(self, address: int, count: int) -> int | None:
        """The read's offset in the span, None when a register of it holds no data."""
        offset = address - self.start
        if offset < 0 or offset + count > len(self.registers) or count < 1 \
                or self.valid_until[offset] < offset + count:
            return None
        return offset

    def read_now(self, address: int, count: int) -> list[int] | ExcCodes:
        if (offset := self._offset(address, count)) is None:
            return ExcCodes.ILLEGAL_ADDRESS
        self.refresh(self.registers)  # type: ignore[misc]
        return self.registers[offset: offset + count]

    async def read(self, func_code: int, address: int, count: int) -> list[int] | ExcCodes:
        if (offset := self._offset(address, count)) is None:
            return ExcCodes.ILLEGAL_ADDRESS
        if self.action and (result := await self.action(
                func_code, self.start, address, count, self.registers, None)):
            return result
        return self.registers[offset: offset + count]

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


def identity(dev: EmulatedDevice) -> ModbusDeviceIdentification:
    """Modbus device identification objects from the device's SunSpec model 1: vendor Mn,
    product code and model name Md, revision Vr; serial number SN as private object 0x80."""
    m = dev.map

    def text(point: str) -> str:
        return str(m.get_raw(1, point) or "")

    ident = ModbusDeviceIdentification(info_name={
        "VendorName": text("Mn"), "ProductCode": text("Md"), "MajorMinorRevision": text("Vr"),
        "ProductName": text("Md"), "ModelName": text("Md"),
        "UserApplicationName": "testbed SunSpec emulator"})
    ident[0x80] = text("SN")
    return ident


class _Identified:
    """Mixin: the identity of the addressed unit instead of pymodbus' process-wide one."""

    @staticmethod
    def _identity(context: Any, device_id: int) -> ModbusDeviceIdentification:
        ident = getattr(context, "identities", {}).get(device_id)
        if ident is None or device_id in getattr(context, "silent", ()):
            raise NoSuchIdException(f"unit {device_id}")
        return ident


class _DeviceInformation(_Identified, ReadDeviceInformationRequest):
    async def datastore_update(self, context: Any, device_id: int) -> ModbusPDU:
        ident = self._identity(context, device_id)
        if not 0x01 <= self.read_code <= 0x04:
            return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_VALUE)
        control = type("Control", (), {"Identity": ident})
        info = DeviceInformationFactory.get(control, self.read_code, self.object_id)
        if self.read_code == DeviceInformation.SPECIFIC and not info.get(self.object_id):
            return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_ADDRESS)
        return ReadDeviceInformationResponse(read_code=self.read_code, information=info,
                                             dev_id=device_id, transaction_id=self.transaction_id)


class _ReportDeviceId(_Identified, ReportDeviceIdRequest):
    async def datastore_update(self, context: Any, device_id: int) -> ModbusPDU:
        ident = self._identity(context, device_id)
        parts = [ident[k] for k in (0, 1, 2, 0x80)]
        data = b"-".join(p if isinstance(p, bytes) else str(p).encode() for p in parts)
        return ReportDeviceIdResponse(identifier=data, dev_id=device_id,
                                      transaction_id=self.transaction_id)


class _PackedHolding(ReadHoldingRegistersResponse):
    """The same bytes as pymodbus' response, packed in one call (pymodbus appends one
    2-byte pack per register: the largest part of encoding a poll's answer)."""

    def encode(self) -> bytes:
        n = len(self.registers)
        return struct.pack(f">B{n}H", 2 * n, *self.registers)


class _PackedInput(ReadInputRegistersResponse):
    encode = _PackedHolding.encode


class _ReadRegisters:
    """Mixin: a register read answered by a plain call into our datastore where it can
    (pymodbus awaits four coroutines deep for it), its answer packed in one call."""

    packed: type[ModbusPDU]

    async def datastore_update(self, context: Any, device_id: int) -> ModbusPDU:
        fc, address, count = self.function_code, self.address, self.count  # type: ignore[attr-defined]
        read_now = getattr(context, "read_now", None)
        values = read_now(device_id, fc, address, count) if read_now else None
        if values is None:  # pymodbus' own path
            values = await context.async_getValues(device_id, fc, address, count)
        if isinstance(values, ExcCodes):
            return ExceptionResponse(fc, values)
        return self.packed(registers=values, dev_id=device_id,
                           transaction_id=self.transaction_id)  # type: ignore[attr-defined]


class _ReadHolding(_ReadRegisters, ReadHoldingRegistersRequest):
    packed = _PackedHolding


class _ReadInput(_ReadRegisters, ReadInputRegistersRequest):
    packed = _PackedInput


_MAX_QUANTITY = {3: 125, 4: 125, 16: 123, 23: 125}
"""Registers per request as the Modbus specification allows (FC23: the read part)."""


class _StrictDecoder(DecodePDU):
    """Request decoding as the Modbus specification says, where pymodbus 3.16 answers a
    malformed request with a wrong function code or not at all: an unknown function code
    is exception 01, a quantity of 0 or above the maximum exception 03."""

    def decode(self, frame: bytes) -> ModbusPDU | None:
        fc = frame[0] if frame else 0
        read = _READS.get(fc)
        if read is not None and len(frame) == 5:  # the poll: straight to our class
            pdu = read()
            pdu.address, pdu.count = _ADDRESS_COUNT.unpack_from(frame, 1)
            if 1 <= pdu.count <= _MAX_QUANTITY[fc]:
                return pdu
            return _Refusal(fc, ExcCodes.ILLEGAL_VALUE)
        if fc < 0x80:
            if fc not in self.pdu_table:
                return _Refusal(fc, ExcCodes.ILLEGAL_FUNCTION)
            if fc in _MAX_QUANTITY and len(frame) >= 5:
                (count,) = struct.unpack_from(">H", frame, 3)
                if not 1 <= count <= _MAX_QUANTITY[fc]:
                    return _Refusal(fc, ExcCodes.ILLEGAL_VALUE)
        pdu = super().decode(frame)
        if type(pdu) is ReadHoldingRegistersRequest:
            pdu.__class__ = _ReadHolding
        elif type(pdu) is ReadInputRegistersRequest:
            pdu.__class__ = _ReadInput
        elif type(pdu) is ReadDeviceInformationRequest:
            pdu.__class__ = _DeviceInformation
        elif type(pdu) is ReportDeviceIdRequest:
            pdu.__class__ = _ReportDeviceId
        return pdu


_READS: dict[int, type[ModbusPDU]] = {3: _ReadHolding, 4: _ReadInput}
"""Register reads, decoded without pymodbus' generic path (which formats every request
for a debug line, log level or not)."""
_ADDRESS_COUNT = struct.Struct(">HH")


_READ_FRAME = struct.Struct(">HHHBBHH")
"""A register read's Modbus TCP frame: MBAP header, function code, address, count."""
_EXCEPTION_FRAME = struct.Struct(">HHHBBB")

PIPELINE_BUFFER = 1 << 18
"""A Modbus TCP connection's receive buffer, at most (pymodbus: one frame, 264 bytes,
less than the requests a pipelining client sends at once; asyncio reads up to 256 KiB)."""


class _Handler(ServerRequestHandler):
    """pymodbus' connection handler, answering a request as soon as it is decoded: pymodbus
    schedules a callback that goes through `run_coroutine_threadsafe` (a wake-up write to
    the loop's self-pipe) to start a task per request, three loop passes before the
    answer. Our datastore never waits, so the handler's coroutine is run on the spot and
    finishes there; should it wait after all, a task takes it over from where it stopped.

    On Modbus TCP every complete request of a read is answered (pymodbus answers the first
    and leaves the others in its buffer until more data arrives, so a client pipelining
    requests waits for their timeouts), and the answers of one read leave in one write.
    A register read (the poll) is answered straight from the datastore (`_read_now`)."""

    tasks: set[asyncio.Task] | None = None
    _out: list[bytes] | None = None
    """Answers made while a read is taken apart, written together at its end."""

    def callback_data(self, data: bytes, addr: tuple | None = None) -> int:
        if not plain_socket(self):
            return self._one(data, addr)
        out = self._out = []
        used, n = 0, len(data)
        try:
            while used < n:
                if n - used >= 12 and self._read_now(data, used, out):
                    used += 12
                    continue
                cut = self._one(data[used:] if used else data, addr)
                if not cut:
                    break  # the rest of a request comes with the next read
                used += cut
        finally:
            self._out = None
            if out and self.transport:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))  # type: ignore[attr-defined]
        return used

    def _read_now(self, data: bytes, pos: int, out: list[bytes]) -> bool:
        """A holding or input register read at `pos` answered as pymodbus' path (`_one`,
        `_ReadRegisters`) answers it, without its PDU objects and coroutines: the frame
        taken apart in one unpack, the registers from `read_now`, the answer packed in
        one call. False (nothing done): not such a read, a quantity the specification
        refuses, broadcast, or a datastore that must be awaited: `_one` answers it."""
        tid, pid, length, unit, fc, address, count = _READ_FRAME.unpack_from(data, pos)
        if pid or length != 6 or fc not in (3, 4) or not unit or not 1 <= count <= 125:
            return False
        server = self.server
        try:
            values = server.context.read_now(unit, fc, address, count)
            if values is None:
                return False
            if isinstance(values, ExcCodes):
                out.append(_EXCEPTION_FRAME.pack(tid, 0, 3, unit, fc | 0x80, values))
            else:
                out.append(struct.pack(f">HHHBBB{count}H", tid, 0, 3 + 2 * count, unit, fc,
                                       2 * count, *values))
        except NoSuchIdException:
            if not server.ignore_missing_devices:  # else no answer: the client times out
                out.append(_EXCEPTION_FRAME.pack(tid, 0, 3, unit, fc | 0x80,
                                                 ExcCodes.GATEWAY_NO_RESPONSE))
        except Exception:  # noqa: BLE001 - `_one` answers it as pymodbus does (device failure)
            return False
        return True

    def _one(self, data: bytes, addr: tuple | None) -> int:
        """Take the first request of `data` apart and answer it; the bytes it took."""
        try:
            used_len = TransactionManager.callback_data(self, data, addr)
        except ModbusIOException as exc:  # as pymodbus answers an undecodable frame
            response = ExceptionResponse(0x00 if exc.fcode is None else exc.fcode,
                                         exception_code=ExcCodes.ILLEGAL_FUNCTION,
                                         device_id=exc.dev_id, transaction=exc.transaction_id)
            self.server_send(response, addr)
            return len(data)
        if self.last_pdu:
            self._run(self._answer(self.last_pdu, self.last_addr))
        return used_len

    async def _answer(self, pdu: ModbusPDU, addr: tuple | None) -> None:
        """pymodbus' `handle_request` for the request given (pymodbus reads it from
        `last_pdu`, which the next pipelined request replaces should this one wait)."""
        server = self.server
        try:
            if server.broadcast_enable and not pdu.dev_id:
                for dev_id in server.context.device_ids():
                    await pdu.datastore_update(server.context, dev_id)
                return
            response = await pdu.datastore_update(server.context, pdu.dev_id)
        except NoSuchIdException:
            if server.ignore_missing_devices:
                return  # the client times out, as pymodbus has it
            response = ExceptionResponse(pdu.function_code, ExcCodes.GATEWAY_NO_RESPONSE)
        except Exception:  # as pymodbus answers a datastore failure
            log.exception("Modbus datastore failed")
            response = ExceptionResponse(pdu.function_code, ExcCodes.DEVICE_FAILURE)
        response.transaction_id = pdu.transaction_id
        response.dev_id = pdu.dev_id
        self.server_send(response, addr)

    def server_send(self, pdu: ModbusPDU | None, addr: tuple | None) -> None:
        """An answer framed in one pack on Modbus TCP (`socket_frame`), corked while a
        read is taken apart, and written straight to the transport (pymodbus' `send`
        empties the receive buffer, which may hold the next request's start); else
        pymodbus'."""
        if pdu and plain_socket(self):
            frame = socket_frame(pdu)
            if self._out is not None:
                self._out.append(frame)
            elif self.transport:
                self.transport.write(frame)  # type: ignore[attr-defined]
        else:
            super().server_send(pdu, addr)

    def handle_later(self) -> None:
        self._run(self.handle_request())

    def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            waiting = coro.send(None)
        except StopIteration:
            return
        except Exception:  # what a task would have logged as never retrieved
            log.exception("Modbus request handler failed")
            return
        if self.tasks is None:
            self.tasks = set()
        task = self.loop.create_task(_resume(coro, waiting))
        self.tasks.add(task)  # a strong reference until done, as asyncio asks
        task.add_done_callback(self.tasks.discard)


class _Resumed:
    """Awaitable that drives a started coroutine on: what it yielded goes to the task
    (the future it waits on), and what the task sends or throws goes back in."""

    __slots__ = ("coro", "waiting")

    def __init__(self, coro: Coroutine[Any, Any, Any], waiting: Any) -> None:
        self.coro, self.waiting = coro, waiting

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, waiting = self.coro, self.waiting
        while True:
            try:
                sent = yield waiting
            except BaseException as exc:  # noqa: BLE001 - cancellation too goes to the coroutine
                try:
                    waiting = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    waiting = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _resume(coro: Coroutine[Any, Any, Any], waiting: Any) -> Any:
    return await _Resumed(coro, waiting)


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

    def adopt(registers: list[int]) -> None:
        if m.registers is not registers:  # adopt pymodbus' register list: no copy per read
            registers[: m.size] = m.registers[: m.size]
            m.registers = registers

    def refresh(registers: list[int]) -> None:
        adopt(registers)
        dev.refresh()

    async def action(fc: int, start: int, address: int, count: int,
                     registers: list[int], values: list[int] | list[bool] | None) -> ExcCodes | None:
        if not values:
            refresh(registers)
            return None
        adopt(registers)
        try:
            dev.write(address, [int(v) for v in values])
        except (WriteRefused, SunSpecError) as exc:
            log.warning("%s: write at %d refused: %s", dev.name, address, exc)
            return ExcCodes.ILLEGAL_VALUE
        return None

    action.refresh = refresh  # type: ignore[attr-defined]  # _ReadSpan's plain-call read
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
        server.context.spans = {}
        server.context.identities = {unit: identity(dev) for unit, dev in self.devices.items()}
        server.decoder.__class__ = _StrictDecoder
        new_handler = server.callback_new_connection

        def handler() -> ServerRequestHandler:
            h = new_handler()
            if type(h) is ServerRequestHandler:
                h.__class__ = _Handler
                fast_framer(h)
                if self.framer == "socket" and self.serial is None:
                    h.max_buffer_size = PIPELINE_BUFFER
            return h

        server.callback_new_connection = handler  # type: ignore[method-assign]
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
