"""Emulated IEEE 1547-2018 inverters and batteries (701-713) through pysunspec2's client
and against OpenDER's own computation."""

from __future__ import annotations

import pytest
import sunspec2.modbus.client as ss_client
from conftest import make_site
from sunspec2.modbus.modbus import ModbusClientException

from testbed.config import SiteConfig
from testbed.devices.emulator import EmulatedSite, prosumer_params
from testbed.devices.emulator1547 import Q_MAX_PU
from testbed.devices.site import BackgroundEmulators
from testbed.physics.der1547 import VOLT_VAR_B, Der1547, Settings1547, volt_var_q_pu
from testbed.physics.models import BatteryParams, PVParams


def site_1547(maps: str = "ieee1547") -> SiteConfig:
    raw = make_site().model_dump(mode="json", exclude_defaults=True)
    for d in raw["prosumers"][0]["devices"]:
        if d["kind"] in ("pv", "battery"):
            d["emulated_models"] = maps
    return SiteConfig.model_validate(raw)


@pytest.fixture
def em():
    with BackgroundEmulators(site_1547(), clock=False) as em:
        em.step(1.0, 2)
        yield em


def scan(em: BackgroundEmulators, name: str) -> ss_client.SunSpecModbusClientDeviceTCP:
    ep = em.endpoints[name]
    dev = ss_client.SunSpecModbusClientDeviceTCP(slave_id=ep.unit, ipaddr=ep.host,
                                                 ipport=ep.port, timeout=10)
    dev.scan()
    return dev


def violations(group, path: str = "") -> list[str]:
    """Every point whose value breaks its definition (enum symbols, bitfield bits)."""
    bad = []
    for name, p in group.points.items():
        v = p.value
        if v is None:
            if p.pdef.get("mandatory") == "M" and p.pdef.get("type") != "pad":
                bad.append(f"{path}{name}: mandatory point not implemented")
            continue
        symbols = {s["value"] for s in p.pdef.get("symbols", [])}
        t = p.pdef["type"]
        if t.startswith("enum") and symbols and v not in symbols:
            bad.append(f"{path}{name}={v} not in {sorted(symbols)}")
        if t.startswith("bitfield") and symbols and v & ~sum(1 << b for b in symbols):
            bad.append(f"{path}{name}={v:#x} has undefined bits")
    for gname, g in group.groups.items():
        for i, sub in enumerate(g if isinstance(g, list) else [g], 1):
            bad += violations(sub, f"{path}{gname}[{i}].")
    return bad


def test_pysunspec2_scans_1547_inverter_and_battery_without_violations(em):
    trips = [707, 708, 709, 710]
    expected = {"pv": [1, 701, 704, 702, 703, 705, 706, 711, 712, *trips],
                "bat": [1, 701, 704, 713, 702, 703, 705, 711, *trips]}
    for name, models in expected.items():
        dev = scan(em, name)
        assert [k for k in dev.models if isinstance(k, int)] == models
        for mid in models:
            model = dev.models[mid][0]
            assert violations(model) == [], (name, mid)
            assert model.len == model.model_len  # L as the definition with its groups
        vv = dev.models[705][0]
        assert len(vv.Crv) == 3 and len(vv.Crv[0].Pt) == 4
        assert [round(p.V.cvalue, 1) for p in vv.Crv[0].Pt] == [92.0, 98.0, 102.0, 108.0]
        dev.close()


def test_legacy_and_both_maps(site):
    with BackgroundEmulators(site_1547("both"), clock=False) as em:
        dev = scan(em, "pv")
        assert [k for k in dev.models if isinstance(k, int)] == [
            1, 103, 120, 123, 701, 704, 702, 703, 705, 706, 711, 712, 707, 708, 709, 710]
        ctl = dev.models[123][0]  # a legacy client's PF command drives the 1547 behaviour
        ctl.OutPFSet.cvalue, ctl.OutPFSet_Ena.value = -0.9, 1
        ctl.write()
        em.step(1.0, 20)
        m701, m103 = dev.models[701][0], dev.models[103][0]
        m701.read()
        m103.read()
        assert m701.Var.cvalue == pytest.approx(-m701.W.cvalue * 0.4843, rel=0.02)
        assert m103.VAr.cvalue == pytest.approx(m701.Var.cvalue, abs=20)
        vv = dev.models[705][0]
        vv.Ena.value = 1  # a second reactive power mode beside 123's PF
        with pytest.raises(ModbusClientException):
            vv.write()
        dev.close()
    with BackgroundEmulators(site, clock=False) as em:  # default stays legacy
        dev = scan(em, "pv")
        assert [k for k in dev.models if isinstance(k, int)] == [1, 103, 120, 123]
        dev.close()


def test_curve_adoption_as_svp_drives_it_and_volt_var_q(em):
    dev = scan(em, "pv")
    vv = dev.models[705][0]
    crv = vv.Crv[1]  # entry 2: writable
    for pt, (v, q) in zip(crv.Pt, ((90, 100), (97, 0), (103, 0), (107, -100)), strict=True):
        pt.V.cvalue, pt.Var.cvalue = v, q
    crv.write()
    vv.AdptCrvReq.value = 2
    vv.write()
    vv.read()
    assert vv.AdptCrvRslt.value == 1  # COMPLETED
    assert [p.V.cvalue for p in vv.Crv[0].Pt] == [90, 97, 103, 107]
    vv.Ena.value = 1
    vv.write()
    inv = em.emulators.physics.devices["pv"]
    em.call(_hold(inv, 230 * 1.05))
    em.step(1.0, 30)  # six open-loop response times of 5 s
    m701 = dev.models[701][0]
    m701.read()
    q_pu = volt_var_q_pu(((0.90, 0.44), (0.97, 0.0), (1.03, 0.0), (1.07, -0.44)), 1.05)
    # 2 % of the rating (100 var), tighter than IEEE 1547-2018 Table 3's 5 % for Q
    assert m701.Var.cvalue == pytest.approx(q_pu * 5000, abs=100)
    assert m701.Var.cvalue < -1000
    dev.close()


async def _hold(dev, v=None, f=None):
    dev.set_terminal(v, f)


def test_write_the_behaviour_cannot_honour_is_refused_and_changes_nothing(em):
    dev = scan(em, "pv")
    vv = dev.models[705][0]
    before = [p.V.cvalue for p in vv.Crv[0].Pt]
    crv = vv.Crv[1]
    crv.Pt[1].V.cvalue, crv.Pt[2].V.cvalue = 99, 95  # not ascending
    crv.write()
    vv.AdptCrvReq.value = 2
    with pytest.raises(ModbusClientException, match="ILLEGAL_DATA_VALUE|Illegal|exception 3|3"):
        vv.write()
    vv.read()
    assert [p.V.cvalue for p in vv.Crv[0].Pt] == before
    assert vv.AdptCrvReq.value == 0
    vv.Crv[0].Pt[0].V.cvalue = 95  # the active curve is read-only
    with pytest.raises(ModbusClientException):
        vv.Crv[0].write()
    ctl = dev.models[704][0]
    ctl.PFWInjEna.value = 1
    ctl.write()
    vv.Ena.value = 1  # a second reactive power mode
    with pytest.raises(ModbusClientException):
        vv.write()
    vv.read()
    assert vv.Ena.value == 0
    dev.close()


def test_limit_reverts_when_its_timer_ends(em):
    dev = scan(em, "pv")
    ctl = dev.models[704][0]
    ctl.WMaxLimPctRvrtTms.value = 20
    ctl.WMaxLimPctRvrt.cvalue = 100
    ctl.WMaxLimPctEnaRvrt.value = 0
    ctl.WMaxLimPct.cvalue = 40
    ctl.WMaxLimPctEna.value = 1
    ctl.write()
    em.step(1.0, 15)
    ctl.read()
    m701 = dev.models[701][0]
    m701.read()
    assert ctl.WMaxLimPctEna.value == 1 and 4 <= ctl.WMaxLimPctRvrtRem.value <= 6
    assert m701.W.cvalue == pytest.approx(2000, abs=100)
    em.step(1.0, 6)  # the timer ends: the limit reverts
    ctl.read()
    assert ctl.WMaxLimPctEna.value == 0 and ctl.WMaxLimPct.cvalue == 100
    assert ctl.WMaxLimPctRvrtRem.value == 0
    em.step(1.0, 20)
    m701.read()
    assert m701.W.cvalue > 4500
    dev.close()


def test_battery_follows_wset_and_shows_soc():
    with BackgroundEmulators(site_1547(), clock=False) as em:
        dev = scan(em, "bat")
        ctl = dev.models[704][0]
        ctl.WSet.cvalue = -2000
        ctl.WSetEna.value = 1
        ctl.write()
        em.step(1.0, 60)
        m701, m713 = dev.models[701][0], dev.models[713][0]
        m701.read()
        m713.read()
        assert m701.W.cvalue == pytest.approx(-2000, abs=10)
        assert m713.SoC.cvalue > 50.0
        ctl.WSet.cvalue = 9000  # beyond the discharge rating
        with pytest.raises(ModbusClientException):
            ctl.write()
        dev.close()


def test_emulated_q_matches_openders_own_computation():
    """The emulator's volt-var Q step by step against a bare OpenDER with the same curve."""
    site = EmulatedSite()
    site.add_prosumer("p", prosumer_params(PVParams(rating_w=5000), BatteryParams()))
    inv = site.add_device("inv", "pv", "p", maps="ieee1547")
    inv.write_point(705, "Ena", 1)
    ref = Der1547("pv", 5000.0, q_max_pu=Q_MAX_PU, settings=Settings1547(volt_var=VOLT_VAR_B,
                                                                          es_delay_s=0.0))
    got, want = [], []
    for k in range(40):
        v = 230 * (1.0 + 0.08 * (k >= 5) - 0.16 * (k >= 25))
        inv.set_terminal(v)
        site.step(1.0)
        pv = site.prosumers["p"].state.pv
        got.append(pv.q_var)
        want.append(ref.step(1.0, v=v, f_hz=50.0, p_w=min(5000.0, 5500 * site.irradiance(
            site.t_s) / 1000 * 0.96))[1])
    assert got == pytest.approx(want, abs=1e-6)
    assert min(got) < -2000 and max(got) > 1500  # both halves of the curve were exercised


def test_scenario_voltage_and_frequency_events_drive_the_terminals():
    from testbed.scenarios.model import Scenario
    from testbed.scenarios.phases.environment import Environment

    sc = Scenario.model_validate({
        "name": "steps", "site": "demo", "start": "12:00", "duration": "1h", "step": "1s",
        "events": [{"kind": "voltage-step", "at": "12:01", "duration": "1m", "v_pu": 1.08},
                   {"kind": "voltage-ramp", "at": "12:03", "duration": "100s", "from_pu": 1.0,
                    "to_pu": 0.92, "prosumer": "p"},
                   {"kind": "frequency-step", "at": "12:06", "duration": "1m", "f_hz": 50.5}]})
    site = EmulatedSite()
    site.add_prosumer("p", prosumer_params(PVParams(rating_w=5000), None))
    inv = site.add_device("inv", "pv", "p", maps="ieee1547")
    inv.write_point(705, "Ena", 1)
    inv.write_point(711, "Ena", 1)
    env = Environment(site, lambda t: 1000.0, lambda n, p, t: 0.0, events=sc.events)
    assert env.grid_at(12 * 3600 + 30, {}) == ({}, {})
    assert env.grid_at(12 * 3600 + 230, {"p": 231.0})[0]["p"] == pytest.approx(230 * 0.96)
    t = 12 * 3600.0
    seen = {}
    while t < 12 * 3600 + 420:
        t += 1.0
        env.step(t, 1.0)
        seen[round(t)] = (site.prosumers["p"].state.pv.ac_w, site.prosumers["p"].state.pv.q_var)
    at = 12 * 3600
    assert seen[at + 119][1] == pytest.approx(-0.44 * 5000, rel=0.02)  # 1.08 p.u.: full absorb
    q = [seen[at + k][1] for k in (230, 250, 279)]  # the ramp passes 0.98 p.u. at 205 s
    assert 0 < q[0] < q[1] < q[2] and q[2] > 0.35 * 5000  # injection grows with the ramp
    p_droop = seen[at + 419][0]  # 50.5 Hz: droop takes (0.5 - 0.036) / (50 x 0.05) of rating
    assert p_droop == pytest.approx(5000 * (1 - 0.464 / 2.5), abs=0.02 * 5000)


def test_adopted_must_trip_curve_trips_and_the_default_rides_through(em):
    dev = scan(em, "pv")
    hv = dev.models[708][0]
    assert [round(p.V.cvalue, 1) for p in hv.Crv[0].MustTrip.Pt] == [110.0, 120.0]
    inv = em.emulators.physics.devices["pv"]
    m701 = dev.models[701][0]
    em.call(_hold(inv, 230 * 1.09))
    em.step(1.0, 5)
    m701.read()
    assert m701.InvSt.value == 3 and m701.W.cvalue > 4000  # 1.09 p.u. is inside the default
    curve = hv.Crv[1].MustTrip
    curve.Pt[0].V.cvalue, curve.Pt[0].Tms.cvalue = 108.0, 1.0  # below 1547's OV1 range
    curve.Pt[1].V.cvalue, curve.Pt[1].Tms.cvalue = 120.0, 0.16
    hv.Crv[1].write()
    hv.AdptCrvReq.value = 2
    with pytest.raises(ModbusClientException):
        hv.write()
    em.step(1.0, 3)
    m701.read()
    assert m701.InvSt.value == 3  # nothing changed: still riding through 1.09 p.u.
    em.call(_hold(inv, 230 * 1.115))  # above OV1 (1.10) ...
    em.step(1.0, 1)
    m701.read()
    assert m701.InvSt.value == 7  # ... for less than its 2 s: momentary cessation (STANDBY)
    curve.Pt[0].V.cvalue, curve.Pt[0].Tms.cvalue = 111.0, 1.0  # OV1 1.11 p.u., 1 s
    hv.Crv[1].write()
    hv.AdptCrvReq.value = 2
    hv.write()
    em.call(_hold(inv, 230 * 1.105))
    em.step(1.0, 4)
    m701.read()
    assert m701.InvSt.value != 0  # 1.105 p.u. is below the adopted OV1 1.11: no trip
    em.call(_hold(inv, 230 * 1.12))
    em.step(1.0, 3)
    m701.read()
    assert m701.InvSt.value == 0 and m701.W.cvalue == 0 and m701.ConnSt.value == 0  # tripped
    hv.read()
    assert [p.V.cvalue for p in hv.Crv[0].MustTrip.Pt] == [111.0, 120.0]
    hv.Ena.value = 0
    with pytest.raises(ModbusClientException):
        hv.write()
    dev.close()


@pytest.mark.parametrize("device, message", [
    ({"name": "x", "kind": "pv", "protocol": "opcua", "port": 0, "emulated_models": "ieee1547"},
     "served by emulated Modbus devices only"),
    ({"name": "x", "kind": "pv", "port": 0, "emulated_functions": ["volt-var"]},
     "emulated_functions need emulated_models: ieee1547 or both"),
    ({"name": "x", "kind": "battery", "port": 0, "emulated_models": "ieee1547",
      "emulated_functions": ["volt-watt"]}, "a battery emulator serves volt-var and freq-droop"),
    ({"name": "x", "kind": "pv", "port": 0, "emulated_models": "1547"}, "emulated_models"),
])
def test_site_file_errors_name_the_field(tmp_path, device, message):
    import yaml

    from testbed.config import ConfigError, load_site

    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "prosumers": [{"name": "p",
                                                                 "devices": [device]}]}))
    with pytest.raises(ConfigError) as err:
        load_site(str(path))
    text = " ".join(str(err.value).split())
    assert str(path) in text and message in text


def test_grid_event_naming_an_unknown_prosumer_is_refused_before_the_run():
    from testbed.config import ConfigError, load_site
    from testbed.scenarios.engine import check_rules
    from testbed.scenarios.model import Scenario

    sc = Scenario.model_validate({
        "name": "steps", "site": "demo", "start": "12:00", "duration": "1h",
        "events": [{"kind": "voltage-step", "at": "12:01", "v_pu": 1.08, "prosumer": "nobody"}]})
    with pytest.raises(ConfigError, match=r"events\[0\].prosumer: voltage-step names unknown "
                                          r"prosumer 'nobody'"):
        check_rules(sc, load_site("demo"))
