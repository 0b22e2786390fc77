"""`testbed conformance`: a site's device through the IEEE 1547.1 procedures, JUnit out.

An emulated device (emulated_models: ieee1547 or both) is started on the simulated
clock and its terminal driven by the test (`EmulatorSource`): a run takes seconds. A real
device is tested in real time through a grid source; without one configured, the
operator sets the source by hand when prompted (`ManualSource`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

from testbed.config import SiteConfig
from testbed.devices.driver import DeviceKind
from testbed.devices.emulator1547 import Ieee1547Device
from testbed.devices.modbus import SunSpecDevice
from testbed.devices.site import SiteEmulators, open_devices

from .procedures import PROCEDURES, TestResult, run_tests
from .source import EmulatorSource, GridSource, ManualSource


class ConformanceError(ValueError):
    """A device or request the conformance tests cannot run against."""


def check_names(names: list[str] | None) -> list[str]:
    names = names or list(PROCEDURES)
    bad = [n for n in names if n not in PROCEDURES]
    if bad:
        raise ConformanceError(f"unknown test {', '.join(bad)} (tests: {', '.join(PROCEDURES)})")
    return names


async def conform(site: SiteConfig, device: str, names: list[str] | None = None, *,
                  dt_s: float = 1.0, ask: Callable[[str], str] = input) -> list[TestResult]:
    """Run the procedures against `device` of `site` (emulated or real)."""
    names = check_names(names)
    found = {d.name: (p, d) for p, d in site.devices()}
    if device not in found:
        raise ConformanceError(f"{site.name}: no device {device!r} "
                               f"(devices: {', '.join(found)})")
    p, d = found[device]
    if d.kind == DeviceKind.METER or d.protocol != "modbus":
        raise ConformanceError(f"{device}: conformance tests need a Modbus SunSpec inverter "
                               "or battery (IEEE 1547 models 701-713)")
    if not d.emulated:
        dev = open_devices(site, [device])[device]
        assert isinstance(dev, SunSpecDevice)
        source: GridSource = ManualSource(230.0, 50.0, ask=ask)
        try:
            return await run_tests(dev, source, names, dt_s)
        finally:
            await dev.close()
    if getattr(d, "emulated_models", "legacy") == "legacy":
        raise ConformanceError(f"{device}: an emulated device serves the legacy models "
                               "unless the site says emulated_models: ieee1547 (or both)")
    one = site.model_copy(update={"prosumers": [p.model_copy(update={"devices": [d]})]})
    em = SiteEmulators(one, free_ports=True)
    await em.start(clock=False)
    try:
        emulated = em.physics.devices[device]
        assert isinstance(emulated, Ieee1547Device)
        source = EmulatorSource(em.physics, emulated, dt_s)
        dev = open_devices(em.resolved_site(), [device])[device]
        assert isinstance(dev, SunSpecDevice)
        try:
            return await run_tests(dev, source, names, dt_s)
        finally:
            await dev.close()
    finally:
        await em.stop()


def junit_xml(results: list[TestResult], suite: str) -> str:
    """One testcase per procedure; a failure names its failed checks (the reason)."""
    root = ET.Element("testsuite", name=suite, tests=str(len(results)),
                      failures=str(sum(1 for r in results if not r.passed and not r.error)),
                      errors=str(sum(1 for r in results if r.error)))
    for r in results:
        case = ET.SubElement(root, "testcase", classname=f"IEEE 1547.1-2020 {r.id}",
                             name=r.name, time=f"{r.duration_s:.1f}")
        if r.error:
            ET.SubElement(case, "error", message=r.error[:500])
        elif not r.passed:
            failure = ET.SubElement(case, "failure", message=r.reason[:500])
            failure.text = "\n".join(c.detail for c in r.checks if not c.passed)
        out = ET.SubElement(case, "system-out")
        out.text = "\n".join(f"{'PASS' if c.passed else 'FAIL'} {c.detail}" for c in r.checks)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True)


def write_junit(results: list[TestResult], suite: str, path: Path) -> None:
    path.write_text(junit_xml(results, suite))
