"""Closed loops: real devices beside emulated ones, the feeder's voltages back to the
devices, and the load-time rules that keep a fast clock off real hardware.

The "real" battery is served by a SunSpec server the run does not own (another
`SiteEmulators` on its own clock, as a lab rig would be); the run reads and commands it
through the same driver as any device."""

from __future__ import annotations

import copy
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from testbed.cli import app
from testbed.config import SiteConfig
from testbed.devices.site import BackgroundEmulators, SiteEmulators, open_devices
from testbed.grid.feeder import checker_for
from testbed.physics.models import clear_sky_irradiance
from testbed.scenarios.phases.devices import DeviceIO
from testbed.scenarios.phases.environment import Environment
from testbed.scenarios.phases.feeder import Feeder
from testbed.telemetry.store import RunStore

runner = CliRunner()
BATTERY = {"capacity_wh": 10000, "max_charge_w": 4000, "max_discharge_w": 4000,
           "soc_init": 0.8}


def _site(real_port: int | None = None, **house1: Any) -> dict[str, Any]:
    bat: dict[str, Any] = {"name": "house-1-battery", "kind": "battery", "port": 0, "unit": 2,
                           "params": BATTERY}
    if real_port is not None:
        bat = {**bat, "emulated": False, "port": real_port, "unit": 1, "timeout_s": 1.0}
    return {"name": "mixed", "prosumers": [
        {"name": "house-1", "load": {"base_w": 800, "peak_w": 800, "noise": 0},
         "devices": [{"name": "house-1-pv", "kind": "pv", "port": 0, "unit": 1},
                     bat, {"name": "house-1-meter", "kind": "meter", "port": 0, "unit": 3}]},
        {"name": "house-2", "load": {"base_w": 500, "peak_w": 500, "noise": 0},
         "devices": [{"name": "house-2-pv", "kind": "pv", "port": 0, "unit": 1},
                     {"name": "house-2-meter", "kind": "meter", "port": 0, "unit": 3}]}],
        **house1}


def _scenario(site: Path, **over: Any) -> dict[str, Any]:
    return {"name": "mixed", "site": str(site), "start": "12:00", "duration": "1h",
            "step": "60s", "seed": 3, "forecast": {"pv_bias_pct": 40},
            "profiles": {"load_noise": 0}, "ledger": {"enabled": False},
            "market": {"gate_s": 0.5, "buy_price": 0.4}, **over}


def _write(tmp_path: Path, site: dict[str, Any], sc: dict[str, Any]) -> Path:
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(site))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sc))
    return path


# ---------------------------------------------------------------------- load-time rules


@pytest.mark.parametrize("extra, expected", [
    ({"clock": {"mode": "fast"}}, r"clock.mode: a fast clock cannot drive real "
                                  r"devices (house-1-battery)"),
    ({"clock": {"mode": "realtime", "speed": 60},
      "events": [{"kind": "device-offline", "at": "12:10", "device": "house-1-battery"}]},
     r"events[0].device: device-offline can only fault an emulated device; "
     r"'house-1-battery' is real"),
])
def test_real_devices_refuse_a_fast_clock_and_device_events_before_anything_starts(
        tmp_path: Path, extra: dict[str, Any], expected: str) -> None:
    path = _write(tmp_path, _site(real_port=1502), _scenario(tmp_path / "site.yaml", **extra))
    out = tmp_path / "runs"
    res = runner.invoke(app, ["run", str(path), "--out", str(out), "-q"])
    assert res.exit_code == 2, res.output
    assert expected in " ".join(res.output.split())
    assert re.search(r"s\.yaml:\d+: ", res.output), res.output  # file and line named
    assert len(res.output.strip().splitlines()) <= 3  # one message, no traceback
    assert not out.exists()  # no folder, no run.db, no keys


@pytest.mark.parametrize("extra, expected", [
    ({"profiles": {"irradiance": {"file": "irr.csv"}}}, "irr.csv:2: time: the irradiance profile needs at least two rows"),
    ({"events": [{"kind": "load-spike", "at": "12:00", "prosumer": "house-9", "extra_w": 5}]},
     "load-spike for unknown prosumer 'house-9'"),
    ({"events": [{"kind": "message-loss", "at": "12:00", "prosumer": "house-9"}]},
     "events[0].prosumer: message-loss for unknown prosumer 'house-9'"),
])
def test_bad_profiles_and_events_leave_nothing_on_disk(tmp_path: Path, extra: dict[str, Any],
                                                       expected: str) -> None:
    (tmp_path / "irr.csv").write_text("time,w\n0,1\n")
    path = _write(tmp_path, _site(), _scenario(tmp_path / "site.yaml", **extra))
    out = tmp_path / "runs"
    res = runner.invoke(app, ["run", str(path), "--out", str(out), "-q"])
    assert res.exit_code == 2 and expected in " ".join(res.output.split()), res.output
    assert not out.exists()


# ---------------------------------------------------------------------- mixed site


def test_a_real_battery_closes_the_loop_with_its_emulated_meter_market_and_settlement(
        tmp_path: Path) -> None:
    rig = SiteConfig.model_validate({
        "name": "rig", "emulation": {"start": "12:00", "tick_s": 0.05, "speed": 1.0},
        "prosumers": [{"name": "rig", "devices": [
            {"name": "rig-battery", "kind": "battery", "port": 0, "unit": 1,
             "params": BATTERY}]}]})
    with BackgroundEmulators(rig) as lab:  # the independent SunSpec server (a lab rig)
        port = lab.endpoints["rig-battery"].port
        path = _write(tmp_path, _site(real_port=port), _scenario(
            tmp_path / "site.yaml", clock={"mode": "realtime", "speed": 600}))
        out = tmp_path / "runs"
        res = runner.invoke(app, ["run", str(path), "--out", str(out), "-q"])
        assert res.exit_code in (0, 1), res.output
    assert "real devices" in res.output and "house-1-battery" in res.output
    (d,) = out.iterdir()
    s = json.loads((d / "summary.json").read_text())
    links = s["devices"].pop("links")  # the emulators pipeline, the real battery does not
    assert s["devices"] == {"real": ["house-1-battery"], "unreached": []}
    assert links["pipelined"] == [
        {"devices": ["house-1-pv", "house-1-meter"], "in_flight": 2},
        {"devices": ["house-2-pv", "house-2-meter"], "in_flight": 2}]
    assert links["one_at_a_time"] == [["house-1-battery"]]
    db = sqlite3.connect(d / "run.db")

    def series(device: str, name: str) -> dict[float, float]:
        return dict(db.execute("SELECT t, value FROM measurements WHERE device = ? AND "
                               "name = ? ORDER BY t", (device, name)).fetchall())

    meter, pv = series("house-1-meter", "p_w"), series("house-1-pv", "p_w")
    bat = series("house-1-battery", "p_w")
    steps = sorted(meter)
    assert len(steps) == 60
    moved = 0
    for prev, t in zip(steps, steps[1:], strict=False):
        # the emulated meter: load 800 W - emulated PV - the real battery measured the
        # step before (registers are whole watts)
        assert meter[t] == pytest.approx(800.0 - pv[t] - bat[prev], abs=2.0), t
        moved += abs(bat[prev]) > 100
    assert moved >= 5  # the battery did move, and the meter saw it
    # the market dispatched the real battery through its driver
    setpoints = db.execute("SELECT COUNT(*) FROM events WHERE kind = 'setpoint' AND "
                           "subject = 'house-1-battery' AND detail != '0.0 W'").fetchone()[0]
    assert setpoints >= 1 and s["market"]["cleared"] >= 1
    # settlement paid what the battery's own readings show it delivered
    rows = db.execute("SELECT s.delivered_kwh, a.delivery, a.side FROM settlements s JOIN "
                      "awards a USING (request_id, order_id) WHERE s.prosumer = 'house-1'"
                      ).fetchall()
    assert rows
    for delivered, delivery, side in rows:
        lo, hi = delivery * 900, (delivery + 1) * 900
        p = [w for t, w in bat.items() if lo < t <= hi]
        metered = sum(max(0.0, w if side == "sell" else -w) for w in p) * 60 / 3.6e6
        assert delivered == pytest.approx(metered, abs=1e-9)
    assert any(r[0] > 0 for r in rows)


# ---------------------------------------------------------------------- feeder coupling


@pytest.mark.parametrize("meter_protocol", ["modbus", "opcua"])
async def test_feeder_voltage_goes_back_to_the_far_end_meter_and_inverter(
        tmp_path: Path, meter_protocol: str) -> None:
    import pandapower as pp

    meter: dict[str, Any] = {"name": "far-meter", "kind": "meter", "port": 0, "unit": 2}
    opcua: dict[str, Any] = {}
    if meter_protocol == "opcua":  # the meter's OPC UA voltage variable shows it too
        from testbed.devices.opcua import make_certificates
        make_certificates(tmp_path / "certs")
        meter = {"name": "far-meter", "kind": "meter", "protocol": "opcua", "port": 0}
        opcua = {"opcua": {"certs": str(tmp_path / "certs"), "username": "op",
                           "password": "pw-for-tests"}}
    site = SiteConfig.model_validate({
        "name": "far", "grid": {"buses": {"far": "Bus R18"}, "background": 0.3}, **opcua,
        "prosumers": [{"name": "far", "load": {"base_w": 300, "peak_w": 300, "noise": 0},
                       "devices": [
                           {"name": "far-pv", "kind": "pv", "port": 0, "unit": 1,
                            "params": {"rating_w": 30000, "ramp_pct_per_s": 100}},
                           meter]}]})
    store = RunStore(tmp_path / "run.db")
    em = SiteEmulators(site, free_ports=True, start_s=12 * 3600.0)
    await em.start(clock=False)
    env = Environment(em.physics, clear_sky_irradiance, lambda n, p, t: 300.0)
    checker = checker_for(site)
    feeder = Feeder(checker, background=0.3)
    io = DeviceIO(site, open_devices(em.resolved_site()), store, em)
    await io.connect()

    def registers(t: float) -> dict[str, float]:
        return {d: v for d, v in store.db.execute(
            "SELECT device, value FROM measurements WHERE t = ? AND name = 'voltage_v'",
            (t,))}

    try:
        vm: dict[str, float] = {}
        t = 12 * 3600.0
        q: dict[str, float] = {}
        for k in range(8):
            t += 60.0
            env.step(t, 60.0, vm_pu=vm)
            r = await io.step(t, 60.0)
            if vm:  # last step's flow voltage, in the registers (0.1 V resolution)
                v = registers(t)
                assert v["far-meter"] == pytest.approx(vm["far"] * 230.0, abs=0.051), k
                assert v["far-pv"] == pytest.approx(vm["far"] * 230.0, abs=0.051), k
            p = {"far": r.metered["far"].injection_w}
            if k == 5:  # the inverter absorbs 20 kvar: what does runpp say?
                q = {"far": -20000.0}
                exporting = vm["far"]
            flow = feeder.step(t, 60.0, p, q)
            assert p["far"] > 20000  # exporting hard at noon
            net = copy.deepcopy(checker.net)
            net.load.scaling *= 0.3
            net.sgen.scaling *= 0.3
            pp.create_sgen(net, checker.connections[0].bus, p_mw=p["far"] / 1e6,
                           q_mvar=q.get("far", 0.0) / 1e6)
            pp.runpp(net, numba=False)
            assert flow.vm_pu["far"] == pytest.approx(
                net.res_bus.vm_pu[checker.connections[0].bus], abs=1e-6)
            if k == 5:
                assert flow.vm_pu["far"] < vm["far"] - 0.004  # absorbing vars pulls V down
            vm = dict(flow.vm_pu)
        idle = checker.prosumer_vm(checker.check({"far": 0.0}, background=0.3))["far"]
        assert exporting > idle + 0.01  # the export raised the far end's voltage
    finally:
        await io.close()
        await em.stop()
        store.close()


def test_grid_check_counts_reactive_power_in_violations_and_their_causes() -> None:
    site = SiteConfig.model_validate({
        "name": "far", "grid": {"buses": {"far": "Bus R18"}, "background": 0.3,
                                "limits": {"plan_vm_max_pu": 0.99, "enforce": "planning"}},
        "prosumers": [{"name": "far", "devices": [
            {"name": "far-meter", "kind": "meter", "port": 0, "unit": 2}]}]})
    c = checker_for(site)
    awards = {"o1": ("far", 15000.0)}

    def far_end(r: Any) -> list[Any]:
        return [v for v in r.violations if v.element == "Bus R18"]

    unity = c.check({"far": 15000.0}, awards, background=0.3)
    (v,) = far_end(unity)
    assert v.kind == "voltage_high" and not v.pre_existing
    assert [x.award for x in v.causes] == ["o1"] and not unity.acceptable
    absorbing = c.check({"far": 15000.0}, awards, background=0.3, base_q={"far": -30000.0})
    assert far_end(absorbing) == []  # the same export, 30 kvar absorbed: the far end is fine
    assert c.prosumer_vm(absorbing)["far"] < 0.99 < c.prosumer_vm(unity)["far"]
