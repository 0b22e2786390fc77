"""Emulated IEEE 1547-2018 inverters and batteries: SunSpec 701-713 over OpenDER.

A device with `maps="ieee1547"` serves models 1 and 701-706, 711, 712 (PV) or 1, 701-705,
711, 713 (battery); `maps="both"` serves the legacy models (103/120/123, 802/124) beside
them. The 70x control points are the device's settings; after every accepted write they
become a `Settings1547` for the OpenDER model (`testbed.physics.der1547`), which turns
the physics' available (PV) or demanded (battery) power, the terminal voltage and the
frequency into P and Q every step.

SunSpec semantics of the emulators (documented in the README):
- Curves (705 volt-var, 706 volt-watt, 712 watt-var) and 711's droop controls: entry 1
  is the active one and read-only; a client writes entry n >= 2 and requests adoption
  with `AdptCrvReq` (`AdptCtlReq`) = n, as SunSpec's SVP does; the device copies it into
  entry 1 and answers `AdptCrvRslt` COMPLETED. An entry the model cannot honour (wrong
  point count, unsupported `DeptRef`, voltages not ascending) is refused with exception
  03 and nothing changes.
- Reversion: `RvrtTms` > 0 with a function enabled (or a 704 setpoint enabled with its
  `*RvrtTms`) starts a timer on the simulated clock; at its end the function reverts
  (705/706/711/712: adopt `RvrtCrv`; 704: the `*Rvrt` values); `*RvrtRem` counts down.
- Volt-var Q in % of `VarMaxInj`/`VarMaxAbs` (DeptRef VAR_MAX_PCT); volt-watt P in % of
  `WMax`; one reactive-power mode at a time (enabling a second is refused).
- Writes to points with no behaviour behind them (702's settings, ramp rates, anti-
  islanding, randomised enter-service delay, PF while absorbing W) are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from testbed.physics.der1547 import VOLT_VAR_B, Der1547, Settings1547, trip_problems
from testbed.physics.models import BatteryState, PVState, battery_command

from .emulator import (
    EmulatedBattery,
    EmulatedDevice,
    EmulatedInverter,
    EmulatedProsumer,
    WriteRefused,
)
from .sunspec import ModelDef, PointDef, RegisterMap, expand, model_def, scale_factor_for

MapChoice = Literal["legacy", "ieee1547", "both"]
MAP_CHOICES: tuple[str, ...] = ("legacy", "ieee1547", "both")
Q_MAX_PU = 0.44
"""Reactive capability per unit of the rating (IEEE 1547 Category B)."""
N_ENTRIES = 3
"""Curves (controls) per curve model: 1 active, 2 for clients to write."""


@dataclass(frozen=True)
class CurveSpec:
    count: str
    npt: int
    x: str
    y: str
    deptref: int | None
    """The one DeptRef value served (None: model has no DeptRef)."""


CURVES: dict[int, CurveSpec] = {
    705: CurveSpec("NCrv", 4, "V", "Var", 1),  # VAR_MAX_PCT
    706: CurveSpec("NCrv", 2, "V", "W", 0),  # W_MAX_PCT
    712: CurveSpec("NCrv", 3, "W", "Var", 1),
}
TRIPS: dict[int, tuple[str, str, str]] = {  # model -> (x point, level 1, level 2)
    707: ("V", "UV1", "UV2"), 708: ("V", "OV1", "OV2"),
    709: ("Hz", "UF1", "UF2"), 710: ("Hz", "OF1", "OF2"),
}
"""Trip models: MustTrip point 1 is the level-1 setting (longer clearing time), point 2
the level-2 one, as IEEE 1547 Tables 11-12 and 15 list them."""
REACTIVE_MODES = ((704, "PFWInjEna"), (704, "VarSetEna"), (705, "Ena"), (712, "Ena"))
REVERTS_704 = {  # enable point -> (timer, remaining, [(point, revert point)])
    "PFWInjEna": ("PFWInjRvrtTms", "PFWInjRvrtRem",
                  [("PFWInj.PF", "PFWInjRvrt.PF"), ("PFWInj.Ext", "PFWInjRvrt.Ext"),
                   ("PFWInjEna", "PFWInjEnaRvrt")]),
    "WMaxLimPctEna": ("WMaxLimPctRvrtTms", "WMaxLimPctRvrtRem",
                      [("WMaxLimPct", "WMaxLimPctRvrt"), ("WMaxLimPctEna", "WMaxLimPctEnaRvrt")]),
    "WSetEna": ("WSetRvrtTms", "WSetRvrtRem",
                [("WSet", "WSetRvrt"), ("WSetPct", "WSetPctRvrt"), ("WSetEna", "WSetEnaRvrt")]),
    "VarSetEna": ("VarSetRvrtTms", "VarSetRvrtRem",
                  [("VarSet", "VarSetRvrt"), ("VarSetPct", "VarSetPctRvrt"),
                   ("VarSetEna", "VarSetEnaRvrt")]),
}
_REVERT_TRIGGERS = {p: ena for ena, (_, _, pairs) in REVERTS_704.items() for p, _ in pairs}
INV_ST = {"OFF": 0, "SLEEPING": 1, "RUNNING": 3, "THROTTLED": 4, "STANDBY": 7}


def layout(kind: str, maps: MapChoice) -> tuple[int | ModelDef, ...]:
    """The models an emulated `kind` device serves under `maps`, curves laid out."""
    legacy = {"pv": (103, 120, 123), "battery": (802, 124)}[kind]
    if maps == "legacy":
        return (1, *legacy)
    # What a poll reads first and together: 701 measurements, 704 controls (and 713
    # storage) side by side, so a driver covers them in two requests; ratings, enter
    # service and the curves after them.
    ieee: list[int | ModelDef] = [701, 704, *((713,) if kind == "battery" else ()), 702, 703]
    curves = (705, 706, 711, 712) if kind == "pv" else (705, 711)
    for mid in curves:
        spec = CURVES.get(mid)
        counts = {"NCtl": N_ENTRIES} if spec is None else {spec.count: N_ENTRIES,
                                                             "NPt": spec.npt}
        ieee.append(expand(model_def(mid), 100_000, counts))
    ieee += [expand(model_def(mid), 100_000, {"NCrvSet": N_ENTRIES - 1, "NPt": 2})
             for mid in TRIPS]
    return (1, *(legacy if maps == "both" else ()), *ieee)


class Ieee1547Device:
    """The 70x side of an emulated inverter or battery (mixed into their classes)."""

    map: RegisterMap
    prosumer: EmulatedProsumer
    kind: str
    rating_w: float
    legacy: bool
    der: Der1547

    def _init_1547(self, m: RegisterMap) -> None:
        r = self.rating_w
        pm = self.prosumer.params.meter
        w_sf = scale_factor_for(r * 1.2)
        a_max = r / (3 * pm.v_nominal)
        for point, sf in (("A_SF", scale_factor_for(a_max * 1.5)), ("V_SF", -1), ("Hz_SF", -2),
                          ("W_SF", w_sf), ("PF_SF", -3), ("VA_SF", w_sf), ("Var_SF", w_sf),
                          ("TotWh_SF", 0), ("TotVarh_SF", 0), ("Tmp_SF", -1)):
            m.set_raw(701, point, sf)
        m.set_raw(701, "ACType", 2)
        m.set_raw(701, "DERMode", 0)
        m.set_raw(701, "ThrotSrc", 0)
        for point, sf in (("W_SF", w_sf), ("PF_SF", -3), ("VA_SF", w_sf), ("Var_SF", w_sf),
                          ("V_SF", -1), ("A_SF", scale_factor_for(a_max * 1.5)), ("S_SF", 0)):
            m.set_raw(702, point, sf)
        q = Q_MAX_PU * r
        for point, value in (("WMaxRtg", r), ("VAMaxRtg", r), ("VarMaxInjRtg", q),
                             ("VarMaxAbsRtg", q), ("VNomRtg", pm.v_nominal),
                             ("VMaxRtg", pm.v_nominal * 1.1), ("VMinRtg", pm.v_nominal * 0.88),
                             ("AMaxRtg", a_max * 1.1), ("PFOvrExtRtg", 0.9),
                             ("PFUndExtRtg", 0.9), ("WMax", r), ("VAMax", r), ("VarMaxInj", q),
                             ("VarMaxAbs", q), ("VNom", pm.v_nominal), ("VMax", pm.v_nominal * 1.1),
                             ("VMin", pm.v_nominal * 0.88), ("AMax", a_max * 1.1)):
            m.set(702, point, value)
        if self.kind == "battery":
            b = self.prosumer.params.battery
            assert b is not None
            for point, value in (("WChaRteMaxRtg", b.max_charge_w), ("WChaRteMax", b.max_charge_w),
                                 ("WDisChaRteMaxRtg", b.max_discharge_w),
                                 ("WDisChaRteMax", b.max_discharge_w)):
                m.set(702, point, value)
        m.set_raw(702, "NorOpCatRtg", 1)  # CAT_B
        m.set_raw(702, "AbnOpCatRtg", 1)  # CAT_II
        modes = (0, 2, 3, 4, 5, 9, 10) if self.kind == "pv" else (0, 1, 2, 3, 4, 5)
        m.set_raw(702, "CtrlModes", sum(1 << b for b in modes))
        # 703 enter service: IEEE 1547 defaults (V in % of VNom, Hz absolute)
        f0 = pm.f_nominal
        m.set_raw(703, "V_SF", -1)
        m.set_raw(703, "Hz_SF", -2)
        m.set_raw(703, "ES", 1)
        m.set(703, "ESVHi", 105.0)
        m.set(703, "ESVLo", 91.7)
        m.set(703, "ESHzHi", f0 + 0.1)
        m.set(703, "ESHzLo", f0 - 0.5)
        for point, value in (("ESDlyTms", 0), ("ESRndTms", 0), ("ESRmpTms", 0),
                             ("ESDlyRemTms", 0)):
            m.set_raw(703, point, value)
        # 704 controls: everything disabled, reverts to disabled
        for point, sf in (("PF_SF", -3), ("WMaxLimPct_SF", -1), ("WSet_SF", w_sf),
                          ("WSetPct_SF", -1), ("VarSet_SF", w_sf), ("VarSetPct_SF", -1)):
            m.set_raw(704, point, sf)
        for point in ("PFWInjEna", "PFWInjEnaRvrt", "PFWAbsEna", "PFWAbsEnaRvrt",
                      "WMaxLimPctEna", "WMaxLimPctEnaRvrt", "WSetEna", "WSetEnaRvrt",
                      "VarSetEna", "VarSetEnaRvrt", "AntiIslEna", "PFWInj.Ext",
                      "PFWInjRvrt.Ext", "PFWAbs.Ext", "PFWAbsRvrt.Ext", "WRmpRef"):
            m.set_raw(704, point, 0)
        for point in ("PFWInjRvrtTms", "PFWInjRvrtRem", "PFWAbsRvrtTms", "PFWAbsRvrtRem",
                      "WMaxLimPctRvrtTms", "WMaxLimPctRvrtRem", "WSetRvrtTms", "WSetRvrtRem",
                      "VarSetRvrtTms", "VarSetRvrtRem"):
            m.set_raw(704, point, 0)
        for point in ("PFWInj.PF", "PFWInjRvrt.PF", "PFWAbs.PF", "PFWAbsRvrt.PF"):
            m.set(704, point, 1.0)
        for point in ("WMaxLimPct", "WMaxLimPctRvrt", "WSetPct", "WSetPctRvrt", "VarSetPct",
                      "VarSetPctRvrt"):
            m.set(704, point, 100.0 if point.startswith("WMax") else 0.0)
        for point in ("WSet", "WSetRvrt", "VarSet", "VarSetRvrt"):
            m.set(704, point, 0.0)
        m.set_raw(704, "WSetMod", 1)  # WATTS
        m.set_raw(704, "VarSetMod", 4)  # VARS
        m.set_raw(704, "VarSetPri", 1)  # REACTIVE
        # curve models: entries 1..N hold the standard's defaults, entry 1 active
        for mid in (705, 706, 711, 712):
            if mid not in self._served:
                continue
            for point in ("Ena", "RvrtTms", "RvrtRem"):
                m.set_raw(mid, point, 0)
            req, rslt = ("AdptCtlReq", "AdptCtlRslt") if mid == 711 else ("AdptCrvReq",
                                                                            "AdptCrvRslt")
            m.set_raw(mid, req, 0)
            m.set_raw(mid, rslt, 1)  # COMPLETED
            m.set_raw(mid, "RvrtCtl" if mid == 711 else "RvrtCrv", 1)
            for i in range(1, N_ENTRIES + 1):
                self._default_entry(m, mid, i)
        defaults = self.der.trip_defaults()
        for mid, (x, one, two) in TRIPS.items():
            m.set_raw(mid, "V_SF" if x == "V" else "Hz_SF", -1 if x == "V" else -2)
            m.set_raw(mid, "Tms_SF", -2)
            m.set_raw(mid, "Ena", 1)
            m.set_raw(mid, "AdptCrvReq", 0)
            m.set_raw(mid, "AdptCrvRslt", 1)
            m.set_raw(mid, "NPt", 2)
            m.set_raw(mid, "NCrvSet", N_ENTRIES - 1)
            for i in range(1, N_ENTRIES):
                c = f"Crv[{i}]."
                m.set_raw(mid, c + "ReadOnly", 1 if i == 1 else 0)
                for part in ("MustTrip", "MayTrip"):  # may trip: the same region
                    m.set_raw(mid, f"{c}{part}.ActPt", 2)
                    for j, name in ((1, one), (2, two)):
                        level, t = defaults[name]
                        value = 100.0 * level if x == "V" else pm.f_nominal + level
                        m.set(mid, f"{c}{part}.Pt[{j}].{x}", value)
                        m.set(mid, f"{c}{part}.Pt[{j}].Tms", t)
                m.set_raw(mid, f"{c}MomCess.ActPt", 0)
        if 713 in self._served:
            b = self.prosumer.params.battery
            assert b is not None
            m.set_raw(713, "WH_SF", scale_factor_for(b.capacity_wh * 1.2))
            m.set_raw(713, "Pct_SF", -1)
            m.set(713, "WHRtg", b.capacity_wh)
            m.set(713, "SoH", 100.0)
            m.set_raw(713, "Sta", 0)

    def _default_entry(self, m: RegisterMap, mid: int, i: int) -> None:
        ro = 1 if i == 1 else 0
        if mid == 711:
            m.set_raw(711, "Db_SF", -3)
            m.set_raw(711, "K_SF", -3)
            m.set_raw(711, "RspTms_SF", 0)
            m.set_raw(711, "NCtl", N_ENTRIES)
            c = f"Ctl[{i}]."
            for point, value in (("DbOf", 0.036), ("DbUf", 0.036), ("KOf", 0.05), ("KUf", 0.05),
                                 ("RspTms", 5.0)):
                m.set(711, c + point, value)
            m.set_raw(711, c + "PMin", 0)
            m.set_raw(711, c + "ReadOnly", ro)
            return
        spec = CURVES[mid]
        c = f"Crv[{i}]."
        if mid in (705, 706):
            m.set_raw(mid, "V_SF", -1)
            m.set_raw(mid, "RspTms_SF", 0)
        else:
            m.set_raw(mid, "W_SF", -1)
        m.set_raw(mid, "DeptRef_SF", -1)
        m.set_raw(mid, "NPt", spec.npt)
        m.set_raw(mid, spec.count, N_ENTRIES)
        m.set_raw(mid, c + "ActPt", spec.npt)
        m.set_raw(mid, c + "DeptRef", spec.deptref)
        m.set_raw(mid, c + "ReadOnly", ro)
        if mid in (705, 712):
            m.set_raw(mid, c + "Pri", 1)  # REACTIVE
        if mid == 705:
            m.set(705, c + "VRef", 100.0)
            m.set_raw(705, c + "VRefAutoEna", 0)
            m.set_raw(705, c + "VRefAutoTms", 0)
            m.set(705, c + "VRefAuto", 100.0)
            m.set(705, c + "RspTms", 5.0)
            pts: tuple[tuple[float, float], ...] = tuple(
                (v * 100, q / Q_MAX_PU * 100) for v, q in VOLT_VAR_B)
        elif mid == 706:
            m.set(706, c + "RspTms", 10.0)
            pts = ((106.0, 100.0), (110.0, 20.0))
        else:
            pts = ((20.0, 0.0), (50.0, 0.0), (100.0, -100.0))
        for j, (x, y) in enumerate(pts, 1):
            m.set(mid, f"{c}Pt[{j}].{spec.x}", x)
            m.set(mid, f"{c}Pt[{j}].{spec.y}", y)

    # -- checks
    def _check_1547(self, p: PointDef, value: Any) -> None:
        mid, name = p.model_id, p.name
        if mid == 702:
            raise WriteRefused(f"702.{name}: ratings and limits are fixed in this emulator")
        if mid == 703:
            if name == "ESRndTms" and value:
                raise WriteRefused("703.ESRndTms: no randomised delay (the emulator is "
                                   "deterministic); write 0")
            if name in ("ESVHi", "ESVLo"):
                _range(p, value, 80.0, 120.0)
        if mid == 704:
            if name in ("AntiIslEna", "PFWAbsEna") and value:
                raise WriteRefused(f"704.{name}: not supported by this emulator")
            if name in ("WRmp", "VarRmp", "WRmpRef"):
                raise WriteRefused(f"704.{name}: ramp rates are not adjustable here")
            if name in ("WMaxLimPct", "WMaxLimPctRvrt"):
                _range(p, value, 0.0, 100.0)
            if name.endswith(".PF"):
                _range(p, value, 0.8, 1.0)
            if name == "VarSetMod" and value not in (1, 4):
                raise WriteRefused("704.VarSetMod: only VAR_MAX_PCT (1) and VARS (4)")
            if name == "WSetMod" and value != 1:
                raise WriteRefused("704.WSetMod: only WATTS (1)")
            if name == "VarSetPri" and value != 1:
                raise WriteRefused("704.VarSetPri: only REACTIVE (1) priority")
            if name in ("WSet", "WSetRvrt") and self.kind == "pv" and value:
                raise WriteRefused(f"704.{name}: a PV inverter follows its array, not a W "
                                   "setpoint (use WMaxLimPct)")
            if name in ("VarSet", "VarSetRvrt"):
                _range(p, value, -Q_MAX_PU * self.rating_w, Q_MAX_PU * self.rating_w)
            if name in ("VarSetPct", "VarSetPctRvrt"):
                _range(p, value, -100.0, 100.0)
        if mid in TRIPS:
            if name == "Ena" and value != 1:
                raise WriteRefused(f"{mid}.Ena: trip protection cannot be disabled")
            if ".MayTrip." in name or ".MomCess." in name:
                raise WriteRefused(f"{mid}.{name}: may-trip and momentary-cessation regions "
                                   "are not adjustable here (the must-trip curve is)")
        if mid == 711 and name.endswith(".PMin") and value:
            raise WriteRefused("711.PMin: only 0 (no minimum) is supported")
        if mid in (705, 706, 711, 712, *TRIPS) and name.startswith(("Crv[1].", "Ctl[1].")):
            raise WriteRefused(f"{mid}.{name}: entry 1 is the active one (read-only); write "
                               "entry 2 or 3 and request its adoption")
        if mid == 705 and name.endswith("VRefAutoEna") and value:
            raise WriteRefused("705.VRefAutoEna: autonomous VRef adjustment is not supported")

    def _check_all_1547(self, trial: RegisterMap, changes: Mapping[tuple[int, str], Any]) -> None:
        for mid in (705, 706, 712, 711):
            req = "AdptCtlReq" if mid == 711 else "AdptCrvReq"
            n = changes.get((mid, req))
            if n:
                if not 1 <= int(n) <= N_ENTRIES:
                    raise WriteRefused(f"{mid}.{req}: {n} is not an entry (1..{N_ENTRIES})")
                _entry_valid(trial, mid, int(n), self.rating_w)
            rv = changes.get((mid, "RvrtCtl" if mid == 711 else "RvrtCrv"))
            if rv is not None and not 1 <= int(rv) <= N_ENTRIES:
                raise WriteRefused(f"{mid}: revert entry {rv} is not 1..{N_ENTRIES}")
        for mid in TRIPS:
            n = changes.get((mid, "AdptCrvReq"))
            if n:
                if not 1 <= int(n) < N_ENTRIES:
                    raise WriteRefused(f"{mid}.AdptCrvReq: {n} is not a curve set "
                                       f"(1..{N_ENTRIES - 1})")
                _trip_valid(trial, mid, int(n), self.prosumer.params.meter.f_nominal)
        on = [f"{m}.{p}" for m, p in REACTIVE_MODES
              if m in self._served and trial.get_raw(m, p) == 1]
        if self.legacy and self.kind == "pv" and trial.get_raw(123, "OutPFSet_Ena") == 1:
            on.append("123.OutPFSet_Ena")
        if len(on) > 1:
            raise WriteRefused(f"one reactive power mode at a time; enabled: {', '.join(on)}")

    # -- after a write
    def _applied_1547(self, changes: Mapping[tuple[int, str], Any]) -> None:
        m = self.map
        t = self.prosumer.state.t_s
        for mid in (705, 706, 712, 711):
            req, rslt = ("AdptCtlReq", "AdptCtlRslt") if mid == 711 else ("AdptCrvReq",
                                                                            "AdptCrvRslt")
            n = changes.get((mid, req))
            if n:
                _adopt(m, mid, int(n))
                m.set_raw(mid, rslt, 1)
            if (mid, "Ena") in changes or (mid, "RvrtTms") in changes or n:
                tms = m.get_raw(mid, "RvrtTms") or 0
                self._timers[(mid, "curve")] = t + tms if tms and m.get_raw(mid, "Ena") else None
        for mid in TRIPS:
            n = changes.get((mid, "AdptCrvReq"))
            if n:
                _adopt(m, mid, int(n))
                m.set_raw(mid, "AdptCrvRslt", 1)
        for ena in REVERTS_704:
            touched = any(_REVERT_TRIGGERS.get(p) == ena or p == REVERTS_704[ena][0]
                          for (mm, p) in changes if mm == 704)
            if touched:
                tms = m.get_raw(704, REVERTS_704[ena][0]) or 0
                self._timers[(704, ena)] = t + tms if tms else None
        self._sync_settings()

    def _tick(self, t: float) -> None:
        """Reversion timers on the simulated clock."""
        m = self.map
        fired = False
        for key, due in list(self._timers.items()):
            if due is None:
                continue
            mid, what = key
            remaining = max(0, math.ceil(due - t - 1e-9))
            if mid == 704:
                m.set_raw(704, REVERTS_704[what][1], remaining)
            else:
                m.set_raw(mid, "RvrtRem", remaining)
            if t + 1e-9 < due:
                continue
            self._timers[key] = None
            fired = True
            if mid == 704:
                for point, source in REVERTS_704[what][2]:
                    m.set_raw(704, point, m.get_raw(704, source))
            else:
                _adopt(m, mid, int(m.get_raw(mid, "RvrtCtl" if mid == 711 else "RvrtCrv") or 1))
        if fired:
            self._sync_settings()

    def _sync_settings(self) -> None:
        self.der.apply(settings_from_map(self.map, self._served, self.rating_w, self.legacy,
                                         self.prosumer.params.meter.f_nominal))
        self.prosumer.version += 1

    def _fill_1547(self, m: RegisterMap, p_w: float, q_var: float, available_w: float) -> None:
        s = self.prosumer.state
        v, f = self._terminal
        va = math.hypot(p_w, q_var)
        a = va / (3 * v) if v > 0 else 0.0
        m.set(701, "W", p_w)
        m.set(701, "Var", q_var)
        m.set(701, "VA", va)
        m.set(701, "PF", abs(p_w) / va if va > 0 else 1.0)
        m.set(701, "A", a)
        m.set(701, "LNV", v)
        m.set(701, "LLV", v * math.sqrt(3))
        for ph, ll in (("1", "VL1L2"), ("2", "VL2L3"), ("3", "VL3L1")):
            m.set(701, f"WL{ph}", p_w / 3)
            m.set(701, f"VarL{ph}", q_var / 3)
            m.set(701, f"VAL{ph}", va / 3)
            m.set(701, f"AL{ph}", a)
            m.set(701, f"VL{ph}", v)
            m.set(701, ll, v * math.sqrt(3))
        m.set(701, "Hz", f)
        status = self.der.status
        tripped = status in ("Trip", "Momentary Cessation")
        connected = not tripped and self.der.settings.permit_service
        if not connected:
            st = "OFF" if status != "Momentary Cessation" else "STANDBY"
        elif abs(p_w) < 1e-6 and available_w <= 0:
            st = "SLEEPING"
        elif p_w < available_w - 0.01 * self.rating_w:
            st = "THROTTLED"
        else:
            st = "RUNNING"
        m.set_raw(701, "St", int(connected))
        m.set_raw(701, "InvSt", INV_ST[st])
        m.set_raw(701, "ConnSt", int(connected))
        m.set_raw(701, "Alrm", 0)
        throttle = 0 if available_w <= 0 else max(0, min(100, round(
            100 * (available_w - p_w) / self.rating_w)))
        m.set_raw(701, "ThrotPct", throttle)
        m.set(701, "TmpCab", 25.0 + 15.0 * abs(p_w) / self.rating_w)
        m.set_raw(701, "TotWhInj", math.floor(self._wh_inj))
        m.set_raw(701, "TotWhAbs", math.floor(self._wh_abs))
        m.set_raw(701, "TotVarhInj", math.floor(self._varh_inj))
        m.set_raw(701, "TotVarhAbs", math.floor(self._varh_abs))
        if 713 in self._served and s.battery is not None:
            b = self.prosumer.params.battery
            assert b is not None
            m.set(713, "SoC", s.battery.soc * 100)
            m.set(713, "WHAvail", max(0.0, s.battery.soc - b.soc_min) * b.capacity_wh)

    def _behave(self, dev_state: Any, v: float, f: float, dt_s: float, p_in: float) -> tuple:
        """One OpenDER step at the terminal; accumulates the 701 energy counters."""
        if self._v_override is not None:
            v = self._v_override
        if self._f_override is not None:
            f = self._f_override
        self._terminal = (v, f)
        self._tick(self.prosumer.state.t_s + dt_s)
        p, q = self.der.step(dt_s, v=v, f_hz=f, p_w=p_in) if dt_s > 0 else (
            self.der.p_w, self.der.q_var)
        h = dt_s / 3600.0
        self._wh_inj += max(p, 0.0) * h
        self._wh_abs += max(-p, 0.0) * h
        self._varh_inj += max(q, 0.0) * h
        self._varh_abs += max(-q, 0.0) * h
        return p, q

    def set_terminal(self, voltage_v: float | None = None,
                     frequency_hz: float | None = None) -> None:
        """Hold the terminal voltage and/or frequency (a grid simulator, a conformance test
        or a scenario event); None gives it back to the feeder and meter."""
        self._v_override, self._f_override = voltage_v, frequency_hz

    # -- the EmulatedDevice hooks, shared by the inverter and the battery (the legacy
    # class after this mixin in the MRO handles the 1xx/8xx models)
    def init_map(self, m: RegisterMap) -> None:
        if self.legacy:
            super().init_map(m)  # type: ignore[misc]
        self._init_1547(m)

    def check(self, p: PointDef, value: Any) -> None:
        if p.model_id < 700:
            super().check(p, value)  # type: ignore[misc]
        else:
            self._check_1547(p, value)

    def check_all(self, trial: RegisterMap, changes: Mapping[tuple[int, str], Any]) -> None:
        self._check_all_1547(trial, changes)

    def apply(self, changes: Mapping[tuple[int, str], Any]) -> None:
        if self.legacy and any(mid < 700 for mid, _ in changes):
            super().apply(changes)  # type: ignore[misc]

    def applied(self, changes: Mapping[tuple[int, str], Any]) -> None:
        self._applied_1547(changes)

    def _setup_1547(self, kind: str, prosumer: EmulatedProsumer, maps: MapChoice,
                    rating_w: float) -> None:
        self.legacy = maps == "both"
        self.models = layout(kind, maps)  # type: ignore[misc]
        self._served = {m if isinstance(m, int) else m.id for m in self.models}
        self.rating_w = rating_w
        self.prosumer = prosumer
        pm = self.prosumer.params.meter
        self._timers: dict[tuple[int, str], float | None] = {}
        self._terminal = (pm.v_nominal, pm.f_nominal)
        self._v_override: float | None = None
        self._f_override: float | None = None
        self._wh_inj = self._wh_abs = self._varh_inj = self._varh_abs = 0.0
        self.der = Der1547(self.kind, self.rating_w, v_nom=pm.v_nominal, f_nom=pm.f_nominal,
                           q_max_pu=Q_MAX_PU, settings=Settings1547(es_delay_s=0.0))


def _range(p: PointDef, value: Any, lo: float, hi: float) -> None:
    if not isinstance(value, int | float) or not lo - 1e-9 <= value <= hi + 1e-9:
        raise WriteRefused(f"{p.model_id}.{p.name}: {value} outside {lo:g}..{hi:g}")


def _entry_valid(m: RegisterMap, mid: int, n: int, rating_w: float) -> None:
    """Refuse (03) an entry OpenDER cannot honour."""
    if mid == 711:
        c = f"Ctl[{n}]."
        for point in ("DbOf", "DbUf", "KOf", "KUf", "RspTms"):
            if m.get(711, c + point) is None:
                raise WriteRefused(f"711.{c}{point} is not set")
        if not 0 < float(m.get(711, c + "KOf") or 0) <= 1 or \
                not 0 < float(m.get(711, c + "KUf") or 0) <= 1:
            raise WriteRefused(f"711.{c}KOf/KUf must be within (0, 1] per unit")
        return
    spec = CURVES[mid]
    c = f"Crv[{n}]."
    if m.get_raw(mid, c + "ActPt") != spec.npt:
        raise WriteRefused(f"{mid}.{c}ActPt must be {spec.npt} (this model's curve has "
                           f"{spec.npt} points), got {m.get_raw(mid, c + 'ActPt')}")
    if spec.deptref is not None and m.get_raw(mid, c + "DeptRef") != spec.deptref:
        raise WriteRefused(f"{mid}.{c}DeptRef must be {spec.deptref}, got "
                           f"{m.get_raw(mid, c + 'DeptRef')}")
    xs = [m.get(mid, f"{c}Pt[{j}].{spec.x}") for j in range(1, spec.npt + 1)]
    ys = [m.get(mid, f"{c}Pt[{j}].{spec.y}") for j in range(1, spec.npt + 1)]
    if any(x is None for x in xs) or any(y is None for y in ys):
        raise WriteRefused(f"{mid}.{c}: every point needs {spec.x} and {spec.y}")
    if any(b < a for a, b in zip(xs, xs[1:], strict=False)):
        raise WriteRefused(f"{mid}.{c}: {spec.x} points must ascend, got {xs}")
    if any(not -100.0 <= float(y) <= 100.0 for y in ys):
        raise WriteRefused(f"{mid}.{c}: {spec.y} points must be within -100..100 %")


def _adopt(m: RegisterMap, mid: int, n: int) -> None:
    """Copy entry `n` into entry 1 (the active one), register for register."""
    if n == 1:
        return
    group = "Ctl" if mid == 711 else "Crv"
    md = m.model(mid).definition
    for name in md.points:
        if name.startswith(f"{group}[{n}].") and not name.endswith(".ReadOnly"):
            target = f"{group}[1]." + name[len(f"{group}[{n}]."):]
            m.set_raw(mid, target, m.get_raw(mid, name))


def settings_from_map(m: RegisterMap, served: set[int], rating_w: float, legacy: bool,
                      f_nom: float) -> Settings1547:
    """The device's 70x (and legacy 123) control points as OpenDER settings, per unit."""
    kw: dict[str, Any] = {}
    if m.get_raw(704, "PFWInjEna") == 1:
        kw["const_pf"] = float(m.get(704, "PFWInj.PF") or 1.0)
        kw["pf_excitation"] = "INJ" if m.get_raw(704, "PFWInj.Ext") == 0 else "ABS"
    elif legacy and 123 in served and m.get_raw(123, "OutPFSet_Ena") == 1:
        pf = float(m.get(123, "OutPFSet") or 1.0)
        kw["const_pf"], kw["pf_excitation"] = abs(pf), "INJ" if pf >= 0 else "ABS"
    if m.get_raw(704, "WMaxLimPctEna") == 1:
        kw["p_limit_pu"] = float(m.get(704, "WMaxLimPct") or 0.0) / 100.0
    if m.get_raw(704, "VarSetEna") == 1:
        if m.get_raw(704, "VarSetMod") == 4:
            kw["const_q_pu"] = float(m.get(704, "VarSet") or 0.0) / rating_w
        else:
            kw["const_q_pu"] = float(m.get(704, "VarSetPct") or 0.0) / 100.0 * Q_MAX_PU
    if m.get_raw(705, "Ena") == 1:
        pts = tuple((float(m.get(705, f"Crv[1].Pt[{j}].V")) / 100.0,
                     float(m.get(705, f"Crv[1].Pt[{j}].Var")) / 100.0 * Q_MAX_PU)
                    for j in range(1, 5))
        kw["volt_var"] = pts
        kw["volt_var_olrt_s"] = float(m.get(705, "Crv[1].RspTms") or 5.0)
        kw["volt_var_vref_pu"] = float(m.get(705, "Crv[1].VRef") or 100.0) / 100.0
    if 706 in served and m.get_raw(706, "Ena") == 1:
        kw["volt_watt"] = tuple((float(m.get(706, f"Crv[1].Pt[{j}].V")) / 100.0,
                                 float(m.get(706, f"Crv[1].Pt[{j}].W")) / 100.0)
                                for j in (1, 2))
        kw["volt_watt_olrt_s"] = float(m.get(706, "Crv[1].RspTms") or 10.0)
    if 712 in served and m.get_raw(712, "Ena") == 1:
        kw["watt_var"] = tuple((float(m.get(712, f"Crv[1].Pt[{j}].W")) / 100.0,
                                float(m.get(712, f"Crv[1].Pt[{j}].Var")) / 100.0 * Q_MAX_PU)
                               for j in (1, 2, 3))
    if m.get_raw(711, "Ena") == 1:
        kw["droop"] = tuple(float(m.get(711, f"Ctl[1].{p}") or 0.0)
                            for p in ("DbOf", "DbUf", "KOf", "KUf"))
        kw["droop_olrt_s"] = float(m.get(711, "Ctl[1].RspTms") or 5.0)
    connected = m.get_raw(703, "ES") == 1
    if legacy and 123 in served and m.get_raw(123, "Conn") == 0:
        connected = False
    kw["permit_service"] = connected
    kw["es_delay_s"] = float(m.get_raw(703, "ESDlyTms") or 0)
    kw["es_ramp_s"] = float(m.get_raw(703, "ESRmpTms") or 0)
    kw["es_v_pu"] = (float(m.get(703, "ESVLo") or 91.7) / 100.0,
                     float(m.get(703, "ESVHi") or 105.0) / 100.0)
    kw["es_f_hz_from_nominal"] = (float(m.get(703, "ESHzLo") or f_nom - 0.5) - f_nom,
                                  float(m.get(703, "ESHzHi") or f_nom + 0.1) - f_nom)
    trip = []
    for mid, (x, one, two) in TRIPS.items():
        if mid not in served:
            continue
        for j, name in ((1, one), (2, two)):
            level = float(m.get(mid, f"Crv[1].MustTrip.Pt[{j}].{x}") or 0.0)
            t = float(m.get(mid, f"Crv[1].MustTrip.Pt[{j}].Tms") or 0.0)
            trip.append((name, level / 100.0 if x == "V" else level - f_nom, t))
    kw["trip"] = tuple(trip)
    return Settings1547(**kw)


def _trip_valid(m: RegisterMap, mid: int, n: int, f_nom: float) -> None:
    """A must-trip curve OpenDER can take: two points, level 2 beyond level 1 and faster."""
    x, one, _ = TRIPS[mid]
    c = f"Crv[{n}].MustTrip."
    if m.get_raw(mid, c + "ActPt") != 2:
        raise WriteRefused(f"{mid}.{c}ActPt must be 2 (level 1 and level 2)")
    (l1, t1), (l2, t2) = ((m.get(mid, f"{c}Pt[{j}].{x}"), m.get(mid, f"{c}Pt[{j}].Tms"))
                          for j in (1, 2))
    if None in (l1, t1, l2, t2):
        raise WriteRefused(f"{mid}.{c}: both points need {x} and Tms")
    beyond = l2 > l1 if one[0] == "O" else l2 < l1  # type: ignore[operator]
    if not beyond or not t2 <= t1:  # type: ignore[operator]
        raise WriteRefused(f"{mid}.{c}: point 2 must lie beyond point 1 ({x} {l1} -> {l2}) "
                           f"and clear no slower (Tms {t1} -> {t2})")
    two = TRIPS[mid][2]
    trip = tuple((name, float(lv) / 100.0 if x == "V" else float(lv) - f_nom, float(t))
                 for name, lv, t in ((one, l1, t1), (two, l2, t2)))
    bad = trip_problems(trip, f_nom)
    if bad:
        raise WriteRefused(f"{mid}.{c}: outside the settings IEEE 1547-2018 allows "
                           f"({', '.join(bad)})")


class EmulatedInverter1547(Ieee1547Device, EmulatedInverter):
    """A PV inverter serving 701-706, 711, 712 (and the legacy maps with `maps="both"`)."""

    model_name = "PV inverter emulator (IEEE 1547)"

    def __init__(self, name: str, prosumer: EmulatedProsumer, serial: str, *,
                 maps: MapChoice = "ieee1547") -> None:
        assert prosumer.params.pv is not None, "prosumer has no PV parameters"
        self._setup_1547("pv", prosumer, maps, prosumer.params.pv.rating_w)
        prosumer.pv_behaviour = self._pv_behaviour
        super().__init__(name, prosumer, serial)
        self._sync_settings()

    def _pv_behaviour(self, pv: PVState, v: float, f: float, dt_s: float) -> PVState:
        available = pv.ac_w
        p, q = self._behave(pv, v, f, dt_s, available)
        p = max(0.0, min(p, available)) if available > 0 else max(0.0, p)
        energy = pv.energy_wh - (pv.ac_w - p) * dt_s / 3600.0
        self._available = available
        return replace(pv, ac_w=p, q_var=q, energy_wh=energy,
                       dc_w=p / self.params.efficiency if p > 0 else 0.0)

    def fill(self, m: RegisterMap) -> None:
        pv = self.prosumer.state.pv
        assert pv is not None
        if self.legacy:
            super().fill(m)
        self._fill_1547(m, pv.ac_w, pv.q_var, getattr(self, "_available", pv.ac_w))


class EmulatedBattery1547(Ieee1547Device, EmulatedBattery):
    """A battery inverter serving 701-705, 711, 713 (and 802/124 with `maps="both"`);
    704 WSet (WATTS, + discharge) is its power setpoint."""

    model_name = "Battery emulator (IEEE 1547)"

    def __init__(self, name: str, prosumer: EmulatedProsumer, serial: str, *,
                 maps: MapChoice = "ieee1547") -> None:
        b = prosumer.params.battery
        assert b is not None, "prosumer has no battery parameters"
        self._setup_1547("battery", prosumer, maps, max(b.max_charge_w, b.max_discharge_w))
        prosumer.battery_behaviour = self._bat_behaviour
        super().__init__(name, prosumer, serial)
        self._sync_settings()

    def _bat_behaviour(self, bat: BatteryState, v: float, f: float, dt_s: float) -> BatteryState:
        """OpenDER shapes the commanded power (limit, droop) and gives Q; the battery
        physics then delivers it within its SOC and rate limits."""
        p, q = self._behave(bat, v, f, dt_s, bat.setpoint_w)
        return replace(bat, setpoint_w=p, q_var=q)

    def fill(self, m: RegisterMap) -> None:
        b = self.prosumer.state.battery
        assert b is not None
        if self.legacy:
            super().fill(m)
        self._fill_1547(m, b.power_w, b.q_var, b.power_w)

    def check(self, p: PointDef, value: Any) -> None:
        super().check(p, value)
        if p.model_id == 704 and p.name in ("WSet", "WSetRvrt"):
            _range(p, value, -self.params.max_charge_w, self.params.max_discharge_w)

    def applied(self, changes: Mapping[tuple[int, str], Any]) -> None:
        super().applied(changes)
        if any(mid == 704 and p.startswith("WSet") for mid, p in changes):
            self._command_wset()

    def _sync_settings(self) -> None:
        super()._sync_settings()
        if getattr(self, "_served", None) and hasattr(self, "storctl_mod"):
            self._command_wset()

    def _command_wset(self) -> None:
        b = self.prosumer.state.battery
        assert b is not None
        ena = self.map.get_raw(704, "WSetEna") == 1
        setpoint = float(self.map.get(704, "WSet") or 0.0) if ena else 0.0
        if not ena and self.legacy:
            return  # the legacy 124 setpoint stands
        self.prosumer.update(battery=battery_command(b, setpoint))


def make_device(kind: str, name: str, prosumer: EmulatedProsumer, serial: str,
                maps: MapChoice) -> EmulatedDevice:
    """The emulated device class for `kind` under `maps` (legacy: the 1xx/8xx classes)."""
    if maps not in MAP_CHOICES:
        raise ValueError(f"maps must be one of {MAP_CHOICES}, not {maps!r}")
    if kind == "pv" and maps != "legacy":
        return EmulatedInverter1547(name, prosumer, serial, maps=maps)
    if kind == "battery" and maps != "legacy":
        return EmulatedBattery1547(name, prosumer, serial, maps=maps)
    raise ValueError(f"no {maps} emulator for {kind}")
