"""The aggregator's day-ahead schedule (`scenarios.profiles.forecast_schedule`)."""

from __future__ import annotations

import math
from dataclasses import replace

from testbed.config import load_site
from testbed.physics.models import (
    LoadParams,
    PVState,
    clear_sky_irradiance,
    household_load_w,
    pv_step,
)
from testbed.scenarios.model import bundled_scenario_path, load_scenario
from testbed.scenarios.profiles import _noise, forecast_schedule, load_fn


def reference(sc, site) -> list[float]:  # type: ignore[no-untyped-def]
    """The schedule as its definition reads: every prosumer's noise-free load and fresh
    PV output, one call each per sample."""
    iv = sc.market.interval_s
    first, n = int(sc.start // iv), math.ceil(sc.duration / iv) + 2
    per = max(1, round(iv / 60.0))
    dt = iv / per
    physics = [p.physics(seed=0) for p in site.prosumers]
    out = []
    for k in range(first, first + n):
        pv_wh = load_wh = 0.0
        for s in range(per):
            t = k * iv + (s + 0.5) * dt
            irr = clear_sky_irradiance(t)
            for ph in physics:
                load_wh += household_load_w(replace(ph.load, noise=0.0), t) * dt / 3600
                if ph.pv is not None:
                    pv_wh += pv_step(ph.pv, PVState(), irr, 1.0).ac_w * dt / 3600
        pv_wh *= 1 + sc.forecast.pv_bias_pct / 100
        load_wh *= 1 + sc.forecast.load_bias_pct / 100
        net = (load_wh - pv_wh) / 1000
        if sc.forecast.noise_pct:
            net += (load_wh + pv_wh) / 1000 * sc.forecast.noise_pct / 100 * _noise(sc.seed,
                                                                                 "fc", k)
        out.append(net)
    return out


def test_schedule_is_the_per_prosumer_sum_bit_for_bit() -> None:
    sc = load_scenario(bundled_scenario_path("demo"))
    sc = sc.model_copy(update={"start": 0.0, "duration": 86400.0, "forecast": sc.forecast.model_copy(
        update={"pv_bias_pct": 12.0, "load_bias_pct": -4.0, "noise_pct": 3.0})})
    site = load_site(sc.site)
    schedule = forecast_schedule(sc, site)
    assert schedule.first_interval == int(sc.start // sc.market.interval_s)
    assert list(schedule.energy_kwh) == reference(sc, site)  # exact, not approx
    assert len(schedule.energy_kwh) == 96 + 2
    assert any(e < 0 for e in schedule.energy_kwh) and any(e > 0 for e in schedule.energy_kwh)


def test_noise_free_load_is_the_shape_alone() -> None:
    p = LoadParams(base_w=300.0, peak_w=2800.0, noise=0.0, seed=7)
    for t in range(0, 86400, 900):
        assert household_load_w(p, t, key="a") == household_load_w(p, t, key="b") \
            == household_load_w(replace(p, seed=8), t)


def test_load_profile_is_the_household_load_with_the_scenarios_noise() -> None:
    sc = load_scenario(bundled_scenario_path("demo"))
    sc = sc.model_copy(update={"profiles": sc.profiles.model_copy(
        update={"load_noise": 0.11})})
    site = load_site(sc.site)
    load = load_fn(sc, site)
    for p in site.prosumers:
        lp = p.physics(sc.seed).load
        for t in (0.0, 7.5 * 3600, 19 * 3600 + 17):
            want = household_load_w(replace(lp, noise=0.11), t, key=p.name)
            assert load(p.name, lp, t) == want  # the same draw, twice: the params are cached
            assert load(p.name, lp, t) == want
    assert load(site.prosumers[0].name, LoadParams(noise=0.5), 3600.0) == household_load_w(
        LoadParams(noise=0.11), 3600.0, key=site.prosumers[0].name)
