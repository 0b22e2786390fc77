"""Our SunSpec driver against real Modbus TCP servers on loopback."""

from __future__ import annotations

import asyncio

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from testbed.devices.driver import DeviceKind, DeviceUnavailable, NotSunSpec, SetpointRejected
from testbed.devices.emulator import EmulatedSite
from testbed.devices.modbus import ModbusEmulatorServer, ModbusLink, SunSpecDevice, plan_reads, scan
from testbed.devices.site import SiteEmulators, open_devices
from testbed.devices.sunspec import RegisterMap


@pytest.fixture
async def running(site):
    em = SiteEmulators(site, free_ports=True)
    await em.start(clock=False)
    em.physics.step(1.0)
    yield em
    await em.stop()


async def test_reads_every_kind_through_one_shared_connection(running):
    devs = open_devices(running.resolved_site())
    assert len({id(d.link) for d in devs.values()}) == 1  # units 1-3 behind one port
    for d in devs.values():
        await d.connect()
    pv, bat, meter = [await devs[n].read() for n in ("pv", "bat", "meter")]
    s = running.physics.prosumers["p1"].state
    assert pv.kind is DeviceKind.PV and pv.values["p_w"] == pytest.approx(s.pv.ac_w, abs=1)
    assert pv.values["rating_w"] == 5000 and pv.status["state"] == "MPPT"
    assert bat.values["soc_pct"] == pytest.approx(50.0, abs=0.1)
    assert bat.values["max_charge_w"] == 4000 and bat.values["max_discharge_w"] == 5000
    assert meter.values["p_w"] == pytest.approx(s.meter.net_w, abs=1)
    assert meter.values["import_wh"] == 1_000_000
    assert meter.values["voltage_v"] == pytest.approx(s.meter.voltage_v, abs=0.05)
    await devs["pv"].close()


async def test_each_poll_is_one_request():
    site = EmulatedSite()
    from testbed.devices.emulator import prosumer_params
    from testbed.physics.models import BatteryParams, PVParams
    site.add_prosumer("x", prosumer_params(PVParams(), BatteryParams()))
    devs = {k: site.add_device(f"x-{k}", k, "x") for k in ("pv", "battery", "meter")}
    for kind, expected in (("pv", [(40070, 106)]), ("battery", [(40070, 90)]), ("meter", [(40070, 107)])):
        async with ModbusEmulatorServer("127.0.0.1", 0, {1: devs[kind]}) as srv:
            d = SunSpecDevice(kind, ModbusLink("127.0.0.1", srv.port), 1)
            await d.connect()
            assert d._reads == expected, kind  # 103..123 in one request; 1 and 120 read once
            await d.close()


def test_plan_reads_splits_at_125_registers():
    from testbed.devices.modbus import DiscoveredModel
    models = [DiscoveredModel(1, 40002, 66, None), DiscoveredModel(203, 40070, 105, None),
              DiscoveredModel(160, 40177, 200, None)]
    assert plan_reads(models, {203, 160}) == [(40070, 107), (40177, 125), (40302, 77)]
    assert plan_reads(models, {1, 203}) == [(40002, 68), (40070, 107)]
    short = [DiscoveredModel(103, 40070, 50, None), DiscoveredModel(120, 40122, 26, None),
             DiscoveredModel(123, 40150, 24, None)]
    assert plan_reads(short, {103, 123}) == [(40070, 106)]  # 120 read along: one request


async def test_setpoints_change_the_physics(running):
    devs = open_devices(running.resolved_site())
    bat, pv = devs["bat"], devs["pv"]
    await bat.connect()
    await pv.connect()
    await bat.write("power_w", -2000)
    await pv.write("limit_pct", 50)
    running.physics.step(10.0)
    s = running.physics.prosumers["p1"].state
    assert s.battery.setpoint_w == pytest.approx(-2000, abs=1)
    assert s.battery.power_w == pytest.approx(-2000, abs=1)
    assert s.pv.limit_enabled and s.pv.limit_pct == 50
    r = await bat.read()
    assert r.values["p_w"] == pytest.approx(-2000, abs=1) and r.status["charge_status"] == "CHARGING"
    await bat.write("power_w", 0)
    running.physics.step(1.0)
    assert running.physics.prosumers["p1"].state.battery.power_w == 0
    # OutWRte and InWRte sit in adjacent registers: one request; StorCtl_Mod another
    before = bat.link.requests
    await bat.write("power_w", 2500)
    assert bat.link.requests - before == 2
    running.physics.step(10.0)
    assert running.physics.prosumers["p1"].state.battery.power_w == pytest.approx(2500, abs=1)
    await bat.close()


async def test_out_of_range_setpoints_are_refused_and_change_nothing(running):
    devs = open_devices(running.resolved_site())
    bat, pv = devs["bat"], devs["pv"]
    await bat.connect()
    await pv.connect()
    with pytest.raises(SetpointRejected, match=r"power_w 6000 W outside -4000 \(charge\) .. \+5000"):
        await bat.write("power_w", 6000)
    # past our own check, the device itself answers exception 03
    with pytest.raises(SetpointRejected, match=r"exception 03 \(illegal data value\)"):
        await pv.write("123.WMaxLimPct", 120)
    with pytest.raises(SetpointRejected, match="read-only"):
        await pv.write("103.W", 10)
    with pytest.raises(SetpointRejected, match="no such point"):
        await pv.write("Watts", 10)
    s = running.physics.prosumers["p1"].state
    assert s.battery.setpoint_w == 0 and s.pv.limit_pct == 100 and not s.pv.limit_enabled
    await bat.close()


async def test_raw_modbus_writes_get_modbus_exceptions(running):
    ep = running.endpoints["bat"]
    dev = running.devices["bat"]
    out_wrte = dev.map.address_of(124, "OutWRte")
    before = list(dev.map.registers)
    client = AsyncModbusTcpClient(ep.host, port=ep.port)
    await client.connect()
    rr = await client.write_register(out_wrte, 2000, device_id=ep.unit)  # 200.0 %
    assert rr.isError() and rr.exception_code == ExcCodes.ILLEGAL_VALUE
    rr = await client.write_register(dev.map.address_of(802, "SoC"), 100, device_id=ep.unit)
    assert rr.isError() and rr.exception_code == ExcCodes.ILLEGAL_ADDRESS  # read-only point
    rr = await client.write_register(dev.map.address_of(124, "StorCtl_Mod"), 0b100, device_id=ep.unit)
    assert rr.isError() and rr.exception_code == ExcCodes.ILLEGAL_VALUE  # undefined bit
    rr = await client.read_holding_registers(40000, count=2, device_id=99)
    assert rr.isError() and rr.exception_code == ExcCodes.GATEWAY_NO_RESPONSE  # unknown unit
    client.close()
    assert dev.map.registers[: len(before)] == before
    assert running.physics.prosumers["p1"].state.battery.setpoint_w == 0


async def test_driver_survives_emulator_restart(running):
    site = running.resolved_site()
    ep = running.endpoints["meter"]
    meter = open_devices(site, ["meter"])["meter"]
    meter.link.backoff_s = 0.05
    await meter.connect()
    first = await meter.read()
    await running.stop()
    with pytest.raises(DeviceUnavailable, match=rf"meter \(127.0.0.1:{ep.port} unit 3\)"):
        await meter.read()
    with pytest.raises(DeviceUnavailable):  # still down: fails fast, names the endpoint
        await meter.read()
    server = ModbusEmulatorServer(ep.host, ep.port, {ep.unit: running.devices["meter"]})
    await server.start()
    try:
        running.physics.step(60.0)
        for _ in range(100):
            try:
                again = await meter.read()
                break
            except DeviceUnavailable:
                await asyncio.sleep(0.05)
        else:
            pytest.fail("driver did not reconnect")
        assert again.values["export_wh"] > first.values["export_wh"]
    finally:
        await server.stop()
        await meter.close()


async def test_scan_of_a_non_sunspec_port_says_so():
    plain = SimDevice(1, [SimData(0, values=[1, 2, 3, 4], datatype=DataType.REGISTERS)])
    server = ModbusTcpServer([plain], address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    port = server.transport.sockets[0].getsockname()[1]
    try:
        with pytest.raises(NotSunSpec, match=r"no SunSpec device .*40000: exception 02; "
                                             r"0: 0x0001 0x0002 is not 'SunS'; 50000: exception 02"):
            await scan("127.0.0.1", port, 1)
    finally:
        await server.shutdown()


async def test_a_silent_base_address_is_not_a_failure():
    """40000 never answers (times out); the map is found at 50000."""
    m = RegisterMap.build([1, 203], base=50000)
    m.set_raw(1, "Mn", "elsewhere")

    async def silent_at_40000(fc, start, address, count, regs, values):
        if address == 40000:
            await asyncio.sleep(5)
        return None

    dev = SimDevice(1, [SimData(40000, values=[0, 0], datatype=DataType.REGISTERS),
                        SimData(50000, values=m.registers, datatype=DataType.REGISTERS)],
                    action=silent_at_40000)
    server = ModbusTcpServer([dev], address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    port = server.transport.sockets[0].getsockname()[1]
    try:
        link = ModbusLink("127.0.0.1", port, timeout_s=0.3)
        d = SunSpecDevice("m", link, 1)
        await d.connect()
        assert d.base == 50000 and [x.id for x in d.models] == [1, 203] and d.kind is DeviceKind.METER
        r = await d.read()
        assert r.values["p_w"] is None  # the map exists but nothing measured yet: not implemented
        link.close()
    finally:
        await server.shutdown()


async def test_connection_refused_is_a_clear_error():
    link = ModbusLink("127.0.0.1", 1, timeout_s=0.5)
    with pytest.raises(DeviceUnavailable, match=r"^gone \(127.0.0.1:1 unit 1\): cannot connect "
                                                 r"\(connection refused\)$"):
        await SunSpecDevice("gone", link, 1, "meter").connect()


async def test_float_meter_model_longer_than_one_request():
    """Model 213 (float meter) is 126 registers: read in two requests, decoded as floats."""
    m = RegisterMap.build([1, 213])
    m.set_raw(1, "Mn", "float-meter")
    m.set(213, "W", -1234.5)
    m.set(213, "TotWhImp", 98765.25)
    m.set(213, "PhVphA", 231.25)
    m.set(213, "Hz", 49.98)
    m.set(213, "Evt", 0)  # the last point: in the second request
    server = ModbusTcpServer([SimDevice(1, [SimData(40000, values=m.registers, datatype=DataType.REGISTERS)])],
                             address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    port = server.transport.sockets[0].getsockname()[1]
    try:
        d = SunSpecDevice("fm", ModbusLink("127.0.0.1", port), 1)
        await d.connect()
        assert d.kind is DeviceKind.METER
        assert d._reads == [(40070, 125), (40195, 1)]
        r = await d.read()
        assert r.values["p_w"] == pytest.approx(-1234.5)
        assert r.values["import_wh"] == pytest.approx(98765.25)
        assert r.values["voltage_v"] == pytest.approx(231.25)
        assert r.values["frequency_hz"] == pytest.approx(49.98, abs=1e-4)
        assert r.values["export_wh"] is None  # float NaN: not implemented
        assert r.status["events"] == 0
        await d.close()
    finally:
        await server.shutdown()
