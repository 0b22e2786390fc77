"""pysunspec2's own client (not our code) against the emulators: discovery, values, controls."""

from __future__ import annotations

import pytest
import sunspec2.modbus.client as ss_client
from sunspec2.modbus.modbus import ModbusClientException

from testbed.devices.site import BackgroundEmulators


@pytest.fixture
def emulators(site):
    with BackgroundEmulators(site, clock=False) as em:
        em.step(1.0, 2)
        yield em


def ss_device(em: BackgroundEmulators, name: str) -> ss_client.SunSpecModbusClientDeviceTCP:
    ep = em.endpoints[name]
    dev = ss_client.SunSpecModbusClientDeviceTCP(slave_id=ep.unit, ipaddr=ep.host, ipport=ep.port, timeout=2)
    dev.scan()
    return dev


def physics(em: BackgroundEmulators):
    return em.emulators.physics.prosumers["p1"].state


def test_scan_finds_the_models_of_each_device(emulators):
    found = {}
    for name in ("pv", "bat", "meter"):
        dev = ss_device(emulators, name)
        found[name] = [k for k in dev.models if isinstance(k, int)]
        common = dev.models[1][0]
        assert common.Mn.cvalue == "testbed"
        assert common.SN.cvalue == f"TB-{name}"
        dev.close()
    assert found == {"pv": [1, 103, 120, 123], "bat": [1, 802, 124], "meter": [1, 203]}


def test_inverter_ac_power_matches_irradiance_rating_efficiency(emulators):
    dev = ss_device(emulators, "pv")
    s = physics(emulators)
    inv, plate = dev.models[103][0], dev.models[120][0]
    expected = min(5000.0, 1.1 * 5000 * s.irradiance_w_m2 / 1000 * 0.96)
    assert inv.W.cvalue == pytest.approx(expected, abs=1.0)
    assert plate.WRtg.cvalue == 5000
    assert inv.St.value == 4  # MPPT (noon, not curtailed)
    dev.close()


def test_meter_registers_increase_and_net_power_balances(emulators):
    dev = ss_device(emulators, "meter")
    meter = dev.models[203][0]
    s = physics(emulators)
    assert meter.W.cvalue == pytest.approx(s.load_w - s.pv.ac_w - s.battery.power_w, abs=1.0)
    assert meter.W.cvalue < 0  # noon: PV exceeds the 500 W load -> export
    exp0, imp0 = meter.TotWhExp.cvalue, meter.TotWhImp.cvalue
    assert imp0 == 1_000_000  # a meter in service; SunSpec reads an accumulator of 0 as unset
    assert exp0 == int(s.meter.export_wh) > 500_000
    emulators.step(10.0, 60)  # 10 minutes
    meter.read()
    assert meter.TotWhExp.cvalue - exp0 == pytest.approx(-meter.W.cvalue / 6, abs=5)
    assert meter.TotWhImp.cvalue == imp0
    assert meter.Hz.cvalue == pytest.approx(50.0, abs=0.1)
    dev.close()


def test_curtailment_written_with_pysunspec2_changes_output(emulators):
    dev = ss_device(emulators, "pv")
    ctl, inv = dev.models[123][0], dev.models[103][0]
    ctl.WMaxLimPct.cvalue = 30
    ctl.WMaxLim_Ena.value = 1
    ctl.write()
    emulators.step(1.0, 10)  # ramp 10 %/s: 100 % -> 30 % takes 7 s
    inv.read()
    assert inv.W.cvalue == pytest.approx(1500, abs=1)
    assert inv.St.value == 5  # THROTTLED
    ctl.Conn.value = 0  # DISCONNECT
    ctl.write()
    emulators.step(1.0)
    inv.read()
    assert inv.W.cvalue == 0 and inv.St.value == 1  # OFF
    ctl.Conn.value = 7  # not a Conn symbol
    with pytest.raises(ModbusClientException, match="exception: 3"):
        ctl.write()
    dev.close()


def test_battery_setpoint_written_with_pysunspec2_changes_soc(emulators):
    dev = ss_device(emulators, "bat")
    bat, stor = dev.models[802][0], dev.models[124][0]
    soc0 = bat.SoC.cvalue
    stor.OutWRte.cvalue = 40  # 40 % of 5000 W discharge
    stor.StorCtl_Mod.value = 2  # DISCHARGE
    stor.write()
    emulators.step(60.0, 30)  # 30 minutes
    bat.read()
    assert bat.W.cvalue == pytest.approx(2000, abs=1)
    # eq. 6: 1000 Wh delivered at eta_dis 0.9 from 10 kWh -> SOC falls 11.1 points
    assert bat.SoC.cvalue == pytest.approx(soc0 - 100 * 1000 / (0.9 * 10000), abs=0.15)
    assert bat.ChaSt.value == 3  # DISCHARGING
    dev.close()


def test_out_of_range_control_is_an_illegal_value_and_changes_nothing(emulators):
    dev = ss_device(emulators, "bat")
    stor, bat = dev.models[124][0], dev.models[802][0]
    stor.OutWRte.cvalue = 150
    with pytest.raises(ModbusClientException, match="exception: 3"):
        stor.write()
    stor.read()
    assert stor.OutWRte.cvalue == 0
    assert physics(emulators).battery.setpoint_w == 0
    emulators.step(60.0, 5)
    bat.read()
    assert bat.W.cvalue == 0
    dev.close()


def test_clamped_setpoint_is_visible_in_status(emulators):
    dev = ss_device(emulators, "bat")
    stor, bat = dev.models[124][0], dev.models[802][0]
    stor.InWRte.cvalue = 100  # 4000 W charge
    stor.StorCtl_Mod.value = 1
    stor.write()
    emulators.step(60.0, 120)  # 2 h: hits SOC_max (0.95) from 0.5
    bat.read()
    assert bat.SoC.cvalue == pytest.approx(95.0, abs=0.1)
    assert bat.W.cvalue == 0
    assert bat.State.value == 5  # SOC PROTECTION
    assert bat.Evt1.value & (1 << 16)  # OVER_SOC_MAX_WARNING
    dev.close()
