"""Device physics: PV inverter, battery (paper eqs. 1-6), smart meter, household load.

Everything here is a pure function of its inputs: a step takes parameters, the previous
state and the step's exogenous inputs and returns a new state. Noise is derived from a
seed and the simulated time, never from a global generator, so a run replays exactly.

Sign conventions (one for the whole package):
- PV and battery AC power use the *generator* convention: positive = power delivered to
  the AC bus. A battery at +2000 W discharges, at -2000 W charges.
- The meter uses the *consumer* convention of SunSpec meter models: positive = import
  from the grid, negative = export.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, TypeVar

T = TypeVar("T")


def _maker(cls: type[T]) -> Callable[..., T]:
    """`cls(**fields)` for a frozen dataclass whose every field is given, without the
    generated __init__'s `object.__setattr__` per field (3x the cost): the per-step
    states are built 4 times per prosumer per step. The instance is the same (equality,
    hash, repr; tests/test_models.py checks every field is set)."""
    new = object.__new__

    def make(**fields: Any) -> T:
        o = new(cls)
        o.__dict__.update(fields)
        return o
    return make


def seeded_noise(seed: int, key: str, t_s: float) -> float:
    """A standard-normal-ish sample fixed by (seed, key, whole second of t).

    Hash-based so any point of a run can be recomputed without replaying the ones before.
    """
    digest = hashlib.blake2b(f"{seed}|{key}|{math.floor(t_s)}".encode(), digest_size=8).digest()
    u1, u2 = struct.unpack(">II", digest)
    a = (u1 + 1) / 4294967297.0
    b = u2 / 4294967296.0
    return math.sqrt(-2.0 * math.log(a)) * math.cos(2.0 * math.pi * b)


# --------------------------------------------------------------------------- PV inverter


class InverterStatus(StrEnum):
    """Mirrors SunSpec model 103 `St` names."""

    OFF = "OFF"  # disconnected from the grid by command
    SLEEPING = "SLEEPING"  # no irradiance
    MPPT = "MPPT"  # producing what the array gives
    THROTTLED = "THROTTLED"  # output held by the active-power limit


@dataclass(frozen=True)
class PVParams:
    rating_w: float = 5000.0
    """AC nameplate rating (SunSpec 120 `WRtg`)."""
    dc_peak_w: float | None = None
    """Array peak DC power at 1000 W/m2; defaults to 1.1 x rating (typical DC/AC ratio)."""
    efficiency: float = 0.96
    """DC -> AC conversion efficiency."""
    ramp_pct_per_s: float = 10.0
    """How fast the active-power limit moves to a new value, % of rating per second."""
    initial_energy_wh: float = 2_000_000.0
    """Lifetime energy counter at start: an inverter in service (SunSpec reads an
    accumulator of 0 as "not implemented")."""

    def __post_init__(self) -> None:
        if self.rating_w <= 0:
            raise ValueError(f"rating_w must be > 0, got {self.rating_w}")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"efficiency must be in (0, 1], got {self.efficiency}")
        if self.ramp_pct_per_s <= 0:
            raise ValueError(f"ramp_pct_per_s must be > 0, got {self.ramp_pct_per_s}")
        if self.dc_peak_w is not None and self.dc_peak_w <= 0:
            raise ValueError(f"dc_peak_w must be > 0, got {self.dc_peak_w}")

    @property
    def array_w(self) -> float:
        return self.dc_peak_w if self.dc_peak_w is not None else 1.1 * self.rating_w


@dataclass(frozen=True)
class PVState:
    ac_w: float = 0.0
    dc_w: float = 0.0
    limit_pct: float = 100.0
    """Commanded active-power limit (SunSpec 123 `WMaxLimPct`)."""
    limit_enabled: bool = False
    connected: bool = True
    """Grid connection (SunSpec 123 `Conn`); a disconnected inverter delivers nothing."""
    effective_limit_pct: float = 100.0
    """Limit actually applied this step, moving towards `limit_pct` at the ramp rate."""
    energy_wh: float = 0.0
    """Lifetime AC energy delivered (SunSpec 103 `WH`)."""
    status: InverterStatus = InverterStatus.SLEEPING
    q_var: float = 0.0
    """Reactive power, + injects vars (over-excited), - absorbs."""
    pf_setpoint: float | None = None
    """Constant power factor (SunSpec 123 `OutPFSet` with `OutPFSet_Ena`): + over-excited
    (injects vars), - under-excited (absorbs); None = unity."""


PF_UNSET = object()


def pv_command(state: PVState, *, limit_pct: float | None = None,
               limit_enabled: bool | None = None, connected: bool | None = None,
               pf: Any = PF_UNSET) -> PVState:
    """Apply a curtailment, connection or power-factor command (`pf` None = unity);
    out-of-range values are refused, not clamped."""
    if limit_pct is not None and not 0.0 <= limit_pct <= 100.0:
        raise ValueError(f"limit_pct must be within 0..100 %, got {limit_pct}")
    if pf is not PF_UNSET and pf is not None and not 0.0 < abs(pf) <= 1.0:
        raise ValueError(f"pf must be within -1..1 and not 0, got {pf}")
    return replace(
        state,
        pf_setpoint=state.pf_setpoint if pf is PF_UNSET else pf,
        limit_pct=state.limit_pct if limit_pct is None else float(limit_pct),
        limit_enabled=state.limit_enabled if limit_enabled is None else bool(limit_enabled),
        connected=state.connected if connected is None else bool(connected),
    )


def pv_step(p: PVParams, s: PVState, irradiance_w_m2: float, dt_s: float) -> PVState:
    """Irradiance -> DC -> AC, capped by rating and the (ramped) active-power limit."""
    irr = max(0.0, irradiance_w_m2)
    dc_w = p.array_w * irr / 1000.0
    available_w = min(dc_w * p.efficiency, p.rating_w)
    target_pct = s.limit_pct if s.limit_enabled else 100.0
    max_move = p.ramp_pct_per_s * dt_s
    delta = target_pct - s.effective_limit_pct
    effective = s.effective_limit_pct + max(-max_move, min(max_move, delta))
    cap_w = effective / 100.0 * p.rating_w if s.connected else 0.0
    if s.pf_setpoint is not None:  # at a fixed PF the apparent power stays within the rating
        cap_w = min(cap_w, p.rating_w * abs(s.pf_setpoint))
    ac_w = min(available_w, cap_w)
    if not s.connected:
        status = InverterStatus.OFF
    elif ac_w <= 0.0:
        status = InverterStatus.SLEEPING
    elif available_w > cap_w:
        status = InverterStatus.THROTTLED
    else:
        status = InverterStatus.MPPT
    dc_used = ac_w / p.efficiency if ac_w > 0 else 0.0
    q_var = 0.0
    if s.pf_setpoint is not None and ac_w > 0:
        pf = abs(s.pf_setpoint)
        q_var = math.copysign(ac_w * math.sqrt(1.0 - pf * pf) / pf, s.pf_setpoint)
    # not `dataclasses.replace` (3x the constructor's cost, 150 states a step at 50
    # prosumers), nor the constructor (3x `_maker`'s): every field named, the unchanged
    # ones from `s`
    return _pv_state(
        ac_w=ac_w, dc_w=dc_used, limit_pct=s.limit_pct, limit_enabled=s.limit_enabled,
        connected=s.connected, effective_limit_pct=effective,
        energy_wh=s.energy_wh + ac_w * dt_s / 3600.0, status=status, q_var=q_var,
        pf_setpoint=s.pf_setpoint,
    )


# --------------------------------------------------------------------------- battery


class ChargeStatus(StrEnum):
    """Mirrors SunSpec model 802/124 `ChaSt` names."""

    EMPTY = "EMPTY"
    DISCHARGING = "DISCHARGING"
    CHARGING = "CHARGING"
    FULL = "FULL"
    HOLDING = "HOLDING"


EPS_W = 1e-6
"""Below a microwatt a setpoint and its feasible limit are the same: no clamp is reported."""


class ClampReason(StrEnum):
    SOC_MIN = "soc_min"  # eq. (1): discharging further would go below SOC_min
    SOC_MAX = "soc_max"  # eq. (1): charging further would go above SOC_max
    DISCHARGE_RATE = "discharge_rate"  # eq. (3): above the maximum discharge power
    CHARGE_RATE = "charge_rate"  # eq. (2): above the maximum charge power


@dataclass(frozen=True)
class BatteryParams:
    capacity_wh: float = 10000.0
    soc_min: float = 0.10
    soc_max: float = 0.95
    max_charge_w: float = 5000.0
    max_discharge_w: float = 5000.0
    eta_ch: float = 0.95
    eta_dis: float = 0.95
    soc_init: float = 0.5

    def __post_init__(self) -> None:
        if self.capacity_wh <= 0:
            raise ValueError(f"capacity_wh must be > 0, got {self.capacity_wh}")
        if not 0.0 <= self.soc_min < self.soc_max <= 1.0:
            raise ValueError(
                f"need 0 <= soc_min < soc_max <= 1, got soc_min={self.soc_min}, soc_max={self.soc_max}")
        if not self.soc_min <= self.soc_init <= self.soc_max:
            raise ValueError(
                f"soc_init={self.soc_init} must lie within [soc_min={self.soc_min}, soc_max={self.soc_max}]")
        for name in ("max_charge_w", "max_discharge_w"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("eta_ch", "eta_dis"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class BatteryState:
    soc: float
    setpoint_w: float = 0.0
    """Commanded AC power, + discharge / - charge."""
    power_w: float = 0.0
    """AC power actually delivered in the last step (setpoint after clamping)."""
    clamped: bool = False
    clamp_reason: ClampReason | None = None
    charged_wh: float = 0.0
    """Lifetime AC energy taken in (E_ch summed)."""
    discharged_wh: float = 0.0
    """Lifetime AC energy delivered (E_dis summed)."""
    status: ChargeStatus = ChargeStatus.HOLDING
    q_var: float = 0.0
    """Reactive power, + injects vars; 0 unless an IEEE 1547 behaviour sets it."""

    @classmethod
    def initial(cls, p: BatteryParams) -> BatteryState:
        return cls(soc=p.soc_init)


def battery_power_limits(p: BatteryParams, soc: float, dt_s: float) -> tuple[float, float]:
    """(max charge W, max discharge W) feasible over the next `dt_s` (eqs. 1-3 and 6).

    Eq. (6) SOC_t = SOC_{t-1} + eta_ch*E_ch/Cap - E_dis/(eta_dis*Cap), bounded by eq. (1),
    gives the energy headroom; eqs. (2)-(3) cap the rate.
    """
    hours = dt_s / 3600.0
    room_up_wh = max(0.0, (p.soc_max - soc) * p.capacity_wh / p.eta_ch)
    room_down_wh = max(0.0, (soc - p.soc_min) * p.capacity_wh * p.eta_dis)
    if hours <= 0:
        return p.max_charge_w, p.max_discharge_w
    return min(p.max_charge_w, room_up_wh / hours), min(p.max_discharge_w, room_down_wh / hours)


def battery_command(state: BatteryState, setpoint_w: float) -> BatteryState:
    """Record a new power setpoint; feasibility is decided by the physics at the next step."""
    if not math.isfinite(setpoint_w):
        raise ValueError(f"setpoint_w must be finite, got {setpoint_w}")
    return replace(state, setpoint_w=float(setpoint_w))


def battery_step(p: BatteryParams, s: BatteryState, dt_s: float) -> BatteryState:
    """Advance SOC by eq. (6), clamping an infeasible setpoint and saying why."""
    max_ch, max_dis = battery_power_limits(p, s.soc, dt_s)
    sp = s.setpoint_w
    reason: ClampReason | None = None
    power = sp
    if sp > max_dis + EPS_W:
        power = max_dis
        reason = ClampReason.DISCHARGE_RATE if max_dis >= p.max_discharge_w else ClampReason.SOC_MIN
    elif -sp > max_ch + EPS_W:
        power = -max_ch
        reason = ClampReason.CHARGE_RATE if max_ch >= p.max_charge_w else ClampReason.SOC_MAX
    hours = dt_s / 3600.0
    e_dis = max(power, 0.0) * hours
    e_ch = max(-power, 0.0) * hours
    soc = s.soc + p.eta_ch * e_ch / p.capacity_wh - e_dis / (p.eta_dis * p.capacity_wh)
    soc = min(p.soc_max, max(p.soc_min, soc))  # only rounding can push it out
    if power > 0:
        status = ChargeStatus.DISCHARGING
    elif power < 0:
        status = ChargeStatus.CHARGING
    elif soc <= p.soc_min + 1e-9:
        status = ChargeStatus.EMPTY
    elif soc >= p.soc_max - 1e-9:
        status = ChargeStatus.FULL
    else:
        status = ChargeStatus.HOLDING
    return _battery_state(  # the fast constructor, as in `pv_step`
        soc=soc, setpoint_w=s.setpoint_w, power_w=power, clamped=reason is not None,
        clamp_reason=reason, charged_wh=s.charged_wh + e_ch,
        discharged_wh=s.discharged_wh + e_dis, status=status, q_var=s.q_var,
    )


# --------------------------------------------------------------------------- meter


@dataclass(frozen=True)
class MeterParams:
    v_nominal: float = 230.0
    f_nominal: float = 50.0
    v_drop_per_kw: float = 0.4
    """Volts lost per kW imported (a feeder's impedance seen from the connection point)."""
    v_noise: float = 0.3
    f_noise: float = 0.01
    initial_import_wh: float = 1_000_000.0
    initial_export_wh: float = 500_000.0
    """Register readings at start: a meter in service (SunSpec reads 0 as "not implemented")."""
    seed: int = 0


@dataclass(frozen=True)
class MeterState:
    net_w: float = 0.0
    """+ import / - export (SunSpec meter convention)."""
    import_wh: float = 0.0
    export_wh: float = 0.0
    voltage_v: float = 230.0
    frequency_hz: float = 50.0


def net_power_w(load_w: float, pv_w: float, battery_w: float) -> float:
    """Net import at the connection point: load - PV - battery discharge + battery charge."""
    return load_w - pv_w - battery_w


def meter_step(p: MeterParams, s: MeterState, *, load_w: float, pv_w: float,
               battery_w: float, dt_s: float, t_s: float, key: str = "meter",
               external_w: float = 0.0, voltage_v: float | None = None) -> MeterState:
    """Integrate import/export registers (never decreasing) and derive V and f.

    `external_w`: measured output of real devices behind the same meter (+ = generation
    or discharge), so an emulated meter sees the hardware beside it. `voltage_v`: the
    voltage a feeder power flow computed at the connection point; without one the meter
    models its own drop (`v_drop_per_kw`) and noise."""
    net = net_power_w(load_w, pv_w + external_w, battery_w)
    hours = dt_s / 3600.0
    if voltage_v is not None:
        v = voltage_v
    else:
        v = p.v_nominal - p.v_drop_per_kw * net / 1000.0 \
            + p.v_noise * seeded_noise(p.seed, key + ".v", t_s)
    f = p.f_nominal + p.f_noise * seeded_noise(p.seed, key + ".f", t_s)
    return _meter_state(
        net_w=net,
        import_wh=s.import_wh + max(net, 0.0) * hours,
        export_wh=s.export_wh + max(-net, 0.0) * hours,
        voltage_v=v,
        frequency_hz=f,
    )


# --------------------------------------------------------------------------- household load


@dataclass(frozen=True)
class LoadParams:
    base_w: float = 300.0
    """Night-time base load."""
    peak_w: float = 2500.0
    """Evening peak (before noise)."""
    noise: float = 0.08
    """Relative noise, one sample per second of simulated time."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.base_w < 0 or self.peak_w < self.base_w:
            raise ValueError(f"need 0 <= base_w <= peak_w, got base_w={self.base_w}, peak_w={self.peak_w}")


def household_load_w(p: LoadParams, t_s: float, key: str = "load") -> float:
    """Residential profile: base load plus morning (7:30) and evening (19:00) peaks.

    `t_s` is seconds since local midnight of day 0; the shape repeats daily.
    """
    w = p.base_w + (p.peak_w - p.base_w) * household_shape(t_s)
    if not p.noise:  # the noise term would be 1.0 + 0.0 * (a finite draw): exactly 1.0
        return max(0.0, w)
    return max(0.0, w * (1.0 + p.noise * seeded_noise(p.seed, key, t_s)))


def household_shape(t_s: float) -> float:
    """The residential profile's shape at t, 0..1 (the same for every household: a
    schedule over many households computes it once per instant)."""
    h = (t_s / 3600.0) % 24.0
    morning = 0.45 * math.exp(-((h - 7.5) ** 2) / (2 * 1.0**2))
    evening = 1.0 * math.exp(-((h - 19.0) ** 2) / (2 * 1.6**2))
    midday = 0.20 * math.exp(-((h - 13.0) ** 2) / (2 * 2.0**2))
    return max(morning, evening, midday)


def clear_sky_irradiance(t_s: float, *, peak_w_m2: float = 1000.0, sunrise_h: float = 6.0,
                         sunset_h: float = 20.0) -> float:
    """A smooth clear-sky day: a sine arch between sunrise and sunset, zero at night."""
    h = (t_s / 3600.0) % 24.0
    if not sunrise_h < h < sunset_h:
        return 0.0
    return peak_w_m2 * math.sin(math.pi * (h - sunrise_h) / (sunset_h - sunrise_h)) ** 1.2


# --------------------------------------------------------------------------- prosumer


@dataclass(frozen=True)
class ProsumerParams:
    """One connection point: optional PV, optional battery, a meter and a household load."""

    pv: PVParams | None = None
    battery: BatteryParams | None = None
    meter: MeterParams = field(default_factory=MeterParams)
    load: LoadParams = field(default_factory=LoadParams)


@dataclass(frozen=True)
class ProsumerState:
    pv: PVState | None
    battery: BatteryState | None
    meter: MeterState
    load_w: float = 0.0
    irradiance_w_m2: float = 0.0
    t_s: float = 0.0

    @classmethod
    def initial(cls, p: ProsumerParams, t_s: float = 0.0) -> ProsumerState:
        return cls(
            pv=PVState(energy_wh=p.pv.initial_energy_wh) if p.pv else None,
            battery=BatteryState.initial(p.battery) if p.battery else None,
            meter=MeterState(import_wh=p.meter.initial_import_wh, export_wh=p.meter.initial_export_wh,
                             voltage_v=p.meter.v_nominal, frequency_hz=p.meter.f_nominal),
            t_s=t_s,
        )


Behaviour = Callable[[Any, float, float, float], Any]
"""(device state, terminal V, terminal Hz, dt s) -> device state."""


_pv_state = _maker(PVState)
_battery_state = _maker(BatteryState)
_meter_state = _maker(MeterState)
_prosumer_state = _maker(ProsumerState)


def prosumer_step(p: ProsumerParams, s: ProsumerState, *, irradiance_w_m2: float,
                  load_w: float, dt_s: float, key: str = "", external_w: float = 0.0,
                  voltage_v: float | None = None, frequency_hz: float | None = None,
                  pv_behaviour: Behaviour | None = None,
                  battery_behaviour: Behaviour | None = None) -> ProsumerState:
    """Advance one connection point by `dt_s`: devices first, then the meter sees their sum
    (plus `external_w` of real devices beside them; `voltage_v` from the feeder, if any).

    A behaviour (the IEEE 1547 functions of `der1547`) turns a device's physics output
    into what its inverter delivers, given the terminal voltage and frequency: the feeder's
    (or a scenario event's) when given, else what the meter showed the step before."""
    t = s.t_s + dt_s
    v_term = voltage_v if voltage_v is not None else s.meter.voltage_v
    f_term = frequency_hz if frequency_hz is not None else s.meter.frequency_hz
    pv = pv_step(p.pv, s.pv, irradiance_w_m2, dt_s) if p.pv and s.pv else None
    if pv is not None and pv_behaviour is not None:
        pv = pv_behaviour(pv, v_term, f_term, dt_s)
    bat = None
    if p.battery and s.battery:
        if battery_behaviour is None:
            bat = battery_step(p.battery, s.battery, dt_s)
        else:  # the inverter's functions shape the command; SOC limits still clamp it
            shaped = battery_behaviour(s.battery, v_term, f_term, dt_s)
            bat = replace(battery_step(p.battery, shaped, dt_s), setpoint_w=s.battery.setpoint_w)
    meter = meter_step(
        p.meter, s.meter, load_w=load_w, pv_w=pv.ac_w if pv else 0.0,
        battery_w=bat.power_w if bat else 0.0, dt_s=dt_s, t_s=t, key=key + ".meter",
        external_w=external_w, voltage_v=voltage_v,
    )
    return _prosumer_state(pv=pv, battery=bat, meter=meter, load_w=load_w,
                         irradiance_w_m2=irradiance_w_m2, t_s=t)
