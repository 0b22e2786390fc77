"""The market round: the aggregator watches the metered aggregate against its schedule;
at an interval end it auctions the gap over MQTT, the prosumers' TCRs answer with signed
orders, the DSO's grid check re-clears until the feeder passes, the award is published.

Does bus I/O (the agents) and records auctions, orders, grid checks and awards in the run
store; returns the setpoints and the clearing for settlement. Its clock is the run's: in
fast mode the round moves the clock past the auction gate through `Clock.advance_to`,
the clock's own interface."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from testbed.bus.client import BusClient
from testbed.clock import EPOCH, Clock
from testbed.grid.check import GridChecker
from testbed.grid.reclear import Reclear, award_power_w, reclear, reclear_async
from testbed.ledger.identity import KeyPair
from testbed.ledger.messages import SignedMessage
from testbed.market.agents import AggregatorAgent, TCRAgent
from testbed.market.aggregator import Aggregator, Schedule
from testbed.market.auction import Clearing, clear
from testbed.market.orders import MarketRules, Order
from testbed.market.tcr import Mode, TCRParams
from testbed.physics.models import BatteryParams
from testbed.telemetry.store import RunStore

from ..model import Scenario
from ..profiles import loses
from .feeder import finite

GATE_S = 1.0
"""Fast mode: the auction gate, in simulated seconds (answers are awaited by count)."""
FAST_WAIT_S = 2.0
"""Fast mode: wall-clock bound on waiting for the answers the aggregator expects."""


@dataclass(frozen=True)
class RoundResult:
    setpoints: dict[str, float]
    """prosumer -> battery setpoint for the next interval (W, + discharge)."""
    clearing: Clearing | None = None
    award_id: str = ""
    request_id: str = ""


class MarketRound:
    def __init__(self, sc: Scenario, store: RunStore, clock: Clock, rules: MarketRules,
                 schedule: Schedule, aggregator_key: KeyPair, keys: Mapping[str, KeyPair],
                 checker: GridChecker | None = None, background: float = 1.0,
                 owners: Mapping[str, str] | None = None) -> None:
        self.sc, self.store, self.clock, self.rules = sc, store, clock, rules
        self.key = aggregator_key
        self.keys = dict(keys)
        self.owner = owners if owners is not None else {k.address: n
                                                        for n, k in self.keys.items()}
        """ledger address -> prosumer; the run's address book, which also knows the
        pseudonyms its prosumers bid under (the aggregator is told where its bidders
        connect to the feeder, not who they are)."""
        self.checker, self.background = checker, background
        self.aggregator = Aggregator(schedule, address=aggregator_key.address,
                                     threshold_kwh=sc.market.threshold_kwh,
                                     buy_price=sc.market.buy_price,
                                     sell_price=sc.market.sell_price, rules=rules)
        self.tcrs: dict[str, TCRAgent] = {}
        self.agent: AggregatorAgent | None = None
        self.soc: dict[str, float | None] = {}
        self.delivering: set[int] = set()
        """Intervals whose auction awarded energy, delivered in the following one."""
        self.counters = dict.fromkeys(("auctions", "cleared", "orders_published",
                                       "orders_lost", "orders_received", "re_cleared"), 0)
        self.dispatch_ok = True
        self.orders_after_fault: list[str] = []
        self.faulted: set[str] = set()
        self._answered = asyncio.Event()
        """Set by every TCR once it has decided its answer: the fast-clock auction waits
        on it, not on a poll."""

    async def start(self, bus: BusClient, site: str, resolve: Callable[[str], bytes | None],
                    batteries: Mapping[str, BatteryParams],
                    submit: Callable[[SignedMessage], Awaitable[None]] | None, *,
                    dso: KeyPair | None = None,
                    pseudonym: Callable[[KeyPair, SignedMessage], KeyPair] | None = None
                    ) -> None:
        """Start the aggregator's agent and a TCR for every prosumer with a battery.
        `dso` signs each grid-checked dispatch (the award's caps are valid on the ledger
        only with it); `pseudonym` gives each TCR the certified pseudonym it answers an
        auction under."""
        sc = self.sc
        self.agent = AggregatorAgent(self.key, bus, site, resolve=resolve, rules=self.rules,
                                     clock=self.clock.now, submit=submit, dso=dso)
        for name, bat in batteries.items():
            tcr = TCRAgent(self.keys[name], bus, site, resolve=resolve,
                           is_aggregator=lambda a: a == self.key.address,
                           params=TCRParams(), battery_params=bat,
                           battery=lambda n=name: self.soc.get(n) or 0.0,
                           mode=Mode(sc.market.mode.lower()), rules=self.rules,
                           clock=self.clock.now, pseudonym=pseudonym)
            tcr.lose = lambda order, n=name: self._lose(n, order)
            tcr.on_answer = self._answered.set
            await tcr.start()
            self.tcrs[name] = tcr

    async def stop(self) -> None:
        for tcr in self.tcrs.values():
            await tcr.stop()

    def step(self, t: float, dt: float, net_import_w: float,
             soc: Mapping[str, float | None]) -> None:
        """The aggregator sees the step's metered aggregate; the TCRs their batteries."""
        self.aggregator.observe(t - dt, net_import_w, dt)
        self.soc.update(soc)

    def exclude(self, prosumer: str, excluded: bool = True) -> None:
        """A faulted battery answers no request (its TCR is disabled) until it recovers."""
        (self.faulted.add if excluded else self.faulted.discard)(prosumer)
        if prosumer in self.tcrs:
            self.tcrs[prosumer].enabled = not excluded

    def certify(self, cpfs: Mapping[str, tuple[float, float]]) -> None:
        """Each TCR learns its meter's interval production and consumption (its CPF)."""
        for name, (prod, cons) in cpfs.items():
            if name in self.tcrs:
                self.tcrs[name].observe(prod, cons)

    def _lose(self, prosumer: str, order: SignedMessage) -> bool:
        t = self.clock.sim_s
        lost = loses(self.sc, prosumer, t, order.id)
        self.counters["orders_lost" if lost else "orders_published"] += 1
        if lost:
            self.store.event(t, "message-lost", prosumer,
                             f"order {order.id[:16]} dropped (message-loss event)")
        return lost

    def _expected_answers(self, request_id: str) -> int | None:
        n = 0
        for tcr in self.tcrs.values():
            ans = tcr.answers.get(request_id)
            if ans is None:
                return None
            n += ans.order is not None and not ans.lost
        return n

    async def interval_end(self, interval: int, t: float,
                           base_w: Mapping[str, float],
                           base_q: Mapping[str, float] | None = None) -> RoundResult:
        """Auction the interval's deviation (if above threshold) for delivery in the next
        one; `base_w`/`base_q`: measured injections the grid check starts from."""
        request = self.aggregator.request_for(interval)
        zero = dict.fromkeys(self.keys, 0.0)
        if request is None:
            return RoundResult(zero)
        return await self._auction(request, interval, t, base_w, base_q, zero)

    async def _auction(self, request: Order, interval: int, t: float,
                       base_w: Mapping[str, float], base_q: Mapping[str, float] | None,
                       setpoints: dict[str, float]) -> RoundResult:
        sc = self.sc
        assert self.agent is not None, "start() first"
        fast = sc.clock.mode == "fast"
        self.counters["auctions"] += 1
        rounds: list[Any] = []

        def dispatch(req: Order, orders: list[Order]
                     ) -> Clearing | Reclear | Awaitable[Reclear]:
            if fast:  # the gate (whole seconds) has closed: move past it
                self.clock.advance_to(math.ceil(EPOCH + t + GATE_S) - EPOCH)
            if self.checker is None:
                return clear(req, orders, self.rules.pricing, rules=self.rules)
            owner = {o.order_id: self.owner[o.address] for o in orders}
            kw: dict[str, Any] = dict(
                checker=self.checker, locate=owner, base_w=base_w, base_q=base_q,
                pricing=self.rules.pricing, rules=self.rules, background=self.background)
            if fast:
                rounds.append(res := reclear(req, orders, **kw))
                return res  # the agent has the DSO sign this grid check before the award
            return sliced(req, orders, kw)

        async def sliced(req: Order, orders: list[Order], kw: dict[str, Any]) -> Reclear:
            # Real time: a re-clear is a power flow per award and round (a second and
            # more with hundreds of bidders); in short slices the loop keeps ticking and
            # reading devices between them.
            res = await reclear_async(req, orders, **kw)
            rounds.append(res)
            return res

        rnd = await self.agent.auction(
            request.side, request.energy_kwh, request.price, interval + 1,
            # realtime: market.gate_s is wall-clock time, so the gate on the simulated
            # clock (what the ledger checks orders against) is that times the speed
            gate_s=GATE_S if fast else sc.market.gate_s * sc.clock.speed,
            wait_s=FAST_WAIT_S if fast else sc.market.gate_s,
            pricing=self.rules.pricing,
            expect=self._expected_answers if fast else None, dispatch=dispatch,
            answered=self._answered if fast else None)
        c = rnd.clearing
        self.counters["orders_received"] += len(rnd.orders)
        self.aggregator.commit(c)
        res = rounds[-1] if rounds else None
        cleared = c.cleared_energy_kwh
        if cleared > 0:
            self.counters["cleared"] += 1
            self.delivering.add(interval)
        if res is not None and not res.passed:
            self.dispatch_ok = False
        rid = rnd.request.id
        st = self.store
        st.insert("auctions", {
            "t": t, "interval": interval, "delivery": interval + 1, "request_id": rid,
            "side": str(request.side), "requested_kwh": request.energy_kwh,
            "price": request.price, "orders": len(rnd.orders), "outcome": str(c.outcome),
            "market_kwh": res.market_kwh if res else cleared, "cleared_kwh": cleared,
            "clearing_price": c.clearing_price, "grid_rounds": len(res.rounds) if res else 0,
            "grid_passed": int(res.passed) if res else 1, "award_id": rnd.award.id,
            "reclear": res.to_dict() if res else {}})
        for m in rnd.orders:
            b = m.parameters["bid"]
            who = self.owner.get(m.client_id, "?")
            st.insert("orders", {"t": t, "request_id": rid, "prosumer": who, "order_id": m.id,
                                 "side": b["type"], "energy_kwh": b["energy"]["value"],
                                 "price": b["price"]["value"], "lost": 0})
            if who in self.faulted:
                self.orders_after_fault.append(m.id)
        if res is not None:
            for r in res.rounds:
                rep = r.report
                st.insert("grid_checks", {
                    "t": t, "request_id": rid, "round": r.n, "light": str(rep.light),
                    "acceptable": int(rep.acceptable), "vm_min_pu": finite(rep.vm_min_pu),
                    "vm_max_pu": finite(rep.vm_max_pu), "max_line_pct": finite(rep.max_line_pct),
                    "max_trafo_pct": finite(rep.max_trafo_pct), "losses_w": finite(rep.losses_w),
                    "violations": len(rep.violations), "report": rep.to_dict()})
            if len(res.rounds) > 1:
                self.counters["re_cleared"] += 1
        for a in c.awards:
            name = self.owner[a.address]
            setpoints[name] = setpoints.get(name, 0.0) + award_power_w(
                a.side, a.energy_kwh, sc.market.interval_s)
            st.insert("awards", {
                "t": t, "request_id": rid, "order_id": a.order_id, "prosumer": name,
                "side": str(a.side), "energy_kwh": a.energy_kwh, "price": a.price,
                "amount_eur": a.amount_eur, "delivery": interval + 1, "delivered_kwh": None})
        return RoundResult(setpoints, c if c.awards else None, rnd.award.id, rid)

    def refused(self) -> int:
        n = len(self.agent.inbox.refused) if self.agent is not None else 0
        return n + sum(len(t.inbox.refused) for t in self.tcrs.values())
