"""Each phase of the run alone: accounting and settlement with numbers worked by hand,
the feeder against pandapower, device I/O against real emulators, the ledger phase over a
real broker through the Validators facade, the expectation checkers, the clock."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from testbed.bus.broker import EmbeddedBroker
from testbed.bus.client import BusClient
from testbed.clock import EPOCH, Clock
from testbed.config import SiteConfig, load_site
from testbed.devices.site import SiteEmulators, open_devices
from testbed.grid.feeder import checker_for
from testbed.ledger import election
from testbed.ledger.chain import genesis_state
from testbed.ledger.election import cpf
from testbed.ledger.setup import init_ledger
from testbed.ledger.validators import Validators
from testbed.market.aggregator import Schedule
from testbed.market.auction import clear
from testbed.market.orders import MarketRules, Order, Side
from testbed.market.settlement import TransferKind
from testbed.scenarios.expectations import CHECKS, evaluate
from testbed.scenarios.model import Scenario
from testbed.scenarios.phases.accounting import Accounting, Metered
from testbed.scenarios.phases.devices import DeviceIO
from testbed.scenarios.phases.feeder import Feeder
from testbed.scenarios.phases.ledger import LedgerPhase
from testbed.scenarios.phases.settlement import Due, SettlementPhase
from testbed.telemetry.store import RunStore

# ---------------------------------------------------------------------- accounting


def test_accounting_integrates_a_step_and_balances_the_house() -> None:
    acc = Accounting(["a", "b"], Schedule(first_interval=0, interval_s=900,
                                          energy_kwh=(1.0, 1.0)), 900)
    # a: 3 kW PV, battery charging 1 kW, meter exports 0.5 kW -> house draws 1.5 kW
    # b: no PV, battery discharging 2 kW, meter imports 0.4 kW -> house draws 2.4 kW
    net = acc.step(60.0, 60.0, {"a": Metered(-500.0, 3000.0, -1000.0),
                                "b": Metered(400.0, 0.0, 2000.0)})
    assert net == pytest.approx(-100.0)
    a = acc.books["a"].interval
    assert a == pytest.approx({"pv_wh": 50.0, "import_wh": 0.0, "export_wh": 500 / 60,
                               "dis_wh": 0.0, "ch_wh": 1000 / 60})
    ta, tb = acc.books["a"].totals, acc.books["b"].totals
    assert ta["load_wh"] == pytest.approx(25.0)  # 1.5 kW for a minute
    assert ta["pv_local_wh"] == pytest.approx(2500 / 60)  # PV to the house and battery
    assert ta["load_local_wh"] == pytest.approx(25.0)  # all of it from PV
    assert tb["load_wh"] == pytest.approx(40.0) and tb["load_local_wh"] == pytest.approx(2000 / 60)
    assert acc.prosumer("a")["self_consumption"] == pytest.approx(2500 / 3000)
    assert acc.prosumer("b")["self_consumption"] is None  # no PV
    # what the feeder takes: the meter's net export, or without a meter the inverters'
    assert Metered(-500.0, 3000.0, -1000.0).injection_w == 500.0
    assert Metered(0.0, 3000.0, -1000.0, has_meter=False).injection_w == 2000.0


def test_accounting_closes_intervals_and_counts_the_delivery_as_covered() -> None:
    acc = Accounting(["a"], Schedule(first_interval=0, interval_s=900,
                                     energy_kwh=(0.5, 0.5, 0.5)), 900)
    for _ in range(15):  # interval 0: 4 kW import for 15 min = 1 kWh, schedule 0.5
        acc.step(0, 60.0, {"a": Metered(4000.0, 0.0, 0.0)})
    c0 = acc.interval_end(0, 900.0, delivered=False, requested_kwh={})
    assert c0.row is None and acc.stats[0]["raw"] == pytest.approx(0.5)
    (cert,) = c0.certified  # no PV, 1 kWh consumed
    assert (cert.production_kwh, cert.consumption_kwh) == (0.0, pytest.approx(1.0))
    assert cert.cpf == pytest.approx(math.exp(-1.0)) == cpf(0.0, 1.0)
    for _ in range(15):  # interval 1: battery delivers 2 kW, meter imports 2 kW
        acc.step(0, 60.0, {"a": Metered(2000.0, 0.0, 2000.0)})
    c1 = acc.interval_end(1, 1800.0, delivered=True, requested_kwh={0: 0.5})
    assert c1.row is not None
    assert c1.row["covered_kwh"] == pytest.approx(0.5)  # 2 kW x 15 min
    assert c1.row["residual_kwh"] == pytest.approx(0.0) and c1.row["requested_kwh"] == 0.5
    assert acc.stats[1]["market"] == pytest.approx(-0.5)
    # interval 1's raw deviation: 0.5 kWh metered - (-0.5) market - 0.5 schedule = 0.5
    assert acc.stats[1]["raw"] == pytest.approx(0.5)
    dev = acc.deviation()
    assert dev["before_kwh"] == pytest.approx(0.5) and dev["covered_share"] == pytest.approx(1.0)
    assert all(v == 0.0 for v in acc.books["a"].interval.values())


# ---------------------------------------------------------------------- settlement


def test_settlement_pays_what_each_battery_metered_in_the_delivery_interval() -> None:
    req = Order("req", "agg", Side.BUY, 3.0, 0.30, 5)
    c = clear(req, [Order("o1", "addr-a", Side.SELL, 2.0, 0.25, 5),
                    Order("o2", "addr-b", Side.SELL, 2.0, 0.20, 5)])
    phase = SettlementPhase(MarketRules(shortfall_penalty_eur_per_kwh=0.10),
                            {"addr-a": "a", "addr-b": "b"})
    phase.add(5, Due(c, "award-1", "req"))
    assert phase.interval_end(4, {}) == []  # nothing due yet
    energy = {"a": {"dis_wh": 600.0, "ch_wh": 0.0}, "b": {"dis_wh": 2500.0, "ch_wh": 0.0}}
    paid = {p.prosumer: p for p in phase.interval_end(5, energy)}
    a, b = paid["a"], paid["b"]  # a awarded 1 kWh (partial), b 2 kWh
    assert a.delivered_kwh == pytest.approx(0.6) and b.delivered_kwh == pytest.approx(2.5)
    assert b.settlement.paid_kwh == 2.0 and [x.amount_ueur for x in b.transfers] == [400_000]
    energy_a, penalty = a.transfers
    assert energy_a.amount_ueur == 150_000  # 0.6 kWh x 0.25
    assert penalty.kind == TransferKind.PENALTY and penalty.amount_ueur == 40_000
    assert a.row(6300.0)["shortfall_kwh"] == pytest.approx(0.4)
    assert phase.interval_end(5, energy) == []  # settled once


# ---------------------------------------------------------------------- feeder


def test_feeder_counts_steps_in_band_and_gives_each_prosumer_its_bus_voltage() -> None:
    import pandapower as pp

    site = load_site("demo")
    checker = checker_for(site)
    feeder = Feeder(checker, background=site.grid.background)
    p = dict.fromkeys(checker.prosumers, 0.0)
    s0 = feeder.step(60.0, 60.0, p)
    far = checker.connections[-1]
    s1 = feeder.step(120.0, 60.0, {**p, far.prosumer: 8000.0})
    assert s1.vm_pu[far.prosumer] > s0.vm_pu[far.prosumer]
    # the bus voltage is what pandapower's own runpp gives with the same injection
    net = __import__("copy").deepcopy(checker.net)
    net.load.scaling *= site.grid.background
    net.sgen.scaling *= site.grid.background
    pp.create_sgen(net, far.bus, p_mw=0.008, q_mvar=0.0)
    pp.runpp(net, numba=False)
    assert s1.vm_pu[far.prosumer] == pytest.approx(net.res_bus.vm_pu[far.bus], abs=1e-6)
    sm = feeder.summary()
    assert sm["steps"] == 2 and sm["in_band_share"] == 1.0
    assert sm["vm_max_pu"] == pytest.approx(max(s0.report.vm_max_pu, s1.report.vm_max_pu))
    assert sm["losses_kwh"] == pytest.approx((s0.report.losses_w + s1.report.losses_w) * 60
                                             / 3.6e6)
    assert s1.row["t"] == 120.0 and s1.row["light"] == str(s1.report.light)


# ---------------------------------------------------------------------- device I/O


async def test_device_io_reads_faults_and_commands_real_emulators(tmp_path: Path,
                                                                  site: SiteConfig) -> None:
    store = RunStore(tmp_path / "run.db")
    em = SiteEmulators(site, free_ports=True)
    await em.start(clock=False)
    try:
        io = DeviceIO(site, open_devices(em.resolved_site()), store, em)
        await io.connect()
        try:
            r = await io.step(60.0, 60.0)
            m = r.metered["p1"]
            state = em.physics.prosumers["p1"].state
            assert m.pv_w == pytest.approx(state.pv.ac_w, abs=1.0)
            assert m.import_w == pytest.approx(state.meter.net_w, abs=1.0)
            assert r.soc["p1"] == pytest.approx(0.5, abs=0.001) and r.real == {}
            await io.command(60.0, {"p1": 2500.0})
            assert em.physics.prosumers["p1"].state.battery.setpoint_w == pytest.approx(2500.0)
            em.silence("bat")
            assert (await io.step(120.0, 60.0)).faulted == ()
            r2 = await io.step(180.0, 60.0)  # second failed read: the battery faults
            assert r2.faulted == ("p1",) and r2.soc["p1"] is None
            await io.command(180.0, {"p1": 0.0})  # skipped: faulted
            em.silence("bat", False)
            assert (await io.step(240.0, 60.0)).recovered == ("p1",)
            assert io.read_errors == 2 and io.faults[0]["t"] == 180.0
        finally:
            await io.close()
    finally:
        await em.stop()
    kinds = [k for (k,) in store.db.execute("SELECT kind FROM events ORDER BY rowid")]
    assert kinds == ["setpoint", "read-failed", "fault", "recovered"]
    store.close()


# ---------------------------------------------------------------------- ledger


async def test_ledger_phase_commits_the_intervals_readings_through_the_facade(
        tmp_path: Path) -> None:
    site = load_site("demo")
    layout = init_ledger(site, tmp_path / "ledger", seed=1, time=EPOCH - 1)
    keys = {p.name: layout.key(p.name) for p in site.prosumers}
    store = RunStore(tmp_path / "run.db")
    clock = Clock(0.0, 60.0, "fast", 1.0)
    clock.advance_to(900.0)
    async with EmbeddedBroker() as broker, BusClient(broker.url) as bus:
        v = await Validators.start(layout, bus, site.name, clock=clock.now)
        phase = LedgerPhase(v, store, keys, layout.key("aggregator"), 900)
        phase.readings(0, [(n, 1.0, 0.5 + i) for i, n in enumerate(keys)], at=clock.now())
        await asyncio.wait_for(phase.interval_end(0, 900.0), 15)
        await phase.stop()
    assert phase.blocks == 1 and v.height() == 1
    s = phase.summary()
    assert s["submitted"] == len(keys) and s["uncommitted"] == 0 and s["verifies"]
    (row,) = store.db.execute("SELECT height, t, txs, proposer_name FROM blocks").fetchall()
    # no readings on the chain before block 1: eq. 9's tie-break by hash elects its proposer
    elected = election.proposer(genesis_state(layout.genesis())).address
    assert row[:3] == (1, 900.0, len(keys)) and keys[row[3]].address == elected
    store.close()


# ---------------------------------------------------------------------- expectations


def _summary(**over: object) -> dict:
    s = {"deviation": {"covered_share": 0.25, "before_kwh": 4.0, "after_kwh": 3.0},
         "market": {"cleared": 3},
         "grid": {"enabled": True, "dispatch_accepted": True, "in_band_share": 1.0,
                  "vm_min_pu": 0.97, "vm_max_pu": 1.02},
         "ledger": {"verified": {"a": {"ok": True, "error": None}}, "verifies": True,
                    "blocks": 9},
         "messages": {"orders_published": 5, "orders_received": 4, "ledger_uncommitted": 0,
                      "orders_lost_injected": 0},
         "faults": [], "clock": {"lateness": None}}
    s.update(over)
    return s


def test_expectation_checkers_say_by_how_much() -> None:
    sc = Scenario.model_validate({"name": "x", "expect": {
        "covered_share_min": 0.3, "deviation_reduced": True, "auctions_cleared_min": 4,
        "voltage_in_band": True, "ledger_verifies": True, "blocks_min": 10,
        "no_lost_messages": True, "faults_excluded": True, "lateness_p99_ms_max": 5}})
    v = {x.name: x for x in evaluate(sc, _summary())}
    assert list(v) == list(CHECKS)
    assert not v["covered_share_min"].ok and "short by 5.0%" in v["covered_share_min"].message
    assert v["deviation_reduced"].ok and v["voltage_in_band"].ok and v["ledger_verifies"].ok
    assert "1 short" in v["auctions_cleared_min"].message
    assert "1 short" in v["blocks_min"].message
    assert not v["no_lost_messages"].ok and v["no_lost_messages"].actual == 1
    assert not v["faults_excluded"].ok and not v["lateness_p99_ms_max"].ok
    assert evaluate(Scenario.model_validate({"name": "y"}), _summary()) == []


# ---------------------------------------------------------------------- clock


def test_fast_clock_is_simulated_time_and_never_goes_back() -> None:
    c = Clock(3600.0, 60.0, "fast", 1.0)
    assert c.now() == EPOCH + 3600.0
    c.advance_to(3661.0)
    c.advance_to(3660.0)
    assert c.sim_now() == 3661.0 and c.lateness() is None


def test_profiles_that_cannot_reach_a_real_device_are_named() -> None:
    from testbed.scenarios.phases.environment import external_w, unreached

    site = SiteConfig.model_validate({"name": "lab", "prosumers": [{"name": "p1", "devices": [
        {"name": "inv", "kind": "pv", "emulated": False, "port": 502, "unit": 1},
        {"name": "bat", "kind": "battery", "emulated": False, "port": 502, "unit": 2},
        {"name": "m", "kind": "meter", "port": 0, "unit": 3}]}]})
    sc = Scenario.model_validate({"name": "x", "events": [
        {"kind": "cloud", "at": "12:00"}, {"kind": "load-spike", "at": "13:00", "extra_w": 1}]})
    assert unreached(sc, site) == [
        "inv: irradiance profile and cloud events do not reach a real PV inverter"]
    real_meter = site.model_copy(update={"prosumers": [site.prosumers[0].model_copy(update={
        "devices": [site.prosumers[0].devices[2].model_copy(
            update={"emulated": False, "port": 502})]})]})
    assert unreached(sc, real_meter) == [
        "m: household load profile and load spikes do not reach a real meter"]
    # the emulated meter adds a real PV's and battery's measured output
    assert external_w({"p1": {"pv": (1200.0, 0.0), "battery": (-500.0, 0.0)}}) == {"p1": 700.0}


# ---------------------------------------------------------------------- environment


def test_environment_steps_physics_with_feeder_voltage_and_real_devices_power() -> None:
    from testbed.devices.emulator import EmulatedSite, prosumer_params
    from testbed.physics.models import LoadParams, MeterParams, PVParams
    from testbed.scenarios.phases.environment import Environment

    physics = EmulatedSite(12 * 3600.0)
    physics.add_prosumer("p1", prosumer_params(PVParams(rating_w=4000.0), None,
                                               MeterParams(v_noise=0.0), LoadParams()))
    env = Environment(physics, lambda t: 1000.0, lambda n, p, t: 900.0)
    env.step(12 * 3600.0 + 60, 60.0)  # no flow yet: the meter's own drop model
    s = physics.prosumers["p1"].state
    assert s.meter.voltage_v == pytest.approx(230.0 - 0.4 * s.meter.net_w / 1000.0)
    # a real battery discharging 1.5 kW beside it, the feeder at 1.031 p.u. at its bus
    env.step(12 * 3600.0 + 120, 60.0, vm_pu={"p1": 1.031},
             measured={"p1": {"battery": (1500.0, 0.0)}})
    s = physics.prosumers["p1"].state
    assert s.meter.voltage_v == pytest.approx(1.031 * 230.0)
    assert s.meter.net_w == pytest.approx(900.0 - s.pv.ac_w - 1500.0)
    assert s.t_s == 12 * 3600.0 + 120


# ---------------------------------------------------------------------- market round


async def test_market_round_auctions_a_shortfall_and_sets_the_batteries(tmp_path: Path) -> None:
    from testbed.scenarios.phases.market import MarketRound

    site = load_site("demo")
    layout = init_ledger(site, tmp_path / "ledger", seed=1, time=EPOCH - 1)
    keys = {p.name: layout.key(p.name) for p in site.prosumers}
    sc = Scenario.model_validate({"name": "m", "start": "12:00", "duration": "1h",
                                  "market": {"buy_price": 0.4}})
    store = RunStore(tmp_path / "run.db")
    clock = Clock(sc.start, 60.0, "fast", 1.0)
    schedule = Schedule(first_interval=48, interval_s=900, energy_kwh=(0.5, 0.5, 0.5))
    identities = genesis_state(layout.genesis()).identities
    market = MarketRound(sc, store, clock, MarketRules(interval_s=900), schedule,
                         layout.key("aggregator"), keys)
    batteries = {p.name: p.physics(0).battery for p in site.prosumers}
    async with EmbeddedBroker() as broker, BusClient(broker.url) as bus:
        await market.start(bus, site.name, lambda a: identities[a].public_key
                           if a in identities else None, batteries, None)
        try:
            for k in range(15):  # 12:00-12:15: 4.5 kW imported, 0.5 kWh scheduled
                clock.advance_to(sc.start + 60 * (k + 1))
                market.step(clock.sim_s, 60.0, 4500.0, dict.fromkeys(keys, 0.8))
            r = await asyncio.wait_for(market.interval_end(48, clock.sim_s, {}), 15)
        finally:
            await market.stop()
    # 1.125 kWh metered - 0.5 scheduled: a buy bid for 0.625 kWh, met by the batteries
    assert market.aggregator.requested_kwh[48] == pytest.approx(0.625)
    assert r.clearing is not None and r.clearing.cleared_energy_kwh == pytest.approx(0.625)
    assert sum(r.setpoints.values()) == pytest.approx(0.625 * 4 * 1000)  # W over 15 min
    assert market.counters["auctions"] == 1 and market.delivering == {48}
    rows = store.db.execute("SELECT COUNT(*), SUM(energy_kwh) FROM awards").fetchone()
    assert rows[0] == len(r.clearing.awards) and rows[1] == pytest.approx(0.625)
    store.close()
