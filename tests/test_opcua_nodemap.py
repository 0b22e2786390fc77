"""OPC UA servers this project did not write: a plain asyncua server with a vendor-style
address space (its own namespace, kW values, Float and Boolean setpoints), read and
commanded through a node map of the site file; and our layout under another namespace."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import pytest
from asyncua import Server, ua

from testbed.config import ConfigError, SiteConfig, load_model
from testbed.devices.driver import SetpointRejected
from testbed.devices.emulator import EmulatedSite, prosumer_params
from testbed.devices.opcua import (
    NodeMissing,
    OpcUaDevice,
    OpcUaEmulatorServer,
    OpcUaLink,
    OpcUaSecurity,
)
from testbed.devices.site import open_devices
from testbed.physics.models import BatteryParams

VENDOR_NS = "urn:vendor:plant"
USER, PASSWORD = "operator", "s3cret-pw"


class VendorServer:
    """Objects/Plant/Inverter01 and Battery01 in the vendor's own namespace, values in kW."""

    def __init__(self) -> None:
        self.server = Server()
        self.nodes: dict[str, object] = {}
        self.port = 0

    async def start(self) -> None:
        s = self.server
        await s.init()
        s.set_endpoint("opc.tcp://127.0.0.1:0/vendor/")
        s.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = await s.register_namespace(VENDOR_NS)
        plant = await s.nodes.objects.add_folder(idx, "Plant")
        inv = await plant.add_object(idx, "Inverter01")
        meas = await inv.add_object(idx, "Measurements")
        ctl = await inv.add_object(idx, "Controls")
        n = self.nodes
        n["P"] = await meas.add_variable(idx, "ActivePower", 3.2)  # kW
        n["Q"] = await meas.add_variable(idx, "ReactivePower", -0.4)  # kvar
        n["V"] = await meas.add_variable(idx, "Voltage", 231.5)
        n["E"] = await meas.add_variable(ua.NodeId("inv01.energy", idx), "Energy", 1234.5)  # kWh
        n["state"] = await inv.add_variable(idx, "State", "Running")
        n["Lim"] = await ctl.add_variable(idx, "PowerLimit", ua.Variant(100.0, ua.VariantType.Float))
        n["LimEna"] = await ctl.add_variable(idx, "LimitEnable", False)
        n["Lim10"] = await ctl.add_variable(idx, "PowerLimitTenths", ua.Variant(1000, ua.VariantType.Int16))
        bat = await plant.add_object(idx, "Battery01")
        n["BP"] = await bat.add_variable(idx, "Power", -1.5)  # kW, + discharge
        n["SoC"] = await bat.add_variable(idx, "SoC", 0.42)  # fraction
        n["Set"] = await bat.add_variable(idx, "PowerSetpoint", ua.Variant(0.0, ua.VariantType.Float))
        rng = await n["Set"].add_property(0, "EURange", ua.Range(Low=-4.0, High=5.0))
        assert rng is not None
        for key in ("Lim", "LimEna", "Lim10", "Set"):
            await n[key].set_writable()
        await s.start()
        self.port = s.bserver.port

    async def value(self, key: str):
        return await self.nodes[key].read_value()

    async def stop(self) -> None:
        await self.server.stop()


INITIAL = {"P": 3.2, "Lim": ua.Variant(100.0, ua.VariantType.Float), "LimEna": False,
           "Lim10": ua.Variant(1000, ua.VariantType.Int16),
           "Set": ua.Variant(0.0, ua.VariantType.Float)}


class _OnItsLoop:
    """The vendor server on its own event loop in a thread (built once per module: an
    asyncua server takes seconds to load its standard address space); awaiting a method
    runs it there."""

    def __init__(self, server: VendorServer) -> None:
        self.vendor, self.loop = server, asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    @property
    def port(self) -> int:
        return self.vendor.port

    async def value(self, key: str):
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.vendor.value(key), self.loop))

    async def set(self, key: str, value) -> None:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
            self.vendor.nodes[key].write_value(value), self.loop))

    async def data_value(self, key: str) -> ua.DataValue:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
            self.vendor.nodes[key].read_data_value(), self.loop))


@pytest.fixture(scope="module")
def vendor_server():
    v = _OnItsLoop(VendorServer())
    v.run(v.vendor.start())
    yield v
    v.run(v.vendor.stop())
    v.loop.call_soon_threadsafe(v.loop.stop)
    v.thread.join(5)


@pytest.fixture
async def vendor(vendor_server):
    for key, value in INITIAL.items():
        await vendor_server.set(key, value)
    return vendor_server


def vendor_site(port: int, pv: dict | None = None, bat: dict | None = None) -> SiteConfig:
    pv_map = {"namespace": VENDOR_NS, "root": "Plant/Inverter01", "points": {
        "p_w": {"path": "Measurements/ActivePower", "unit": "kW"},
        "q_var": {"path": "Measurements/ReactivePower", "unit": "kvar"},
        "voltage_v": "Measurements/Voltage",
        "energy_wh": {"node": f"nsu={VENDOR_NS};s=inv01.energy", "unit": "kWh"},
        "limit_pct": "Controls/PowerLimit",
        "limit_enabled": "Controls/LimitEnable",
    }, "status": {"state": "State"}, **(pv or {})}
    bat_map = {"namespace": VENDOR_NS, "root": "Plant/Battery01", "points": {
        "p_w": {"path": "Power", "scale": 1000},
        "soc_pct": {"path": "SoC", "unit": "fraction"},
        "power_w": {"path": "PowerSetpoint", "unit": "kW"},
    }, **(bat or {})}
    dev = {"protocol": "opcua", "emulated": False, "host": "127.0.0.1", "port": port}
    return SiteConfig.model_validate({
        "name": "vendor", "opcua": {"allow_insecure": True},
        "prosumers": [{"name": "p1", "devices": [
            {"name": "inv", "kind": "pv", **dev, "opcua": pv_map},
            {"name": "bat", "kind": "battery", **dev, "opcua": bat_map},
        ]}],
    })


async def test_values_read_equal_the_values_served_in_neutral_units(vendor):
    devs = open_devices(vendor_site(vendor.port))
    try:
        for d in devs.values():
            await d.connect()
        r = await devs["inv"].read()
        assert r.values == pytest.approx({"p_w": 3200.0, "q_var": -400.0, "voltage_v": 231.5,
                                          "energy_wh": 1_234_500.0, "limit_pct": 100.0,
                                          "limit_enabled": 0.0})
        assert r.status == {"state": "Running"}
        b = await devs["bat"].read()
        assert b.values == pytest.approx({"p_w": -1500.0, "soc_pct": 42.0})
        await vendor.set("P", 4.05)
        assert (await devs["inv"].read()).values["p_w"] == pytest.approx(4050.0)
    finally:
        for d in devs.values():
            await d.close()


async def test_writes_land_on_the_mapped_nodes_and_limit_pct_enables_the_limit(vendor):
    devs = open_devices(vendor_site(vendor.port))
    inv, bat = devs["inv"], devs["bat"]
    try:
        await inv.write("limit_pct", 40)
        assert await vendor.value("Lim") == pytest.approx(40.0)
        assert await vendor.value("LimEna") is True  # as on Modbus: the limit is enabled
        await inv.write("limit_enabled", 0)
        assert await vendor.value("LimEna") is False

        await bat.write("power_w", 2500)  # W -> 2.5 kW, written as the node's Float
        assert await vendor.value("Set") == pytest.approx(2.5)
        dv = await vendor.data_value("Set")
        assert dv.Value.VariantType is ua.VariantType.Float
        await bat.write("power_w", -4000)
        assert await vendor.value("Set") == pytest.approx(-4.0)
    finally:
        await inv.close()


async def test_out_of_range_writes_are_refused_and_change_nothing(vendor):
    devs = open_devices(vendor_site(vendor.port))
    inv, bat = devs["inv"], devs["bat"]
    try:
        with pytest.raises(SetpointRejected, match=r"^inv \(opc\.tcp://127\.0\.0\.1:\d+ Plant/Inverter01\): "
                           r"limit_pct 400 % is outside 0\.\.100 %"):
            await inv.write("limit_pct", 400)
        assert await vendor.value("Lim") == pytest.approx(100.0)
        assert await vendor.value("LimEna") is False
        # the server's EURange (-4..5 kW) in neutral units
        with pytest.raises(SetpointRejected, match=r"power_w 9000 W is outside -4000\.\.5000 W "
                                                   r"\(range from the server's EURange\)"):
            await bat.write("power_w", 9000)
        assert await vendor.value("Set") == 0.0
    finally:
        await inv.close()


async def test_site_file_range_applies_when_the_server_publishes_none(vendor):
    site = vendor_site(vendor.port, pv={"points": {
        "p_w": {"path": "Measurements/ActivePower", "unit": "kW"},
        "limit_pct": {"path": "Controls/PowerLimit", "range": [10, 80]}}})
    inv = open_devices(site, ["inv"])["inv"]
    try:
        await inv.connect()
        assert inv.ranges["limit_pct"] == (10, 80)
        with pytest.raises(SetpointRejected, match=r"limit_pct 90 % is outside 10\.\.80 % "
                                                   r"\(range from the site file\)"):
            await inv.write("limit_pct", 90)
        await inv.write("limit_pct", 80)
        assert await vendor.value("Lim") == pytest.approx(80.0)
        assert await vendor.value("LimEna") is False  # not mapped here: nothing else written
    finally:
        await inv.close()


async def test_integer_node_with_a_scale_is_read_and_written_in_its_own_type(vendor):
    site = vendor_site(vendor.port, pv={"points": {
        "limit_pct": {"path": "Controls/PowerLimitTenths", "scale": 0.1}}})
    inv = open_devices(site, ["inv"])["inv"]
    try:
        assert (await inv.read()).values == {"limit_pct": pytest.approx(100.0)}
        await inv.write("limit_pct", 42.3)
        dv = await vendor.data_value("Lim10")
        assert dv.Value.VariantType is ua.VariantType.Int16 and dv.Value.Value == 423
        assert (await inv.read()).values["limit_pct"] == pytest.approx(42.3)
    finally:
        await inv.close()


@pytest.mark.parametrize(("change", "expected"), [
    ({"root": "Plant/Inverter02"},
     r"^inv \(opc\.tcp://127\.0\.0\.1:(\d+) Plant/Inverter02\): no node Objects/Plant/Inverter02 for "
     r"the device root in namespace urn:vendor:plant: Objects/Plant has no 'Inverter02' "
     r"\(it has: Battery01, Inverter01\)$"),
    ({"points": {"p_w": "Measurements/ActivPower"}},
     r"^inv \(opc\.tcp://127\.0\.0\.1:\d+ Plant/Inverter01\): no node "
     r"Objects/Plant/Inverter01/Measurements/ActivPower for p_w in namespace urn:vendor:plant: "
     r"Objects/Plant/Inverter01/Measurements has no 'ActivPower' \(it has: ActivePower, Energy, "
     r"ReactivePower, Voltage\)$"),
    ({"namespace": "urn:vendor:other"},
     r"^inv \(opc\.tcp://127\.0\.0\.1:\d+ Plant/Inverter01\): namespace 'urn:vendor:other' is not "
     r"on this server \(it has: urn:freeopcua:python:server, urn:vendor:plant\)$"),
    ({"points": {"p_w": {"node": f"nsu={VENDOR_NS};s=nope"}}},
     r"^inv \(opc\.tcp://127\.0\.0\.1:\d+ Plant/Inverter01\): no node nsu=urn:vendor:plant;s=nope "
     r"for p_w \(ns=2;s=nope: BadNodeIdUnknown\)$"),
])
async def test_a_missing_namespace_or_node_is_one_line_naming_device_endpoint_and_path(
        vendor, change, expected):
    inv = open_devices(vendor_site(vendor.port, pv=change), ["inv"])["inv"]
    try:
        with pytest.raises(NodeMissing) as info:
            await inv.connect()
        assert "\n" not in str(info.value)
        assert re.match(expected, str(info.value)), str(info.value)
        assert str(vendor.port) in str(info.value)
    finally:
        await inv.close()


async def test_subscribe_mode_reads_what_the_monitored_items_delivered(vendor):
    site = vendor_site(vendor.port, pv={"mode": "subscribe", "publishing_interval_s": 0.05})
    sub = open_devices(site, ["inv"])["inv"]
    poll = open_devices(vendor_site(vendor.port), ["inv"])["inv"]
    try:
        await sub.connect()
        await poll.connect()
        await vendor.set("P", 1.25)
        for _ in range(100):  # until the notification arrived
            if (await sub.read()).values["p_w"] == pytest.approx(1250.0):
                break
            await asyncio.sleep(0.02)
        a, b = await sub.read(), await poll.read()
        assert a.values == b.values and a.values["p_w"] == pytest.approx(1250.0)
        assert a.status == b.status
        assert sub._feed is not None and sub._feed.notifications >= 6
    finally:
        await sub.close()
        await poll.close()


# ----------------------------------------------------------------- our layout, another namespace


async def test_our_layout_under_another_namespace_uri_works_by_naming_it():
    em = EmulatedSite(12 * 3600.0)
    em.add_prosumer("p1", prosumer_params(None, BatteryParams(capacity_wh=8000, soc_init=0.6)))
    em.add_device("b1", "battery", "p1")
    em.step(1.0)
    security = OpcUaSecurity(None, username=USER, password=PASSWORD, accounts={USER: PASSWORD},
                             allow_insecure=True)
    server = OpcUaEmulatorServer("127.0.0.1", 0, {"b1": em.devices["b1"]}, security,
                                 namespace="urn:acme:der")
    port = await server.start()
    try:
        cfg = load_model(SiteConfig, f"""
name: acme
opcua: {{allow_insecure: true, username: {USER}, password: {PASSWORD}}}
prosumers:
  - name: p1
    devices:
      - {{name: battery, kind: battery, protocol: opcua, emulated: false, port: {port},
          opcua: {{namespace: "urn:acme:der", device: b1}}}}
""", "acme.yaml")
        dev = open_devices(cfg)["battery"]
        try:
            r = await dev.read()
            assert r.values["soc_pct"] == pytest.approx(60.0, abs=0.01)
            assert r.values["capacity_wh"] == pytest.approx(8000.0)
            await dev.write("power_w", -2000)
            assert em.devices["b1"].prosumer.state.battery.setpoint_w == -2000
        finally:
            await dev.close()
        # the default namespace is not there: one line, not a ValueError traceback
        dev = OpcUaDevice("b1", OpcUaLink("127.0.0.1", port, security))
        with pytest.raises(NodeMissing, match=r"^b1 \(opc\.tcp://127\.0\.0\.1:\d+ Devices/b1\): namespace "
                           r"'urn:testbed:devices' is not on this server \(it has: "
                           r"urn:testbed:server, urn:acme:der\)$"):
            await dev.connect()
        await dev.close()
    finally:
        await server.stop()


def test_node_map_errors_in_the_site_file_name_the_field():
    def load(points: str) -> None:
        load_model(SiteConfig, f"""
name: s
opcua: {{allow_insecure: true}}
prosumers:
  - name: p1
    devices:
      - name: inv
        kind: pv
        protocol: opcua
        emulated: false
        opcua:
          points: {points}
""", "s.yaml")

    with pytest.raises(ConfigError, match=r"s\.yaml:\d+: .*'soc_pct' is not a pv point"):
        load("{soc_pct: SoC}")
    with pytest.raises(ConfigError, match=r"p_w: unit kWh does not convert to W"):
        load("{p_w: {path: P, unit: kWh}}")
    with pytest.raises(ConfigError, match=r"give exactly one of path .* or node"):
        load("{p_w: {path: P, node: 'ns=2;i=5'}}")
    with pytest.raises(ConfigError, match=r"s\.yaml:\d+: prosumers\[0\]\.devices\[0\]\.opcua\.points\.p_w"
                       r"\.node: not a NodeId: expected e\.g\. 'nsu=urn:vendor;s=Inverter\.P' or 'ns=2;i=1017' "
                       r"\(got 'ns=x;i=3'\)$"):
        load("{p_w: {node: 'ns=x;i=3'}}")
    load("{p_w: {path: P, unit: MW}, q_var: {node: 'nsu=urn:v;s=Q'}, voltage_v: {node: 'ns=3;i=7'}}")


def test_cli_reads_and_writes_a_mapped_device_and_errors_are_one_line(vendor_server, tmp_path):
    from typer.testing import CliRunner

    from testbed.cli import app

    def site_file(path: str) -> str:
        f = tmp_path / "lab.yaml"
        f.write_text(f"""
name: lab
opcua: {{allow_insecure: true}}
prosumers:
  - name: p1
    devices:
      - name: inv
        kind: pv
        protocol: opcua
        emulated: false
        port: {vendor_server.port}
        opcua:
          namespace: {VENDOR_NS}
          root: Plant/Inverter01
          points:
            p_w: {{path: {path}, unit: kW}}
            limit_pct: Controls/PowerLimit
""")
        return str(f)

    vendor_server.run(vendor_server.vendor.nodes["P"].write_value(3.2))  # as other tests found it
    runner = CliRunner()
    env = {"COLUMNS": "300"}
    r = runner.invoke(app, ["devices", "read", site_file("Measurements/ActivePower"), "inv", "--json"],
                      env=env)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["values"]["p_w"] == pytest.approx(3200.0)
    r = runner.invoke(app, ["devices", "write", site_file("Measurements/ActivePower"), "inv",
                            "limit_pct", "400"], env=env)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert re.fullmatch(r"error: inv \(opc\.tcp://127\.0\.0\.1:\d+ Plant/Inverter01\): limit_pct 400 % "
                        r"is outside 0\.\.100 % \(range from its meaning\); nothing written\n", r.stderr)
    r = runner.invoke(app, ["devices", "read", site_file("Measurements/P"), "inv"], env=env)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.count("\n") == 1 and "no node Objects/Plant/Inverter01/Measurements/P for p_w" in r.stderr
