"""Emulated devices: the physics of `models.py` bound to SunSpec register maps.

An `EmulatedSite` owns one `EmulatedProsumer` per connection point and advances their
physics on a simulated clock. Each `EmulatedDevice` (inverter, battery, meter) knows
which SunSpec models it presents, how to fill them from the physics state and how a
write to a control point becomes a command. Transport (Modbus today) is elsewhere: the
server in `modbus.py` asks a device to `refresh()` its map before a read and to
`write()` before it stores registers, so a refused write never reaches the registers.

SunSpec conventions of the emulators (documented in the README):
- Inverter: models 1, 103, 120, 123. `WMaxLimPct` (0-100 % of `WRtg`) with
  `WMaxLim_Ena`=1 curtails; the limit ramps at the inverter's ramp rate. `Conn`=0
  disconnects (no output, `St` OFF). `OutPFSet` (|PF| >= 0.9; + over-excited, injects
  vars; - under-excited) with `OutPFSet_Ena`=1 holds that power factor (P capped so VA
  stays within `WRtg`). A command whose `*_RvrtTms` is set reverts when that many
  simulated seconds pass (limit off, unity PF, reconnected).
- Battery: models 1, 802, 124. 802 `W` is + discharge / - charge. The power setpoint is
  124 `StorCtl_Mod` bit 1 (DISCHARGE) with `OutWRte` % of the rated discharge power,
  and/or bit 0 (CHARGE) with `InWRte` % of `WChaMax`; no bit set holds at 0 W. Rates are
  signed (-100..100 %: a negative `OutWRte` charges). `InOutWRte_RvrtTms` reverts to
  holding; 802 `SetOp`=2 (DISCONNECT) holds 0 W and shows `State` DISCONNECTED. A setpoint
  the battery cannot follow is clamped: 802 `State` = SOC PROTECTION and `Evt1` warning
  bits (UNDER_SOC_MIN_WARNING, OVER_SOC_MAX_WARNING, OVER_CHARGE/DISCHARGE_CURRENT_WARNING).
- Meter: models 1, 203, balanced three-phase; `W` + import / - export.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

from testbed.physics.models import (
    PF_UNSET,
    BatteryParams,
    Behaviour,
    ClampReason,
    LoadParams,
    MeterParams,
    ProsumerParams,
    ProsumerState,
    PVParams,
    battery_command,
    clear_sky_irradiance,
    household_load_w,
    prosumer_step,
    pv_command,
)

from .sunspec import PointDef, RegisterMap, SunSpecError, scale_factor_for

MANUFACTURER = "testbed"
SQRT3 = math.sqrt(3.0)

INVERTER_ST = {"OFF": 1, "SLEEPING": 2, "MPPT": 4, "THROTTLED": 5}
CHA_ST = {"OFF": 1, "EMPTY": 2, "DISCHARGING": 3, "CHARGING": 4, "FULL": 5, "HOLDING": 6}
BAT_STATE_DISCONNECTED, BAT_STATE_CONNECTED, BAT_STATE_SOC_PROTECTION = 1, 3, 5
EVT1_BITS = {  # SunSpec 802 Evt1 symbol values (bit positions)
    ClampReason.CHARGE_RATE: 6,
    ClampReason.DISCHARGE_RATE: 8,
    ClampReason.SOC_MIN: 14,
    ClampReason.SOC_MAX: 16,
}


class WriteRefused(ValueError):
    """A control write the device will not accept; the map and physics stay unchanged."""


class EmulatedProsumer:
    """One connection point's physics, advanced by the site clock and commanded by devices."""

    def __init__(self, name: str, params: ProsumerParams, t_s: float = 0.0) -> None:
        self.name = name
        self.params = params
        self.state = ProsumerState.initial(params, t_s)
        self.version = 0
        """Bumped on every change so devices re-encode their maps only when needed."""
        self.pv_behaviour: Behaviour | None = None
        self.battery_behaviour: Behaviour | None = None
        """IEEE 1547 behaviour of an emulated inverter serving 70x models (`emulator1547`)."""
        self.timers: list[Callable[[float], None]] = []
        """Devices' reversion timers, called with the simulated time after each step."""

    def step(self, dt_s: float, irradiance_w_m2: float, load_w: float, *,
             external_w: float = 0.0, voltage_v: float | None = None,
             frequency_hz: float | None = None) -> None:
        self.state = prosumer_step(self.params, self.state, irradiance_w_m2=irradiance_w_m2,
                                   load_w=load_w, dt_s=dt_s, key=self.name,
                                   external_w=external_w, voltage_v=voltage_v,
                                   frequency_hz=frequency_hz, pv_behaviour=self.pv_behaviour,
                                   battery_behaviour=self.battery_behaviour)
        self.version += 1
        if self.timers:
            for tick in list(self.timers):
                tick(self.state.t_s)

    def update(self, **changes: object) -> None:
        self.state = replace(self.state, **changes)
        self.version += 1


class EmulatedDevice:
    """Base for an emulated device presenting a SunSpec map."""

    kind: str = ""
    models: tuple[int, ...] = ()
    model_name: str = ""

    def __init__(self, name: str, prosumer: EmulatedProsumer, serial: str) -> None:
        self.name = name
        self.prosumer = prosumer
        self.serial = serial
        self.map = RegisterMap.build(self.models)
        self._encoded_version = -1
        m = self.map
        m.set_raw(1, "Mn", MANUFACTURER)
        m.set_raw(1, "Md", self.model_name)
        m.set_raw(1, "Vr", "0.1.0")
        m.set_raw(1, "SN", serial[:32])
        m.set_raw(1, "DA", 1)
        self.init_map(m)
        self.refresh()

    # -- to be provided by each kind
    def init_map(self, m: RegisterMap) -> None:
        """Static points: nameplate ratings and scale factors."""

    def fill(self, m: RegisterMap) -> None:
        """Dynamic points from the current physics state."""

    def apply(self, changes: Mapping[tuple[int, str], float | int | str | None]) -> None:
        """Turn accepted control-point values into physics commands."""

    def check(self, p: PointDef, value: float | int | str | None) -> None:
        """Kind-specific range checks; raise WriteRefused."""

    def check_all(self, trial: RegisterMap, changes: Mapping[tuple[int, str], object]) -> None:
        """Checks across points (a curve to adopt, one reactive mode at a time), on the map
        as it would be after the write; raise WriteRefused."""

    def applied(self, changes: Mapping[tuple[int, str], object]) -> None:
        """After the written registers are stored (adoption of curves, reversion timers)."""

    def revert(self, key: str) -> None:
        """A reversion timer armed with `arm(key, ...)` ran out."""

    # -- shared
    def arm(self, key: str, seconds: float | None) -> None:
        """Start (or, with 0/None, stop) the reversion timer `key` on the simulated clock."""
        due = getattr(self, "_due", None)
        if due is None:
            due = self._due = {}
        if seconds:
            due[key] = self.prosumer.state.t_s + float(seconds)
            if self._tick_due not in self.prosumer.timers:
                self.prosumer.timers.append(self._tick_due)
        else:
            due.pop(key, None)

    def _tick_due(self, t_s: float) -> None:
        for key, at in list(self._due.items()):
            if t_s + 1e-9 >= at:
                del self._due[key]
                self.revert(key)
        if not self._due:
            self.prosumer.timers.remove(self._tick_due)

    def _writers(self, m: RegisterMap) -> tuple[Callable[..., None], ...]:
        """The kind's `fill_writers` for map `m`, made once."""
        cached = self.__dict__.get("_fill_writers")
        if cached is None or cached[0] is not m:
            cached = self._fill_writers = (m, self.fill_writers(m))
        return cached[1]

    def fill_writers(self, m: RegisterMap) -> tuple[Callable[..., None], ...]:
        """`RegisterMap.writer`s of the dynamic points `fill` stores on every step."""
        return ()

    def refresh(self) -> None:
        if self._encoded_version != self.prosumer.version:
            self.fill(self.map)
            self._encoded_version = self.prosumer.version

    def write(self, address: int, values: list[int]) -> None:
        """Validate and apply a register write; raises WriteRefused leaving state unchanged."""
        trial = self.map.copy()
        start = address - trial.base
        if start < 0 or start + len(values) > len(trial.registers):
            raise WriteRefused(f"address {address}+{len(values)} outside the SunSpec map")
        trial.registers[start: start + len(values)] = values
        changes: dict[tuple[int, str], float | int | str | None] = {}
        for a in range(address, address + len(values)):
            located = trial.locate(a)
            if located is None:
                raise WriteRefused(f"address {a} holds no point")
            inst, p = located
            if not p.writable:
                raise WriteRefused(f"{inst.id}.{p.name} is read-only")
            if (inst.id, p.name) in changes:
                continue
            first = inst.address + p.offset
            if first < address or first + p.size > address + len(values):
                raise WriteRefused(f"{inst.id}.{p.name}: write must cover all {p.size} registers")
            value = trial.get(inst.id, p.name)
            _check_generic(p, trial.get_raw(inst.id, p.name))
            self.check(p, value)
            changes[(inst.id, p.name)] = value
        self.check_all(trial, changes)
        self.apply(changes)
        self.map.registers[start: start + len(values)] = values
        self._encoded_version = -1
        self.applied(changes)
        self.refresh()

    def write_point(self, model_id: int, point: str, value: float | int | str) -> None:
        """Engineering-unit write (used by tests and the OPC UA side): same checks."""
        trial = self.map.copy()
        trial.set(model_id, point, value)
        p = trial.model(model_id).definition.point(point)
        i = trial.address_of(model_id, point) - trial.base
        self.write(trial.base + i, trial.registers[i: i + p.size])


def _check_generic(p: PointDef, raw: float | int | str | None) -> None:
    """Refuse enum values outside the symbols and bitfields with undefined bits."""
    if raw is None:
        raise WriteRefused(f"{p.name}: the 'not implemented' value cannot be written")
    if p.type.startswith("enum") and p.symbols and raw not in p.symbols.values():
        raise WriteRefused(f"{p.name}: {raw} is not one of {dict(p.symbols)}")
    if p.type.startswith("bitfield") and p.symbols:
        allowed = sum(1 << b for b in p.symbols.values())
        if int(raw) & ~allowed:
            raise WriteRefused(f"{p.name}: bits {int(raw) & ~allowed:#x} are not defined")


def _in_range(p: PointDef, value: float | int | str | None, lo: float, hi: float) -> None:
    if not isinstance(value, int | float) or not lo - 1e-9 <= value <= hi + 1e-9:
        raise WriteRefused(f"{p.name}: {value} outside {lo:g}..{hi:g} {p.units or ''}".rstrip())


class EmulatedInverter(EmulatedDevice):
    kind = "pv"
    models = (1, 103, 120, 123)
    model_name = "PV inverter emulator"

    def __init__(self, name: str, prosumer: EmulatedProsumer, serial: str) -> None:
        assert prosumer.params.pv is not None, "prosumer has no PV parameters"
        self.params: PVParams = prosumer.params.pv
        super().__init__(name, prosumer, serial)

    def init_map(self, m: RegisterMap) -> None:
        p = self.params
        w_sf = scale_factor_for(p.rating_w * 1.2)
        a_max = p.rating_w / (3 * 200.0)
        for point, sf in (("A_SF", scale_factor_for(a_max * 1.2)), ("V_SF", -1), ("W_SF", w_sf),
                          ("Hz_SF", -2), ("VA_SF", w_sf), ("VAr_SF", w_sf), ("PF_SF", -1),
                          ("WH_SF", 0), ("DCA_SF", scale_factor_for(p.array_w / 400.0 * 1.2)),
                          ("DCV_SF", -1), ("DCW_SF", scale_factor_for(p.array_w * 1.2)),
                          ("Tmp_SF", -1)):
            m.set_raw(103, point, sf)
        m.set_raw(120, "DERTyp", 4)
        for point in ("WRtg_SF", "VARtg_SF", "VArRtg_SF"):
            m.set_raw(120, point, w_sf)
        m.set_raw(120, "ARtg_SF", scale_factor_for(a_max * 1.2))
        m.set_raw(120, "PFRtg_SF", -3)
        m.set(120, "WRtg", p.rating_w)
        m.set(120, "VARtg", p.rating_w)
        for q in ("VArRtgQ1", "VArRtgQ2"):
            m.set(120, q, 0.44 * p.rating_w)
        for q in ("VArRtgQ3", "VArRtgQ4"):
            m.set(120, q, -0.44 * p.rating_w)
        m.set(120, "ARtg", a_max)
        for q in ("PFRtgQ1", "PFRtgQ2"):
            m.set(120, q, 0.9)
        for q in ("PFRtgQ3", "PFRtgQ4"):
            m.set(120, q, -0.9)
        m.set_raw(123, "WMaxLimPct_SF", -1)
        m.set_raw(123, "OutPFSet_SF", -3)
        m.set_raw(123, "VArPct_SF", -1)
        m.set(123, "OutPFSet", 1.0)
        m.set_raw(123, "OutPFSet_Ena", 0)
        m.set_raw(123, "VArPct_Ena", 0)
        for point in ("Conn_WinTms", "Conn_RvrtTms", "WMaxLimPct_WinTms", "WMaxLimPct_RvrtTms",
                      "WMaxLimPct_RmpTms", "OutPFSet_WinTms", "OutPFSet_RvrtTms", "OutPFSet_RmpTms"):
            m.set_raw(123, point, 0)

    def fill(self, m: RegisterMap) -> None:
        s = self.prosumer.state
        pv = s.pv
        assert pv is not None
        v = s.meter.voltage_v
        a = pv.ac_w / (3 * v) if v > 0 else 0.0
        va = math.hypot(pv.ac_w, pv.q_var)
        dcv = 400.0 if pv.dc_w > 0 else 0.0
        vl = v * SQRT3
        w103, w123 = self._writers(m)
        w103(a, a, a, a, v, v, v, vl, vl, vl, pv.ac_w, s.meter.frequency_hz, va, pv.q_var,
             math.copysign(100.0 * pv.ac_w / va, pv.q_var or 1.0) if va > 0 else 100.0,
             math.floor(pv.energy_wh), dcv, pv.dc_w / dcv if dcv else 0.0, pv.dc_w,
             25.0 + 15.0 * pv.ac_w / self.params.rating_w, INVERTER_ST[pv.status.value], 0, 0)
        w123(pv.limit_pct, int(pv.limit_enabled), int(pv.connected),
             int(pv.pf_setpoint is not None))

    def fill_writers(self, m: RegisterMap) -> tuple[Callable[..., None], ...]:
        return (m.writer(103, ("A", "AphA", "AphB", "AphC", "PhVphA", "PhVphB", "PhVphC",
                               "PPVphAB", "PPVphBC", "PPVphCA", "W", "Hz", "VA", "VAr", "PF",
                               "WH", "DCV", "DCA", "DCW", "TmpCab", "St", "Evt1", "Evt2")),
                m.writer(123, ("WMaxLimPct", "WMaxLim_Ena", "Conn", "OutPFSet_Ena")))

    def check(self, p: PointDef, value: float | int | str | None) -> None:
        if p.model_id == 123 and p.name == "WMaxLimPct":
            _in_range(p, value, 0.0, 100.0)
        if p.model_id == 123 and p.name == "OutPFSet":
            _in_range(p, value, -1.0, 1.0)
            if abs(float(value or 0.0)) < 0.9 - 1e-9:  # type: ignore[arg-type]
                raise WriteRefused(f"{p.name}: {value} below the rated power factor 0.9 "
                                   "(120 PFRtgQ1..Q4)")

    def apply(self, changes: Mapping[tuple[int, str], float | int | str | None]) -> None:
        pv = self.prosumer.state.pv
        assert pv is not None
        limit = changes.get((123, "WMaxLimPct"))
        ena = changes.get((123, "WMaxLim_Ena"))
        conn = changes.get((123, "Conn"))
        pf_set, pf_ena = changes.get((123, "OutPFSet")), changes.get((123, "OutPFSet_Ena"))
        pf: object = PF_UNSET
        if pf_set is not None or pf_ena is not None:
            on = bool(pf_ena) if pf_ena is not None else pv.pf_setpoint is not None
            value = pf_set if pf_set is not None else self.map.get(123, "OutPFSet")
            pf = float(value) if on and value is not None else None  # type: ignore[arg-type]
        if limit is None and ena is None and conn is None and pf is PF_UNSET:
            self._arm_reverts(changes)
            return
        self.prosumer.update(pv=pv_command(
            pv, limit_pct=None if limit is None else float(limit),
            limit_enabled=None if ena is None else bool(ena),
            connected=None if conn is None else bool(conn), pf=pf))
        self._arm_reverts(changes)

    def _arm_reverts(self, changes: Mapping[tuple[int, str], object]) -> None:
        """SunSpec 123: a command with its RvrtTms set reverts when the time runs out; a
        write of the command or of RvrtTms (clients write either first) starts the timer."""
        for keys, timer in ((("WMaxLimPct", "WMaxLim_Ena"), "WMaxLimPct_RvrtTms"),
                            (("OutPFSet", "OutPFSet_Ena"), "OutPFSet_RvrtTms"),
                            (("Conn",), "Conn_RvrtTms")):
            if any((123, k) in changes for k in (*keys, timer)):
                tms = changes.get((123, timer), self.map.get_raw(123, timer))
                self.arm(timer, tms)  # type: ignore[arg-type]

    def revert(self, key: str) -> None:
        pv = self.prosumer.state.pv
        assert pv is not None
        back = {"WMaxLimPct_RvrtTms": {"limit_enabled": False}, "OutPFSet_RvrtTms": {"pf": None},
                "Conn_RvrtTms": {"connected": True}}[key]
        self.prosumer.update(pv=pv_command(pv, **back))  # type: ignore[arg-type]


class EmulatedBattery(EmulatedDevice):
    kind = "battery"
    models = (1, 802, 124)
    model_name = "Battery emulator"

    def __init__(self, name: str, prosumer: EmulatedProsumer, serial: str) -> None:
        assert prosumer.params.battery is not None, "prosumer has no battery parameters"
        self.params: BatteryParams = prosumer.params.battery
        self.wchamax = self.params.max_charge_w
        # The 124 control registers are the device's command state; the power setpoint
        # is derived from them, so a partial update (rate first, mode later) is kept.
        self.storctl_mod, self.out_pct, self.in_pct = 0, 0.0, 0.0
        self.connected = True
        """802 SetOp: CONNECT (1) or DISCONNECT (2); disconnected, the battery holds 0 W."""
        super().__init__(name, prosumer, serial)

    @property
    def nominal_v(self) -> float:
        return 48.0 if self.params.capacity_wh < 30000 else 400.0

    def init_map(self, m: RegisterMap) -> None:
        p = self.params
        w_sf = scale_factor_for(max(p.max_charge_w, p.max_discharge_w) * 1.2)
        ah = p.capacity_wh / self.nominal_v
        a_max = max(p.max_charge_w, p.max_discharge_w) / self.nominal_v
        m.set_raw(802, "AHRtg_SF", scale_factor_for(ah * 1.2))
        m.set_raw(802, "WHRtg_SF", scale_factor_for(p.capacity_wh * 1.2))
        m.set_raw(802, "WChaDisChaMax_SF", w_sf)
        m.set_raw(802, "DisChaRte_SF", -1)
        m.set_raw(802, "SoC_SF", -1)
        m.set_raw(802, "DoD_SF", -1)
        m.set_raw(802, "SoH_SF", 0)
        m.set_raw(802, "V_SF", -1)
        m.set_raw(802, "CellV_SF", -3)
        m.set_raw(802, "A_SF", scale_factor_for(a_max * 1.2))
        m.set_raw(802, "AMax_SF", scale_factor_for(a_max * 1.2))
        m.set_raw(802, "W_SF", w_sf)
        m.set(802, "AHRtg", ah)
        m.set(802, "WHRtg", p.capacity_wh)
        m.set(802, "WChaRteMax", p.max_charge_w)
        m.set(802, "WDisChaRteMax", p.max_discharge_w)
        m.set(802, "SoCMax", p.soc_max * 100)
        m.set(802, "SoCMin", p.soc_min * 100)
        m.set(802, "SocRsvMax", p.soc_max * 100)
        m.set(802, "SoCRsvMin", p.soc_min * 100)
        m.set(802, "SoH", 100)
        m.set_raw(802, "LocRemCtl", 0)
        m.set_raw(802, "Typ", 4)
        m.set(802, "AChaMax", p.max_charge_w / self.nominal_v)
        m.set(802, "ADisChaMax", p.max_discharge_w / self.nominal_v)
        m.set_raw(802, "EvtVnd1", 0)
        m.set_raw(802, "EvtVnd2", 0)
        m.set_raw(802, "Evt2", 0)
        m.set_raw(802, "AlmRst", 0)
        m.set_raw(802, "SetOp", 1)
        m.set_raw(802, "SetInvState", 1)
        m.set_raw(124, "WChaMax_SF", w_sf)
        m.set_raw(124, "WChaDisChaGra_SF", 0)
        m.set_raw(124, "MinRsvPct_SF", -1)
        m.set_raw(124, "ChaState_SF", -1)
        m.set_raw(124, "InBatV_SF", -1)
        m.set_raw(124, "InOutWRte_SF", -1)
        m.set_raw(124, "WChaGra", 100)
        m.set_raw(124, "WDisChaGra", 100)
        m.set(124, "MinRsvPct", p.soc_min * 100)
        m.set_raw(124, "ChaGriSet", 1)
        m.set_raw(124, "StorCtl_Mod", 0)
        m.set(124, "OutWRte", 0)
        m.set(124, "InWRte", 0)
        for point in ("InOutWRte_WinTms", "InOutWRte_RvrtTms", "InOutWRte_RmpTms"):
            m.set_raw(124, point, 0)

    def fill(self, m: RegisterMap) -> None:
        s = self.prosumer.state
        b = s.battery
        assert b is not None
        p = self.params
        v = self.nominal_v * (0.9 + 0.2 * b.soc)
        cha_st = CHA_ST[b.status.value]
        soc_clamp = b.clamp_reason in (ClampReason.SOC_MIN, ClampReason.SOC_MAX)
        w802, w124 = self._writers(m)
        w802(b.soc * 100, (1 - b.soc) * 100, abs(b.power_w) / p.capacity_wh * 100, cha_st,
             BAT_STATE_DISCONNECTED if not self.connected else
             BAT_STATE_SOC_PROTECTION if soc_clamp else BAT_STATE_CONNECTED,
             1 if self.connected else 2,
             1 << EVT1_BITS[b.clamp_reason] if b.clamp_reason else 0,
             v, self.nominal_v * 1.1, self.nominal_v * 0.9, b.power_w / v, b.power_w,
             b.setpoint_w, int(b.discharged_wh / p.capacity_wh), int(s.t_s) & 0xFFFF)
        w124(cha_st, self.wchamax, b.soc * 100, v, self.storctl_mod, self.out_pct, self.in_pct)

    def fill_writers(self, m: RegisterMap) -> tuple[Callable[..., None], ...]:
        return (m.writer(802, ("SoC", "DoD", "DisChaRte", "ChaSt", "State", "SetOp", "Evt1", "V",
                               "VMax", "VMin", "A", "W", "ReqW", "NCyc", "Hb")),
                m.writer(124, ("ChaSt", "WChaMax", "ChaState", "InBatV", "StorCtl_Mod",
                               "OutWRte", "InWRte")))

    def check(self, p: PointDef, value: float | int | str | None) -> None:
        if p.model_id == 124 and p.name in ("OutWRte", "InWRte"):
            _in_range(p, value, -100.0, 100.0)  # signed: SunSpec 124 allows -100..100 %
        elif p.model_id == 124 and p.name == "WChaMax":
            _in_range(p, value, 0.0, self.params.max_charge_w)
        elif (p.model_id, p.name) in ((124, "MinRsvPct"), (802, "SocRsvMax"), (802, "SoCRsvMin")):
            _in_range(p, value, self.params.soc_min * 100, self.params.soc_max * 100)

    def apply(self, changes: Mapping[tuple[int, str], float | int | str | None]) -> None:
        self.wchamax = float(changes.get((124, "WChaMax"), self.wchamax) or 0.0)
        self.storctl_mod = int(changes.get((124, "StorCtl_Mod"), self.storctl_mod) or 0)
        self.out_pct = float(changes.get((124, "OutWRte"), self.out_pct) or 0.0)
        self.in_pct = float(changes.get((124, "InWRte"), self.in_pct) or 0.0)
        if (802, "SetOp") in changes:
            self.connected = changes[(802, "SetOp")] != 2
        if any((124, k) in changes for k in ("StorCtl_Mod", "OutWRte", "InWRte",
                                             "InOutWRte_RvrtTms")):
            tms = changes.get((124, "InOutWRte_RvrtTms"), self.map.get_raw(124, "InOutWRte_RvrtTms"))
            self.arm("InOutWRte_RvrtTms", tms)  # type: ignore[arg-type]
        self._command()

    def revert(self, key: str) -> None:
        """InOutWRte_RvrtTms ran out: back to holding (no charge or discharge command)."""
        self.storctl_mod, self.out_pct, self.in_pct = 0, 0.0, 0.0
        self._command()

    def _command(self) -> None:
        b = self.prosumer.state.battery
        assert b is not None
        setpoint = 0.0
        if self.storctl_mod & 0b10:  # DISCHARGE
            setpoint += self.out_pct / 100.0 * self.params.max_discharge_w
        if self.storctl_mod & 0b01:  # CHARGE
            setpoint -= self.in_pct / 100.0 * self.wchamax
        if not self.connected:
            setpoint = 0.0
        self.prosumer.update(battery=battery_command(b, setpoint))


class EmulatedMeter(EmulatedDevice):
    kind = "meter"
    models = (1, 203)
    model_name = "Smart meter emulator"

    def init_map(self, m: RegisterMap) -> None:
        pp = self.prosumer.params
        behind = pp.load.peak_w + (pp.pv.rating_w if pp.pv else 0.0) + (
            pp.battery.max_discharge_w if pp.battery else 0.0)
        peak = max(15000.0, pp.load.peak_w * 3, 1.2 * behind)  # export of a large PV fits
        w_sf = scale_factor_for(peak)
        m.set_raw(203, "A_SF", scale_factor_for(peak / (3 * 200.0)))
        m.set_raw(203, "V_SF", -1)
        m.set_raw(203, "Hz_SF", -2)
        for sf in ("W_SF", "VA_SF", "VAR_SF"):
            m.set_raw(203, sf, w_sf)
        m.set_raw(203, "PF_SF", -1)
        m.set_raw(203, "TotWh_SF", 0)
        m.set_raw(203, "Evt", 0)

    def fill(self, m: RegisterMap) -> None:
        mt = self.prosumer.state.meter
        v = mt.voltage_v
        a = abs(mt.net_w) / (3 * v) if v > 0 else 0.0
        s = self.prosumer.state
        q_in = (s.pv.q_var if s.pv else 0.0) + (s.battery.q_var if s.battery else 0.0)
        va = math.hypot(mt.net_w, q_in)
        vl, w = v * SQRT3, mt.net_w
        (w203,) = self._writers(m)
        w203(a, a, a, a, v, v, v, v, vl, vl, vl, vl, mt.frequency_hz, w, w / 3, w / 3, w / 3,
             va, -q_in,  # the meter counts + import: vars the inverters inject are -
             100.0 * abs(w) / va if q_in and va > 0 else 100.0,
             math.floor(mt.import_wh), math.floor(mt.export_wh))

    def fill_writers(self, m: RegisterMap) -> tuple[Callable[..., None], ...]:
        return (m.writer(203, ("A", "AphA", "AphB", "AphC", "PhV", "PhVphA", "PhVphB", "PhVphC",
                               "PPV", "PhVphAB", "PhVphBC", "PhVphCA", "Hz", "W", "WphA",
                               "WphB", "WphC", "VA", "VAR", "PF", "TotWhImp", "TotWhExp")),)


DEVICE_CLASSES: dict[str, type[EmulatedDevice]] = {
    cls.kind: cls for cls in (EmulatedInverter, EmulatedBattery, EmulatedMeter)
}


Irradiance = Callable[[float], float]


class EmulatedSite:
    """Every emulated prosumer of a site on one simulated clock.

    `t_s` is simulated seconds since midnight of day 0. Irradiance and household load
    default to the seeded synthetic profiles of `models.py`; the scenario engine passes
    its own functions.
    """

    def __init__(self, t0_s: float = 12 * 3600.0, *, irradiance: Irradiance | None = None,
                 load: Callable[[str, LoadParams, float], float] | None = None) -> None:
        self.t_s = t0_s
        self.prosumers: dict[str, EmulatedProsumer] = {}
        self.devices: dict[str, EmulatedDevice] = {}
        self.irradiance = irradiance or clear_sky_irradiance
        self.load = load or (lambda name, p, t: household_load_w(p, t, key=name))

    def add_prosumer(self, name: str, params: ProsumerParams) -> EmulatedProsumer:
        if name in self.prosumers:
            raise ValueError(f"prosumer {name!r} already exists")
        pr = EmulatedProsumer(name, params, self.t_s)
        self.prosumers[name] = pr
        return pr

    def add_device(self, name: str, kind: str, prosumer: str, serial: str | None = None, *,
                   maps: str = "legacy") -> EmulatedDevice:
        """`maps`: legacy (1xx/8xx models), ieee1547 (701-713 with OpenDER behaviour) or
        both; meters are always legacy."""
        if name in self.devices:
            raise ValueError(f"device {name!r} already exists")
        try:
            cls = DEVICE_CLASSES[kind]
        except KeyError:
            raise SunSpecError(f"no emulator for device kind {kind!r}") from None
        if maps != "legacy":
            from .emulator1547 import make_device

            dev = make_device(kind, name, self.prosumers[prosumer], serial or f"TB-{name}",
                              maps)  # type: ignore[arg-type]
            self.devices[name] = dev
            return dev
        dev = cls(name, self.prosumers[prosumer], serial or f"TB-{name}")
        self.devices[name] = dev
        return dev

    def step(self, dt_s: float, *, external_w: Mapping[str, float] | None = None,
             voltage_v: Mapping[str, float] | None = None,
             frequency_hz: Mapping[str, float] | None = None) -> None:
        """Advance every prosumer's physics by `dt_s` of simulated time. `external_w`:
        prosumer -> measured output of its real devices (+ = generation or discharge),
        which its emulated meter adds; `voltage_v`: prosumer -> terminal voltage from the
        feeder's power flow, which its emulated meter and inverters show."""
        t = self.t_s + dt_s
        irr = self.irradiance(t)
        ext, volts, freqs = external_w or {}, voltage_v or {}, frequency_hz or {}
        for pr in self.prosumers.values():
            pr.step(dt_s, irr, self.load(pr.name, pr.params.load, t),
                    external_w=ext.get(pr.name, 0.0), voltage_v=volts.get(pr.name),
                    frequency_hz=freqs.get(pr.name))
        self.t_s = t

    async def run(self, tick_s: float = 1.0, speed: float = 1.0,
                  stop: asyncio.Event | None = None) -> None:
        """Advance in real time (x `speed`) on absolute deadlines, so lateness never accumulates."""
        stop = stop or asyncio.Event()
        start = time.monotonic()
        n = 0
        while not stop.is_set():
            n += 1
            deadline = start + n * tick_s / speed
            delay = deadline - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                    break
                except TimeoutError:
                    pass
            self.step(tick_s)


def prosumer_params(pv: PVParams | None, battery: BatteryParams | None,
                    meter: MeterParams | None = None, load: LoadParams | None = None) -> ProsumerParams:
    return ProsumerParams(pv=pv, battery=battery, meter=meter or MeterParams(),
                          load=load or LoadParams())
