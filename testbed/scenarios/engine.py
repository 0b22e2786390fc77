"""The run loop: one scenario, step by step, across real protocols (DESIGN.md, data flow).

Per step (simulated time t -> t + step):
 1. the clock ticks (fast: at once; realtime: on an absolute wall-clock deadline, its
    lateness measured and never accumulated);
 2. emulated physics advance under the scenario's profiles and events;
 3. every device is read over its protocol (Modbus/SunSpec or OPC UA); a device that
    does not answer twice in a row is faulted: its prosumer leaves the market;
 4. the aggregator accumulates metered vs scheduled energy; the feeder's state is
    power-flowed for the record.
At the end of each settlement interval:
 5. deliveries of the interval are settled from the battery readings (payments and
    penalties as signed ledger transactions); meters certify the interval's production
    and consumption (the CPF evidence);
 6. if the deviation is above threshold the aggregator auctions the gap over MQTT, the
    TCRs answer with signed orders, the grid check re-clears until the feeder passes,
    the award is signed and published; battery setpoints for the next interval follow;
 7. the PoE-elected validator proposes a block; validators check and vote over the bus;
    it commits (with its certificate) in every node's own store.
Everything lands in the run store (`telemetry.store`), committed every step.

In fast mode every clock the agents and nodes see is simulated time, keys derive from
the seed and blocks are produced on the scenario's schedule, so a replay with the same
seed writes the same store (wall-clock columns aside).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import statistics
import time as _time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from testbed.bus import topics
from testbed.bus.broker import open_bus
from testbed.clock import EPOCH
from testbed.config import ConfigError, InfluxConfig, SiteConfig, load_site
from testbed.devices.driver import Device, DeviceError, Reading
from testbed.devices.site import SiteEmulators, open_devices
from testbed.grid.reclear import award_power_w, reclear
from testbed.ledger import messages
from testbed.ledger import transactions as T
from testbed.ledger.blocks import Block
from testbed.ledger.chain import Chain, verify_store
from testbed.ledger.identity import KeyPair
from testbed.ledger.node import LedgerNode
from testbed.ledger.pseudonyms import PseudonymDesk
from testbed.ledger.setup import init_ledger
from testbed.ledger.state import Params
from testbed.market.agents import AggregatorAgent, TCRAgent
from testbed.market.aggregator import Aggregator
from testbed.market.auction import Clearing, clear
from testbed.market.orders import MarketRules, Order, Pricing, Side
from testbed.market.settlement import TransferKind, settle_clearing
from testbed.market.tcr import Mode, TCRParams
from testbed.telemetry.influx import InfluxSink
from testbed.telemetry.store import RunStore

from .model import DeviceEvent, Scenario
from .profiles import forecast_schedule, irradiance_fn, load_fn, loses

log = logging.getLogger(__name__)

GATE_S = 1.0
"""Fast mode: the auction gate, in simulated seconds (answers are awaited by count)."""
FAST_WAIT_S = 2.0
"""Fast mode: wall-clock bound on waiting for the answers the aggregator expects."""
FAULT_AFTER = 2
"""Consecutive failed reads before a device counts as faulted."""


@dataclass
class ProsumerBook:
    """What the orchestrator knows of one prosumer, from its readings."""

    name: str
    key: KeyPair
    meter: str | None = None
    pv: str | None = None
    battery: str | None = None
    last: dict[str, Reading] = field(default_factory=dict)
    interval: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("pv_wh", "import_wh", "export_wh", "dis_wh", "ch_wh"), 0.0))
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("pv_wh", "import_wh", "export_wh", "dis_wh", "ch_wh", "load_wh", "pv_local_wh",
         "load_local_wh"), 0.0))
    setpoint_w: float = 0.0
    faulted_at: float | None = None
    cpf: float = 0.0
    tcr: TCRAgent | None = None

    @property
    def injection_w(self) -> float:
        """Net export at the connection point (meter p_w is + import)."""
        r = self.last.get("meter")
        return -float(r.values.get("p_w", 0.0)) if r else 0.0

    @property
    def soc(self) -> float | None:
        r = self.last.get("battery")
        if r is None or r.values.get("soc_pct") is None:
            return None
        return float(r.values["soc_pct"]) / 100.0


@dataclass
class Verdict:
    name: str
    ok: bool
    actual: Any
    target: Any
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "actual": self.actual, "target": self.target,
                "message": self.message}


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    verdicts: list[Verdict]

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.verdicts)


class Clock:
    """Simulated time, and in realtime mode the wall-clock deadlines of the steps.

    Deadlines are absolute (start + k x step / speed): a late tick does not push later
    ones back, so the run never drifts; each tick's lateness is recorded."""

    def __init__(self, start_s: float, step_s: float, mode: str, speed: float) -> None:
        self.start_s, self.step_s, self.mode, self.speed = start_s, step_s, mode, speed
        self.sim_s = start_s
        self.lateness_ms: list[float] = []
        self._t0 = 0.0

    def begin(self) -> None:
        self._t0 = _time.monotonic()

    def now(self) -> float:
        """What agents and nodes sign with: simulated seconds since day-0 midnight, offset
        to a fixed epoch so message dates are real-looking timestamps."""
        if self.mode == "realtime":
            return EPOCH + self.start_s + (_time.monotonic() - self._t0) * self.speed
        return EPOCH + self.sim_s

    async def tick(self, k: int) -> float | None:
        """Wait for step k's deadline (realtime); returns its lateness in ms."""
        if self.mode != "realtime":
            return None
        deadline = self._t0 + k * self.step_s / self.speed
        delay = deadline - _time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        late = max(0.0, (_time.monotonic() - deadline) * 1000.0)
        self.lateness_ms.append(late)
        return late

    def lateness(self) -> dict[str, float] | None:
        if not self.lateness_ms:
            return None
        xs = sorted(self.lateness_ms)
        return {"p50_ms": _pct(xs, 50), "p99_ms": _pct(xs, 99), "max_ms": xs[-1],
                "ticks": len(xs)}



def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    k = min(len(xs) - 1, max(0, math.ceil(p / 100 * len(xs)) - 1))
    return xs[k]


class Run:
    """One scenario run; `await Run(...).execute()`."""

    def __init__(self, scenario: Scenario, *, out: Path = Path("runs"),
                 broker: str | None = None, seed: int | None = None,
                 speed: float | None = None, fast: bool = False,
                 influx: InfluxConfig | None = None, influx_token: str | None = None,
                 report: bool = True,
                 progress: Callable[[int, int, dict[str, Any]], None] | None = None) -> None:
        updates: dict[str, Any] = {}
        if seed is not None:
            updates["seed"] = seed
        if speed is not None:
            updates["clock"] = scenario.clock.model_copy(update={"mode": "realtime",
                                                                 "speed": speed})
        if fast:
            updates["clock"] = scenario.clock.model_copy(update={"mode": "fast"})
        sc = scenario.model_copy(update=updates) if updates else scenario  # keeps .source
        self.sc = sc
        self.site = self._site()
        self.broker = broker
        self.progress = progress
        self.influx = influx or self.site.telemetry.influx
        """Where the run's time series go (flags over the site file's `telemetry.influx`)."""
        self.influx_token = influx_token
        self.report = report
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        self.run_id = f"{sc.name}-s{sc.seed}-{stamp}"
        self.dir = Path(out) / self.run_id
        n = 1
        while self.dir.exists():
            n += 1
            self.dir = Path(out) / f"{self.run_id}-{n}"
        self.run_id = self.dir.name
        self.rules = MarketRules(interval_s=sc.market.interval_s,
                                 pricing=Pricing(sc.market.pricing))
        self.clock = Clock(sc.start, sc.step, sc.clock.mode, sc.clock.speed)
        self.books: dict[str, ProsumerBook] = {}
        self.owners = {d.name: (p.name, d.kind.value) for p, d in self.site.devices()}
        """device -> (prosumer, kind), looked up on every read."""
        self.by_address: dict[str, str] = {}
        self.counters: dict[str, int] = dict.fromkeys(
            ("submitted", "orders_published", "orders_lost", "orders_received", "read_errors",
             "setpoint_errors", "auctions", "cleared", "blocks"), 0)
        self.delivering: set[int] = set()
        """Intervals whose auction awarded energy, delivered in the following one."""
        self.pending_settle: dict[int, list[tuple[Clearing, str, str]]] = {}
        self.interval_stats: dict[int, dict[str, float]] = {}
        self.covered: dict[int, float] = {}
        self.feeder_rows = 0
        self.feeder_in_band = 0
        self.vm_min = math.inf
        self.vm_max = -math.inf
        self.losses_wh = 0.0
        self.faults: list[dict[str, Any]] = []
        self.orders_after_fault: list[str] = []
        self.grid_rejections = 0
        self.dispatch_ok = True
        self.submitted_ids: list[str] = []
        self.committed_ids: set[str] = set()
        self._outbox: list[messages.SignedMessage] = []
        self._rejected_seen = 0
        self._recorded_height = 0
        self._round: asyncio.Future[None] | None = None
        self._fail_count: dict[str, int] = {}

    def _site(self) -> SiteConfig:
        sc = self.sc
        try:
            site = load_site(sc.site)
        except ConfigError as exc:
            raise ConfigError(f"{sc.source or sc.name}: site: {exc}") from None
        updates: dict[str, Any] = {"emulation": site.emulation.model_copy(
            update={"seed": sc.seed})}
        if sc.grid.background is not None:
            updates["grid"] = site.grid.model_copy(update={"background": sc.grid.background})
        site = site.model_copy(update=updates)  # keeps .source
        names = {d.name for _, d in site.devices()}
        for e in sc.events:
            if isinstance(e, DeviceEvent) and e.device not in names:
                raise ConfigError(f"{sc.source or sc.name}: events: {e.kind} names unknown "
                                  f"device {e.device!r} (devices: {', '.join(sorted(names))})")
        return site

    # ------------------------------------------------------------------ set-up

    async def execute(self) -> RunResult:
        sc, site = self.sc, self.site
        self.dir.mkdir(parents=True)
        (self.dir / "scenario.json").write_text(
            json.dumps(sc.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
        (self.dir / "site.json").write_text(
            json.dumps(site.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
        self.store = RunStore(self.dir / "run.db")
        st = self.store
        st.put_meta("run_id", self.run_id)
        st.put_meta("scenario", sc.name)
        st.put_meta("seed", str(sc.seed))
        st.put_meta("started_at", datetime.now(UTC).isoformat())
        st.put_meta("sim_start_s", str(sc.start))
        st.put_meta("time_origin_ms", str(int(_time.time()) * 1000))
        sink = None
        if self.influx is not None:
            st.put_meta("influx", self.influx.model_dump())
            st.commit()  # the sink reads the run's meta first
            sink = InfluxSink(self.influx, self.dir, token=self.influx_token)
            sink.start()
        wall0 = _time.perf_counter()
        self.layout = init_ledger(
            site, self.dir / "ledger", seed=sc.seed, time=EPOCH + sc.start - 1,
            validators=min(sc.ledger.validators, len(site.prosumers)),
            prosumer_funds_eur=sc.ledger.prosumer_funds_eur, rules=self.rules,
            params=Params(max_skew_s=max(300.0, 2.0 * sc.market.interval_s),
                          max_age_s=max(900.0, 4.0 * sc.market.interval_s),
                          round_timeout_s=max(2.0, sc.market.gate_s)))
        for p in site.prosumers:
            book = ProsumerBook(p.name, self.layout.key(p.name))
            for d in p.devices:
                setattr(book, d.kind.value, d.name)
            self.books[p.name] = book
            self.by_address[book.key.address] = p.name
        self.agg_key = self.layout.key("aggregator")
        self.checker = None
        if sc.grid.enabled and site.grid.enabled:
            from testbed.grid.feeder import checker_for
            self.checker = checker_for(site)
        self.schedule = forecast_schedule(sc, site)
        emulators = SiteEmulators(site, free_ports=True, start_s=sc.start)
        emulators.physics.irradiance = irradiance_fn(sc)
        emulators.physics.load = load_fn(sc, site)
        self.emulators = emulators
        try:
            await emulators.start(clock=False)
            async with open_bus(self.broker) as bus:
                self.bus = bus
                await self._with_bus()
        finally:
            await emulators.stop()
        st.put_meta("finished_at", datetime.now(UTC).isoformat())
        st.put_meta("wall_s", f"{_time.perf_counter() - wall0:.3f}")
        summary = self._summary(_time.perf_counter() - wall0)
        verdicts = evaluate(sc, summary)
        summary["expectations"] = [v.to_dict() for v in verdicts]
        summary["passed"] = all(v.ok for v in verdicts)
        st.put_meta("passed", json.dumps(summary["passed"]))
        st.close()
        if sink is not None:
            summary["telemetry"] = sink.close().to_dict()
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True)
                                               + "\n")
        if self.report:
            from testbed.dashboards.report import write_report
            try:
                write_report(self.dir)
            except Exception as exc:  # the run is recorded; a report can be made again
                log.error("report not written (%s); the run store is complete: "
                          "`testbed report %s` makes it again", exc, self.dir)
        return RunResult(self.dir, summary, verdicts)

    async def _with_bus(self) -> None:
        sc, site = self.sc, self.site
        self.nodes: list[LedgerNode] = []
        if sc.ledger.enabled:
            for name in self.layout.validators():
                chain = Chain.open(self.layout.db_path(name))
                node = LedgerNode(name, self.layout.key(name), chain, self.bus, site.name,
                                  clock=self.clock.now, autoproduce=False)
                await node.start()
                self.nodes.append(node)
        registry = Chain.open(self.layout.db_path(self.layout.validators()[0])) \
            if not self.nodes else self.nodes[0].chain
        identities = registry.state.identities
        # prosumers bid under per-auction pseudonyms the administrator certifies
        self.desk = PseudonymDesk(self.layout.key("admin"), self.layout.audit_key(),
                                  submit=self._queue if self.nodes else None,
                                  aliases=self.by_address)

        def resolve(address: str) -> bytes | None:
            e = identities.get(address)
            return e.public_key if e else self.desk.resolve(address)

        self.devices: dict[str, Device] = open_devices(self.emulators.resolved_site())
        self.aggregator = Aggregator(self.schedule, address=self.agg_key.address,
                                     threshold_kwh=sc.market.threshold_kwh,
                                     buy_price=sc.market.buy_price,
                                     sell_price=sc.market.sell_price, rules=self.rules)
        self.agg_agent = AggregatorAgent(self.agg_key, self.bus, site.name, resolve=resolve,
                                         rules=self.rules, clock=self.clock.now,
                                         submit=self._submit if self.nodes else None,
                                         dso=self.layout.key("dso"))
        physics = {p.name: p.physics(sc.seed) for p in site.prosumers}
        for name, book in self.books.items():
            bat = physics[name].battery
            if bat is None or book.battery is None:
                continue
            tcr = TCRAgent(book.key, self.bus, site.name, resolve=resolve,
                           is_aggregator=lambda a: a == self.agg_key.address,
                           params=TCRParams(), battery_params=bat,
                           battery=lambda b=book: b.soc if b.soc is not None else 0.0,
                           mode=Mode(sc.market.mode.lower()), rules=self.rules, clock=self.clock.now,
                           pseudonym=self.desk.issue)
            tcr.lose = lambda order, n=name: self._lose(n, order)
            await tcr.start()
            book.tcr = tcr
        try:
            await asyncio.gather(*(d.connect() for d in self.devices.values()),
                                 return_exceptions=True)
            await self._loop()
        finally:
            for book in self.books.values():
                if book.tcr is not None:
                    await book.tcr.stop()
            for d in self.devices.values():
                with contextlib.suppress(Exception):
                    await d.close()
            for node in self.nodes:
                await node.stop()
            self.ledger_verified = self._verify_ledger()

    # ------------------------------------------------------------------ loop

    async def _loop(self) -> None:
        sc = self.sc
        iv = sc.market.interval_s
        self.clock.begin()
        device_events = [e for e in sc.events if isinstance(e, DeviceEvent)]
        active: set[int] = set()
        for k in range(1, sc.steps + 1):
            late = await self.clock.tick(k)
            t0 = sc.start + (k - 1) * sc.step
            t1 = t0 + sc.step
            for i, e in enumerate(device_events):
                on = e.active(t0)
                if on != (i in active):
                    await self._device_event(e, on, t0)
                    (active.add if on else active.discard)(i)
            self.emulators.physics.step(sc.step)
            self.clock.sim_s = t1
            await self._read(t1, sc.step)
            self._feeder(t1)
            if round(t1) % iv == 0:
                await self._interval_end(int(round(t1)) // iv - 1, t1)
            self.store.insert("steps", {"step": k, "t": t1, "late_ms": late,
                                        "wall": _time.time()})
            self.store.commit()
            if self.progress:
                self.progress(k, sc.steps, {"t": t1, "auctions": self.counters["auctions"],
                                            "blocks": self.counters["blocks"]})
        if self._round is not None:
            await self._round
            self._round = None
            self.store.commit()

    async def _device_event(self, e: DeviceEvent, on: bool, t: float) -> None:
        what = {"device-offline": "gateway off the network", "device-silent": "stops answering"}
        if e.kind == "device-silent":
            self.emulators.silence(e.device, on)
        elif on:
            await self.emulators.offline(e.device)
        else:
            await self.emulators.online(e.device)
        self.store.event(t, e.kind if on else f"{e.kind}-end", e.device,
                         f"{e.device}: {what[e.kind]}" if on else f"{e.device}: back")

    async def _read(self, t: float, dt: float) -> None:
        names = list(self.devices)
        results = await asyncio.gather(*(self.devices[n].read() for n in names),
                                       return_exceptions=True)
        rows = []
        for name, r in zip(names, results, strict=True):
            owner, kind = self.owners[name]
            book = self.books[owner]
            if isinstance(r, BaseException):
                if not isinstance(r, DeviceError):
                    raise r
                self._failed(book, name, kind, t, r)
                continue
            self._answered(book, name, t)
            book.last[kind] = r
            for key, v in r.values.items():
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                    rows.append((t, name, book.name, kind, key, float(v)))
        self.store.insert_many("measurements", ("t", "device", "prosumer", "kind", "name",
                                                "value"), rows)
        net_import = 0.0
        for book in self.books.values():
            acc, tot = book.interval, book.totals
            m = book.last.get("meter")
            imp = float(m.values.get("p_w", 0.0)) if m else 0.0
            pv = float(book.last["pv"].values.get("p_w", 0.0)) if "pv" in book.last else 0.0
            bat = float(book.last["battery"].values.get("p_w", 0.0)) \
                if "battery" in book.last else 0.0
            wh = dt / 3600.0
            parts = {"pv_wh": max(0.0, pv) * wh, "import_wh": max(0.0, imp) * wh,
                     "export_wh": max(0.0, -imp) * wh, "dis_wh": max(0.0, bat) * wh,
                     "ch_wh": max(0.0, -bat) * wh}
            for key, v in parts.items():
                acc[key] += v
                tot[key] += v
            load = max(0.0, pv + imp + bat)  # what the house drew: every flow balanced
            charge, discharge = max(0.0, -bat), max(0.0, bat)
            tot["load_wh"] += load * wh
            tot["pv_local_wh"] += min(max(0.0, pv), load + charge) * wh
            tot["load_local_wh"] += min(load, max(0.0, pv) + discharge) * wh
            net_import += imp
        self.aggregator.observe(t - dt, net_import, dt)

    def _failed(self, book: ProsumerBook, device: str, kind: str, t: float,
                exc: Exception) -> None:
        self.counters["read_errors"] += 1
        n = self._fail_count.get(device, 0) + 1
        self._fail_count[device] = n
        if n == 1:
            self.store.event(t, "read-failed", device, str(exc)[:300])
        if n == FAULT_AFTER and kind == "battery" and book.faulted_at is None:
            book.faulted_at = t
            if book.tcr is not None:
                book.tcr.enabled = False
            book.setpoint_w = 0.0
            self.faults.append({"device": device, "prosumer": book.name, "t": t,
                                "reason": str(exc)[:200]})
            self.store.event(t, "fault", device, f"{book.name} leaves the market: its battery "
                             f"does not answer ({str(exc)[:200]})")
        if n == FAULT_AFTER and kind != "meter":  # a stale meter value beats none
            book.last.pop(kind, None)

    def _answered(self, book: ProsumerBook, device: str, t: float) -> None:
        fails = self._fail_count
        if fails.get(device):
            if fails[device] >= FAULT_AFTER:
                self.store.event(t, "recovered", device, f"{device} answers again")
                if book.battery == device and book.faulted_at is not None:
                    book.faulted_at = None
                    if book.tcr is not None:
                        book.tcr.enabled = True
            fails[device] = 0

    def _feeder(self, t: float) -> None:
        if self.checker is None:
            return
        r = self.checker.check({n: b.injection_w for n, b in self.books.items()},
                               background=self.site.grid.background)
        self.feeder_rows += 1
        lim = self.checker.limits
        if r.converged and lim.vm_min_pu <= r.vm_min_pu and r.vm_max_pu <= lim.vm_max_pu:
            self.feeder_in_band += 1
        if r.converged:
            self.vm_min, self.vm_max = min(self.vm_min, r.vm_min_pu), max(self.vm_max,
                                                                          r.vm_max_pu)
            self.losses_wh += r.losses_w * self.sc.step / 3600.0
        self.store.insert("feeder", {"t": t, "light": str(r.light), "vm_min_pu": _f(r.vm_min_pu),
                                     "vm_max_pu": _f(r.vm_max_pu),
                                     "max_line_pct": _f(r.max_line_pct),
                                     "max_trafo_pct": _f(r.max_trafo_pct),
                                     "losses_w": _f(r.losses_w), "import_w": _f(r.import_w)})

    # ------------------------------------------------------------------ intervals

    async def _interval_end(self, interval: int, t: float) -> None:
        """Close the interval's books now; run its market round (auction, setpoints,
        block) inline in fast mode, and beside the step loop in realtime mode, so a
        market gate never holds up the clock (the previous round is awaited first)."""
        if self._round is not None:
            await self._round
            self._round = None
        self._settle(interval, t)
        self._certify(interval, t)
        self._account(interval, t)
        work = self._market_round(interval, t)
        if self.sc.clock.mode == "realtime":
            self._round = asyncio.ensure_future(work)
        else:
            await work

    async def _market_round(self, interval: int, t: float) -> None:
        request = self.aggregator.request_for(interval)
        setpoints = {n: 0.0 for n in self.books}
        if request is not None:
            setpoints.update(await self._auction(request, interval, t))
        await self._command(setpoints, t)
        if self.nodes:
            await self._block(t)

    def _account(self, interval: int, t: float) -> None:
        """The interval's metered vs scheduled energy; `covered` is filled in when the
        delivery that answers it has been metered."""
        iv = self.sc.market.interval_s
        metered = market = 0.0
        delivered = interval - 1 in self.delivering
        for book in self.books.values():
            a = book.interval
            metered += (a["import_wh"] - a["export_wh"]) / 1000.0
            if delivered:
                market -= (a["dis_wh"] - a["ch_wh"]) / 1000.0
        schedule = self.schedule[interval] if interval in self.schedule.intervals() else 0.0
        raw = metered - market - schedule
        self.interval_stats[interval] = {"start": interval * iv, "schedule": schedule,
                                         "metered": metered, "market": market, "raw": raw}
        if interval - 1 in self.interval_stats:
            prev = interval - 1
            st = self.interval_stats[prev]
            cov = -market  # delivery in this interval answers the previous one's deviation
            self.covered[prev] = cov
            self.store.insert("intervals", {
                "interval": prev, "start": st["start"], "schedule_kwh": st["schedule"],
                "metered_kwh": st["metered"], "market_kwh": st["market"],
                "raw_deviation_kwh": st["raw"],
                "requested_kwh": self.aggregator.requested_kwh.get(prev, 0.0),
                "covered_kwh": cov, "residual_kwh": st["raw"] - cov})
        for book in self.books.values():
            book.interval = dict.fromkeys(book.interval, 0.0)

    def _certify(self, interval: int, t: float) -> None:
        """Each meter signs its interval's production and consumption (PoE evidence)."""
        iv = self.sc.market.interval_s
        for book in self.books.values():
            a = book.interval
            prod = a["pv_wh"] / 1000.0
            cons = max(0.0, (a["pv_wh"] + a["import_wh"] - a["export_wh"]) / 1000.0)
            book.cpf = math.exp(-abs(prod - cons))
            if book.tcr is not None:
                book.tcr.observe(prod, cons)
            self.store.insert("cpf", {"t": t, "prosumer": book.name, "production_kwh": prod,
                                      "consumption_kwh": cons, "cpf": book.cpf})
            if self.nodes:
                msg = messages.sign(book.key, T.READING, {
                    "meter": book.key.address, "start": int(EPOCH + interval * iv),
                    "duration_s": iv, "production_kwh": round(prod, 6),
                    "consumption_kwh": round(cons, 6)}, at=self.clock.now())
                self._queue(msg)

    def _settle(self, interval: int, t: float) -> None:
        """Pay what was delivered in `interval` for the awards that asked for it."""
        due = self.pending_settle.pop(interval, [])
        for clearing, award_id, request_id in due:
            delivered: dict[str, float] = {}
            for a in clearing.awards:
                book = self.books[self.by_address[a.address]]
                acc = book.interval
                kwh = (acc["dis_wh"] if a.side == Side.SELL else acc["ch_wh"]) / 1000.0
                delivered[a.order_id] = kwh
                self.store.db.execute("UPDATE awards SET delivered_kwh = ? WHERE request_id = ? "
                                      "AND order_id = ?", (kwh, request_id, a.order_id))
            for s in settle_clearing(clearing, delivered, rules=self.rules):
                prosumer = self.by_address[clearing.awarded[s.order_id].address]
                self.store.insert("settlements", {
                    "t": t, "request_id": request_id, "order_id": s.order_id, "prosumer": prosumer,
                    "awarded_kwh": s.awarded_kwh, "delivered_kwh": s.delivered_kwh,
                    "paid_kwh": s.paid_kwh, "shortfall_kwh": s.shortfall_kwh,
                    "transfers": [x.to_dict() for x in s.transfers]})
                if not self.nodes:
                    continue
                for x in s.transfers:
                    award = award_id if x.kind == TransferKind.ENERGY else None
                    memo = f"{x.kind} {x.order_id[:16]} interval {x.interval}"
                    by_pseudonym = self.desk.payments(x.payer, x.payee, x.amount_ueur,
                                                      award=award, memo=memo,
                                                      at=self.clock.now())
                    payer = self.agg_key if x.payer == self.agg_key.address else \
                        self.books[self.by_address[x.payer]].key
                    for msg in by_pseudonym or [messages.sign(payer, T.PAYMENT, {
                            "to": x.payee, "amount": x.amount_ueur, "award": award,
                            "memo": memo}, at=self.clock.now())]:
                        self._queue(msg)

    def _lose(self, prosumer: str, order: messages.SignedMessage) -> bool:
        lost = loses(self.sc, prosumer, self.clock.sim_s, order.id)
        self.counters["orders_lost" if lost else "orders_published"] += 1
        if lost:
            self.store.event(self.clock.sim_s, "message-lost", prosumer,
                             f"order {order.id[:16]} dropped (message-loss event)")
        return lost

    def _expected_answers(self, request_id: str) -> int | None:
        n = 0
        for book in self.books.values():
            tcr = book.tcr
            if tcr is None:
                continue
            ans = tcr.answers.get(request_id)
            if ans is None:
                return None
            n += ans.order is not None and not ans.lost
        return n

    async def _auction(self, request: Order, interval: int, t: float) -> dict[str, float]:
        sc = self.sc
        self.counters["auctions"] += 1
        rounds: list[Any] = []

        def dispatch(req: Order, orders: list[Order]) -> Any:
            if sc.clock.mode == "fast":  # the gate (whole seconds) has closed: move past it
                self.clock.sim_s = math.ceil(EPOCH + t + GATE_S) - EPOCH
            if self.checker is None:
                return clear(req, orders, self.rules.pricing, rules=self.rules)
            owner = {o.order_id: self.by_address[o.address] for o in orders}
            res = reclear(req, orders, checker=self.checker, locate=owner,
                          base_w={n: b.injection_w for n, b in self.books.items()},
                          pricing=self.rules.pricing, rules=self.rules,
                          background=self.site.grid.background)
            rounds.append(res)
            return res  # the agent has the DSO sign this grid check before the award

        rnd = await self.agg_agent.auction(
            request.side, request.energy_kwh, request.price, interval + 1,
            # realtime: market.gate_s is wall-clock time, so the gate on the simulated
            # clock (what the ledger checks orders against) is that times the speed
            gate_s=sc.market.gate_s * sc.clock.speed if sc.clock.mode == "realtime" else GATE_S,
            wait_s=sc.market.gate_s if sc.clock.mode == "realtime" else FAST_WAIT_S,
            pricing=self.rules.pricing,
            expect=self._expected_answers if sc.clock.mode == "fast" else None,
            dispatch=dispatch)
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
        self.store.insert("auctions", {
            "t": t, "interval": interval, "delivery": interval + 1, "request_id": rid,
            "side": str(request.side), "requested_kwh": request.energy_kwh,
            "price": request.price, "orders": len(rnd.orders), "outcome": str(c.outcome),
            "market_kwh": res.market_kwh if res else cleared, "cleared_kwh": cleared,
            "clearing_price": c.clearing_price, "grid_rounds": len(res.rounds) if res else 0,
            "grid_passed": int(res.passed) if res else 1, "award_id": rnd.award.id,
            "reclear": res.to_dict() if res else {}})
        for m in rnd.orders:
            b = m.parameters["bid"]
            self.store.insert("orders", {"t": t, "request_id": rid, "prosumer": self.by_address.get(
                m.client_id, "?"), "order_id": m.id, "side": b["type"],
                "energy_kwh": b["energy"]["value"], "price": b["price"]["value"], "lost": 0})
            book = self.books.get(self.by_address.get(m.client_id, ""))
            if book is not None and book.faulted_at is not None:
                self.orders_after_fault.append(m.id)
        if res is not None:
            for r in res.rounds:
                rep = r.report
                self.store.insert("grid_checks", {
                    "t": t, "request_id": rid, "round": r.n, "light": str(rep.light),
                    "acceptable": int(rep.acceptable), "vm_min_pu": _f(rep.vm_min_pu),
                    "vm_max_pu": _f(rep.vm_max_pu), "max_line_pct": _f(rep.max_line_pct),
                    "max_trafo_pct": _f(rep.max_trafo_pct), "losses_w": _f(rep.losses_w),
                    "violations": len(rep.violations), "report": rep.to_dict()})
            if len(res.rounds) > 1:
                self.grid_rejections += 1
        setpoints: dict[str, float] = {}
        for a in c.awards:
            name = self.by_address[a.address]
            setpoints[name] = setpoints.get(name, 0.0) + award_power_w(
                a.side, a.energy_kwh, sc.market.interval_s)
            self.store.insert("awards", {
                "t": t, "request_id": rid, "order_id": a.order_id, "prosumer": name,
                "side": str(a.side), "energy_kwh": a.energy_kwh, "price": a.price,
                "amount_eur": a.amount_eur, "delivery": interval + 1, "delivered_kwh": None})
        if c.awards:
            self.pending_settle.setdefault(interval + 1, []).append((c, rnd.award.id, rid))
        return setpoints

    async def _command(self, setpoints: dict[str, float], t: float) -> None:
        for name, w in setpoints.items():
            book = self.books[name]
            if book.battery is None or book.faulted_at is not None:
                continue
            if w == 0.0 and book.setpoint_w == 0.0:
                continue
            try:
                await self.devices[book.battery].write("power_w", round(w, 1))
                book.setpoint_w = w
                self.store.event(t, "setpoint", book.battery, f"{w:.1f} W")
            except DeviceError as exc:
                self.counters["setpoint_errors"] += 1
                self.store.event(t, "setpoint-failed", book.battery, str(exc)[:300])

    # ------------------------------------------------------------------ ledger

    def _queue(self, msg: messages.SignedMessage) -> None:
        self._outbox.append(msg)

    async def _submit(self, msg: messages.SignedMessage) -> None:
        await self._flush()
        await self._publish(msg)

    async def _publish(self, msg: messages.SignedMessage) -> None:
        self.counters["submitted"] += 1
        self.submitted_ids.append(msg.id)
        await self.bus.publish(topics.ledger_tx(self.site.name), msg.raw, qos=1)

    async def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        for msg in outbox:
            await self._publish(msg)

    async def _block(self, t: float) -> None:
        """The elected validator proposes once every submitted transaction has reached it
        (or been refused by it); then every node must commit (each within 10 s)."""
        await self._flush()
        want = set(self.submitted_ids) - self.committed_ids
        if want:
            proposer = next((n for n in self.nodes if _elected(n) == n.key.address), None)
            loop = asyncio.get_running_loop()
            if proposer is not None:
                deadline = loop.time() + 10.0
                while loop.time() < deadline:
                    have = len(want & proposer.mempool.keys())
                    if have + len(proposer.stats.rejected) - self._rejected_seen >= len(want):
                        break
                    await asyncio.sleep(0.0005)
                self._rejected_seen = len(proposer.stats.rejected)
            height = max(n.chain.height for n in self.nodes)
            for n in self.nodes:
                await n.produce()
            deadline = loop.time() + 10.0
            while loop.time() < deadline and min(n.chain.height for n in self.nodes) <= height:  # noqa: ASYNC110 - several nodes
                await asyncio.sleep(0.0005)
            if min(n.chain.height for n in self.nodes) <= height:
                self.store.event(t, "block-missing", None, f"no block committed after height "
                                 f"{height} within 10 s")
        self._record_blocks()

    def _record_blocks(self) -> None:
        node = self.nodes[0]
        store = node.chain.store
        if store is None:
            return
        for h in range(self._recorded_height + 1, node.chain.height + 1):
            stored = store.block(h)
            if stored is None:
                break
            block = Block.parse(stored.raw)
            self.committed_ids.update(tx_id for tx_id, _ in stored.txs)
            self.counters["blocks"] += 1
            self.store.insert("blocks", {
                "height": h, "t": block.time - EPOCH, "hash": block.hash,
                "proposer": block.proposer,
                "proposer_name": self.by_address.get(block.proposer, "?"), "round": block.round,
                "txs": block.header["txs"], "cpf": block.header.get("evidence", {})})
            self._recorded_height = h

    def _verify_ledger(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.layout.validators():
            rep = verify_store(self.layout.db_path(name), genesis=self.layout.genesis())
            out[name] = {"ok": rep.ok, "height": rep.height, "error": rep.error}
        return out

    # ------------------------------------------------------------------ summary

    def _summary(self, wall_s: float) -> dict[str, Any]:
        st = self.store.db
        before = sum(abs(s["raw"]) for k, s in self.interval_stats.items() if k in self.covered)
        after = sum(abs(s["raw"] - self.covered[k]) for k, s in self.interval_stats.items()
                    if k in self.covered)
        auctions = st.execute("SELECT COUNT(*), SUM(requested_kwh), SUM(market_kwh), "
                              "SUM(cleared_kwh) FROM auctions").fetchone()
        prices = [r[0] for r in st.execute("SELECT price FROM awards")]
        traded = st.execute("SELECT COALESCE(SUM(energy_kwh), 0), COALESCE(SUM(amount_eur), 0)"
                            " FROM awards").fetchone()
        delivered = st.execute("SELECT COALESCE(SUM(delivered_kwh), 0) FROM awards"
                               ).fetchone()[0]
        prosumers = {}
        cpfs = {r[0]: r[1] for r in st.execute(
            "SELECT prosumer, cpf FROM cpf ORDER BY t")}
        for name, b in self.books.items():
            tot = b.totals
            pv, exp, imp, load = tot["pv_wh"], tot["export_wh"], tot["import_wh"], tot["load_wh"]
            row = st.execute("SELECT COALESCE(SUM(energy_kwh), 0), COALESCE(SUM(amount_eur), 0)"
                             " FROM awards WHERE prosumer = ?", (name,)).fetchone()
            prosumers[name] = {
                "pv_kwh": pv / 1000, "load_kwh": load / 1000, "import_kwh": imp / 1000,
                "export_kwh": exp / 1000,
                # PV used on site (by the house or its battery) / PV; load met on site
                # (by PV or the battery) / load
                "self_consumption": None if pv <= 0 else tot["pv_local_wh"] / pv,
                "self_sufficiency": None if load <= 0 else tot["load_local_wh"] / load,
                "cpf": cpfs.get(name), "traded_kwh": row[0], "revenue_eur": row[1],
                "faulted_at": b.faulted_at}
        blocks = st.execute("SELECT proposer_name, COUNT(*) FROM blocks GROUP BY "
                            "proposer_name").fetchall()
        lights = dict(st.execute("SELECT light, COUNT(*) FROM feeder GROUP BY light").fetchall())
        refused = list(self.agg_agent.inbox.refused) if hasattr(self, "agg_agent") else []
        for b in self.books.values():
            if b.tcr is not None:
                refused += list(b.tcr.inbox.refused)
        node_rejected = [r for n in getattr(self, "nodes", []) for r in n.stats.rejected]
        uncommitted = len(set(self.submitted_ids) - self.committed_ids)
        ledger = getattr(self, "ledger_verified", {})
        return {
            "run_id": self.run_id, "scenario": self.sc.name, "seed": self.sc.seed,
            "site": self.site.name, "steps": self.sc.steps, "step_s": self.sc.step,
            "start_s": self.sc.start, "duration_s": self.sc.duration,
            "clock": {"mode": self.sc.clock.mode, "speed": self.sc.clock.speed,
                      "wall_s": round(wall_s, 3), "lateness": self.clock.lateness()},
            "deviation": {"before_kwh": before, "after_kwh": after,
                          "covered_share": None if before <= 0 else 1 - after / before,
                          "requested_kwh": auctions[1] or 0.0,
                          "delivered_kwh": delivered},
            "market": {"auctions": auctions[0], "cleared": self.counters["cleared"],
                       "market_kwh": auctions[2] or 0.0, "cleared_kwh": auctions[3] or 0.0,
                       "grid_curtailed_kwh": (auctions[2] or 0.0) - (auctions[3] or 0.0),
                       "energy_traded_kwh": traded[0], "value_eur": traded[1],
                       "price_min": min(prices) if prices else None,
                       "price_max": max(prices) if prices else None,
                       "price_mean": statistics.fmean(prices) if prices else None},
            "prosumers": prosumers,
            "ledger": {"enabled": bool(getattr(self, "nodes", [])),
                       "blocks": self.counters["blocks"],
                       "proposers": dict(blocks), "submitted": self.counters["submitted"],
                       "uncommitted": uncommitted, "verified": ledger,
                       "verifies": bool(ledger) and all(v["ok"] for v in ledger.values())},
            "grid": {"enabled": self.checker is not None, "steps": self.feeder_rows,
                     "in_band_share": (self.feeder_in_band / self.feeder_rows
                                       if self.feeder_rows else None),
                     "lights": lights, "vm_min_pu": _f(self.vm_min), "vm_max_pu": _f(self.vm_max),
                     "losses_kwh": self.losses_wh / 1000,
                     "auctions_re_cleared": self.grid_rejections,
                     "dispatch_accepted": self.dispatch_ok},
            "messages": {"orders_published": self.counters["orders_published"],
                         "orders_lost_injected": self.counters["orders_lost"],
                         "orders_received": self.counters["orders_received"],
                         "refused_by_agents": len(refused),
                         "refused_by_ledger": len(node_rejected),
                         "ledger_submitted": self.counters["submitted"],
                         "ledger_uncommitted": uncommitted,
                         "read_errors": self.counters["read_errors"],
                         "setpoint_errors": self.counters["setpoint_errors"]},
            "faults": [{**f, "orders_after_fault": len(self.orders_after_fault)}
                       for f in self.faults],
        }


def _elected(node: LedgerNode) -> str:
    from testbed.ledger import election
    return election.proposer(node.chain.state, 0).address


def _f(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


# ---------------------------------------------------------------------- expectations


def evaluate(sc: Scenario, s: dict[str, Any]) -> list[Verdict]:
    """The scenario's expectations against the run's summary; each says by how much."""
    e = sc.expect
    out: list[Verdict] = []
    if e.covered_share_min is not None:
        share = s["deviation"]["covered_share"]
        ok = share is not None and share >= e.covered_share_min
        out.append(Verdict("covered_share_min", ok, share, e.covered_share_min,
                           f"market covered {_pctx(share)} of the deviation "
                           f"({'>=' if ok else '<'} {e.covered_share_min:.0%} required"
                           + ("" if ok or share is None else
                              f", short by {e.covered_share_min - share:.1%}") + ")"))
    if e.deviation_reduced is not None:
        d = s["deviation"]
        ok = (d["after_kwh"] < d["before_kwh"]) == e.deviation_reduced
        out.append(Verdict("deviation_reduced", ok, d["after_kwh"], d["before_kwh"],
                           f"deviation {d['before_kwh']:.3f} kWh before the market, "
                           f"{d['after_kwh']:.3f} kWh after"))
    if e.auctions_cleared_min is not None:
        n = s["market"]["cleared"]
        out.append(Verdict("auctions_cleared_min", n >= e.auctions_cleared_min, n,
                           e.auctions_cleared_min,
                           f"{n} auctions cleared (>= {e.auctions_cleared_min} required"
                           + ("" if n >= e.auctions_cleared_min else
                              f", {e.auctions_cleared_min - n} short") + ")"))
    if e.voltage_in_band is not None:
        g = s["grid"]
        ok = g["enabled"] and g["dispatch_accepted"] and (g["in_band_share"] or 0) == 1.0
        out.append(Verdict("voltage_in_band", ok == e.voltage_in_band, g["in_band_share"], 1.0,
                           f"{_pctx(g['in_band_share'])} of steps inside the hard band "
                           f"(V {_fmt(g['vm_min_pu'])}-{_fmt(g['vm_max_pu'])} p.u.); every dispatch "
                           f"{'accepted' if g['dispatch_accepted'] else 'NOT accepted'} by "
                           "the grid check"))
    if e.ledger_verifies is not None:
        led = s["ledger"]
        bad = {k: v["error"] for k, v in led["verified"].items() if not v["ok"]}
        ok = led["verifies"] == e.ledger_verifies
        out.append(Verdict("ledger_verifies", ok, led["verifies"], e.ledger_verifies,
                           f"{len(led['verified'])} validator stores verified"
                           + (f"; failed: {bad}" if bad else "")))
    if e.blocks_min is not None:
        n = s["ledger"]["blocks"]
        out.append(Verdict("blocks_min", n >= e.blocks_min, n, e.blocks_min,
                           f"{n} blocks committed (>= {e.blocks_min} required"
                           + ("" if n >= e.blocks_min else f", {e.blocks_min - n} short")
                           + ")"))
    if e.no_lost_messages is not None:
        m = s["messages"]
        lost = (m["orders_published"] - m["orders_received"]) + m["ledger_uncommitted"]
        ok = (lost == 0) == e.no_lost_messages
        out.append(Verdict("no_lost_messages", ok, lost, 0,
                           f"{m['orders_published'] - m['orders_received']} published orders "
                           f"not received, {m['ledger_uncommitted']} ledger transactions not "
                           f"committed ({m['orders_lost_injected']} losses injected by the "
                           "scenario)"))
    if e.faults_excluded is not None:
        f = s["faults"]
        after = sum(x["orders_after_fault"] for x in f[:1])
        ok = bool(f) and after == 0
        out.append(Verdict("faults_excluded", ok == e.faults_excluded, after, 0,
                           f"{len(f)} faulted batteries; {after} orders from them after "
                           "their fault" if f else "no battery faulted during the run"))
    if e.lateness_p99_ms_max is not None:
        lat = s["clock"]["lateness"]
        p99 = lat["p99_ms"] if lat else None
        ok = p99 is not None and p99 <= e.lateness_p99_ms_max
        out.append(Verdict("lateness_p99_ms_max", ok, p99, e.lateness_p99_ms_max,
                           f"tick lateness p99 {p99 if p99 is not None else 'n/a'} ms "
                           f"(<= {e.lateness_p99_ms_max} ms required; realtime mode only)"))
    return out


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _pctx(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def junit_xml(result: RunResult) -> str:
    """The expectations as a JUnit XML test suite (one test case each), for CI."""
    from xml.sax.saxutils import escape, quoteattr

    vs = result.verdicts
    name = result.summary.get("scenario", "scenario")
    fails = sum(not v.ok for v in vs)
    cases = []
    for v in vs:
        body = "" if v.ok else (f"<failure message={quoteattr(v.message)}>"
                                f"{escape(json.dumps(v.to_dict()))}</failure>")
        cases.append(f'  <testcase classname={quoteattr("testbed.run." + name)} '
                     f'name={quoteattr(v.name)}>{body}<system-out>{escape(v.message)}'
                     "</system-out></testcase>")
    return ("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n"
            f"<testsuite name={quoteattr('testbed run ' + name)} tests=\"{len(vs)}\" "
            f"failures=\"{fails}\" errors=\"0\">\n" + "\n".join(cases) + "\n</testsuite>\n")


async def run_scenario(scenario: Scenario, **kw: Any) -> RunResult:
    return await Run(scenario, **kw).execute()
