"""The run: set-up, then one loop whose body is the data flow of a step through the
phases (`scenarios.phases`, docs/architecture.md).

One step (simulated time t -> t + step):
 1. the clock ticks (fast: at once; realtime: on an absolute wall-clock deadline);
 2. the environment advances the emulated physics under the scenario's profiles, with the
    voltages of the previous step's power flow and the measured power of real devices;
 3. device I/O reads every device over its protocol (faults: two failed reads in a row);
 4. the feeder's power flow takes every prosumer's measured P and Q; its bus voltages go
    back to the emulated devices in the next step's environment;
 5. accounting integrates metered energy; the aggregator compares it with its schedule.
At the end of each market interval:
 6. settlement pays the deliveries metered in the interval; meters certify it (CPF);
 7. the market round auctions the deviation (grid check and re-clear), the batteries get
    their setpoints through the same drivers;
 8. the ledger phase has a block produced and records it.
Everything lands in the run store (`telemetry.store`), committed every step.

In fast mode every clock the agents and nodes see is simulated time, keys derive from
the seed and blocks are produced on the scenario's schedule, so a replay with the same
seed writes the same store (wall-clock columns aside).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import json
import logging
import statistics
import time as _time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.bus.broker import open_bus
from testbed.bus.client import BusClient
from testbed.clock import EPOCH, Clock
from testbed.config import ConfigError, InfluxConfig, SiteConfig, load_site, locate
from testbed.cosim.errors import FederateLost, need_helics
from testbed.devices.site import SiteEmulators, open_devices
from testbed.ledger.chain import Chain
from testbed.ledger.pseudonyms import PseudonymDesk
from testbed.ledger.setup import init_ledger
from testbed.ledger.state import Params
from testbed.ledger.validators import Validators
from testbed.market.orders import MarketRules, Pricing
from testbed.telemetry import store as queries
from testbed.telemetry.influx import InfluxSink
from testbed.telemetry.store import RunStore

from . import expectations
from .expectations import Verdict, evaluate
from .model import DeviceEvent, GridEvent, Scenario
from .phases.accounting import Accounting
from .phases.devices import DeviceEvents, DeviceIO, StepReadings
from .phases.environment import Environment, external_w, unreached
from .phases.feeder import Feeder
from .phases.ledger import LedgerPhase
from .phases.market import MarketRound, RoundResult
from .phases.settlement import Due, SettlementPhase
from .profiles import forecast_schedule, irradiance_fn, load_fn

if TYPE_CHECKING:
    from testbed.cosim.run import LocalFederation, RunFederate

log = logging.getLogger(__name__)

__all__ = ["Run", "RunResult", "Verdict", "evaluate", "junit_xml", "run_scenario"]


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    verdicts: list[Verdict]

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.verdicts)


def junit_xml(result: RunResult) -> str:
    """The run's expectations as a JUnit XML test suite, for CI."""
    return expectations.junit_xml(result.summary, result.verdicts)


class Run:
    """One scenario run; `await Run(...).execute()`. Everything is validated here, before
    anything is created on disk or started."""

    def __init__(self, scenario: Scenario, *, out: Path = Path("runs"),
                 broker: str | None = None, seed: int | None = None,
                 speed: float | None = None, fast: bool = False,
                 influx: InfluxConfig | None = None, influx_token: str | None = None,
                 report: bool = True, helics: str | None = None, shards: int | None = None,
                 feeder_federate: bool = False,
                 progress: Callable[[int, int, dict[str, Any]], None] | None = None) -> None:
        self.timings: dict[str, float] = {}
        """Wall seconds of the run's phases outside the step loop (and the loop), in order:
        where a run's start-up and end go (`bench/scenario.py` prints them)."""
        self._t = _time.perf_counter()
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
        self._lap("site")
        self.schedule = forecast_schedule(sc, self.site)
        self.profiles = (irradiance_fn(sc), load_fn(sc, self.site))  # checked before start
        self._lap("forecast and profiles")
        self.broker = broker
        self.progress = progress
        self.influx = influx or self.site.telemetry.influx
        """Where the run's time series go (flags over the site file's `telemetry.influx`)."""
        self.influx_token = influx_token
        self.report = report
        self.helics = helics
        """HELICS broker (HOST:PORT) whose shards serve the emulated devices; with
        `shards`, the run starts a broker and that many shard processes itself."""
        self.shards = shards
        if helics is not None and shards is not None:
            raise ConfigError("--helics and --shards: give one (--shards starts its own "
                              "broker; --helics joins shards started elsewhere)")
        self.feeder_federate = feeder_federate
        """The feeder's power flow in its own HELICS federate (`cosim.feeder`)."""
        if feeder_federate and helics is None and shards is None:
            raise ConfigError("--feeder-federate: the feeder federate joins a HELICS "
                              "federation; give --shards N or --helics BROKER")
        if shards is not None and shards < 1:
            raise ConfigError(f"--shards {shards}: expected at least 1")
        if helics is not None or shards is not None:
            need_helics()  # before anything is created
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
        self.checker = None
        if sc.grid.enabled and self.site.grid.enabled:
            from testbed.grid.feeder import checker_for
            self.checker = checker_for(self.site)
            self._lap("feeder")

    def _lap(self, phase: str) -> None:
        """`phase` has just ended: its wall time since the previous lap."""
        now = _time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self._t
        self._t = now

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
        check_rules(sc, site)
        return site

    # ------------------------------------------------------------------ set-up

    async def execute(self) -> RunResult:
        sc, site = self.sc, self.site
        self._lap("before execute")
        self.dir.mkdir(parents=True)
        (self.dir / "scenario.json").write_text(
            json.dumps(sc.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
        (self.dir / "site.json").write_text(
            json.dumps(site.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
        # real time: the store's writes (a step's thousands of rows and its commit) in a
        # thread of their own, off the loop that keeps the ticks
        self.store = st = RunStore(self.dir / "run.db", writer=self.clock.realtime)
        for key, value in (("run_id", self.run_id), ("scenario", sc.name),
                           ("seed", str(sc.seed)), ("started_at", datetime.now(UTC).isoformat()),
                           ("sim_start_s", str(sc.start)),
                           ("time_origin_ms", str(int(_time.time()) * 1000))):
            st.put_meta(key, value)
        sink = None
        if self.influx is not None:
            st.put_meta("influx", self.influx.model_dump())
            st.commit()  # the sink reads the run's meta first
            st.flush()
            sink = InfluxSink(self.influx, self.dir, token=self.influx_token)
            sink.start()
        wall0 = _time.perf_counter()
        self.layout = init_ledger(
            site, self.dir / "ledger", seed=sc.seed, time=EPOCH + sc.start - 1,
            validators=sc.ledger.validators,
            prosumer_funds_eur=sc.ledger.prosumer_funds_eur, rules=self.rules,
            params=Params(max_skew_s=max(300.0, 2.0 * sc.market.interval_s),
                          max_age_s=max(900.0, 4.0 * sc.market.interval_s),
                          round_timeout_s=max(2.0, sc.market.gate_s)))
        self._lap("run folder, store, ledger set-up")
        self.keys = {p.name: self.layout.key(p.name) for p in site.prosumers}
        self.agg_key = self.layout.key("aggregator")
        self.owners = {k.address: n for n, k in self.keys.items()}
        """The run's address book: ledger address -> prosumer, pseudonyms included as
        the desk issues them (settlement and the grid check locate bidders by it)."""
        emulators = SiteEmulators(site, free_ports=True, start_s=sc.start)
        self.env = Environment(emulators.physics, *self.profiles, events=sc.events)
        self.accounting = Accounting(self.keys, self.schedule, sc.market.interval_s)
        self.settlement = SettlementPhase(self.rules, self.owners)
        self.feeder = Feeder(self.checker, site.grid.background) if self.checker else None
        self.market = MarketRound(sc, st, self.clock, self.rules, self.schedule, self.agg_key,
                                  self.keys, self.checker, site.grid.background,
                                  owners=self.owners)
        self.ledger: LedgerPhase | None = None
        self.desk: PseudonymDesk | None = None
        self.cosim: RunFederate | None = None
        self.lost: FederateLost | None = None
        self.federation: LocalFederation | None = None
        try:
            if self.helics is not None or self.shards is not None:
                from testbed.cosim.run import LocalFederation, RunFederate
                broker = self.helics
                if self.shards is not None:
                    federation = self.federation = LocalFederation(
                        sc.site, self.shards, sc.seed, log_dir=self.dir / "cosim",
                        feeder=self.feeder_federate and self.checker is not None,
                        feeder_background=sc.grid.background)
                    broker = federation.start()
                assert broker is not None
                remote = self.feeder_federate and self.checker is not None
                self.cosim = RunFederate(site, broker, feeder_limits=(
                    self.checker.limits if remote and self.checker else None))
                if self.cosim.feeder is not None:
                    self.feeder = self.cosim.feeder  # type: ignore[assignment]
                if self.federation is not None:
                    self.cosim.fed.watch = self.federation.watch
                served = await self.cosim.start()
            else:
                await emulators.start(clock=False)
                served = emulators.resolved_site()
            self._lap("phases, emulators start")
            async with open_bus(self.broker) as bus:
                self._lap("bus open")
                await self._with_bus(bus, served, self.cosim or emulators)
        except BaseException:
            # a run that fails still keeps every step it committed: in real time those
            # commits may still sit in the store's writer thread, which would die with
            # the process
            with contextlib.suppress(Exception):
                st.flush()
            raise
        finally:
            await emulators.stop()
            if self.cosim is not None:
                self.cosim.close()
            if self.federation is not None:
                self.federation.stop()
        self._lap("bus close, emulators stop")
        st.put_meta("finished_at", datetime.now(UTC).isoformat())
        st.put_meta("wall_s", f"{_time.perf_counter() - wall0:.3f}")
        summary = self._summary(_time.perf_counter() - wall0)
        verdicts = evaluate(sc, summary)
        summary["expectations"] = [v.to_dict() for v in verdicts]
        summary["passed"] = all(v.ok for v in verdicts) and self.lost is None
        st.put_meta("passed", json.dumps(summary["passed"]))
        self._lap("summary")
        st.close()
        self._lap("store close")
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

    async def _with_bus(self, bus: BusClient, served: SiteConfig,
                        emulators: DeviceEvents) -> None:
        sc, site = self.sc, self.site
        if sc.ledger.enabled:
            validators = await Validators.start(self.layout, bus, site.name,
                                                clock=self.clock.now)
            self.ledger = LedgerPhase(validators, self.store, self.keys, self.agg_key,
                                      sc.market.interval_s)
            identities = validators.nodes[0].chain.state.identities
            self._lap("validators start")
        else:
            first = self.layout.validators()[0]
            identities = Chain.open(self.layout.db_path(first)).state.identities
        # prosumers bid under per-auction pseudonyms the administrator certifies
        desk = self.desk = PseudonymDesk(self.layout.key("admin"), self.layout.audit_key(),
                                         submit=self.ledger.queue if self.ledger else None,
                                         aliases=self.owners)

        def resolve(address: str) -> bytes | None:
            e = identities.get(address)
            return e.public_key if e else desk.resolve(address)

        self.devices = DeviceIO(site, open_devices(served), self.store, emulators)
        batteries = {p.name: bat for p in site.prosumers
                     if (bat := p.physics(sc.seed).battery) is not None
                     and self.devices.battery(p.name) is not None}
        try:
            await self.market.start(bus, site.name, resolve, batteries,
                                    self.ledger.submit if self.ledger else None,
                                    dso=self.layout.key("dso"), pseudonym=desk.issue)
            await self.devices.connect()
            self._lap("market start, devices connect")
            # Everything set up so far (pandapower, the feeder, keys, emulators) lives as
            # long as the run: out of the collector's way, a full collection scans only
            # what the loop allocates (in real time, unfrozen, each full collection
            # stalled the loop ~200 ms every ~3 s with 1,000 devices: late ticks); and
            # a step's many short-lived objects (readings, messages, rows) die by
            # reference count long before a young collection every 20,000 allocations
            # instead of 700 would look at them. GC per step,
            # 50 prosumers: 11 ms -> 4 ms (freeze) -> 0.2 ms (thresholds).
            thresholds = gc.get_threshold()
            gc.collect()
            gc.freeze()
            gc.set_threshold(20_000, 20, 10)
            self._lap("gc collect and freeze")
            try:
                await self._loop()
                self._lap("step loop")
            finally:
                gc.set_threshold(*thresholds)
                gc.unfreeze()
        finally:
            await self.market.stop()
            await self.devices.close()
            self._lap("market stop, devices close")
            if self.ledger is not None:
                await self.ledger.stop()
                self._lap("ledger stop (validators, verify)")

    # ------------------------------------------------------------------ loop

    async def _loop(self) -> None:
        sc, clock = self.sc, self.clock
        events = [e for e in sc.events if isinstance(e, DeviceEvent)]
        vm_pu: dict[str, float] = {}
        real: dict[str, Any] = {}
        self._round: asyncio.Future[None] | None = None
        clock.begin()
        for k in range(1, sc.steps + 1):
            late = await clock.tick(k)
            t0 = sc.start + (k - 1) * sc.step
            t1 = t0 + sc.step
            try:
                vm_pu, real = await self._step(k, t0, t1, vm_pu, real, events, late)
            except FederateLost as exc:
                self._federate_lost(t1, exc)
                break
        if self._round is not None:
            await self._round
            self._round = None
            self.store.commit()

    async def _step(self, k: int, t0: float, t1: float, vm_pu: dict[str, float],
                    real: dict[str, Any], events: list[DeviceEvent], late: float | None,
                    ) -> tuple[dict[str, float], dict[str, Any]]:
        """One step's data flow; returns the voltages and real devices' power the next
        step's environment takes."""
        sc, clock = self.sc, self.clock
        iv = sc.market.interval_s
        await self.devices.events(t0, events)
        if self.cosim is not None:
            await self.cosim.step(t0, sc.step, self.env.physics, self.env.volts(vm_pu),
                                  external_w(real))
        else:
            self.env.step(t1, sc.step, vm_pu=vm_pu, measured=real)
        clock.advance_to(t1)
        readings = await self.devices.step(t1, sc.step)
        for name in readings.faulted:
            self.market.exclude(name)
        for name in readings.recovered:
            self.market.exclude(name, False)
        net_import = self.accounting.step(t1, sc.step, readings.metered)
        self.market.step(t1, sc.step, net_import, readings.soc)
        if self.feeder is not None:
            flow = self.feeder.step(t1, sc.step, *_injections(readings))
            if inspect.isawaitable(flow):  # a feeder federate (cosim.feeder)
                flow = await flow
            self.store.insert("feeder", flow.row)
            vm_pu = dict(flow.vm_pu)
        real = dict(readings.real)
        if round(t1) % iv == 0:
            await self._interval_end(int(round(t1)) // iv - 1, t1, readings)
        self.store.insert("steps", {"step": k, "t": t1, "late_ms": late,
                                    "wall": _time.time()})
        self.store.commit()
        if self.progress:
            self.progress(k, sc.steps, {"t": t1, "auctions": self.market.counters["auctions"],
                                        "blocks": self.ledger.blocks if self.ledger else 0})
        return vm_pu, real

    def _federate_lost(self, t: float, exc: FederateLost) -> None:
        """End the run at this step: the store keeps every step before it."""
        self.lost = exc
        log.error("run ended at t=%g s: %s (lost: %s)", t, exc, ", ".join(exc.devices) or "none")
        self.store.event(t, "federate-lost", None,
                         f"{exc}; lost devices: {', '.join(exc.devices) or 'none'}")
        self.store.commit()

    async def _interval_end(self, interval: int, t: float, readings: StepReadings) -> None:
        """Close the interval's books now; run its market round (auction, setpoints,
        block) inline in fast mode, and beside the step loop in realtime mode, so a
        market gate never holds up the clock (the previous round is awaited first)."""
        if self._round is not None:
            await self._round
            self._round = None
        st = self.store
        closed = self.accounting.interval_end(
            interval, t, delivered=interval - 1 in self.market.delivering,
            requested_kwh=self.market.aggregator.requested_kwh)
        paid = self.settlement.interval_end(interval, closed.energy)
        for p in paid:
            queries.set_delivered(st, p.request_id, p.settlement.order_id, p.delivered_kwh)
            st.insert("settlements", p.row(t))
        for c in closed.certified:
            st.insert("cpf", {"t": t, "prosumer": c.prosumer, "production_kwh": c.production_kwh,
                              "consumption_kwh": c.consumption_kwh, "cpf": c.cpf})
        self.market.certify({c.prosumer: (c.production_kwh, c.consumption_kwh)
                             for c in closed.certified})
        if self.ledger is not None:
            self.ledger.payments(((x, p.award_id) for p in paid for x in p.transfers),
                                 at=self.clock.now(), desk=self.desk)
            self.ledger.readings(interval, ((c.prosumer, c.production_kwh, c.consumption_kwh)
                                  for c in closed.certified), at=self.clock.now())
        if closed.row is not None:
            st.insert("intervals", closed.row)
        work = self._market_round(interval, t, *_injections(readings))
        if self.clock.realtime:
            self._round = asyncio.ensure_future(work)
        else:
            await work

    async def _market_round(self, interval: int, t: float, base_w: dict[str, float],
                            base_q: dict[str, float]) -> None:
        result: RoundResult = await self.market.interval_end(interval, t, base_w, base_q)
        if result.clearing is not None:
            self.settlement.add(interval + 1, Due(result.clearing, result.award_id,
                                                  result.request_id))
        await self.devices.command(t, result.setpoints)
        if self.ledger is not None:
            await self.ledger.interval_end(interval, t)

    # ------------------------------------------------------------------ summary

    def _summary(self, wall_s: float) -> dict[str, Any]:
        sc, db = self.sc, self.store.db
        mk = queries.market_totals(db)
        prices = mk["prices"]
        traded = queries.traded_by_prosumer(db)
        cpfs = queries.last_cpf(db)
        dev_io = self.devices.summary()
        prosumers = {}
        for name in self.keys:
            kwh, eur = traded.get(name, (0.0, 0.0))
            prosumers[name] = {**self.accounting.prosumer(name), "cpf": cpfs.get(name),
                               "traded_kwh": kwh, "revenue_eur": eur,
                               "faulted_at": dev_io["faulted_at"].get(name)}
        led = self.ledger
        uncommitted = led.summary()["uncommitted"] if led else 0
        ledger = {**led.summary(), "proposers": queries.blocks_by_proposer(db)} if led else {
            "enabled": False, "blocks": 0, "proposers": {}, "submitted": 0, "uncommitted": 0,
            "verified": {}, "verifies": False}
        counters = self.market.counters
        grid: dict[str, Any] = {"enabled": self.feeder is not None, "steps": 0,
                                "in_band_share": None, "vm_min_pu": None, "vm_max_pu": None,
                                "losses_kwh": 0.0}
        if self.feeder is not None:
            grid.update(self.feeder.summary())
        grid.update({"lights": queries.feeder_lights(db),
                     "auctions_re_cleared": counters["re_cleared"],
                     "dispatch_accepted": self.market.dispatch_ok})
        return {
            "run_id": self.run_id, "scenario": sc.name, "seed": sc.seed,
            "site": self.site.name, "steps": sc.steps, "step_s": sc.step,
            "start_s": sc.start, "duration_s": sc.duration,
            "clock": {"mode": sc.clock.mode, "speed": sc.clock.speed,
                      "wall_s": round(wall_s, 3), "lateness": self.clock.lateness()},
            "deviation": {**self.accounting.deviation(), "requested_kwh": mk["requested_kwh"],
                          "delivered_kwh": mk["delivered_kwh"]},
            "market": {"auctions": mk["auctions"], "cleared": counters["cleared"],
                       "market_kwh": mk["market_kwh"], "cleared_kwh": mk["cleared_kwh"],
                       "grid_curtailed_kwh": mk["market_kwh"] - mk["cleared_kwh"],
                       "energy_traded_kwh": mk["energy_traded_kwh"], "value_eur": mk["value_eur"],
                       "price_min": min(prices) if prices else None,
                       "price_max": max(prices) if prices else None,
                       "price_mean": statistics.fmean(prices) if prices else None},
            "prosumers": prosumers,
            "devices": {"real": dev_io["real"], "links": dev_io["links"],
                        "unreached": unreached(sc, self.site)},
            "ledger": ledger,
            "grid": grid,
            "messages": {"orders_published": counters["orders_published"],
                         "orders_lost_injected": counters["orders_lost"],
                         "orders_received": counters["orders_received"],
                         "refused_by_agents": self.market.refused(),
                         "refused_by_ledger": led.rejected() if led else 0,
                         "ledger_submitted": len(led.submitted) if led else 0,
                         "ledger_uncommitted": uncommitted,
                         "read_errors": self.devices.read_errors,
                         "setpoint_errors": self.devices.setpoint_errors},
            **({"cosim": {"broker": self.helics or "local", "shards": self.shards,
                          "lost_devices": self.lost.devices if self.lost else [],
                          "error": str(self.lost) if self.lost else None}}
               if self.helics is not None or self.shards is not None else {}),
            "faults": [{**f, "orders_after_fault": len(self.market.orders_after_fault)}
                       for f in self.devices.faults],
        }


def check_rules(sc: Scenario, site: SiteConfig) -> None:
    """What a scenario may do on a site, checked before anything starts (a ConfigError
    naming the scenario file, line and field): a fast clock never drives real devices;
    device events name emulated devices of the site; grid events name its prosumers.
    (Load-spike and message-loss events are checked with the load profile,
    `profiles.load_fn`.)"""

    def where(*loc: str | int) -> str:
        return locate(sc.source, loc) if sc.source else f"{sc.name}: {locate(None, loc)}"

    devices = {d.name: d for _, d in site.devices()}
    real = sorted(n for n, d in devices.items() if not d.emulated)
    if real and sc.clock.mode == "fast":
        raise ConfigError(f"{where('clock', 'mode')}: a fast clock cannot drive real devices "
                          f"({', '.join(real)}); use mode: realtime")
    prosumers = {p.name for p in site.prosumers}
    for i, e in enumerate(sc.events):
        if isinstance(e, GridEvent) and e.prosumer not in (None, *prosumers):
            raise ConfigError(f"{where('events', i, 'prosumer')}: {e.kind} names unknown "
                              f"prosumer {e.prosumer!r} (prosumers: "
                              f"{', '.join(sorted(prosumers))})")
        if not isinstance(e, DeviceEvent):
            continue
        if e.device not in devices:
            raise ConfigError(f"{where('events', i, 'device')}: {e.kind} names unknown "
                              f"device {e.device!r} (devices: {', '.join(sorted(devices))})")
        if not devices[e.device].emulated:
            raise ConfigError(f"{where('events', i, 'device')}: {e.kind} can only fault an "
                              f"emulated device; {e.device!r} is real (emulated: false)")


def _injections(r: StepReadings) -> tuple[dict[str, float], dict[str, float]]:
    """Each prosumer's measured P and Q into the grid (unity PF where no Q is reported)."""
    return ({n: m.injection_w for n, m in r.metered.items()},
            {n: m.q_var for n, m in r.metered.items()})


async def run_scenario(scenario: Scenario, **kw: Any) -> RunResult:
    return await Run(scenario, **kw).execute()
