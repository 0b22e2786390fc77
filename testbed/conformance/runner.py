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
                  dt_s: float = 1.0, ask: Callable[[str], str] = input,
                  nominal: tuple[float, float] = (230.0, 50.0)) -> list[TestResult]:
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
        source: GridSource = ManualSource(*nominal, ask=ask)
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


def html_report(results: list[TestResult], suite: str) -> str:
    """One self-contained page (plotly inlined once): per test its P, Q, V and f against
    time with each step marked, and the table of its checks."""
    import html

    import plotly.io as pio
    from plotly.subplots import make_subplots

    parts = []
    for i, r in enumerate(results):
        fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                            subplot_titles=("P (W) and Q (var)", "V (V)", "f (Hz)"))
        t0 = r.samples[0].t if r.samples else 0.0
        x = [s.t - t0 for s in r.samples]
        fig.add_scatter(x=x, y=[s.p_w for s in r.samples], name="P", row=1, col=1)
        fig.add_scatter(x=x, y=[s.q_var for s in r.samples], name="Q", row=1, col=1)
        fig.add_scatter(x=x, y=[s.v for s in r.samples], name="V", row=2, col=1)
        fig.add_scatter(x=x, y=[s.f_hz for s in r.samples], name="f", row=3, col=1)
        for t, label in r.steps:
            fig.add_vline(x=t - t0, line={"dash": "dot", "color": "#888"})
            fig.add_annotation(x=t - t0, y=1.02, yref="paper", text=html.escape(label),
                               showarrow=False, textangle=-30, font={"size": 9})
        fig.update_layout(height=620, margin={"t": 60}, xaxis3_title="s since the test began")
        verdict = "PASS" if r.passed else "FAIL"
        rows = "".join(f"<tr class={'ok' if c.passed else 'bad'}><td>{'PASS' if c.passed else 'FAIL'}"
                       f"</td><td>{html.escape(c.detail)}</td></tr>" for c in r.checks)
        parts.append(
            f"<h2>{html.escape(r.id)} {html.escape(r.name)}: {verdict}</h2>"
            + (f"<p class=bad>{html.escape(r.error)}</p>" if r.error else "")
            + pio.to_html(fig, include_plotlyjs="inline" if i == 0 else False, full_html=False)
            + f"<table>{rows}</table>")
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>"
            f"IEEE 1547.1 conformance: {html.escape(suite)}</title><style>"
            "body{font-family:sans-serif;margin:2em} td{padding:2px 8px} "
            ".ok td:first-child{color:#080} .bad,.bad td:first-child{color:#b00}</style>"
            f"</head><body><h1>IEEE 1547.1-2020 conformance: {html.escape(suite)}</h1>"
            + "".join(parts) + "</body></html>\n")
