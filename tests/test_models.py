"""Device physics against hand-computed numbers (paper eqs. 1-6 for the battery)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.physics.models import (
    BatteryParams,
    BatteryState,
    ChargeStatus,
    ClampReason,
    InverterStatus,
    LoadParams,
    MeterParams,
    MeterState,
    ProsumerParams,
    ProsumerState,
    PVParams,
    PVState,
    battery_command,
    battery_power_limits,
    battery_step,
    household_load_w,
    meter_step,
    prosumer_step,
    pv_command,
    pv_step,
    seeded_noise,
)


def test_pv_ac_power_is_irradiance_times_array_times_efficiency():
    p = PVParams(rating_w=5000, dc_peak_w=4000, efficiency=0.95)
    s = pv_step(p, PVState(), irradiance_w_m2=600, dt_s=1)
    assert s.ac_w == pytest.approx(4000 * 0.6 * 0.95)
    assert s.status is InverterStatus.MPPT
    assert s.energy_wh == pytest.approx(4000 * 0.6 * 0.95 / 3600)


def test_pv_clips_at_rating_and_sleeps_at_night():
    p = PVParams(rating_w=5000, dc_peak_w=6000, efficiency=0.96)
    assert pv_step(p, PVState(), 1000, 1).ac_w == 5000
    night = pv_step(p, PVState(), 0, 1)
    assert night.ac_w == 0 and night.status is InverterStatus.SLEEPING


def test_pv_limit_ramps_at_the_configured_rate():
    p = PVParams(rating_w=5000, dc_peak_w=6000, efficiency=0.96, ramp_pct_per_s=10)
    s = pv_command(PVState(), limit_pct=40, limit_enabled=True)
    s = pv_step(p, s, 1000, 1)
    assert s.effective_limit_pct == pytest.approx(90)
    assert s.ac_w == pytest.approx(4500)
    assert s.status is InverterStatus.THROTTLED
    for _ in range(10):
        s = pv_step(p, s, 1000, 1)
    assert s.ac_w == pytest.approx(2000)
    s = pv_step(p, pv_command(s, limit_enabled=False), 1000, 2)
    assert s.ac_w == pytest.approx(3000)  # 40 % + 2 s x 10 %/s


def test_pv_disconnect_stops_output():
    p = PVParams(rating_w=5000)
    s = pv_step(p, pv_command(PVState(), connected=False), 1000, 1)
    assert s.ac_w == 0 and s.status is InverterStatus.OFF
    assert pv_step(p, pv_command(s, connected=True), 1000, 1).ac_w == 5000


def test_pv_refuses_out_of_range_limit():
    with pytest.raises(ValueError, match="0..100"):
        pv_command(PVState(), limit_pct=120)


def test_battery_soc_follows_eq6_with_efficiencies():
    p = BatteryParams(capacity_wh=10000, eta_ch=0.9, eta_dis=0.8, soc_init=0.5,
                      max_charge_w=5000, max_discharge_w=5000)
    s = battery_step(p, battery_command(BatteryState.initial(p), 2000), 3600)
    # E_dis = 2000 Wh at the AC side; SOC drops by E_dis / (eta_dis * Cap)
    assert s.soc == pytest.approx(0.5 - 2000 / (0.8 * 10000))
    assert s.power_w == 2000 and not s.clamped and s.status is ChargeStatus.DISCHARGING
    s = battery_step(p, battery_command(s, -1000), 3600)
    assert s.soc == pytest.approx(0.25 + 0.9 * 1000 / 10000)
    assert s.charged_wh == pytest.approx(1000) and s.discharged_wh == pytest.approx(2000)


def test_battery_clamps_at_soc_min_and_says_so():
    p = BatteryParams(capacity_wh=10000, soc_min=0.1, soc_init=0.12, eta_dis=0.9)
    s = battery_step(p, battery_command(BatteryState.initial(p), 5000), 3600)
    # only (0.12 - 0.10) * 10000 * 0.9 = 180 Wh can come out within SOC_min
    assert s.power_w == pytest.approx(180)
    assert s.soc == pytest.approx(0.1)
    assert s.clamped and s.clamp_reason is ClampReason.SOC_MIN
    s = battery_step(p, s, 60)
    assert s.power_w == 0 and s.clamp_reason is ClampReason.SOC_MIN and s.status is ChargeStatus.EMPTY


def test_battery_clamps_charge_rate_and_soc_max():
    p = BatteryParams(capacity_wh=10000, soc_max=0.9, soc_init=0.5, max_charge_w=3000, eta_ch=1.0)
    s = battery_step(p, battery_command(BatteryState.initial(p), -4000), 60)
    assert s.power_w == -3000 and s.clamp_reason is ClampReason.CHARGE_RATE
    full = battery_step(p, battery_command(BatteryState(soc=0.9), -100), 60)
    assert full.power_w == 0 and full.clamp_reason is ClampReason.SOC_MAX


def test_battery_limits_match_eq6_headroom():
    p = BatteryParams(capacity_wh=10000, soc_min=0.1, soc_max=0.9, eta_ch=0.95, eta_dis=0.95,
                      max_charge_w=50000, max_discharge_w=50000)
    ch, dis = battery_power_limits(p, 0.5, 3600)
    assert ch == pytest.approx(0.4 * 10000 / 0.95)
    assert dis == pytest.approx(0.4 * 10000 * 0.95)


@given(soc=st.floats(0.1, 0.9), sp=st.floats(-20000, 20000), dt=st.floats(1, 3600))
def test_battery_never_leaves_bounds(soc, sp, dt):
    p = BatteryParams(capacity_wh=10000, soc_min=0.1, soc_max=0.9, soc_init=0.5)
    s = battery_step(p, battery_command(BatteryState(soc=soc), sp), dt)
    assert p.soc_min - 1e-12 <= s.soc <= p.soc_max + 1e-12
    assert -p.max_charge_w - 1e-9 <= s.power_w <= p.max_discharge_w + 1e-9
    assert s.clamped == (abs(s.power_w - sp) > 1e-6)


def test_battery_params_validate():
    with pytest.raises(ValueError, match="soc_min < soc_max"):
        BatteryParams(soc_min=0.9, soc_max=0.5)
    with pytest.raises(ValueError, match="soc_init"):
        BatteryParams(soc_init=0.99)


def test_meter_net_power_and_registers():
    p = MeterParams(v_noise=0, f_noise=0, v_drop_per_kw=0.5)
    s = meter_step(p, MeterState(), load_w=1000, pv_w=3000, battery_w=-500, dt_s=3600, t_s=0)
    assert s.net_w == pytest.approx(1000 - 3000 + 500)
    assert s.export_wh == pytest.approx(1500) and s.import_wh == 0
    assert s.voltage_v == pytest.approx(230 + 0.5 * 1.5)
    s2 = meter_step(p, s, load_w=2000, pv_w=0, battery_w=500, dt_s=1800, t_s=1)
    assert s2.import_wh == pytest.approx(750) and s2.export_wh == pytest.approx(1500)


@given(st.lists(st.tuples(st.floats(0, 20000), st.floats(0, 20000), st.floats(-9000, 9000)),
                min_size=1, max_size=30))
def test_meter_energy_registers_never_decrease(steps):
    s = MeterState()
    for i, (load, pv, bat) in enumerate(steps):
        n = meter_step(MeterParams(), s, load_w=load, pv_w=pv, battery_w=bat, dt_s=10, t_s=i)
        assert n.import_wh >= s.import_wh and n.export_wh >= s.export_wh
        s = n


def test_load_profile_shape_and_seed():
    p = LoadParams(base_w=300, peak_w=3000, noise=0.0)
    assert household_load_w(p, 3 * 3600) == pytest.approx(300, rel=0.01)
    assert household_load_w(p, 19 * 3600) == pytest.approx(3000, rel=0.01)
    noisy = LoadParams(base_w=300, peak_w=3000, noise=0.1, seed=5)
    a = [household_load_w(noisy, t) for t in range(0, 86400, 3600)]
    assert a == [household_load_w(noisy, t) for t in range(0, 86400, 3600)]
    other = LoadParams(base_w=300, peak_w=3000, noise=0.1, seed=6)
    assert a != [household_load_w(other, t) for t in range(0, 86400, 3600)]


def test_seeded_noise_is_roughly_standard_normal():
    xs = [seeded_noise(1, "k", t) for t in range(4000)]
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
    assert abs(mean) < 0.08 and 0.9 < sd < 1.1


def test_prosumer_meter_sees_load_minus_pv_minus_battery():
    params = ProsumerParams(pv=PVParams(rating_w=4000, dc_peak_w=4000, efficiency=1.0),
                            battery=BatteryParams(), meter=MeterParams(v_noise=0, f_noise=0))
    s = ProsumerState.initial(params)
    s = ProsumerState(pv=s.pv, battery=battery_command(s.battery, -1500), meter=s.meter)
    s = prosumer_step(params, s, irradiance_w_m2=500, load_w=800, dt_s=1)
    assert s.pv.ac_w == pytest.approx(2000)
    assert s.meter.net_w == pytest.approx(800 - 2000 + 1500)


def test_step_functions_build_complete_states_equal_to_the_constructors() -> None:
    """The per-step states come from a fast constructor (`models._maker`): every field
    set, and equal (hash, repr too) to what the dataclass's own constructor makes."""
    import dataclasses

    from testbed.physics.models import BatteryParams, ProsumerParams, ProsumerState, prosumer_step

    p = ProsumerParams(pv=PVParams(rating_w=4000.0), battery=BatteryParams())
    s = ProsumerState.initial(p, 0.0)
    for k in range(3):
        s = prosumer_step(p, s, irradiance_w_m2=700.0, load_w=800.0 + k, dt_s=60.0,
                          key="h", voltage_v=None if k == 0 else 231.0)
    for state in (s, s.pv, s.battery, s.meter):
        names = {f.name for f in dataclasses.fields(state)}
        assert set(vars(state)) == names, type(state).__name__
        again = type(state)(**{n: getattr(state, n) for n in names})
        assert again == state and hash(again) == hash(state) and repr(again) == repr(state)
        with pytest.raises(dataclasses.FrozenInstanceError):
            state.t_s = 1.0  # type: ignore[misc]
