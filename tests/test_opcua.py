"""OPC UA: emulator server, driver and security, against real servers on loopback."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from asyncua import Client, ua
from asyncua.common.utils import create_nonce
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

from testbed.config import ConfigError, SiteConfig, load_site
from testbed.devices.driver import DeviceKind, DeviceUnavailable, SetpointRejected
from testbed.devices.emulator import EmulatedSite, prosumer_params
from testbed.devices.modbus import ModbusEmulatorServer, ModbusLink, SunSpecDevice
from testbed.devices.opcua import (
    CLIENT_URI,
    NAMESPACE_URI,
    AccessDenied,
    OpcUaDevice,
    OpcUaEmulatorServer,
    OpcUaLink,
    OpcUaSecurity,
    add_trusted_client,
    make_certificate,
    make_certificates,
)
from testbed.devices.site import BackgroundEmulators, open_devices
from testbed.physics.models import BatteryParams, PVParams

BIN = Path(sys.executable).parent
TOOLS_URI = "urn:example.org:FreeOpcUa:opcua-asyncio"  # what asyncua's command-line tools send
USER, PASSWORD = "operator", "s3cret-pw"


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Path:
    """The folder `testbed devices certs` makes, plus a certificate for asyncua's tools."""
    d = tmp_path_factory.mktemp("opcua-certs")
    make_certificates(d)
    add_trusted_client(d, "uatools", TOOLS_URI)
    return d


def mixed_site(certs: Path | None, **opcua: object) -> SiteConfig:
    """PV over Modbus; battery and meter over OPC UA (each protocol on its own free port)."""
    return SiteConfig.model_validate({
        "name": "mixed",
        "emulation": {"start": "12:00", "seed": 3},
        "opcua": {"certs": str(certs) if certs else None, "username": USER, "password": PASSWORD,
                  **opcua},
        "prosumers": [{
            "name": "p1",
            "load": {"base_w": 500, "peak_w": 500, "noise": 0.0},
            "devices": [
                {"name": "pv", "kind": "pv", "port": 0, "unit": 1, "params": {"rating_w": 5000}},
                {"name": "bat", "kind": "battery", "protocol": "opcua", "port": 0,
                 "params": {"capacity_wh": 10000, "soc_init": 0.5, "max_charge_w": 4000,
                            "max_discharge_w": 5000, "eta_ch": 0.95, "eta_dis": 0.9}},
                {"name": "meter", "kind": "meter", "protocol": "opcua", "port": 0},
            ],
        }],
    })


@pytest.fixture(scope="module")
def served(certs):
    """The mixed site's emulators in a background thread, clock off (tests step it)."""
    with BackgroundEmulators(mixed_site(certs), clock=False) as em:
        em.step(1.0)
        yield em


def state(em: BackgroundEmulators):
    return em.emulators.physics.prosumers["p1"].state


def url(em: BackgroundEmulators, name: str = "bat") -> str:
    ep = em.endpoints[name]
    return f"opc.tcp://{ep.host}:{ep.port}/"


def tool(name: str, *args: str, certs: Path, password: str = PASSWORD) -> subprocess.CompletedProcess:
    security = f"Basic256Sha256,SignAndEncrypt,{certs / 'uatools/cert.der'},{certs / 'uatools/key.pem'}"
    return subprocess.run([str(BIN / name), *args, f"--security={security}", "--user", USER,
                           "--password", password, "--timeout", "5"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})


def test_asyncua_tools_browse_and_read_the_secure_endpoint(served, certs):
    u = url(served)
    # by browse path from Objects; urn:testbed:devices is namespace 2 on our servers
    r = tool("uals", "-u", u, "-n", "i=85", "-p", "2:Devices,2:bat", "-l", certs=certs)
    assert r.returncode == 0, r.stderr
    for name in ("p_w", "soc_pct", "capacity_wh", "voltage_v", "power_w", "status", "kind"):
        assert name in r.stdout, (name, r.stdout)
    assert "10000.0" in r.stdout  # capacity_wh, with -l the values are listed

    soc = state(served).battery.soc * 100
    r = tool("uaread", "-u", u, "-n", "ns=2;s=bat/soc_pct", certs=certs)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.strip()) == pytest.approx(soc, abs=0.05)
    r = tool("uaread", "-u", u, "-n", "ns=2;s=meter/p_w", certs=certs)
    assert float(r.stdout.strip()) == pytest.approx(state(served).meter.net_w, abs=1)
    r = tool("uaread", "-u", u, "-n", "ns=2;s=bat/status/state", certs=certs)
    assert r.stdout.strip() == "CONNECTED"

    r = tool("uaread", "-u", u, "-n", "ns=2;s=bat/soc_pct", certs=certs, password="nope")
    assert "BadUserAccessDenied" in r.stdout + r.stderr


async def test_mixed_site_reads_and_commands_through_one_interface(served):
    devs = open_devices(served.site)
    assert isinstance(devs["pv"], SunSpecDevice) and isinstance(devs["bat"], OpcUaDevice)
    assert devs["bat"].link is devs["meter"].link  # one session per endpoint
    try:
        for d in devs.values():
            await d.connect()
        pv, bat, meter = [await devs[n].read() for n in ("pv", "bat", "meter")]
        s = state(served)
        assert pv.kind is DeviceKind.PV and pv.values["p_w"] == pytest.approx(s.pv.ac_w, abs=1)
        assert bat.kind is DeviceKind.BATTERY and set(bat.values) == {
            "p_w", "setpoint_w", "soc_pct", "capacity_wh", "max_charge_w", "max_discharge_w",
            "soc_min_pct", "soc_max_pct", "voltage_v", "current_a"}
        assert bat.values["soc_pct"] == pytest.approx(s.battery.soc * 100, abs=0.05)
        assert bat.values["max_charge_w"] == 4000 and bat.values["max_discharge_w"] == 5000
        assert bat.status["state"] == "CONNECTED" and bat.status["clamped"] is False
        assert meter.values["p_w"] == pytest.approx(s.meter.net_w, abs=1)
        assert meter.values["import_wh"] == pytest.approx(s.meter.import_wh, abs=1)

        soc0 = s.battery.soc
        await devs["bat"].write("power_w", -2000)  # charge 2 kW, over OPC UA
        await devs["pv"].write("limit_pct", 50)    # curtail, over Modbus
        served.step(60.0)
        s = state(served)
        assert s.battery.setpoint_w == -2000 and s.battery.power_w == pytest.approx(-2000, abs=1)
        # eq. 1: SOC += eta_ch * E_ch / Cap = 0.95 * 2000 W * 60 s / 3600 / 10000 Wh
        assert s.battery.soc - soc0 == pytest.approx(0.95 * 2000 * 60 / 3600 / 10000, rel=1e-6)
        assert s.pv.limit_enabled and s.pv.limit_pct == 50
        bat = await devs["bat"].read()
        assert bat.values["p_w"] == pytest.approx(-2000, abs=1) and bat.values["setpoint_w"] == -2000
        assert bat.values["soc_pct"] == pytest.approx(s.battery.soc * 100, abs=0.05)
        assert bat.status["charge_status"] == "CHARGING" and bat.status["storctl_mod"] == 1
        meter = await devs["meter"].read()
        assert meter.values["p_w"] == pytest.approx(s.load_w - s.pv.ac_w + 2000, abs=2)

        await devs["bat"].write("power_w", 0)
        served.step(1.0)
        assert state(served).battery.power_w == 0
    finally:
        for d in devs.values():
            await d.close()


async def test_information_model_units_ranges_and_refused_writes(served, certs):
    client = Client(url(served), timeout=5)
    client.application_uri = CLIENT_URI
    await client.set_security(SecurityPolicyBasic256Sha256, str(certs / "client/cert.der"),
                              str(certs / "client/key.pem"))
    client.set_user(USER)
    client.set_password(PASSWORD)
    async with client:
        ns = await client.get_namespace_index(NAMESPACE_URI)
        bat = await client.nodes.objects.get_child([f"{ns}:Devices", f"{ns}:bat"])
        p_w = await bat.get_child(f"{ns}:p_w")
        power = await bat.get_child(f"{ns}:power_w")
        eu = await (await p_w.get_child("0:EngineeringUnits")).read_value()
        assert eu.DisplayName.Text == "W" and eu.UnitId == 0x575454  # UNECE "WTT"
        assert eu.NamespaceUri == "http://www.opcfoundation.org/UA/units/un/cefact"
        rng = await (await power.get_child("0:EURange")).read_value()
        assert (rng.Low, rng.High) == (-4000.0, 5000.0)
        assert (await power.read_type_definition()) == ua.NodeId(ua.ObjectIds.AnalogItemType)
        assert (await p_w.read_data_type()) == ua.NodeId(ua.ObjectIds.Double)
        assert ua.AccessLevel.CurrentWrite not in await p_w.get_access_level()
        assert await (await bat.get_child(f"{ns}:kind")).read_value() == "battery"

        before = state(served).battery
        for value, expected in ((9000.0, "BadOutOfRange"), (-4000.5, "BadOutOfRange"),
                                ("lots", "BadTypeMismatch")):
            [status] = await client.write_values([power], [value], raise_on_partial_error=False)
            assert status.name == expected, value
        [status] = await client.write_values([p_w], [1.0], raise_on_partial_error=False)
        assert status.name == "BadUserAccessDenied"  # measurements are read-only
        assert state(served).battery == before  # refused writes changed nothing

        [status] = await client.write_values([power], [2500.0])  # bare client, in range
        assert status.is_good()
        assert state(served).battery.setpoint_w == 2500
        await client.write_values([power], [0.0])


async def test_out_of_range_setpoint_is_refused_with_the_range(served):
    dev = open_devices(served.site, ["bat"])["bat"]
    try:
        before = state(served).battery
        # refused by the driver, from the EURange the server publishes, before any Write
        with pytest.raises(SetpointRejected, match=r"bat \(opc\.tcp://127\.0\.0\.1:\d+ Devices/bat\): "
                           r"power_w 9000 W is outside -4000\.\.5000 W \(range from the server's EURange\)"):
            await dev.write("power_w", 9000)
        with pytest.raises(SetpointRejected, match=r"'limit_pct' is not a setpoint of a battery "
                                                   r"\(setpoints: power_w\)"):
            await dev.write("limit_pct", 10)
        assert state(served).battery == before
    finally:
        await dev.close()


def _security(certs: Path | None, **changes: object) -> OpcUaSecurity:
    base = {"certs": certs, "username": USER, "password": PASSWORD, "accounts": {USER: PASSWORD}}
    return OpcUaSecurity(**{**base, **changes})  # type: ignore[arg-type]


async def _connect(em: BackgroundEmulators, security: OpcUaSecurity) -> None:
    ep = em.endpoints["bat"]
    dev = OpcUaDevice("bat", OpcUaLink(ep.host, ep.port, security, timeout_s=3), "battery")
    try:
        await dev.connect()
        await dev.read()
    finally:
        await dev.close()


async def test_wrong_password_is_refused(served, certs):
    with pytest.raises(AccessDenied, match=r"bat \(opc\.tcp://127\.0\.0\.1:\d+ Devices/bat\): .*refused "
                       r"\(BadUserAccessDenied\): wrong username or password \(user 'operator'"):
        await _connect(served, _security(certs, password="wrong"))
    with pytest.raises(AccessDenied, match=r"refused \(BadIdentityTokenRejected\): the server does not "
                                           r"accept this kind of login \(no username configured"):
        await _connect(served, _security(certs, username=None, password=None))  # anonymous


async def test_untrusted_client_certificate_is_refused(served, certs, tmp_path):
    mine = tmp_path / "certs"
    make_certificate(mine / "client", CLIENT_URI, "intruder", server=False)  # not in trusted/clients
    shutil.copytree(certs / "trusted", mine / "trusted")
    with pytest.raises(AccessDenied, match=r"refused \(BadCertificateUntrusted\): the server does not "
                                           r"trust our client certificate .*certs/client/cert\.der"):
        await _connect(served, _security(mine))

    # and the driver refuses a server whose certificate it does not trust
    shutil.copytree(certs / "client", mine / "client", dirs_exist_ok=True)
    for f in (mine / "trusted/servers").iterdir():
        f.unlink()
    make_certificate(tmp_path / "other", "urn:other", "other server", server=True)
    shutil.copy(tmp_path / "other/cert.der", mine / "trusted/servers/other.der")
    with pytest.raises(AccessDenied, match=r"the server's certificate 'testbed device emulator' "
                                           r"\(SHA-256 .*\) is not in .*trusted/servers"):
        await _connect(served, _security(mine))


async def test_insecure_connection_is_refused_unless_the_site_allows_it(served, certs):
    with pytest.raises(AccessDenied, match=r"no None \(insecure\) endpoint \(the server offers: "
                                           r"Basic256Sha256 SignAndEncrypt\); the server does not "
                                           r"allow insecure connections"):
        await _connect(served, _security(None, allow_insecure=True))

    # A client that skips the endpoint check still gets nothing from a NoSecurity channel.
    client = Client(url(served), timeout=3)
    await client.connect_sessionless()
    try:
        params = ua.CreateSessionParameters(
            ClientDescription=ua.ApplicationDescription(ApplicationUri="urn:rogue",
                                                        ApplicationType=ua.ApplicationType.Client),
            ClientNonce=create_nonce(32), EndpointUrl=url(served), SessionName="rogue",
            RequestedSessionTimeout=10000)
        await client.uaclient.create_session(params)
        token = ua.UserNameIdentityToken(UserName=USER, Password=PASSWORD.encode(), PolicyId="username")
        await client.uaclient.activate_session(ua.ActivateSessionParameters(
            UserIdentityToken=token, LocaleIds=["en"], ClientSignature=ua.SignatureData()))
        with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
            await client.get_node(f"nsu={NAMESPACE_URI};s=bat/soc_pct").read_value()
    finally:
        client.disconnect_socket()

    # With `allow_insecure: true` (and no certificates) the site works without security.
    with BackgroundEmulators(mixed_site(None, allow_insecure=True), clock=False) as em:
        dev = open_devices(em.site, ["bat"])["bat"]
        await dev.connect()
        r = await dev.read()
        assert r.values["capacity_wh"] == 10000
        await dev.close()


async def test_reconnects_after_the_server_restarts(certs):
    site = EmulatedSite()
    site.add_prosumer("x", prosumer_params(PVParams(), BatteryParams()))
    devs = {"x-bat": site.add_device("x-bat", "battery", "x")}
    security = _security(certs)
    server = OpcUaEmulatorServer("127.0.0.1", 0, devs, security)
    port = await server.start()
    link = OpcUaLink("127.0.0.1", port, security, timeout_s=1.0, backoff_s=0.1, backoff_max_s=0.2)
    dev = OpcUaDevice("x-bat", link, "battery")
    try:
        await dev.connect()
        assert (await dev.read()).values["soc_pct"] == pytest.approx(50, abs=0.1)
        generation = link.generation
        await server.stop()
        with pytest.raises(DeviceUnavailable, match=r"x-bat \(opc\.tcp://127\.0\.0\.1:\d+ Devices/x-bat\)"):
            for _ in range(20):  # the loss shows up at once or at the next request
                await dev.read()
                await asyncio.sleep(0.05)
        with pytest.raises(DeviceUnavailable, match="cannot connect|not connected"):
            await asyncio.sleep(0.2)
            await dev.read()  # still down: a clear error, quickly
        server = OpcUaEmulatorServer("127.0.0.1", port, devs, security)
        await server.start()
        pr = site.prosumers["x"]
        pr.update(battery=replace(pr.state.battery, soc=0.42))  # changed while we were away
        await asyncio.sleep(0.25)  # past the backoff
        r = await dev.read()
        assert r.values["soc_pct"] == pytest.approx(42, abs=0.1) and link.generation == generation + 1
        await dev.write("power_w", 1000)  # setpoints work on the new session too
        assert site.prosumers["x"].state.battery.setpoint_w == 1000
    finally:
        await dev.close()
        await server.stop()


async def test_same_device_over_modbus_and_opcua_reads_the_same(certs):
    site = EmulatedSite()
    site.add_prosumer("x", prosumer_params(PVParams(), BatteryParams()))
    pv = site.add_device("x-pv", "pv", "x")
    site.step(5.0)
    async with (ModbusEmulatorServer("127.0.0.1", 0, {1: pv}) as mb,
                OpcUaEmulatorServer("127.0.0.1", 0, {"x-pv": pv}, _security(certs)) as ua_srv):
        a = SunSpecDevice("x-pv", ModbusLink("127.0.0.1", mb.port), 1)
        b = OpcUaDevice("x-pv", OpcUaLink("127.0.0.1", ua_srv.port, _security(certs)))
        await a.connect()
        await b.connect()
        assert b.kind is DeviceKind.PV  # told by the server
        await b.write("limit_pct", 40)  # over OPC UA, seen over Modbus
        site.step(10.0)
        ra, rb = await a.read(), await b.read()
        assert ra.values == rb.values and ra.status == rb.status
        assert rb.values["limit_pct"] == 40 and rb.values["limit_enabled"] == 1
        await a.close()
        await b.close()


# --------------------------------------------------------------------------- site files


def test_site_files_mix_protocols(tmp_path, certs):
    site = tmp_path / "lab.yaml"
    site.write_text("""\
name: lab
opcua: {certs: certs, username: op, password: pw}
prosumers:
  - name: h1
    devices:
      - {name: h1-pv, kind: pv, port: 1502, unit: 1}
      - {name: h1-bat, kind: battery, protocol: opcua, port: 4841}
      - {name: h1-meter, kind: meter, protocol: opcua}
""")
    cfg = load_site(site)
    assert cfg.opcua.certs == tmp_path / "certs"  # relative to the site file
    _, bat = cfg.find("h1-bat")
    _, meter = cfg.find("h1-meter")
    assert bat.unit is None and meter.port == 4840 and cfg.find("h1-pv")[1].unit == 1
    assert bat.address == "opc.tcp://127.0.0.1:4841 h1-bat"

    def bad(text: str, match: str) -> None:
        site.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_site(site)

    base = site.read_text()
    bad(base.replace("protocol: opcua, port: 4841", "protocol: opcua, port: 4841, unit: 2"),
        r"lab.yaml:7: prosumers\[0\].devices\[1\]: unit is a Modbus unit id; an OPC UA device is found by its name")
    bad(base.replace("port: 4841", "port: 1502"),
        r"devices 'h1-pv' \(modbus\) and 'h1-bat' \(opcua\) both use 127.0.0.1:1502; one port serves one protocol")
    bad(base.replace("{certs: certs, username: op, password: pw}", "{username: op, password: pw}"),
        r"OPC UA devices \(h1-bat, h1-meter\) need opcua.certs: a folder made by `testbed devices certs DIR`")
    bad(base.replace("{certs: certs, username: op, password: pw}", "{certs: certs}"),
        r"emulated OPC UA devices \(h1-bat, h1-meter\) need an account")
    bad(base.replace("password: pw", "password: pw, policy: Basic128Rsa15"),
        r"lab.yaml:2: opcua.policy: Input should be 'Basic256Sha256', 'Aes128_Sha256_RsaOaep' or 'Aes256_Sha256_RsaPss'")


def test_certificates_pass_asyncuas_own_checks(certs):
    """Made by asyncua.crypto.cert_gen: application URI and host names in subjectAltName,
    the right extended key usage, and a key that matches, as asyncua's checks want."""
    import socket

    from asyncua.crypto.uacrypto import check_certificate, load_certificate, load_private_key
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    for role, uri, use in (("server", "urn:testbed:server", ExtendedKeyUsageOID.SERVER_AUTH),
                           ("client", CLIENT_URI, ExtendedKeyUsageOID.CLIENT_AUTH)):
        cert = asyncio.run(load_certificate(certs / role / "cert.der"))
        key = asyncio.run(load_private_key(certs / role / "key.pem"))
        assert check_certificate(cert, uri, socket.gethostname()) is False  # False: no problem
        assert check_certificate(cert, uri, "localhost") is False
        assert cert.public_key().public_numbers() == key.public_key().public_numbers()
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [use]
        assert (certs / role / "key.pem").stat().st_mode & 0o077 == 0


async def test_asyncua_tools_write_what_the_driver_reads_and_read_what_it_wrote(served, certs):
    """asyncua's own command-line tools and our driver on the same emulated battery, both ways."""
    dev = open_devices(served.site, ["bat"])["bat"]
    u = url(served)
    try:
        r = await asyncio.to_thread(tool, "uawrite", "-u", u, "-n", "ns=2;s=bat/power_w", "-t", "double",
                                    "1500", certs=certs)
        assert r.returncode == 0, r.stderr
        assert state(served).battery.setpoint_w == 1500
        assert (await dev.read()).values["setpoint_w"] == 1500
        await dev.write("power_w", -1200)
        r = await asyncio.to_thread(tool, "uaread", "-u", u, "-n", "ns=2;s=bat/power_w", certs=certs)
        assert float(r.stdout.strip()) == -1200
        r = await asyncio.to_thread(tool, "uawrite", "-u", u, "-n", "ns=2;s=bat/power_w", "-t", "double",
                                    "99000", certs=certs)
        assert "BadOutOfRange" in r.stdout + r.stderr  # the server's own check, without our driver
        assert state(served).battery.setpoint_w == -1200
    finally:
        await dev.write("power_w", 0)
        await dev.close()
