"""The pytest plugin, used the way a user's CI would: an installed entry point, a fresh run."""

from __future__ import annotations

USER_TEST = '''
import asyncio
from pymodbus.client import ModbusTcpClient
from testbed.devices.site import open_devices


def test_controller_reads_battery(testbed_emulators):
    ep = testbed_emulators.endpoints["house-1-battery"]
    assert ep.host == "127.0.0.1" and ep.port not in (15021, 15022, 15023)  # free ports
    client = ModbusTcpClient(ep.host, port=ep.port)  # the user's own Modbus code
    assert client.connect()
    rr = client.read_holding_registers(40000, count=2, device_id=ep.unit)
    assert rr.registers == [0x5375, 0x6E53]  # "SunS"
    client.close()


def test_stepped_site(testbed_emulators_factory):
    em = testbed_emulators_factory("demo", clock=False)
    dev = open_devices(em.site, ["house-2-battery"])["house-2-battery"]

    async def go():
        await dev.connect()
        await dev.write("power_w", 2000)
        return dev

    asyncio.run(go())
    em.step(60.0, 60)  # one simulated hour, deterministic
    reading = asyncio.run(dev.read())
    assert reading.values["p_w"] == 2000
    assert reading.values["soc_pct"] < 30 - 100 * 2000 / (0.95 * 13500) + 0.2
'''


def test_fixture_serves_the_demo_site_on_free_ports(pytester):
    pytester.makepyfile(test_user=USER_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_site_option_selects_another_site(pytester):
    pytester.makefile(".yaml", lab="""
name: lab
prosumers:
  - name: p
    devices:
      - {name: only-meter, kind: meter, port: 0}
""")
    pytester.makepyfile(test_user='''
def test_one(testbed_emulators):
    assert list(testbed_emulators.endpoints) == ["only-meter"]
''')
    result = pytester.runpytest_subprocess("--testbed-site", "lab.yaml")
    result.assert_outcomes(passed=1)
