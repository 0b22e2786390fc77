"""Modbus transport: one link per endpoint (Modbus TCP, RTU over TCP, or an RS-485 serial
port), shared by the unit ids behind it, with pacing, per-request timeouts and retries,
and errors that say what happened. Knows nothing of SunSpec (the device model lives in
`modbus.py`, as pysunspec2 keeps its Modbus client apart from its device model).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.client.base import ModbusBaseClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerSocket, FramerType
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.register_message import ReadHoldingRegistersResponse
from pymodbus.transaction import TransactionManager
from pymodbus.transport import CommType

from .driver import DeviceError, DeviceUnavailable


@dataclass(frozen=True)
class SerialSettings:
    """An RS-485 port as pyserial opens it (Modbus RTU)."""

    port: str
    baudrate: int = 19200
    bytesize: int = 8
    parity: str = "N"
    stopbits: int = 1




_pymodbus_log = logging.getLogger("pymodbus")
_pymodbus_log.propagate = False  # its errors carry raw frames; never on the user's console
_pymodbus_log.addHandler(logging.NullHandler())
_log = logging.getLogger(__name__)


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


class _HoldingRegisters(ReadHoldingRegistersResponse):
    """pymodbus' answer to a holding-register read, decoded in one unpack (pymodbus
    unpacks register by register) and keeping the bytes as they came (`raw`), which the
    SunSpec decoder reads point by point: no list built only to be packed again."""

    raw: bytes = b""
    _registers: list[int] | None = None

    def decode(self, data: bytes) -> None:
        if (data_len := int(data[0])) >= len(data):  # the check and error of pymodbus
            raise ModbusIOException(f"byte_count {data_len} > length of packet {len(data)}",
                                    function_code=self.function_code)
        self.raw = bytes(data[1: 1 + 2 * (data_len // 2)])
        self._registers = None

    @property  # type: ignore[override]
    def registers(self) -> list[int]:
        """The registers as numbers, unpacked when asked for (a SunSpec poll never asks)."""
        regs = self._registers
        if regs is None:
            regs = self._registers = list(struct.unpack(f">{len(self.raw) // 2}H", self.raw))
        return regs

    @registers.setter
    def registers(self, value: Sequence[int]) -> None:
        self._registers = list(value)

    def __str__(self) -> str:
        """Short: pymodbus formats every decoded answer for a debug line, log level or not
        (11 us of a read of ~100 registers, a sixth of a bare client's CPU per read); the raw frame is
        in pymodbus' own debug dump."""
        return (f"{type(self).__name__}(dev_id={self.dev_id}, "
                f"transaction_id={self.transaction_id}, registers={len(self.registers)})")


class _Pending:
    """A pipelined request in flight: its answer's future, unit and deadline."""

    __slots__ = ("deadline", "dev_id", "future")

    def __init__(self, future: asyncio.Future, dev_id: int, deadline: float) -> None:
        self.future, self.dev_id, self.deadline = future, dev_id, deadline


class BadAnswer(ModbusIOException):
    """An answer paired to its request by transaction id whose PDU does not decode."""


class _Transaction(TransactionManager):
    """pymodbus' client transaction with a cheaper wait for the answer, and, on Modbus TCP,
    several requests in flight (`window`).

    One in flight (`window` 1, pymodbus' model): pymodbus wraps each answer's future in
    `asyncio.wait_for` (a second future, a timer and a callback per request, and one
    more loop pass before the caller resumes) behind a lock of its own. Here the link's
    pacer already keeps one request in flight, so the lock goes, and one watch timer per
    connection enforces the deadline of the request in flight: it re-arms itself at the
    current deadline when it fires early, so a request costs a float store, not a timer.

    Pipelined (`window` > 1): the requests issued in one loop pass are corked and leave
    in one socket write (`_flush`, scheduled with `call_soon`); answers are paired to
    their request by transaction id and unit, every complete answer of a read taken apart
    (`data_received`). An answer to no request in flight (a late one, after its timeout)
    or for another unit is ignored and logged, as pymodbus' framer skips it; never paired
    to another request. Each request keeps its own deadline (the watch sleeps until the
    earliest). A lost connection fails every request in flight (the link's `on_lost`).

    Timeouts, the count of unanswered requests before pymodbus closes the connection,
    and its errors are pymodbus'."""

    deadline = 0.0
    window = 1
    """Requests this connection may have in flight (set by the link before connecting)."""
    _watch: asyncio.TimerHandle | None = None
    _cork: list[bytes] | None = None
    _pending: dict[int, _Pending] | None = None

    async def execute(self, no_response_expected: bool, request: ModbusPDU) -> ModbusPDU:
        if self.retries:  # pymodbus' own retries: its own loop (the link retries itself)
            return await super().execute(no_response_expected, request)
        if not self.transport:
            raise ConnectionException("Not connected")
        if self.window > 1 and not no_response_expected and plain_socket(self):
            return await self._pipelined(request)
        request.transaction_id = tid = self.getNextTID()
        self.recv_buffer = b""
        future = self.response_future = self.loop.create_future()
        if plain_socket(self):  # pymodbus' frame, packed in one go
            self.request_dev_id, self.request_transaction_id = request.dev_id, tid
            self.low_level_send(socket_frame(request))
        else:
            self.pdu_send(request)
        if no_response_expected:
            return None  # type: ignore[return-value]
        self.deadline = deadline = self.loop.time() + self.comm_params.timeout_connect
        watch = self._watch
        if watch is None or watch.when() > deadline:
            if watch is not None:
                watch.cancel()
            self._watch = self.loop.call_at(deadline, self._check)
        try:
            response: ModbusPDU = await future
        except TimeoutError:
            raise self._no_answer(request) from None
        self.count_until_disconnect = self.max_until_disconnect
        if request.dev_id and response.dev_id != request.dev_id:
            raise self._io_exception_from_request(
                f"ERROR: request uses device id={request.dev_id} but received {response.dev_id}.",
                request)
        if response.transaction_id and response.transaction_id != request.transaction_id:
            raise self._io_exception_from_request(
                f"ERROR: request uses transaction id={request.transaction_id} but received "
                f"{response.transaction_id}.", request)
        response.retries = 0
        return response

    def _no_answer(self, request: ModbusPDU) -> ModbusIOException:
        """A request's timeout, as pymodbus counts it: after `max_until_disconnect`
        unanswered requests in a row the connection is closed."""
        if self.count_until_disconnect < 0:
            if self.comm_params.comm_type != CommType.SERIAL:
                self.connection_lost(TimeoutError("Server not responding"))
            return self._io_exception_from_request(
                "ERROR: No response received of the last requests (default: retries+3), "
                "CLOSING CONNECTION.", request)
        self.count_until_disconnect -= 1
        return self._io_exception_from_request(
            "No response received after 0 retries, continue with next request", request)

    async def _pipelined(self, request: ModbusPDU) -> ModbusPDU:
        """One request of several in flight: corked, sent with the loop pass's others,
        answered when its transaction id comes back (or failed at its deadline)."""
        pending = self._pending
        if pending is None:
            pending = self._pending = {}
        tid = self.getNextTID()
        while tid in pending:  # a wrapped-around id still in flight (a very late answer)
            tid = self.getNextTID()
        request.transaction_id = tid
        frame = socket_frame(request)
        loop = self.loop
        if self._cork is None:
            self._cork = [frame]
            loop.call_soon(self._flush)
        else:
            self._cork.append(frame)
        future = loop.create_future()
        deadline = loop.time() + self.comm_params.timeout_connect
        pending[tid] = _Pending(future, request.dev_id, deadline)
        watch = self._watch
        if watch is None or watch.when() > deadline:
            if watch is not None:
                watch.cancel()
            self._watch = loop.call_at(deadline, self._check_all)
        try:
            response: ModbusPDU = await future
        except TimeoutError:
            raise self._no_answer(request) from None
        finally:
            if pending.get(tid) is not None and pending[tid].future is future:
                del pending[tid]  # cancelled, or failed: its answer is nobody's now
        self.count_until_disconnect = self.max_until_disconnect
        response.retries = 0
        return response

    def _flush(self) -> None:
        """Send the corked requests in one write (not `send`: pymodbus' `send` empties
        the receive buffer, which may hold the start of an answer in flight)."""
        cork, self._cork = self._cork, None
        if cork and self.transport:
            self.transport.write(cork[0] if len(cork) == 1 else b"".join(cork))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        """Pipelined: take apart every complete answer of the read and hand each to its
        request (pymodbus' path takes one frame per read and bounds its buffer at one
        frame's size, too small for several answers)."""
        pending = self._pending
        if pending is None:
            super().data_received(data)
            return
        buf = self.recv_buffer + data if self.recv_buffer else data
        n, pos = len(buf), 0
        while n - pos >= 8:
            tid, pid, length, dev_id = _HEADER.unpack_from(buf, pos)
            if pid or not 2 <= length <= 254:  # no Modbus TCP frame here: the stream's
                _log.warning("%s: not a Modbus TCP answer (protocol id %d, length %d); "
                             "%d bytes dropped", self.comm_params.comm_name, pid, length,
                             n - pos)  # framing is lost; the requests in flight time out
                pos = n
                break
            end = pos + 6 + length
            if end > n:
                break  # the rest of it comes with the next read
            p = pending.get(tid)
            if p is None:
                _log.debug("answer with transaction id %d (unit %d) to no request in "
                           "flight: ignored (late, after its timeout?)", tid, dev_id)
            elif p.dev_id and dev_id != p.dev_id:
                _log.warning("answer with transaction id %d from unit %d, but the request "
                             "went to unit %d: ignored", tid, dev_id, p.dev_id)
            else:
                del pending[tid]
                future = p.future
                if not future.done():
                    pdu = self.framer.decoder.decode(buf[pos + 7: end])
                    if pdu is None:
                        future.set_exception(BadAnswer(
                            "Unable to decode response", transaction_id=tid, dev_id=dev_id))
                    else:
                        pdu.dev_id, pdu.transaction_id = dev_id, tid
                        future.set_result(pdu)
            pos = end
        self.recv_buffer = buf[pos:] if pos < n else b""

    def fail_all(self, exc: Exception) -> None:
        """Fail every request in flight (the connection is gone): each future marked
        retrieved, or asyncio logs "Future exception was never retrieved" for one nobody
        awaits any more (a request awaiting it still gets the exception)."""
        self._cork = None
        futures = [p.future for p in self._pending.values()] if self._pending else []
        if self._pending:
            self._pending.clear()
        if not self.is_server and self.window == 1:
            futures.append(self.response_future)
        for future in futures:
            if not future.done():
                future.set_exception(exc)
                future.exception()

    def _check(self) -> None:
        """The watch: time out the request in flight past its deadline, else sleep until
        that deadline (none in flight: stop until the next request)."""
        self._watch = None
        future = self.response_future
        if future.done():
            return
        if self.loop.time() >= self.deadline:
            future.set_exception(TimeoutError())
        else:
            self._watch = self.loop.call_at(self.deadline, self._check)

    def _check_all(self) -> None:
        """The pipelined watch: time out every request past its deadline, sleep until
        the earliest of the others."""
        self._watch = None
        pending = self._pending
        if not pending:
            return
        now, nxt = self.loop.time(), None
        for tid, p in list(pending.items()):
            if p.future.done():
                del pending[tid]
            elif now >= p.deadline:
                del pending[tid]
                p.future.set_exception(TimeoutError())
            elif nxt is None or p.deadline < nxt:
                nxt = p.deadline
        if nxt is not None:
            self._watch = self.loop.call_at(nxt, self._check_all)

    def close(self, reconnect: bool = False) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        super().close(reconnect)
        self.fail_all(ConnectionException("connection closed"))


class _ClientDecoder(DecodePDU):
    """pymodbus' response decoder, a holding-register answer built straight as
    `_HoldingRegisters` (pymodbus' generic path looks the class up and formats every
    answer for a debug line, log level or not). Errors as pymodbus has them: None."""

    def decode(self, frame: bytes) -> ModbusPDU | None:
        if frame and frame[0] == 3:
            pdu = _HoldingRegisters()
            try:
                pdu.decode(frame[1:])
            except (ModbusException, ValueError, IndexError, struct.error):
                return None
            return pdu
        return super().decode(frame)


_MBAP = struct.Struct(">HHHBB")
"""Modbus TCP header (transaction id, protocol 0, length, unit) and the function code."""


_HEADER = struct.Struct(">HHHB")


class FastSocketFramer(FramerSocket):
    """pymodbus' Modbus TCP framer, a complete frame at the start of the data read taken
    apart in one unpack (the usual case: the whole read; with pipelined requests the
    first of several, the caller asking again for the rest); partial, unexpected or
    malformed frames go through pymodbus' `handleFrame` as before."""

    def handleFrame(self, data: bytes, exp_devid: int, exp_tid: int) -> tuple[int, ModbusPDU | None]:
        n = len(data)
        if n > 8:
            tid, pid, length, dev_id = _HEADER.unpack_from(data)
            end = length + 6
            if (not pid and 9 <= end <= n and (not exp_devid or dev_id == exp_devid)
                    and (not exp_tid or not tid or tid == exp_tid)):
                if (pdu := self.decoder.decode(data[7:end] if end < n else data[7:])) is None:
                    raise ModbusIOException("Unable to decode request", transaction_id=tid,
                                            dev_id=dev_id)
                pdu.dev_id, pdu.transaction_id = dev_id, tid
                return end, pdu
        return super().handleFrame(data, exp_devid, exp_tid)


def fast_framer(tm: TransactionManager) -> None:
    """Give a connection with pymodbus' Modbus TCP framer the `FastSocketFramer`."""
    if type(tm.framer) is FramerSocket:
        tm.framer.__class__ = FastSocketFramer


def plain_socket(tm: TransactionManager) -> bool:
    """Modbus TCP framing and no trace hooks on this client or server connection: its
    frames can be packed by `socket_frame` (pymodbus builds one in three calls and two
    traces, ~1-3 us of a request)."""
    plain = tm.__dict__.get("_plain")
    if plain is None:
        plain = tm._plain = (  # type: ignore[attr-defined]
            type(tm.framer) in (FramerSocket, FastSocketFramer)
            and getattr(tm.trace_pdu, "__func__", None) is TransactionManager.dummy_trace_pdu
            and getattr(tm.trace_packet, "__func__", None)
            is TransactionManager.dummy_trace_packet)
    return plain


def socket_frame(pdu: ModbusPDU) -> bytes:
    """The Modbus TCP frame pymodbus' `buildFrame` makes, around the PDU's own `encode`
    (which keeps its checks of address and count)."""
    data = pdu.encode()
    return _MBAP.pack(pdu.transaction_id, 0, len(data) + 2, pdu.dev_id, pdu.function_code) + data


MAX_IN_FLIGHT = 32
"""The most requests a link keeps in flight (a site file's `max_in_flight`, at most)."""

RTU_QUIET_S = 0.5
"""After an RTU timeout the link stays quiet this long (at most the timeout): RTU frames
carry no transaction id, so a late answer must not be taken for the next request's."""


class _Window:
    """A link's pacer: up to `size` requests in flight, the others waiting their turn in
    order (asyncio's Lock and Semaphore, but a free slot taken without a coroutine: a
    Semaphore's acquire, two coroutines and a generator per request, was a tenth of a
    pipelined client's CPU)."""

    __slots__ = ("busy", "loop", "size", "waiters")

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop) -> None:
        self.size, self.loop, self.busy = size, loop, 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def enter(self) -> asyncio.Future[None] | None:
        """Take a slot (None), or the future that gives one when it is this one's turn."""
        if self.busy < self.size and not self.waiters:
            self.busy += 1
            return None
        turn = self.loop.create_future()
        self.waiters.append(turn)
        return turn

    async def wait(self, turn: asyncio.Future[None]) -> None:
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.leave()  # the slot came with the cancellation: pass it on
            raise

    def leave(self) -> None:
        """Give the slot to the next waiter still waiting, or free it."""
        waiters = self.waiters
        while waiters:
            turn = waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.busy -= 1


class ModbusLink:
    """One connection to an endpoint (TCP host:port, RTU over TCP, or a serial port), shared
    by the unit ids behind it, as with a gateway or an RS-485 bus.

    Requests are paced: by default one in flight at a time (pymodbus' model; many real
    devices and gateways answer no more), at least `min_gap_s` between the end of one and
    the start of the next. On Modbus TCP, `max_in_flight` > 1 pipelines: up to that many
    requests in flight, those issued in one loop pass sent in one write, answers paired
    by transaction id (for endpoints known to answer pipelined requests: our emulator
    server; a gap (`min_gap_s`) or RTU framing keeps one at a time). Each request carries
    its own timeout and retry count (a device's site-file fields). A lost connection fails
    the requests in flight; the next request reconnects at once, and only a failed connect
    starts the backoff (doubling from `backoff_s` to `backoff_max_s`) during which
    requests fail fast, so a dead endpoint never stalls a poll loop.
    """

    def __init__(self, host: str, port: int, *, timeout_s: float = 1.0, min_gap_s: float = 0.0,
                 framer: str = "socket", serial: SerialSettings | None = None,
                 backoff_s: float = 0.5, backoff_max_s: float = 10.0,
                 max_in_flight: int = 1) -> None:
        if framer not in ("socket", "rtu"):
            raise ValueError(f"framer must be 'socket' (Modbus TCP) or 'rtu', not {framer!r}")
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.framer = "rtu" if serial is not None else framer
        self.serial = serial
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self._client: ModbusBaseClient | None = None
        self._lock: _Window | None = None
        self._loop_of_lock: asyncio.AbstractEventLoop | None = None
        self._min_gap_s = min_gap_s
        self._max_in_flight = 1
        self.max_in_flight = max_in_flight
        self._loop: asyncio.AbstractEventLoop | None = None
        self._delay = 0.0
        self._retry_at = 0.0
        self._connecting: asyncio.Lock | None = None
        self._loop_of_connecting: asyncio.AbstractEventLoop | None = None
        self._last_done = 0.0
        self._quiet_until = 0.0
        self.generation = 0
        """Bumped on every new connection (reconnects, for figures and tests)."""
        self.last_error: str | None = None
        self.requests = 0
        self.failures = 0

    @property
    def max_in_flight(self) -> int:
        """Requests the endpoint takes in flight (Modbus TCP only; 1: one at a time)."""
        return self._max_in_flight

    @max_in_flight.setter
    def max_in_flight(self, n: int) -> None:
        if not isinstance(n, int) or not 1 <= n <= MAX_IN_FLIGHT:
            raise ValueError(f"max_in_flight must be 1..{MAX_IN_FLIGHT}, not {n!r}")
        if n > 1 and self.framer == "rtu":
            raise ValueError(f"{self.endpoint}: RTU frames carry no transaction id: one request "
                             "in flight at a time (max_in_flight 1)")
        window = self.window
        self._max_in_flight = n
        self._new_window(window)

    def _new_window(self, before: int) -> None:
        """After a change of `max_in_flight` or `min_gap_s`: the pacer is made again, and
        a connection opened for another window closed (the next request reconnects)."""
        self._loop_of_lock = None
        if self.window != before:
            self.close()

    @property
    def min_gap_s(self) -> float:
        return self._min_gap_s

    @min_gap_s.setter
    def min_gap_s(self, gap: float) -> None:
        window = self.window
        self._min_gap_s = gap
        self._new_window(window)

    @property
    def window(self) -> int:
        """Requests actually kept in flight: `max_in_flight`, or 1 with a gap to keep
        between requests."""
        return 1 if self._min_gap_s else self._max_in_flight

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
        client.register(_HoldingRegisters)
        ctx = client.ctx
        if type(ctx.framer.decoder) is DecodePDU:
            ctx.framer.decoder.__class__ = _ClientDecoder
        if type(ctx) is TransactionManager:
            ctx.__class__ = _Transaction
            ctx.window = self.window  # type: ignore[attr-defined]
        fast_framer(ctx)
        lost = ctx.callback_disconnected

        def on_lost(exc: Exception | None) -> None:
            """pymodbus lets the request in flight wait for its timeout when the connection
            drops; fail it (every one in flight, pipelined) now so the retry reconnects at
            once."""
            lost(exc)
            if isinstance(ctx, _Transaction):
                ctx.fail_all(ConnectionException(f"connection lost ({exc or 'closed'})"))
                return
            future = ctx.response_future
            if not future.done():
                future.set_exception(ConnectionException(f"connection lost ({exc or 'closed'})"))
                future.exception()

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

    def _pacer(self) -> _Window:
        """The link's window of requests in flight, for the running event loop."""
        loop = asyncio.get_running_loop()
        if self._lock is None or self._loop_of_lock is not loop:
            self._lock, self._loop_of_lock = _Window(self.window, loop), loop
        return self._lock

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> ModbusBaseClient:
        """`ensure`, one connect at a time (pipelined, several requests may find the
        link down at once: they share the one connect)."""
        lock = self._connecting
        if lock is None or self._loop_of_connecting is not loop:
            lock = self._connecting = asyncio.Lock()
            self._loop_of_connecting = loop
        async with lock:
            return await self.ensure()

    async def _request(self, fn: str, address: int, arg: Any, unit: int,
                       timeout_s: float | None, retries: int, hint: str) -> Any:
        """One request, paced, with its own timeout; retried on no answer."""
        timeout = timeout_s or self.timeout_s
        count = arg if isinstance(arg, int) else len(arg)
        loop = asyncio.get_running_loop()
        for attempt in range(retries + 1):
            pacer = self._lock if self._loop_of_lock is loop else self._pacer()
            if (turn := pacer.enter()) is not None:
                await pacer.wait(turn)
            try:
                client = self._client
                if client is None or self._loop is not loop or not client.connected:
                    client = await self._connect(loop)
                if self._min_gap_s or self._quiet_until:
                    wait = max(self._last_done + self._min_gap_s, self._quiet_until) - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                client.ctx.comm_params.timeout_connect = timeout  # pymodbus copied the client's
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
            finally:
                pacer.leave()
            if rr.isError():
                code = _exc_code(rr)
                if code in GATEWAY_SILENT and attempt < retries:
                    continue
                cls = GatewayTargetSilent if code in GATEWAY_SILENT else ModbusExceptionReply
                raise cls(address, count, unit, code)
            return rr if fn == "read" else None
        raise AssertionError("unreachable")

    async def read(self, address: int, count: int, unit: int, *, timeout_s: float | None = None,
                   retries: int = 0, hint: str = "") -> list[int]:
        """Holding registers; `hint` says which site-file field raises the timeout."""
        rr = await self._request("read", address, count, unit, timeout_s, retries, hint)
        return rr.registers

    async def read_bytes(self, address: int, count: int, unit: int, *,
                         timeout_s: float | None = None, retries: int = 0, hint: str = "") -> bytes:
        """Holding registers as the big-endian bytes of the answer (what SunSpec decodes)."""
        rr = await self._request("read", address, count, unit, timeout_s, retries, hint)
        raw = getattr(rr, "raw", None)
        return raw if raw is not None else struct.pack(f">{len(rr.registers)}H", *rr.registers)

    async def write(self, address: int, values: Sequence[int], unit: int, *,
                    timeout_s: float | None = None, retries: int = 0, hint: str = "") -> None:
        await self._request("write", address, values, unit, timeout_s, retries, hint)

    def _failed(self, client: ModbusBaseClient, unit: int, exc: ModbusException,
                timeout: float, hint: str) -> DeviceUnavailable:
        """A request without an answer: a timeout on a live connection leaves it open (one
        unit may be silent while others answer); a lost connection is dropped (if it is
        still the link's: pipelined, another request may have reconnected already)."""
        if isinstance(exc, ModbusIOException) and client.connected:
            if isinstance(exc, BadAnswer):
                return DeviceUnavailable(f"{self.endpoint} unit {unit}: the answer does not "
                                         f"decode ({exc})")
            if self.framer == "rtu":  # no transaction ids: let a late answer pass unread
                self._quiet_until = time.monotonic() + min(timeout, RTU_QUIET_S)
            return RequestTimeout(
                f"{self.endpoint} unit {unit}: timeout, no response within {timeout:g} s"
                f" ({hint or 'raise timeout_s in the site file'})")
        if self._client is client:
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


GATEWAY_SILENT = (10, 11)
"""Gateway exceptions: the unit behind it did not answer (or has no path): unavailable."""


class GatewayTargetSilent(ModbusExceptionReply, DeviceUnavailable):
    """The gateway answered for a unit that did not: retried, and counted as unavailable."""
