"""A HELICS value federate for asyncio code: blocking HELICS calls run in a worker
thread so the federate's own servers (Modbus, OPC UA, MQTT clients) keep answering while
it waits for a grant.

Times (`timing`): within a step from t0 to t1 = t0 + dt the run publishes the shards'
inputs at t0 + dt/2, the shards are granted t1 (physics), the run is granted t1 + dt/10
(device reads). The run is uninterruptible, so it is granted exactly the time it
asks for and every hand-over is to a strictly later time (no same-time ambiguity)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from typing import Any

import helics as h

from testbed.bus.broker import free_port

from .errors import CosimError

MAXTIME = float(h.HELICS_TIME_MAXTIME)
WATCH_S = 0.25
CORE = "zmqss"
"""HELICS core type of every federate and of the brokers `--shards` starts: ZeroMQ, single
socket (each federate connects out to the broker's one port). Not tcpss: its connection
is lost ("lost comms") on a value or message larger than its 4 kB buffer (`--maxsize`,
and raising it did not help in HELICS 3.6.1), and one step's inputs for 500 prosumers
are ~25 kB; zmqss carried 300 kB values with the defaults."""


def inputs_time(t0: float, dt: float) -> float:
    return t0 + 0.5 * dt


def read_time(t1: float, dt: float) -> float:
    return t1 + 0.1 * dt


LOCAL_CORE = "zmq"
"""HELICS core type of the federations `--shards` starts on this machine (their broker's
address is given as `zmq://HOST:PORT`). zmqss's single-socket comms poll without blocking
(~20,000 zero-timeout polls and ~5,000 yields a second in each process): every federate
and the broker burnt ~0.4 of a core while only waiting for a grant, which on 2 cores took
from the run and the shards; zmq's comms block (~1 ms of CPU per 50 ms of waiting instead
of ~18). zmq has each federate listen on a port of its own as well (it is given a free
one), so across hosts zmqss stays the default."""


def broker_address(broker: str) -> str:
    """`host:port` (or `tcp://host:port`, or `zmq://host:port` for a broker of the zmq core
    type) -> HELICS's broker address; refuses others."""
    return _parse_broker(broker)[1]


def broker_core(broker: str) -> str:
    """The core type a federate of `broker` uses: zmq for `zmq://host:port`, else zmqss."""
    return _parse_broker(broker)[0]


def _parse_broker(broker: str) -> tuple[str, str]:
    core, addr = (LOCAL_CORE, broker.removeprefix("zmq://")) if broker.startswith("zmq://") \
        else (CORE, broker.removeprefix("tcp://"))
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise CosimError(f"--helics {broker!r}: expected HOST:PORT of a helics_broker "
                         "(e.g. 127.0.0.1:23404)")
    return core, f"tcp://{host}:{port}"


class Federate:
    """A HELICS combination federate (values and messages) on a zmqss core (one outgoing
    connection to the broker: only the broker's port must be reachable) connected to
    `broker`.

    `interruptible`: granted as soon as an input arrives (the shards wait for the run's
    inputs with a request for the end of time); otherwise exactly the time requested."""

    def __init__(self, name: str, broker: str, *, timeout_s: float = 20.0,
                 interruptible: bool = False) -> None:
        self.name = name
        self.interruptible = interruptible
        self.broker = broker
        self.core, address = _parse_broker(broker)
        init = f"--federates=1 --broker_address={address} --timeout={timeout_s}s"
        init += " --loglevel=error"
        if self.core == LOCAL_CORE:  # its own port: a free one, not the broker's guess
            host = address.removeprefix("tcp://").rpartition(":")[0]
            init += f" --local_interface={host} --localport={free_port(host)}"
        self._init = init
        self.fed: Any = None
        self.pubs: dict[str, Any] = {}
        self.subs: dict[str, Any] = {}
        self.endpoints: dict[str, Any] = {}
        self._busy = 0
        self.watch: Callable[[], str | None] | None = None
        """Asked while a call blocks: a message ends the wait (a local child died)."""
        """Blocking calls in flight in a worker thread (the federate is not freed under them)."""

    def _create(self) -> None:
        fi = h.helicsCreateFederateInfo()
        h.helicsFederateInfoSetCoreTypeFromString(fi, self.core)
        h.helicsFederateInfoSetCoreInitString(fi, self._init)
        h.helicsFederateInfoSetFlagOption(fi, h.HELICS_FLAG_UNINTERRUPTIBLE,
                                          not self.interruptible)
        h.helicsFederateInfoSetIntegerProperty(fi, h.HELICS_PROPERTY_INT_LOG_LEVEL,
                                               h.HELICS_LOG_LEVEL_ERROR)
        try:
            self.fed = h.helicsCreateCombinationFederate(self.name, fi)
        finally:
            h.helicsFederateInfoFree(fi)

    async def connect(self) -> None:
        try:
            await asyncio.to_thread(self._create)
        except h.HelicsException as exc:
            raise CosimError(f"federate {self.name}: cannot join the HELICS broker at "
                             f"{self.broker}: {exc}") from None

    def publish_to(self, key: str, kind: str = "double") -> None:
        dtype = h.HELICS_DATA_TYPE_DOUBLE if kind == "double" else h.HELICS_DATA_TYPE_STRING
        self.pubs[key] = h.helicsFederateRegisterGlobalPublication(self.fed, key, dtype, "")

    def subscribe(self, key: str) -> None:
        self.subs[key] = h.helicsFederateRegisterSubscription(self.fed, key, "")

    def endpoint(self, key: str) -> None:
        """A global endpoint: where messages to `key` arrive, or whence they are sent."""
        self.endpoints[key] = h.helicsFederateRegisterGlobalEndpoint(self.fed, key, "")

    def send(self, key: str, text: str, destination: str) -> None:
        h.helicsEndpointSendStringTo(self.endpoints[key], text, destination)

    def messages(self, key: str) -> list[tuple[str, str]]:
        """The messages that arrived at endpoint `key`: (source endpoint, text)."""
        ep, out = self.endpoints[key], []
        while h.helicsEndpointHasMessage(ep):
            m = h.helicsEndpointGetMessage(ep)
            out.append((h.helicsMessageGetSource(m), h.helicsMessageGetString(m)))
        return out

    def put(self, key: str, value: float | str) -> None:
        pub = self.pubs[key]
        if isinstance(value, str):
            h.helicsPublicationPublishString(pub, value)
        else:
            h.helicsPublicationPublishDouble(pub, value)

    def get(self, key: str, default: float = math.nan) -> float:
        sub = self.subs[key]
        if not h.helicsInputIsValid(sub) or h.helicsInputLastUpdateTime(sub) < 0:
            return default
        return h.helicsInputGetDouble(sub)

    def text(self, key: str) -> str | None:
        sub = self.subs[key]
        value = h.helicsInputGetString(sub)
        return value or None

    def updated(self, key: str) -> bool:
        return bool(h.helicsInputIsUpdated(self.subs[key]))

    def executing(self) -> bool:
        """In executing mode, in good standing (no error, not disconnecting)."""
        if self.fed is None or self._busy:
            return False
        try:
            return bool(h.helicsFederateGetState(self.fed) == h.HELICS_STATE_EXECUTION)
        except h.HelicsException:
            return False

    async def _call(self, what: str, fn: Any, *args: Any) -> Any:
        """A blocking HELICS call in a worker thread; `watch` (if set) is asked every
        quarter second while it blocks and ends the wait with its message."""
        if self.fed is None:
            raise CosimError(f"federate {self.name}: {what}: disconnected")
        self._busy += 1
        done = asyncio.ensure_future(asyncio.to_thread(fn, self.fed, *args))
        done.add_done_callback(self._done)
        try:
            while True:
                finished, _ = await asyncio.wait({done}, timeout=WATCH_S)
                if finished:
                    return done.result()
                if self.watch is not None and (why := self.watch()):
                    raise CosimError(f"federate {self.name}: {what}: {why}")
        except h.HelicsException as exc:
            raise CosimError(f"federate {self.name}: {what}: {exc}") from None

    def _done(self, fut: asyncio.Future[Any]) -> None:
        self._busy -= 1
        if not fut.cancelled():
            fut.exception()  # retrieved: a call abandoned by `watch` logs nothing

    async def initializing(self) -> None:
        """Initializing mode: what is published now is there when execution starts."""
        await self._call("entering initializing mode", h.helicsFederateEnterInitializingMode)

    async def enter(self) -> None:
        await self._call("entering executing mode", h.helicsFederateEnterExecutingMode)

    async def request(self, t: float) -> float:
        """Ask for time `t`; returns the granted time (MAXTIME once the federation ends)."""
        return float(await self._call(f"time request {t:g}", h.helicsFederateRequestTime, t))

    def abort(self, why: str) -> None:
        """Fail this federate now (a signal): a call blocked in a worker thread returns
        with an error instead of waiting for the broker."""
        if self.fed is not None:
            with contextlib.suppress(h.HelicsException):
                h.helicsFederateLocalError(self.fed, -1, why)

    def close(self) -> None:
        """Leave the federation (a blocked time request in a worker thread returns); the
        federate is freed unless a call is still in flight (then the process frees it)."""
        if self.fed is None:
            return
        with contextlib.suppress(h.HelicsException):
            h.helicsFederateDisconnect(self.fed)
        if not self._busy:
            with contextlib.suppress(h.HelicsException):
                h.helicsFederateFree(self.fed)
        self.fed = None
