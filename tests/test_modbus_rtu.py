"""Modbus RTU: on a serial line (a pseudo-terminal pair, no hardware) and over TCP (as
through a serial-to-Ethernet gateway). Discovery, reads and writes go through the same
`Device` interface as Modbus TCP; the emulators serve RTU with `testbed devices serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty

import pytest

from testbed.config import SiteConfig
from testbed.devices.driver import DeviceKind
from testbed.devices.site import SiteEmulators, open_devices

pytest.importorskip("serial", reason="pymodbus' serial transport needs pyserial (pymodbus[serial])")


def rtu_site(transport: str, serial_port: str | None = None, parity: str = "N") -> SiteConfig:
    """Linux pseudo-terminals refuse parity bits (EINVAL), so the pty tests run 8N1."""
    extra = {"transport": transport}
    if serial_port is not None:
        extra["serial"] = {"port": serial_port, "baudrate": 38400, "parity": parity}
    return SiteConfig.model_validate({
        "name": "rtu-site",
        "emulation": {"start": "12:00", "seed": 3},
        "prosumers": [{
            "name": "p1",
            "load": {"base_w": 500, "peak_w": 500, "noise": 0.0},
            "devices": [
                {"name": "pv", "kind": "pv", "port": 0, "unit": 1, "timeout_s": 2.0, **extra},
                {"name": "bat", "kind": "battery", "port": 0, "unit": 7, "timeout_s": 2.0,
                 "params": {"capacity_wh": 10000, "soc_init": 0.5, "max_charge_w": 4000,
                            "max_discharge_w": 5000}, **extra},
                {"name": "meter", "kind": "meter", "port": 0, "unit": 3, "timeout_s": 2.0, **extra},
            ],
        }],
    })


class PtyBridge:
    """Two pseudo-terminals joined back to back: what one side's program writes to its
    tty, the other side's program reads from its own (a null-modem cable, in software)."""

    def __init__(self) -> None:
        self.fds = [os.openpty(), os.openpty()]
        for master, slave in self.fds:
            tty.setraw(slave)
            os.set_blocking(master, False)
        self.paths = [os.ttyname(slave) for _, slave in self.fds]
        self.bytes = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        (a, _), (b, _) = self.fds
        loop.add_reader(a, self._copy, a, b)
        loop.add_reader(b, self._copy, b, a)

    def _copy(self, src: int, dst: int) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            data = os.read(src, 4096)
            self.bytes += len(data)
            os.write(dst, data)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for master, slave in self.fds:
            loop.remove_reader(master)
            os.close(master)
            os.close(slave)


async def _exercise(em: SiteEmulators, site: SiteConfig) -> None:
    """Discovery, reads and a write of every kind through the Device interface."""
    devs = open_devices(site)
    assert len({id(d.link) for d in devs.values()}) == 1  # one bus, three units
    for d in devs.values():
        await d.connect()
    assert {n: d.kind for n, d in devs.items()} == {
        "pv": DeviceKind.PV, "bat": DeviceKind.BATTERY, "meter": DeviceKind.METER}
    s = em.physics.prosumers["p1"].state
    pv, bat, meter = [await devs[n].read() for n in ("pv", "bat", "meter")]
    assert pv.values["p_w"] == pytest.approx(s.pv.ac_w, abs=1) and pv.values["rating_w"] > 0
    assert bat.values["soc_pct"] == pytest.approx(50.0, abs=0.1)
    assert meter.values["p_w"] == pytest.approx(s.meter.net_w, abs=1)
    await devs["bat"].write("power_w", -2000)
    await devs["pv"].write("limit_pct", 30)
    em.physics.step(10.0)
    s = em.physics.prosumers["p1"].state
    assert s.battery.setpoint_w == pytest.approx(-2000, abs=1)
    assert (await devs["pv"].read()).values["limit_pct"] == pytest.approx(30)
    await devs["pv"].close()


async def test_rtu_over_tcp():
    site = rtu_site("rtu-over-tcp")
    em = SiteEmulators(site, free_ports=True)
    eps = await em.start(clock=False)
    try:
        assert eps["pv"].address.startswith("rtu+tcp://127.0.0.1:")
        em.physics.step(1.0)
        await _exercise(em, em.resolved_site())
    finally:
        await em.stop()


async def test_rtu_on_a_serial_line():
    bridge = PtyBridge()
    bridge.start()
    driver_tty, device_tty = bridge.paths
    em = SiteEmulators(rtu_site("rtu", device_tty), free_ports=True)
    eps = await em.start(clock=False)
    try:
        assert eps["bat"].address == f"rtu://{device_tty}/7"
        em.physics.step(1.0)
        await _exercise(em, rtu_site("rtu", driver_tty))
        assert bridge.bytes > 0  # it really went over the line
    finally:
        await em.stop()
        bridge.close()


def test_rtu_site_fields_are_checked():
    with pytest.raises(ValueError, match="transport: rtu needs serial"):
        rtu_site("rtu")
    site = rtu_site("rtu", "/dev/ttyUSB0", parity="E")
    d = site.prosumers[0].devices[0]
    assert d.serial is not None and d.serial.baudrate == 38400 and d.serial.parity == "E"
    assert d.address == "/dev/ttyUSB0 unit 1"


async def test_serial_port_errors_say_what_is_wrong():
    from testbed.devices.driver import DeviceUnavailable
    from testbed.devices.modbus import ModbusLink, SerialSettings, SunSpecDevice

    gone = SunSpecDevice("inv", ModbusLink("", 0, serial=SerialSettings("/dev/ttyNOPE9")), 1, "pv")
    with pytest.raises(DeviceUnavailable, match=r"^inv \(/dev/ttyNOPE9 unit 1\): cannot connect "
                                                r"\(cannot open the serial port: .*No such file"):
        await gone.read()
    master, slave = os.openpty()  # a pseudo-terminal takes no parity bit: as a USB adapter might not
    try:
        picky = SunSpecDevice("inv", ModbusLink("", 0, serial=SerialSettings(
            os.ttyname(slave), parity="E")), 1, "pv")
        with pytest.raises(DeviceUnavailable, match=r"refused baudrate/parity/stopbits/bytesize"):
            await picky.read()
    finally:
        os.close(master)
        os.close(slave)


async def test_a_silenced_rtu_unit_fails_alone():
    """Fault injection works on RTU-served emulators too: one unit silent, the others answer."""
    site = rtu_site("rtu-over-tcp")
    em = SiteEmulators(site, free_ports=True)
    await em.start(clock=False)
    try:
        em.physics.step(1.0)
        devs = open_devices(em.resolved_site())
        for d in devs.values():
            await d.connect()
        em.silence("bat")
        from testbed.devices.driver import DeviceUnavailable
        with pytest.raises(DeviceUnavailable, match=r"bat .*exception 11"):
            await devs["bat"].read()
        assert (await devs["meter"].read()).values["p_w"] is not None
        em.silence("bat", False)
        assert (await devs["bat"].read()).values["soc_pct"] is not None
        await devs["pv"].close()
    finally:
        await em.stop()


def test_bad_serial_settings_name_the_field(tmp_path):
    from testbed.config import ConfigError, load_site
    f = tmp_path / "lab.yaml"
    f.write_text("""\
name: lab
prosumers:
  - name: p
    devices:
      - {name: m, kind: meter, emulated: false, transport: rtu, unit: 2,
         serial: {port: /dev/ttyUSB0, parity: X}}
""")
    with pytest.raises(ConfigError, match=r"lab.yaml:6: prosumers\[0\].devices\[0\].serial.parity"):
        load_site(f)


async def test_pysunspec2_rtu_client_reads_and_writes_our_rtu_emulator():
    """pysunspec2's own RTU client (its own framing over pyserial, not pymodbus) against
    the emulators serving RTU on a serial line."""
    import sunspec2.modbus.client as ss_client

    bridge = PtyBridge()
    bridge.start()
    client_tty, device_tty = bridge.paths
    em = SiteEmulators(rtu_site("rtu", device_tty), free_ports=True)
    await em.start(clock=False)
    try:
        em.physics.step(1.0)

        def with_pysunspec2() -> tuple[list[int], float, str]:
            dev = ss_client.SunSpecModbusClientDeviceRTU(7, client_tty, baudrate=38400, timeout=2)
            try:
                dev.scan()
                ids = [k for k in dev.models if isinstance(k, int)]
                soc = dev.models[802][0].SoC.cvalue
                ctl = dev.models[124][0]
                ctl.InWRte.cvalue = 25.0  # charge at a quarter of WChaMax
                ctl.StorCtl_Mod.cvalue = 1
                ctl.write()
                return ids, soc, dev.models[1][0].SN.cvalue
            finally:
                dev.close()

        ids, soc, serial_number = await asyncio.to_thread(with_pysunspec2)
        assert ids == [1, 802, 124] and serial_number == "TB-bat"
        assert soc == pytest.approx(50.0, abs=0.1)
        em.physics.step(10.0)
        assert em.physics.prosumers["p1"].state.battery.setpoint_w == pytest.approx(-1000, abs=1)
    finally:
        await em.stop()
        bridge.close()


def test_cli_scan_over_rtu_on_a_serial_line_and_through_a_gateway():
    from typer.testing import CliRunner

    from testbed.cli import app
    from testbed.devices.site import BackgroundEmulators

    runner = CliRunner()
    with BackgroundEmulators(rtu_site("rtu-over-tcp"), clock=False) as em:
        ep = em.endpoints["bat"]
        r = runner.invoke(app, ["devices", "scan", f"127.0.0.1:{ep.port}", "--rtu", "--unit", "7"],
                          env={"COLUMNS": "200"})
        assert r.exit_code == 0, r.output
        assert f"127.0.0.1:{ep.port}/rtu unit 7" in r.output and "kind: battery" in r.output
        assert "802" in r.output and "124" in r.output
        r = runner.invoke(app, ["devices", "scan", f"127.0.0.1:{ep.port}", "--unit", "7",
                                "--timeout", "0.3"])  # Modbus TCP framing to an RTU gateway
        assert r.exit_code != 0 and "Traceback" not in r.output
    bridge = PtyBridge()  # run by the emulators' event loop, beside the RTU server
    client_tty, device_tty = bridge.paths
    with BackgroundEmulators(rtu_site("rtu", device_tty), clock=False) as em:
        em.call(_start_bridge(bridge))
        try:
            r = runner.invoke(app, ["devices", "scan", client_tty, "--rtu", "--unit", "3",
                                    "--baudrate", "38400", "--parity", "N"], env={"COLUMNS": "200"})
            assert r.exit_code == 0, r.output
            assert "kind: meter" in r.output and "203" in r.output
        finally:
            em.call(_stop_bridge(bridge))


async def _start_bridge(bridge: PtyBridge) -> None:
    bridge.start()


async def _stop_bridge(bridge: PtyBridge) -> None:
    bridge.close()


def test_cli_write_of_a_group_point_and_an_enum_symbol_over_rtu():
    from typer.testing import CliRunner

    from testbed.cli import app
    from testbed.devices.site import BackgroundEmulators

    runner = CliRunner()
    with BackgroundEmulators(rtu_site("rtu-over-tcp"), clock=False) as em:
        site = em.site
        path = _site_file(site)
        try:
            r = runner.invoke(app, ["devices", "write", str(path), "pv", "123.WMaxLim_Ena", "ENABLED"])
            assert r.exit_code == 0, r.output
            assert em.emulators.devices["pv"].map.get(123, "WMaxLim_Ena") == 1
            r = runner.invoke(app, ["devices", "write", str(path), "pv", "limit_pct", "ON"])
            assert r.exit_code != 0 and "'ON' is not a number" in r.output
        finally:
            path.unlink()


def _site_file(site: SiteConfig):
    import tempfile
    from pathlib import Path

    import yaml
    f = Path(tempfile.mkstemp(suffix=".yaml")[1])
    f.write_text(yaml.safe_dump(site.model_dump(mode="json", exclude_defaults=True)))
    return f
