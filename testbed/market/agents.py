"""The market on the message bus: the aggregator and the prosumers' TCRs as agents.

Every market message is a signed ledger transaction in the paper's envelope (one
implementation: `testbed.ledger.messages`), so what travels on MQTT can be committed to
the ledger unchanged:

- the aggregator's request is an `auction-open` transaction on `market/{i}/request`;
- a TCR's answer is a `bid-offer` transaction on `market/{i}/orders`, from its address
  (a registry-certified pseudonym on public channels, or its identity);
- the clearing is an `award` transaction on `market/{i}/awards` carrying the auction
  contract's result, with a notice for every participant, losers included.

Each receiver checks, in this order: JSON envelope, registered key, signature, freshness
(stale date, replayed reqId), operation shape, then the market rules (`validate_order`).
A refused message is logged with its reason and dropped; the round goes on for everyone
else.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import time as _time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from testbed.bus import topics
from testbed.bus.client import BusClient, BusMessage
from testbed.ledger import messages
from testbed.ledger import transactions as T
from testbed.ledger.election import cpf
from testbed.ledger.errors import Reason, Rejected
from testbed.ledger.identity import KeyPair
from testbed.ledger.messages import Freshness, KeyResolver, SignedMessage
from testbed.physics.models import BatteryParams, BatteryState

from .auction import CONTRACT, Clearing, clear
from .orders import DEFAULT_RULES, MarketError, MarketRules, Order, Pricing, Side, validate_order
from .tcr import Mode, TCRParams, respond

log = logging.getLogger("testbed.market")
PRICING_NAMES = {Pricing.PAY_AS_BID: "pay-as-bid", Pricing.PAY_AS_CLEAR: "pay-as-clear"}
MAX_REFUSAL = 300
"""Characters of a refusal's log line: a hostile payload cannot flood the log."""


def _bid(side: Side | str, energy_kwh: float, price: float) -> dict[str, Any]:
    return {"type": str(side), "energy": {"unit": "kWh", "value": energy_kwh},
            "price": {"unit": "EUR/kWh", "value": price}}


def order_of(msg: SignedMessage, interval: int) -> Order:
    """The market order a shape-checked auction-open or bid-offer message carries."""
    b = msg.parameters["bid"]
    return Order(msg.id, msg.client_id, Side(b["type"]), float(b["energy"]["value"]),
                 float(b["price"]["value"]), interval)


@dataclass
class Inbox:
    """Checks incoming market messages; keeps what it refused and why."""

    resolve: KeyResolver
    clock: Callable[[], float]
    max_skew_s: float = 300.0
    refused: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fresh = Freshness(self.max_skew_s)

    def accept(self, m: BusMessage, operation: str) -> SignedMessage | None:
        """The message if it is well formed, fresh, signed by a registered key and of the
        expected operation and shape; else None, refused with its reason (one line)."""
        try:
            msg = messages.parse(m.payload)  # parsed once per process (its cache)
            self.fresh.accept(msg, self.resolve, self.clock())
            if msg.operation != operation:
                raise Rejected(Reason.INVALID, f"expected {operation}, got {msg.operation}")
            T.check_shape(msg.operation, msg.parameters)
        except Rejected as exc:
            self.refuse(m.topic, str(exc))
            return None
        except Exception as exc:  # noqa: BLE001 - any payload costs one line, never a traceback
            self.refuse(m.topic, f"malformed ({type(exc).__name__}: {exc})")
            return None
        return msg

    def refuse(self, where: str, reason: str) -> None:
        """Log one line (control characters and newlines of a hostile payload flattened,
        the length bounded) and keep it."""
        text = " ".join(f"{where}: {reason}".split())
        text = "".join(c if c.isprintable() else "?" for c in text)
        if len(text) > MAX_REFUSAL:
            text = text[:MAX_REFUSAL - 3] + "..."
        log.warning("refused %s", text)
        self.refused.append(text)


@dataclass
class Round:
    """One auction as the aggregator saw it."""

    request: SignedMessage
    orders: list[SignedMessage]
    clearing: Clearing
    award: SignedMessage
    grid_check: SignedMessage | None = None
    """The DSO's signed grid check of the dispatch (when `dispatch` ran one)."""


class GridDispatch(Protocol):
    """What a grid-checked dispatch returns (`testbed.grid.reclear.Reclear`)."""

    clearing: Clearing

    def grid_check(self, dso: KeyPair, auction_id: str, *, at: float) -> SignedMessage: ...


class AggregatorAgent:
    def __init__(self, key: KeyPair, bus: BusClient, site: str, *, resolve: KeyResolver,
                 rules: MarketRules = DEFAULT_RULES, clock: Callable[[], float] = _time.time,
                 submit: Callable[[SignedMessage], Any] | None = None,
                 dso: KeyPair | None = None) -> None:
        self.key, self.bus, self.site, self.rules, self.clock = key, bus, site, rules, clock
        self.inbox = Inbox(resolve, clock)
        self.submit = submit
        """Also hand every message to the ledger (e.g. `LedgerNode.submit`)."""
        self.dso = dso
        """The DSO's key: signs the grid check of a dispatch before its award is recorded
        (the ledger takes caps only from a DSO-signed grid check)."""

    async def _record(self, msg: SignedMessage) -> None:
        if self.submit is not None:
            result = self.submit(msg)
            if asyncio.iscoroutine(result):
                await result

    async def _until(self, t: float) -> None:
        """Wait until the agent's clock reads `t` (it may run faster or slower than the
        wall clock); a clock that stands still for a wall-clock second is an error."""
        loop = asyncio.get_running_loop()
        last, since = self.clock(), loop.time()
        while (now := self.clock()) < t:
            if now != last:
                last, since = now, loop.time()
            elif loop.time() - since > 1.0:
                raise MarketError(f"the clock stands at {now:.3f}, before the gate {t}")
            await asyncio.sleep(min(0.02, t - now))

    async def auction(self, side: Side, energy_kwh: float, price: float, interval: int, *,
                      gate_s: float = 1.0, wait_s: float | None = None,
                      pricing: Pricing | None = None,
                      expect: Callable[[str], int | None] | None = None,
                      dispatch: Callable[[Order, list[Order]], Clearing | GridDispatch
                                         | Awaitable[Clearing | GridDispatch]]
                      | None = None, answered: asyncio.Event | None = None) -> Round:
        """Publish a request, collect answers until the gate closes, clear and publish.

        The gate is `gate_s` after now on the agent's clock, the time the ledger checks
        orders against; `wait_s` is how long to wait for answers in wall-clock seconds
        (default `gate_s`: a clock at real time). A clock running faster than real time
        (a realtime scenario at speed x) passes the gate sooner, so an order dated after
        it is refused here, as the ledger would refuse it, rather than awarded and then
        dropped from the chain. `expect(request_id)` may tell how many answers are coming
        (None: not yet known): the wait then ends as soon as they are in, which is how a
        fast-mode scenario runs hundreds of auctions without waiting out wall-clock gates.
        `answered`, set whenever what `expect` says may have changed, lets that wait
        sleep until something happens instead of re-checking `expect` every 2 ms.
        `dispatch(request, orders)` replaces the plain clearing, e.g. with the grid
        check's re-clear; when it returns the grid check (a `GridDispatch`), the DSO
        signs it and it is recorded before the award, whose caps it backs. Orders are recorded to the
        ledger after the gate, sorted by id, so a replayed run commits the same blocks.
        """
        pricing = pricing or self.rules.pricing
        now = self.clock()
        request = messages.sign(self.key, T.AUCTION, {
            "address": self.key.address, "interval": interval, "gate": math.ceil(now + gate_s),
            "pricing": PRICING_NAMES[pricing], "contract": CONTRACT,
            "bid": _bid(side, energy_kwh, price)}, at=now)
        req_order = order_of(request, interval)
        validate_order(req_order, self.rules)
        received: list[SignedMessage] = []
        orders: list[Order] = []
        seen: set[str] = set()
        async with await self.bus.subscribe(topics.market_orders(self.site, interval)) as sub:
            await self._record(request)
            await self.bus.publish(topics.market_request(self.site, interval), request.raw)
            gate = request.parameters["gate"]  # whole seconds: answers are taken until then
            deadline = asyncio.get_running_loop().time() + (gate_s if wait_s is None
                                                             else wait_s)
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                if answered is not None:
                    answered.clear()  # before reading `expect`: a later answer sets it again
                want = expect(request.id) if expect is not None else None
                if want is not None and len(received) >= want:
                    break
                try:
                    if expect is not None and answered is not None:
                        m = await _next_or_event(sub, answered, left)
                        if m is None:
                            continue
                    else:
                        m = await sub.get(timeout=min(left, 0.002) if expect else left)
                except TimeoutError:
                    continue
                msg = self.inbox.accept(m, T.ORDER)
                if msg is None:
                    continue
                p = msg.parameters
                if p["auction"] != request.id:
                    self.inbox.refuse(m.topic, f"order {msg.id[:12]} answers another auction")
                    continue
                if msg.time > gate:
                    self.inbox.refuse(m.topic, f"order {msg.id[:12]} from {msg.client_id}: "
                                      f"dated {msg.date}, after the gate ({gate})")
                    continue
                if p["address"] != msg.client_id or msg.client_id in seen:
                    self.inbox.refuse(m.topic, f"order {msg.id[:12]}: address must be the "
                                      "signer's, one order per participant")
                    continue
                try:
                    order = order_of(msg, interval)
                    validate_order(order, self.rules)
                except (MarketError, ValueError, TypeError, KeyError) as exc:
                    self.inbox.refuse(m.topic, f"order {msg.id[:12]} from {msg.client_id}: "
                                      f"{exc}")
                    continue
                seen.add(msg.client_id)
                received.append(msg)
                orders.append(order)
        received.sort(key=lambda m: m.id)
        orders.sort(key=lambda o: o.order_id)
        for msg in received:
            await self._record(msg)
        result = (dispatch(req_order, orders) if dispatch is not None
                  else clear(req_order, orders, pricing, rules=self.rules))
        if inspect.isawaitable(result):  # e.g. a grid check's power flows in a thread
            result = await result
        grid = None if isinstance(result, Clearing) else result
        clearing = result if grid is None else grid.clearing
        await self._until(gate)  # the ledger takes an award only in a block after the gate
        check = None
        if grid is not None and self.dso is not None:
            check = grid.grid_check(self.dso, request.id, at=self.clock())
            await self._record(check)
        elif clearing.caps:
            log.warning("auction %s: grid caps without a DSO key to sign them; the ledger "
                        "will refuse the award", request.id[:12])
        params: dict[str, Any] = {"auction": request.id, "contract": CONTRACT,
                                  "orders": [m.id for m in received],
                                  "result": clearing.to_dict()}
        if clearing.caps:
            params["caps"] = dict(clearing.caps)
        award = messages.sign(self.key, T.AWARD, params, at=self.clock())
        await self._record(award)
        await self.bus.publish(topics.market_awards(self.site, interval), award.raw)
        return Round(request, received, clearing, award, check)


@dataclass
class Answer:
    request: SignedMessage
    order: SignedMessage | None
    notice: dict[str, Any] | None = None
    award: dict[str, Any] | None = None
    lost: bool = False
    """The order was signed but never reached the bus (a scenario's message-loss event)."""


class TCRAgent:
    """A prosumer's transactive controller on the bus.

    `battery` returns the battery's current state (from its driver reading); `on_award`
    receives (awarded kWh, side, interval) to turn into a setpoint.
    """

    def __init__(self, key: KeyPair, bus: BusClient, site: str, *, resolve: KeyResolver,
                 is_aggregator: Callable[[str], bool], params: TCRParams,
                 battery_params: BatteryParams, battery: Callable[[], BatteryState | float],
                 mode: Mode = Mode.TE, rules: MarketRules = DEFAULT_RULES,
                 clock: Callable[[], float] = _time.time,
                 on_award: Callable[[float, Side, int], Any] | None = None,
                 pseudonym: Callable[[KeyPair, SignedMessage], KeyPair] | None = None
                 ) -> None:
        self.key, self.bus, self.site = key, bus, site
        self.pseudonym = pseudonym
        """(identity key, auction request) -> the certified pseudonym key to answer it
        with (`testbed.ledger.pseudonyms.PseudonymDesk.issue`); None: the identity."""
        self.params, self.battery_params, self.battery = params, battery_params, battery
        self.mode, self.rules, self.clock = mode, rules, clock
        self.is_aggregator = is_aggregator
        self.inbox = Inbox(resolve, clock)
        self.on_award = on_award
        self.cpf = 0.0
        """exp(-|P - C|) of the last metered interval; set by `observe`."""
        self.answers: dict[str, Answer] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.awarded = asyncio.Event()
        self.enabled = True
        """False: answer no request (its battery is faulted or offline)."""
        self.lose: Callable[[SignedMessage], bool] | None = None
        """Fault injection: True drops the signed order instead of publishing it."""
        self.on_answer: Callable[[], None] | None = None
        """Called once this agent has decided its answer to a request (an order on its
        way, or none): a fast-clock aggregator waits on that instead of polling."""

    def observe(self, production_kwh: float, consumption_kwh: float) -> None:
        self.cpf = cpf(production_kwh, consumption_kwh)

    async def start(self) -> None:
        for kind, fn in (("request", self._on_request), ("awards", self._on_award)):
            sub = await self.bus.subscribe(topics.market_filter(self.site, kind))
            self._tasks.append(asyncio.create_task(self._pump(sub, fn)))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()

    async def _pump(self, sub: Any, fn: Callable[[BusMessage], Any]) -> None:
        async for m in sub:
            try:
                await fn(m)
            except Exception as exc:  # noqa: BLE001 - one bad message must not stop the
                # controller, nor cost more than a line in its log
                self.inbox.refuse(m.topic, f"TCR {self.key.address}: cannot handle "
                                  f"({type(exc).__name__}: {exc})")

    async def _on_request(self, m: BusMessage) -> None:
        msg = self.inbox.accept(m, T.AUCTION)
        if msg is None:
            return
        if not self.is_aggregator(msg.client_id):
            self.inbox.refuse(m.topic, f"request from {msg.client_id}, not the aggregator")
            return
        p = msg.parameters
        if not self.enabled:
            self._answered(msg.id, Answer(msg, None))
            return
        request = order_of(msg, p["interval"])
        mine = respond(request, self.params, self.battery_params, self.battery(), self.mode,
                       address=self.key.address, rules=self.rules)
        answer = Answer(msg, None)
        if mine is None:
            self._answered(msg.id, answer)
            return
        signer = self.key if self.pseudonym is None else self.pseudonym(self.key, msg)
        order = messages.sign(signer, T.ORDER, {
            "address": signer.address, "cpf": round(self.cpf, 6), "auction": msg.id,
            "bid": _bid(mine.side, mine.energy_kwh, mine.price)}, at=self.clock())
        answer.order = order
        answer.lost = self.lose is not None and self.lose(order)
        if not answer.lost:
            await self.bus.publish(topics.market_orders(self.site, p["interval"]), order.raw)
        self._answered(msg.id, answer)  # after publishing: an answer in here is on its way

    def _answered(self, request_id: str, answer: Answer) -> None:
        self.answers[request_id] = answer
        if self.on_answer is not None:
            self.on_answer()

    async def _on_award(self, m: BusMessage) -> None:
        msg = self.inbox.accept(m, T.AWARD)
        if msg is None:
            return
        answer = self.answers.get(msg.parameters["auction"])
        if answer is None or answer.order is None:
            return
        if msg.client_id != answer.request.client_id:
            self.inbox.refuse(m.topic, "award not signed by the auction's aggregator")
            return
        result = msg.parameters["result"]
        oid = answer.order.id
        try:
            notice = _line_for(result, "notices", oid)
            award = _line_for(result, "awards", oid)
            energy = side = None
            if award is not None:
                energy, side = float(award["energy_kwh"]), Side(award["side"])
                if not math.isfinite(energy) or energy < 0:
                    raise ValueError(f"energy_kwh {energy} is not a finite amount >= 0")
        except (KeyError, TypeError, ValueError) as exc:
            self.inbox.refuse(m.topic, f"award {msg.id[:12]}: result is malformed for order "
                              f"{oid[:12]} ({type(exc).__name__}: {exc})")
            return
        answer.notice, answer.award = notice, award
        if energy is not None and side is not None and self.on_award is not None:
            res = self.on_award(energy, side, answer.request.parameters["interval"])
            if asyncio.iscoroutine(res):
                await res
        self.awarded.set()


def _line_for(result: dict[str, Any], key: str, order_id: str) -> dict[str, Any] | None:
    """The line of `result[key]` (a list of objects with `order_id`) for one order."""
    lines = result.get(key, [])
    if not isinstance(lines, list):
        raise TypeError(f"{key} must be a list")
    for line in lines:
        if not isinstance(line, dict):
            raise TypeError(f"{key} must hold objects")
        if line.get("order_id") == order_id:
            return line
    return None


async def _next_or_event(sub: Any, event: asyncio.Event, wait_s: float) -> BusMessage | None:
    """The subscription's next message, or None as soon as `event` is set (TimeoutError
    when neither happens within `wait_s`)."""
    m = sub.get_nowait()
    if m is not None:
        return m
    get = asyncio.ensure_future(sub.get())
    ev = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait((get, ev), timeout=wait_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        ev.cancel()
    if get in done:
        return get.result()
    get.cancel()
    try:
        return await get  # it finished before the cancel took: keep its message
    except asyncio.CancelledError:
        pass
    if not done:
        raise TimeoutError
    return None
