"""Asyncio MQTT client over paho-mqtt 2.x, with paho's socket loop driven by the event loop.

Why not ``loop_start()``: publishing from the caller's thread while paho's own thread runs
the network loop is slow here (hundreds of messages/s: every publish wakes the other thread
through a socket pair and contends for paho's locks). Registering paho's socket with the
asyncio loop (``add_reader``/``add_writer`` plus a periodic ``loop_misc``) keeps everything
on one thread and reaches tens of thousands of messages/s on loopback.

Only the blocking TCP connect and TLS handshake run in a worker thread, so an unreachable
broker never stalls the event loop; every paho callback that may fire in that thread is
marshalled back to the loop.

Delivery semantics:

* ``await publish(..., qos=1)`` returns once the broker has sent PUBACK (it has the message).
  QoS 1 messages published while the connection is down are kept by the client (bounded by
  ``max_queued``) and sent after the reconnect; their futures resolve on the PUBACK then.
  QoS 0 messages published while disconnected raise `BusError` (there is nothing to retry).
* Subscriptions are remembered and re-subscribed after every reconnect.
* A persistent session (``client_id`` given) may receive messages the broker queued for it
  before this process has subscribed again (a restarted node reconnecting): messages that
  match no local subscription are held (the last ``max_unclaimed``) and delivered, in
  order, to the first subscription that matches them, so none is dropped.
* A refused connection (bad credentials, not authorised) raises `BusError` at connect time;
  after a successful connect, losses are retried with exponential backoff forever until
  `close()`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import random
import socket
import ssl
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
# paho reports MQTT 3.1.1 CONNACK codes as their MQTT 5 reason codes; brokers' logs use these
_V311_CONNACK = {132: 1, 133: 2, 136: 3, 134: 4, 135: 5}


class BusError(Exception):
    """The bus cannot do what was asked: broker unreachable or refusing, queue full, closed."""


@dataclass(frozen=True)
class TLSOptions:
    """How the client verifies the broker (and optionally proves itself with a certificate).

    ``ca_file`` None means the system trust store. ``check_hostname`` False accepts any name
    in the broker's certificate (the chain is still verified) — for lab brokers reached by IP.
    """

    ca_file: str | Path | None = None
    certfile: str | Path | None = None
    keyfile: str | Path | None = None
    check_hostname: bool = True

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file) if self.ca_file else None
        )
        ctx.check_hostname = self.check_hostname
        if self.certfile:
            ctx.load_cert_chain(str(self.certfile), str(self.keyfile) if self.keyfile else None)
        return ctx


@dataclass(frozen=True)
class BusMessage:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass(frozen=True)
class BrokerAddress:
    """A parsed broker URL (``mqtt://[user:pass@]host[:port]`` or ``mqtts://...``)."""

    scheme: str
    host: str
    port: int
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise BusError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise BusError(f"broker URL {url!r}: no host")
        try:
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError as exc:
            raise BusError(f"broker URL {url!r}: {exc}") from None
        return cls(
            scheme,
            parts.hostname,
            port,
            unquote(parts.username) if parts.username is not None else None,
            unquote(parts.password) if parts.password is not None else None,
        )

    @property
    def safe_url(self) -> str:
        """The URL without credentials, for messages and logs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@functools.lru_cache(maxsize=8192)
def topic_matches(topic_filter: str, topic: str) -> bool:
    """paho's matcher, cached: it builds a trie per call, too slow for every message."""
    return mqtt.topic_matches_sub(topic_filter, topic)


_CLOSED: Any = object()


class Subscription:
    """Messages matching one filter, in arrival order; an async iterator until closed.

    The queue is unbounded by default: messages that move money or energy are never dropped
    here, so a consumer that stops reading grows memory rather than losing data. With
    ``max_pending`` (traffic whose senders repeat it, e.g. consensus gossip, and which anyone
    on the broker could flood) the oldest waiting message makes room and is counted in
    `dropped`.
    """

    def __init__(self, bus: BusClient, topic_filter: str, qos: int,
                 max_pending: int | None = None) -> None:
        self.topic_filter = topic_filter
        self.qos = qos
        self._bus = bus
        self._queue: asyncio.Queue[BusMessage] = asyncio.Queue()
        self._closed = False
        self.max_pending = max_pending
        self.dropped = 0

    def _deliver(self, msg: BusMessage) -> None:
        if not self._closed:
            if self.max_pending is not None and self._queue.qsize() >= self.max_pending:
                with contextlib.suppress(asyncio.QueueEmpty):
                    self._queue.get_nowait()
                    self.dropped += 1
            self._queue.put_nowait(msg)

    @property
    def closed(self) -> bool:
        return self._closed

    def pending(self) -> int:
        """Messages received and not yet taken."""
        return self._queue.qsize()

    async def get(self, timeout: float | None = None) -> BusMessage:  # noqa: ASYNC109
        """The next message; `TimeoutError` after ``timeout`` s, `BusError` once closed."""
        if self._closed and self._queue.empty():
            raise BusError(f"subscription {self.topic_filter!r} is closed")
        msg = await asyncio.wait_for(self._queue.get(), timeout)
        if msg is _CLOSED:
            raise BusError(f"subscription {self.topic_filter!r} is closed")
        return msg

    def get_nowait(self) -> BusMessage | None:
        """The next message if one is waiting, else None."""
        try:
            msg = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        return None if msg is _CLOSED else msg

    def close(self) -> None:
        """Stop receiving; unsubscribes at the broker when no other subscription uses the filter."""
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(_CLOSED)
        self._bus._drop_subscription(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> BusMessage:
        try:
            return await self.get()
        except BusError:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


Callback = Callable[[BusMessage], Awaitable[None] | None]



def _no_delay(sock: Any) -> None:
    """Send each MQTT packet at once (TCP_NODELAY), as asyncio does for its own sockets:
    paho leaves Nagle on, so a packet written while the previous one is unacknowledged
    waits for the peer's delayed ACK (~40 ms on Linux loopback): a fast run idled ~200
    times for ~37 ms each, and every real-time consensus round could pay it."""
    with contextlib.suppress(OSError, AttributeError):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

class BusClient:
    """One MQTT connection. Use as ``async with BusClient(url) as bus: ...``.

    ``client_id`` given → persistent session (clean_session False), so the broker keeps
    QoS 1 messages for us across short disconnects; no id → a random one and a clean session
    (no orphaned sessions left in the broker).

    ``max_inflight`` is paho's window of unacknowledged QoS 1 publishes on the wire (paho's
    bookkeeping is O(window) per PUBACK; 50-100 measured best on loopback); ``max_queued``
    bounds the messages the client holds (in flight + waiting); `publish` waits for room,
    `publish_nowait` raises `BusError` when full.
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: TLSOptions | None = None,
        keepalive: int = 30,
        clean_session: bool | None = None,
        connect_timeout: float = 10.0,
        reconnect_delay: tuple[float, float] = (0.1, 5.0),
        max_inflight: int = 100,
        max_queued: int = 50_000,
        max_unclaimed: int = 10_000,
    ) -> None:
        self.address = BrokerAddress.parse(url)
        self.url = self.address.safe_url
        self.client_id = client_id or f"testbed-{uuid.uuid4().hex[:12]}"
        if clean_session is None:
            clean_session = client_id is None
        self._username = username if username is not None else self.address.username
        self._password = password if password is not None else self.address.password
        if tls is None and self.address.scheme == "mqtts":
            tls = TLSOptions()
        self._tls = tls
        self._keepalive = keepalive
        self._connect_timeout = connect_timeout
        self._reconnect_delay = reconnect_delay
        self._max_queued = max(1, min(max_queued, 65_000))  # paho mids are 16-bit

        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(self._max_queued)
        c.connect_timeout = connect_timeout
        if self._username is not None:
            c.username_pw_set(self._username, self._password)
        if tls is not None:
            try:
                c.tls_set_context(tls.context())
            except (OSError, ssl.SSLError) as exc:
                raise BusError(f"{self.url}: TLS settings: {exc}") from exc
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_unsubscribe = self._on_unsubscribe
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_socket_register_write
        c.on_socket_unregister_write = self._on_socket_unregister_write
        self._client = c

        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._connected = asyncio.Event()
        self._connack: asyncio.Future[ReasonCode] | None = None
        self._publishes: dict[int, asyncio.Future[None]] = {}
        self._acks: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._room = asyncio.Semaphore(self._max_queued)
        self._subs: list[Subscription] = []
        self._routes: dict[str, list[Subscription]] = {}
        """topic -> the open subscriptions it matches, in subscription order; cleared
        whenever a subscription opens or closes (many agents share one connection: each
        message used to be matched against every one of their subscriptions)."""
        self._filters: dict[str, int] = {}  # filter -> number of local subscriptions
        self._filter_qos: dict[str, int] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._rx = 0  # packets handled, to know when a read made progress
        self._write_pending = False  # a write is scheduled for the loop's next round
        self._writer = False  # the socket has a writer (the kernel buffer was full)
        self.reconnects = 0
        self._unclaimed: collections.deque[BusMessage] = collections.deque(
            maxlen=max(0, max_unclaimed))
        self.unclaimed_dropped = 0
        """Messages received without a matching subscription and pushed out of the bound."""

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> BusClient:
        await self.connect()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until the connection is up (after a loss, until the reconnect succeeded)."""
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def connect(self) -> None:
        """Connect and wait for CONNACK; `BusError` if refused, unreachable or timed out."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._client.connect_async(self.address.host, self.address.port, self._keepalive)
        try:
            await self._attempt()
        except BusError:
            self._client._sock_close()  # noqa: SLF001 - paho has no public abort
            raise
        self._tasks = [
            asyncio.create_task(self._misc_loop(), name=f"bus-misc-{self.client_id}"),
        ]

    async def _attempt(self) -> None:
        """One connection attempt: socket (+TLS) in a thread, then CONNACK on the loop."""
        assert self._loop is not None
        self._connack = self._loop.create_future()
        try:
            async with asyncio.timeout(self._connect_timeout + 1.0):
                try:
                    await asyncio.to_thread(self._client.reconnect)
                except ssl.SSLCertVerificationError as exc:
                    raise BusError(
                        f"{self.url}: TLS certificate not trusted: {exc.verify_message}"
                    ) from None
                except (OSError, ssl.SSLError) as exc:
                    raise BusError(f"cannot reach broker {self.url}: {exc}") from None
                rc = await self._connack
        except TimeoutError:
            raise BusError(
                f"broker {self.url}: no CONNACK within {self._connect_timeout:g} s"
            ) from None
        if rc.is_failure:
            code = _V311_CONNACK.get(rc.value, rc.value)
            hint = " (check username/password and the broker's ACL)" if code in (4, 5) else ""
            raise BusError(
                f"broker {self.url} refused the connection: {rc} "
                f"(CONNACK reason code {code}){hint}"
            )

    async def close(self) -> None:
        """Disconnect cleanly; pending publishes fail with `BusError`."""
        if self._closing:
            return
        self._closing = True
        if self._client.is_connected():
            self._client.disconnect()
            # let the DISCONNECT packet go out (the writer callback sends it)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    # paho has no event for 'written'; poll briefly
                    while self._client.socket() is not None and self._client.want_write():  # noqa: ASYNC110
                        await asyncio.sleep(0.001)
        self._client._sock_close()  # noqa: SLF001 - closes and unregisters the socket
        self._connected.clear()
        for t in [*self._tasks, *self._handlers]:
            t.cancel()
        for t in [*self._tasks, *self._handlers]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        err = BusError(f"bus to {self.url} closed before the broker acknowledged")
        for fut in [*self._publishes.values(), *self._acks.values()]:
            if not fut.done():
                fut.set_exception(err)
                fut.exception()  # mark retrieved: nobody may be awaiting it
        self._publishes.clear()
        self._acks.clear()
        for sub in list(self._subs):
            sub.close()

    async def _misc_loop(self) -> None:
        """Keepalive pings and, when the connection is lost, reconnect with backoff."""
        delay = self._reconnect_delay[0]
        while not self._closing:
            if self._client.socket() is not None:
                self._client.loop_misc()
                await asyncio.sleep(0.5)
                continue
            await asyncio.sleep(delay * (0.75 + random.random() / 2))
            if self._closing:
                return
            try:
                await self._attempt()
            except BusError as exc:
                self._client._sock_close()  # noqa: SLF001
                log.info("bus %s: reconnect failed: %s", self.url, exc)
                delay = min(delay * 2, self._reconnect_delay[1])
                continue
            delay = self._reconnect_delay[0]
            log.info("bus %s: reconnected", self.url)

    # -- paho socket callbacks (may run in the connect thread) -----------------------------

    def _in_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        _no_delay(sock)
        self._in_loop(self._add_reader, sock)

    def _add_reader(self, sock: socket.socket) -> None:
        assert self._loop is not None
        if sock.fileno() >= 0 and sock is self._client.socket():
            self._loop.add_reader(sock.fileno(), self._on_readable)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()
        if fd >= 0:
            self._in_loop(self._remove_fd, fd)

    def _remove_fd(self, fd: int) -> None:
        assert self._loop is not None
        self._loop.remove_reader(fd)
        self._loop.remove_writer(fd)
        self._writer = False

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._write_soon, sock)

    def _write_soon(self, sock: socket.socket) -> None:
        """paho has bytes to send: write them in the loop's next round, all that the
        callbacks before it queued in one go. Only when the socket cannot take them all
        does the socket get a writer (each add/remove is a selector syscall, which cost
        more than the write itself when done for every publish)."""
        if not self._write_pending:
            self._write_pending = True
            assert self._loop is not None
            self._loop.call_soon(self._write_now, sock)

    def _write_now(self, sock: socket.socket) -> None:
        self._write_pending = False
        c = self._client
        if sock.fileno() < 0 or sock is not c.socket():
            return
        c.loop_write()
        if c.want_write() and sock is c.socket() and not self._writer:
            self._add_writer(sock)

    def _add_writer(self, sock: socket.socket) -> None:
        assert self._loop is not None
        if sock.fileno() >= 0 and sock is self._client.socket():
            self._loop.add_writer(sock.fileno(), self._client.loop_write)
            self._writer = True

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()
        if fd >= 0 and self._writer:
            assert self._loop is not None
            self._writer = False
            self._in_loop(self._loop.remove_writer, fd)

    def _on_readable(self) -> None:
        # paho reads one packet per loop_read() when nothing is in flight; drain what is there
        # in one callback (stop when a read made no progress). TLS may hold decrypted bytes the
        # selector cannot see, hence the pending() check.
        c = self._client
        for _ in range(256):
            before = self._rx
            if c.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
            sock = c.socket()
            if sock is None:
                return
            if self._rx == before and not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                return
        sock = c.socket()
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            assert self._loop is not None
            self._loop.call_soon(self._on_readable)

    # -- paho protocol callbacks (loop thread) --------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        self._rx += 1
        if not rc.is_failure:
            if self._tasks:  # up before: counted here, before anyone waiting is woken
                self.reconnects += 1
            self._connected.set()
            if self._filter_qos:
                client.subscribe(list(self._filter_qos.items()))
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(rc)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        self._rx += 1
        if self._connected.is_set() and not self._closing:
            log.warning("bus %s: connection lost (%s); reconnecting", self.url, rc)
        self._connected.clear()
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(
                BusError(f"broker {self.url} closed the connection before CONNACK ({rc})")
            )

    def _on_message(self, client: mqtt.Client, userdata: Any, m: mqtt.MQTTMessage) -> None:
        self._rx += 1
        topic = m.topic
        msg = BusMessage(topic, m.payload, m.qos, bool(m.retain))
        subs = self._routes.get(topic)
        if subs is None:
            if len(self._routes) >= 4096:
                self._routes.clear()
            subs = self._routes[topic] = [
                sub for sub in self._subs if topic_matches(sub.topic_filter, topic)]
        for sub in subs:
            sub._deliver(msg)
        claimed = bool(subs)
        if not claimed and self._unclaimed.maxlen:
            if len(self._unclaimed) == self._unclaimed.maxlen:
                self.unclaimed_dropped += 1
            self._unclaimed.append(msg)

    def _claim(self, sub: Subscription) -> None:
        """Hand a new subscription the held messages it matches (arrival order)."""
        if not self._unclaimed:
            return
        keep: collections.deque[BusMessage] = collections.deque(maxlen=self._unclaimed.maxlen)
        for msg in self._unclaimed:
            if topic_matches(sub.topic_filter, msg.topic):
                sub._deliver(msg)
            else:
                keep.append(msg)
        self._unclaimed = keep

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, rc: ReasonCode, props: Any
    ) -> None:
        self._rx += 1
        fut = self._publishes.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, rcs: list[ReasonCode], props: Any
    ) -> None:
        self._rx += 1
        fut = self._acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(rcs)

    def _on_unsubscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, rcs: list[ReasonCode], props: Any
    ) -> None:
        self._rx += 1

    # -- publishing --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise BusError(f"bus to {self.url} is closed")
        if self._loop is None:
            raise BusError(f"bus to {self.url} is not connected (use `async with BusClient(...)`)")

    def publish_nowait(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        """Queue a message; the future resolves on PUBACK (QoS 1) or once written (QoS 0).

        Raises `BusError` when ``max_queued`` messages are already held, or for QoS 0 while
        disconnected. No flow control beyond that: use `publish` or `publish_many` for bursts.
        """
        self._check_open()
        assert self._loop is not None
        info = self._client.publish(topic, payload, qos, retain)
        rc = info.rc
        if rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise BusError(f"bus to {self.url}: {self._max_queued} messages already queued")
        if rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
            raise BusError(f"bus to {self.url} is disconnected; QoS 0 message to {topic!r} dropped")
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise BusError(f"bus to {self.url}: publish to {topic!r} failed: {mqtt.error_string(rc)}")
        fut = self._loop.create_future()
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and info.is_published():  # written already
            fut.set_result(None)
        else:
            self._publishes[info.mid] = fut
        return fut

    async def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish and wait until the broker has it (PUBACK for QoS 1; written for QoS 0)."""
        self._check_open()
        async with self._room:
            await self.publish_nowait(topic, payload, qos, retain)

    async def publish_many(
        self,
        messages: Iterable[tuple[str, bytes | str]],
        qos: int = 1,
        retain: bool = False,
        window: int | None = None,
    ) -> int:
        """Publish a burst, keeping at most ``window`` unacknowledged; returns the count.

        Order is kept per topic (one connection, in order). Fails with `BusError` on the first
        message that fails.
        """
        self._check_open()
        window = min(window or self._max_queued, self._max_queued)
        gate = asyncio.Semaphore(window)
        pending: set[asyncio.Future[None]] = set()
        failed: list[BaseException] = []

        def done(f: asyncio.Future[None]) -> None:
            pending.discard(f)
            gate.release()
            self._room.release()
            if not f.cancelled() and f.exception() is not None:
                failed.append(f.exception())  # type: ignore[arg-type]

        n = 0
        for topic, payload in messages:
            if failed:
                break
            await gate.acquire()
            await self._room.acquire()
            try:
                fut = self.publish_nowait(topic, payload, qos, retain)
            except BaseException:
                gate.release()
                self._room.release()
                raise
            pending.add(fut)
            fut.add_done_callback(done)
            n += 1
        if pending:
            await asyncio.wait(list(pending))
        if failed:
            raise failed[0]
        return n

    # -- subscribing -------------------------------------------------------------------------

    async def subscribe(
        self, topic_filter: str, qos: int = 1, timeout: float | None = 10.0,  # noqa: ASYNC109
        *, max_pending: int | None = None,
    ) -> Subscription:
        """Subscribe and wait for SUBACK; `BusError` if the broker rejects the filter.

        While disconnected the filter is recorded and subscribed on reconnect.
        ``max_pending`` bounds the messages waiting to be read (see `Subscription`).
        """
        self._check_open()
        assert self._loop is not None
        sub = Subscription(self, topic_filter, qos, max_pending)
        self._subs.append(sub)  # before SUBSCRIBE: retained messages arrive right after SUBACK
        self._routes.clear()
        self._claim(sub)
        self._filters[topic_filter] = self._filters.get(topic_filter, 0) + 1
        new_qos = max(qos, self._filter_qos.get(topic_filter, -1))
        if self._filter_qos.get(topic_filter) == new_qos:
            return sub
        self._filter_qos[topic_filter] = new_qos
        try:
            rc, mid = self._client.subscribe(topic_filter, new_qos)
        except ValueError as exc:
            sub.close()
            raise BusError(f"bad topic filter {topic_filter!r}: {exc}") from None
        if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            return sub
        fut: asyncio.Future[list[ReasonCode]] = self._loop.create_future()
        self._acks[mid] = fut
        try:
            rcs = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            sub.close()
            raise BusError(f"broker {self.url}: no SUBACK for {topic_filter!r}") from None
        if any(r.is_failure for r in rcs):
            sub.close()
            raise BusError(
                f"broker {self.url} refused subscription {topic_filter!r}: "
                + ", ".join(f"{r} ({r.value})" for r in rcs)
            )
        return sub

    def _drop_subscription(self, sub: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subs.remove(sub)
        self._routes.clear()
        f = sub.topic_filter
        n = self._filters.get(f, 0) - 1
        if n > 0:
            self._filters[f] = n
            return
        self._filters.pop(f, None)
        self._filter_qos.pop(f, None)
        if not self._closing and self._client.is_connected():
            self._client.unsubscribe(f)

    async def on(self, topic_filter: str, callback: Callback, qos: int = 1) -> Subscription:
        """Call ``callback(msg)`` (sync or async) for each matching message, one at a time, in
        order. Close the returned subscription to stop. A raising callback is logged, not fatal.
        """
        sub = await self.subscribe(topic_filter, qos)

        async def pump() -> None:
            async for msg in sub:
                try:
                    r = callback(msg)
                    if inspect.isawaitable(r):
                        await r
                except Exception as exc:  # noqa: BLE001 - a payload costs one line, not a traceback
                    log.warning("bus handler for %r failed on %s: %s", topic_filter, msg.topic,
                                " ".join(f"{type(exc).__name__}: {exc}".split())[:300])
                    log.debug("bus handler traceback", exc_info=True)

        task = asyncio.create_task(pump(), name=f"bus-on-{topic_filter}")
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        return sub
