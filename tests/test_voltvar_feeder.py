"""Reactive power where it matters: the bundled far-end scenario's 50 kW IEEE 1547
inverter on CIGRE LV, closed loop (feeder voltage -> inverter -> measured Q -> power
flow), at unity power factor and with volt-var on."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.config import SiteConfig, load_site
from testbed.devices.site import SiteEmulators, open_devices
from testbed.grid.feeder import checker_for
from testbed.physics.der1547 import VOLT_VAR_B, volt_var_q_pu
from testbed.physics.models import clear_sky_irradiance
from testbed.scenarios.phases.devices import DeviceIO
from testbed.scenarios.phases.environment import Environment
from testbed.scenarios.phases.feeder import Feeder
from testbed.telemetry.store import RunStore

RATING = 50000.0


def far_end(volt_var: bool) -> SiteConfig:
    raw = load_site("far-end").model_dump(mode="json", exclude_defaults=True)
    for d in raw["prosumers"][0]["devices"]:
        if d["kind"] == "pv" and not volt_var:
            d.pop("emulated_functions", None)
        d["port"] = 0
    return SiteConfig.model_validate(raw)


async def closed_loop(tmp_path: Path, volt_var: bool, steps: int = 8) -> list[tuple]:
    """(far-end V p.u. of the step's flow, measured P, measured Q, V the inverter saw)."""
    site = far_end(volt_var)
    store = RunStore(tmp_path / f"run-{volt_var}.db")
    em = SiteEmulators(site, free_ports=True, start_s=12 * 3600.0)
    await em.start(clock=False)
    env = Environment(em.physics, clear_sky_irradiance, lambda n, p, t: 300.0)
    checker = checker_for(site)
    feeder = Feeder(checker, background=0.0)
    io = DeviceIO(site, open_devices(em.resolved_site()), store, em)
    await io.connect()
    out = []
    try:
        vm: dict[str, float] = {}
        t = 12 * 3600.0
        for _ in range(steps):
            t += 60.0
            env.step(t, 60.0, vm_pu=vm)
            r = await io.step(t, 60.0)
            m = r.metered["far"]
            flow = feeder.step(t, 60.0, {"far": m.injection_w}, {"far": m.q_var})
            # the feeder's flow is runpp's with the measured P and Q at the far bus
            ref = checker.prosumer_vm(checker.check({"far": m.injection_w}, background=0.0,
                                                    base_q={"far": m.q_var}))["far"]
            assert flow.vm_pu["far"] == pytest.approx(ref, abs=1e-6)
            out.append((flow.vm_pu["far"], m.injection_w, m.q_var, vm.get("far", 1.0)))
            vm = dict(flow.vm_pu)
    finally:
        await io.close()
        await em.stop()
        store.close()
    return out


async def test_volt_var_holds_the_far_end_bus_in_band_where_unity_pf_does_not(tmp_path):
    unity = await closed_loop(tmp_path, volt_var=False)
    vv = await closed_loop(tmp_path, volt_var=True)
    assert all(v > 1.05 for v, *_ in unity)  # unity PF: above the planning band every step
    assert all(q == 0 for _, _, q, _ in unity)
    assert unity[0][0] == pytest.approx(vv[0][0], abs=1e-9)  # same start (no Q yet)
    assert all(v <= 1.05 for v, *_ in vv[1:])  # volt-var: inside from the first response on
    assert unity[-1][0] - vv[-1][0] > 0.005
    for _v, p, q, seen in vv[1:]:
        assert p > 45000  # the export is (almost) all still there
        # Q per the Category B curve at the voltage the inverter saw, within 2 % of the
        # rating (the standard's MRA is 5 %), measured through the driver
        assert q == pytest.approx(volt_var_q_pu(VOLT_VAR_B, seen) * RATING, abs=0.02 * RATING)
    assert vv[-1][2] < -5000


def test_bundled_scenario_runs_and_its_report_plots_q_per_prosumer(tmp_path):
    import json

    from typer.testing import CliRunner

    from testbed.cli import app
    from testbed.dashboards.report import figures, open_run

    res = CliRunner().invoke(app, ["run", "volt-var-far-end", "--fast", "-q", "--no-report",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    (run,) = tmp_path.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    # the first step's flow is at unity PF (no voltage fed back yet): above 1.05 p.u.;
    # every later one holds the band
    assert summary["grid"]["vm_max_pu"] > 1.05
    db, files = open_run(run)
    vm = [r[0] for r in db.execute("SELECT vm_max_pu FROM feeder ORDER BY t")]
    assert vm[0] > 1.05 and all(v <= 1.05 for v in vm[1:])
    sections = {s.key: s for s in figures(db, files)}
    db.close()
    q = [t for t in sections["prosumers"].figure.data if t.yaxis == "y2"]
    assert [t.name for t in q] == ["far"] and min(q[0].y) < -5000


def test_grafana_run_dashboard_plots_p_q_v_per_prosumer():
    import json

    path = Path(__file__).parent.parent / "lab" / "grafana" / "dashboards" / "testbed-run.json"
    dash = json.loads(path.read_text())  # test_dashboards checks it is the current export
    panels = {p["title"]: p for p in dash["panels"] if p["type"] != "row"}
    q = panels["Reactive power per inverter"]
    assert q["fieldConfig"]["defaults"]["unit"] == "voltampreact"
    assert all('r._field == "q_var"' in t["query"] for t in q["targets"])
    assert {'r.kind == "pv"', 'r.kind == "battery"'} <= {
        k for t in q["targets"] for k in ('r.kind == "pv"', 'r.kind == "battery"') if k in t["query"]}
    v = panels["Voltage per prosumer"]
    assert 'r._field == "voltage_v"' in v["targets"][0]["query"]
    assert '"prosumer"' in v["targets"][0]["query"]
    assert "Net power per prosumer" in panels
