"""Emulated devices without a transport: the write checks every protocol goes through."""

from __future__ import annotations

import pytest

from testbed.devices.emulator import EmulatedSite, WriteRefused, prosumer_params
from testbed.physics.models import BatteryParams, PVParams


@pytest.fixture
def site():
    s = EmulatedSite()
    s.add_prosumer("x", prosumer_params(PVParams(rating_w=4000), BatteryParams(max_discharge_w=3000)))
    for kind in ("pv", "battery", "meter"):
        s.add_device(f"x-{kind}", kind, "x")
    return s


def test_engineering_writes_command_the_physics(site):
    bat, pv = site.devices["x-battery"], site.devices["x-pv"]
    bat.write_point(124, "OutWRte", 50.0)
    bat.write_point(124, "StorCtl_Mod", 2)
    pv.write_point(123, "WMaxLimPct", 25.0)
    pv.write_point(123, "WMaxLim_Ena", 1)
    site.step(60.0)
    s = site.prosumers["x"].state
    assert s.battery.power_w == pytest.approx(1500)
    assert s.pv.ac_w == pytest.approx(1000)
    bat.refresh()  # what the server does before answering a read
    assert bat.map.get(802, "W") == pytest.approx(1500)


@pytest.mark.parametrize("device, model, point, value, message", [
    ("x-battery", 124, "InWRte", 101.0, "outside -100..100"),
    ("x-battery", 124, "StorCtl_Mod", 4, "bits 0x4 are not defined"),
    ("x-battery", 802, "SoC", 10.0, "read-only"),
    ("x-pv", 123, "WMaxLim_Ena", 2, "is not one of"),
    ("x-pv", 123, "OutPFSet", -1.5, "outside -1..1"),
])
def test_refused_writes_leave_map_and_physics_unchanged(site, device, model, point, value, message):
    dev = site.devices[device]
    regs, state, version = list(dev.map.registers), site.prosumers["x"].state, site.prosumers["x"].version
    with pytest.raises(WriteRefused, match=message):
        dev.write_point(model, point, value)
    assert dev.map.registers == regs
    assert site.prosumers["x"].state is state and site.prosumers["x"].version == version


def test_partial_register_write_is_refused(site):
    dev = site.devices["x-battery"]
    with pytest.raises(WriteRefused, match="holds no point|read-only|outside"):
        dev.write(dev.map.base + dev.map.size + 5, [1])
