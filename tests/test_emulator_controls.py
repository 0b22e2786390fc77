"""Legacy-map controls of the emulators as SunSpec clients use them (pysunspec2 and plain
pymodbus as the clients): power factor, reversion timers, SetOp, signed rates, and the
Modbus device identification (FC43/14, FC17) from model 1."""

from __future__ import annotations

import math

import pytest
import sunspec2.modbus.client as ss_client
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from sunspec2.modbus.modbus import ModbusClientException

from testbed.devices.site import BackgroundEmulators


@pytest.fixture
def em(site):
    with BackgroundEmulators(site, clock=False) as em:
        em.step(1.0, 2)
        yield em


def scan(em, name):
    ep = em.endpoints[name]
    dev = ss_client.SunSpecModbusClientDeviceTCP(slave_id=ep.unit, ipaddr=ep.host,
                                                 ipport=ep.port, timeout=10)
    dev.scan()
    return dev


def test_power_factor_setpoint_gives_vars_and_reverts(em):
    dev = scan(em, "pv")
    ctl, inv = dev.models[123][0], dev.models[103][0]
    ctl.OutPFSet.cvalue = -0.9  # under-excited: absorbs vars
    ctl.OutPFSet_Ena.value = 1
    ctl.OutPFSet_RvrtTms.value = 30
    ctl.write()
    em.step(1.0, 2)
    inv.read()
    p, q = inv.W.cvalue, inv.VAr.cvalue
    assert q == pytest.approx(-p * math.sqrt(1 - 0.81) / 0.9, rel=0.01)
    assert p <= 0.9 * 5000 + 1  # VA within the rating at PF 0.9
    assert abs(inv.PF.cvalue) == pytest.approx(90, abs=0.5)
    ctl.OutPFSet.cvalue = 0.5  # below the rated 0.9: refused
    with pytest.raises(ModbusClientException, match="exception: 3"):
        ctl.write()
    em.step(1.0, 29)  # the 30 s reversion time runs out
    ctl.read()
    inv.read()
    assert ctl.OutPFSet_Ena.value == 0 and inv.VAr.cvalue == 0
    dev.close()


def test_limit_and_storage_rates_revert_on_time(em):
    pv, bat = scan(em, "pv"), scan(em, "bat")
    ctl = pv.models[123][0]
    ctl.WMaxLimPct.cvalue, ctl.WMaxLim_Ena.value, ctl.WMaxLimPct_RvrtTms.value = 20, 1, 60
    ctl.write()
    stor = bat.models[124][0]
    stor.InOutWRte_RvrtTms.value = 45
    stor.OutWRte.cvalue, stor.StorCtl_Mod.value = 40, 2
    stor.write()
    em.step(1.0, 44)
    state = em.emulators.physics.prosumers["p1"].state
    assert state.pv.limit_enabled and state.battery.setpoint_w == pytest.approx(2000)
    em.step(1.0, 1)  # 45 s: the storage command reverts to holding
    state = em.emulators.physics.prosumers["p1"].state
    assert state.battery.setpoint_w == 0 and state.pv.limit_enabled
    em.step(1.0, 15)  # 60 s: the limit reverts
    ctl.read()
    stor.read()
    assert ctl.WMaxLim_Ena.value == 0 and stor.StorCtl_Mod.value == 0
    pv.close()
    bat.close()


def test_signed_rate_charges_and_setop_disconnects(em):
    dev = scan(em, "bat")
    stor, b802 = dev.models[124][0], dev.models[802][0]
    stor.OutWRte.cvalue, stor.StorCtl_Mod.value = -50, 2  # negative discharge = charge
    stor.write()
    em.step(1.0, 3)
    b802.read()
    assert b802.W.cvalue == pytest.approx(-2500, abs=5)  # 50 % of the 5000 W rating
    b802.SetOp.value = 2  # DISCONNECT
    b802.write()
    em.step(1.0, 3)
    b802.read()
    assert b802.W.cvalue == 0 and b802.State.value == 1  # DISCONNECTED
    b802.SetOp.value = 1
    b802.write()
    em.step(1.0, 3)
    b802.read()
    assert b802.W.cvalue == pytest.approx(-2500, abs=5)
    dev.close()


async def _identify(host, port, unit):
    client = AsyncModbusTcpClient(host, port=port)
    await client.connect()
    try:
        info = await client.read_device_information(read_code=3, object_id=0, device_id=unit)
        report = await client.report_device_id(device_id=unit)
        missing = await client.read_device_information(read_code=1, object_id=0, device_id=99)
        return info, report, missing
    finally:
        client.close()


def test_device_identification_comes_from_model_1(em):
    ep = em.endpoints["bat"]
    info, report, missing = em.call(_identify(ep.host, ep.port, ep.unit))
    assert not info.isError()
    assert info.information[0] == b"testbed"
    assert info.information[1] == b"Battery emulator"
    assert info.information[0x80] == b"TB-bat"
    assert b"Pymodbus" not in report.identifier
    assert report.identifier.startswith(b"testbed-Battery emulator")
    assert missing.isError() and missing.exception_code == ExcCodes.GATEWAY_NO_RESPONSE
