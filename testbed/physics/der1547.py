"""IEEE 1547-2018 inverter behaviour through EPRI's OpenDER.

OpenDER (`opender`) is the model: constant power factor, constant reactive power,
volt-var, watt-var, volt-watt, frequency droop, active power limit, enter service and
trip, each with its open-loop response time. What is ours: the settings in per unit as
the emulators' SunSpec points give them (`Settings1547`), and the frame around OpenDER:

- OpenDER works at 60 Hz (its droop and trip code says 60). A 50 Hz device is presented
  to it scaled by 60/f_nom, frequencies and deadbands alike, so the droop's per-unit
  relation (df / f_nom / k) is what the standard says.
- Voltages are phase-to-neutral at the device terminal (the feeder's bus voltage), the
  nominal line-to-line voltage is sqrt(3) x the phase nominal.
- OpenDER keeps state between steps (filters, timers), so a `Der1547` is an object, not a
  pure function; its step is deterministic (no randomised enter-service delay).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

from opender import DER, DER_BESS, DER_PV

# OpenDER warns on every construction that a default DC voltage is below the AC peak.
logging.getLogger().addFilter(lambda r: "DC voltage should be greater" not in r.getMessage())

OPENDER_F_NOM = 60.0
Point = tuple[float, float]


@dataclass(frozen=True)
class Settings1547:
    """The 1547 functions' settings, per unit of the nameplate (P of `rating_w`, Q of the
    apparent-power rating, V of the nominal phase voltage); None = function disabled.
    Defaults are the standard's Category B defaults (volt-var curve, 5 s / 10 s OLRTs)."""

    const_pf: float | None = None
    """Constant power factor (0 < pf <= 1) with `pf_excitation`."""
    pf_excitation: Literal["INJ", "ABS"] = "INJ"
    """INJ: over-excited (injects vars), ABS: under-excited (absorbs vars)."""
    const_q_pu: float | None = None
    volt_var: tuple[Point, Point, Point, Point] | None = None
    """(V pu, Q pu) x 4, V ascending."""
    volt_var_olrt_s: float = 5.0
    volt_var_vref_pu: float = 1.0
    watt_var: tuple[Point, Point, Point] | None = None
    """(P pu, Q pu) x 3, P ascending."""
    volt_watt: tuple[Point, Point] | None = None
    """(V pu, P pu) x 2: full power at V1, P2 at V2."""
    volt_watt_olrt_s: float = 10.0
    droop: tuple[float, float, float, float] | None = None
    """(over-frequency deadband Hz, under-frequency deadband Hz, kOF, kUF)."""
    droop_olrt_s: float = 5.0
    p_limit_pu: float | None = None
    """Active power limit (0..1 of the rating)."""
    permit_service: bool = True
    """Enter service permitted (703 ES, legacy Conn); False ceases to energise."""
    es_delay_s: float = 300.0
    es_ramp_s: float = 300.0
    es_v_pu: Point = (0.917, 1.05)
    es_f_hz_from_nominal: Point = (-0.5, 0.1)
    trip: tuple[tuple[str, float, float], ...] = ()
    """Must-trip settings: (OV1 | OV2 | UV1 | UV2 | OF1 | OF2 | UF1 | UF2, level, clearing
    time s); V levels per unit, frequency levels in Hz from nominal. Empty: OpenDER's
    defaults for the device's category."""


VOLT_VAR_B: tuple[Point, Point, Point, Point] = ((0.92, 0.44), (0.98, 0.0), (1.02, 0.0),
                                                 (1.08, -0.44))
"""IEEE 1547-2018 Table 8, Category B default volt-var curve."""


@dataclass
class Der1547:
    """One inverter (`kind` pv) or battery inverter (`kind` battery) with OpenDER inside."""

    kind: Literal["pv", "battery"]
    rating_w: float
    v_nom: float = 230.0
    f_nom: float = 50.0
    q_max_pu: float = 0.44
    """Reactive capability, injection and absorption, per unit of the rating (Cat B)."""
    settings: Settings1547 = field(default_factory=Settings1547)
    p_w: float = 0.0
    q_var: float = 0.0
    status: str = "Continuous Operation"

    def __post_init__(self) -> None:
        np = dict(NP_VA_MAX=self.rating_w, NP_P_MAX=self.rating_w,
                  NP_Q_MAX_INJ=self.q_max_pu * self.rating_w,
                  NP_Q_MAX_ABS=self.q_max_pu * self.rating_w,
                  NP_AC_V_NOM=self.v_nom * math.sqrt(3))
        if self.kind == "pv":
            self._der: DER = DER_PV(**np)
        else:
            self._der = DER_BESS(**np, NP_P_MAX_CHARGE=self.rating_w,
                                 NP_APPARENT_POWER_CHARGE_MAX=self.rating_w)
        f = self._der.der_file
        f.NP_V_DC = 2 * self.v_nom * math.sqrt(3)
        f.ES_RANDOMIZED_DELAY = 0.0
        self._fs = OPENDER_F_NOM / self.f_nom
        self.apply(self.settings, initial=True)

    def apply(self, s: Settings1547, *, initial: bool = False) -> None:
        """Write settings into OpenDER's common file format (it models the execution delay)."""
        f = self._der.der_file
        fs = self._fs
        f.CONST_PF_MODE_ENABLE = s.const_pf is not None
        if s.const_pf is not None:
            f.CONST_PF, f.CONST_PF_EXCITATION = s.const_pf, s.pf_excitation
        f.CONST_Q_MODE_ENABLE = s.const_q_pu is not None
        if s.const_q_pu is not None:
            f.CONST_Q = s.const_q_pu
        f.QV_MODE_ENABLE = s.volt_var is not None
        if s.volt_var is not None:
            for i, (v, q) in enumerate(s.volt_var, 1):
                setattr(f, f"QV_CURVE_V{i}", v)
                setattr(f, f"QV_CURVE_Q{i}", q)
            f.QV_OLRT, f.QV_VREF = s.volt_var_olrt_s, s.volt_var_vref_pu
        f.QP_MODE_ENABLE = s.watt_var is not None
        if s.watt_var is not None:
            for i, (p, q) in enumerate(s.watt_var, 1):
                setattr(f, f"QP_CURVE_P{i}_GEN", p)
                setattr(f, f"QP_CURVE_Q{i}_GEN", q)
        f.PV_MODE_ENABLE = s.volt_watt is not None
        if s.volt_watt is not None:
            (v1, p1), (v2, p2) = s.volt_watt
            f.PV_CURVE_V1, f.PV_CURVE_P1, f.PV_CURVE_V2, f.PV_CURVE_P2 = v1, p1, v2, p2
            f.PV_OLRT = s.volt_watt_olrt_s
        f.PF_MODE_ENABLE = s.droop is not None
        if s.droop is not None:
            dbof, dbuf, kof, kuf = s.droop
            f.PF_DBOF, f.PF_DBUF, f.PF_KOF, f.PF_KUF = dbof * fs, dbuf * fs, kof, kuf
            f.PF_OLRT = s.droop_olrt_s
        f.AP_LIMIT_ENABLE = s.p_limit_pu is not None
        if s.p_limit_pu is not None:
            f.AP_LIMIT = s.p_limit_pu
        f.ES_PERMIT_SERVICE = s.permit_service
        f.ES_DELAY, f.ES_RAMP_RATE = s.es_delay_s, s.es_ramp_s
        f.ES_V_LOW, f.ES_V_HIGH = s.es_v_pu
        f.ES_F_LOW = OPENDER_F_NOM + s.es_f_hz_from_nominal[0] * fs
        f.ES_F_HIGH = OPENDER_F_NOM + s.es_f_hz_from_nominal[1] * fs
        for name, level, t in s.trip:
            if name[1] == "V":
                setattr(f, f"{name}_TRIP_V", level)
            else:
                setattr(f, f"{name}_TRIP_F", OPENDER_F_NOM + level * fs)
            setattr(f, f"{name}_TRIP_T", t)
        self.settings = s

    def trip_defaults(self) -> dict[str, tuple[float, float]]:
        """OpenDER's must-trip settings: name -> (level, clearing time), V per unit and
        frequency from nominal in this device's Hz."""
        f, out = self._der.der_file, {}
        for name in ("OV1", "OV2", "UV1", "UV2"):
            out[name] = (float(getattr(f, f"{name}_TRIP_V")), float(getattr(f, f"{name}_TRIP_T")))
        for name in ("OF1", "OF2", "UF1", "UF2"):
            hz = (float(getattr(f, f"{name}_TRIP_F")) - OPENDER_F_NOM) / self._fs
            out[name] = (hz, float(getattr(f, f"{name}_TRIP_T")))
        return out

    def step(self, dt_s: float, *, v: float, f_hz: float, p_w: float) -> tuple[float, float]:
        """Advance by `dt_s` with terminal phase voltage `v`, frequency `f_hz` and `p_w`: the
        available AC power of a PV inverter, the demanded power (+ discharge) of a battery.
        Returns (P W, Q var), generator convention (+Q injects vars)."""
        DER.t_s = dt_s  # OpenDER's step is a class attribute
        d = self._der
        f_in = OPENDER_F_NOM + (f_hz - self.f_nom) * self._fs
        if self.kind == "pv":
            d.update_der_input(p_dc_w=max(0.0, p_w) / d.der_file.NP_EFFICIENCY, v=v, f=f_in)
        else:
            d.update_der_input(p_dem_w=p_w, v=v, f=f_in)  # type: ignore[call-arg]
            d.bessspecific.soc_calc.bess_soc = 0.5  # SOC is our battery physics' concern
        p, q = d.run()
        self.p_w, self.q_var, self.status = float(p), float(q), str(d.der_status)
        return self.p_w, self.q_var


_SCRATCH: list[DER] = []


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.failed: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "check failed for" in msg:
            self.failed.append(msg.split("check failed for", 1)[1].split(".")[0].strip())


def trip_problems(trip: tuple[tuple[str, float, float], ...], f_nom: float = 50.0) -> list[str]:
    """The must-trip settings (as `Settings1547.trip`) outside the ranges IEEE 1547-2018
    allows, by OpenDER's own setting checks (it only logs them)."""
    if not _SCRATCH:
        _SCRATCH.append(DER_PV(NP_VA_MAX=1000.0, NP_P_MAX=1000.0, NP_Q_MAX_INJ=440.0,
                               NP_Q_MAX_ABS=440.0))
    f = _SCRATCH[0].der_file
    fs = OPENDER_F_NOM / f_nom
    collect = _Collect()
    root = logging.getLogger()
    root.addHandler(collect)
    try:
        for name, level, t in trip:
            if name[1] == "V":
                setattr(f, f"{name}_TRIP_V", level)
            else:
                setattr(f, f"{name}_TRIP_F", OPENDER_F_NOM + level * fs)
            setattr(f, f"{name}_TRIP_T", t)
    finally:
        root.removeHandler(collect)
    return collect.failed


def volt_var_q_pu(curve: tuple[Point, ...], v_pu: float) -> float:
    """The volt-var curve's steady-state Q (pu) at `v_pu`: piecewise linear, flat outside."""
    pts = sorted(curve)
    if v_pu <= pts[0][0]:
        return pts[0][1]
    for (v1, q1), (v2, q2) in zip(pts, pts[1:], strict=False):
        if v_pu <= v2:
            return q1 + (q2 - q1) * (v_pu - v1) / (v2 - v1) if v2 > v1 else q2
    return pts[-1][1]
