"""What SunSpec models mean to the engine: which models make a PV inverter, a battery or
a meter, and how their points map to the driver's neutral measurements and setpoints.

Pure functions of decoded model values (`ModelValues`), transport-free; `modbus.py`
reads the registers and calls them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .driver import DeviceKind, SetpointRejected

if TYPE_CHECKING:
    from .modbus import SunSpecDevice


INVERTER_MODELS = (103, 102, 101, 113, 112, 111)  # integer+SF and float variants
IEEE1547_MODELS = tuple(range(701, 714))
"""IEEE 1547-2018 information model: 701 measurements, 702 ratings, 704 controls, 713 storage."""
METER_MODELS = (203, 204, 202, 201, 213, 214, 212, 211)
STORAGE_MODELS = (802, 124, 713)
LEGACY_DER = (*INVERTER_MODELS, 120, 121, 123)
KIND_MODELS: dict[DeviceKind, tuple[int, ...]] = {
    DeviceKind.PV: (*LEGACY_DER, 701, 702, 704),
    DeviceKind.BATTERY: (*STORAGE_MODELS, *LEGACY_DER, 701, 702, 704),
    DeviceKind.METER: METER_MODELS,
}
KIND_NEEDS = {
    DeviceKind.PV: "an inverter model: 101-103, 111-113 or 701",
    DeviceKind.BATTERY: "802, or 124 or 713 beside an inverter model 101-103, 111-113 or 701",
    DeviceKind.METER: "a meter model: 201-204 or 211-214",
}
STATIC_MODELS = (1, 120, 121, 702)
"""Read once at discovery: identity and ratings do not change while connected."""
MODEL_PREFERENCES = ("ieee1547", "legacy")


def kind_models(kind: DeviceKind, ids: Iterable[int], prefer: str = "ieee1547") -> set[int]:
    """The models a device of `kind` is read through; empty when it has none that fit.

    A device offering both the legacy (1xx) and the IEEE 1547 (70x) models is read through
    the 70x ones unless `prefer` is "legacy"; a battery needs a storage model (802, 124
    or 713), a PV inverter an inverter model (101-103, 111-113 or 701).
    """
    have = set(ids)
    wanted = set(KIND_MODELS[kind]) & have
    if kind is DeviceKind.METER:
        return wanted
    inverter = have & {*INVERTER_MODELS, 701}
    if kind is DeviceKind.BATTERY and 802 in have:
        pass  # a battery model of its own (802) needs no inverter model beside it
    elif not inverter or (kind is DeviceKind.BATTERY and not have & set(STORAGE_MODELS)):
        return set()
    legacy, ieee = have & set(INVERTER_MODELS), 701 in have
    if legacy and ieee:
        drop = set(LEGACY_DER) - {120, 121} if prefer != "legacy" else {701, 704}
        wanted -= drop
    return wanted


def infer_kind(model_ids: Iterable[int]) -> DeviceKind | None:
    ids = set(model_ids)
    if ids & set(STORAGE_MODELS):
        return DeviceKind.BATTERY
    if ids & {*INVERTER_MODELS, 701}:
        return DeviceKind.PV
    if ids & set(METER_MODELS):
        return DeviceKind.METER
    return None


def _first(models: Mapping[int, Mapping[str, Any]], ids: Iterable[int]) -> Mapping[str, Any]:
    for i in ids:
        if i in models:
            return models[i]
    return {}


def _pick(*sources: tuple[Mapping[str, Any], str]) -> Any:
    """The first implemented value among (model values, point) pairs, decoded lazily: a
    fallback is decoded only when what precedes it is missing."""
    for values, point in sources:
        v = values.get(point)
        if v is not None:
            return v
    return None


INV_STATES = {1: "OFF", 2: "SLEEPING", 3: "STARTING", 4: "MPPT", 5: "THROTTLED",
              6: "SHUTTING_DOWN", 7: "FAULT", 8: "STANDBY"}
DER_STATES = {0: "OFF", 1: "SLEEPING", 2: "STARTING", 3: "MPPT", 4: "THROTTLED",
              5: "SHUTTING_DOWN", 6: "FAULT", 7: "STANDBY"}
"""701 InvSt, named as the legacy states (701 RUNNING is the legacy MPPT)."""


def _ac(models: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """AC measurements from 701 when read, else from the legacy inverter model."""
    d = models.get(701)
    if d is not None:
        return {"p_w": d.get("W"), "q_var": d.get("Var"), "voltage_v": _pick((d, "LNV"), (d, "VL1")),
                "frequency_hz": d.get("Hz"), "energy_wh": d.get("TotWhInj"),
                "temperature_c": d.get("TmpCab"), "current_a": d.get("A"),
                "state": DER_STATES.get(d.get("InvSt"), d.get("InvSt")), "events": d.get("Alrm")}
    inv = _first(models, INVERTER_MODELS)
    return {"p_w": inv.get("W"), "q_var": inv.get("VAr"), "voltage_v": inv.get("PhVphA"),
            "frequency_hz": inv.get("Hz"), "energy_wh": inv.get("WH"),
            "temperature_c": inv.get("TmpCab"), "current_a": inv.get("A"), "dc_w": inv.get("DCW"),
            "state": INV_STATES.get(inv.get("St"), inv.get("St")), "events": inv.get("Evt1")}


def _pv_values(models: Mapping[int, dict], static: Mapping[int, dict]) -> tuple[dict, dict]:
    ac = _ac(models)
    ctl, der = models.get(123, {}), models.get(704, {})
    if 704 in models:
        limit, enabled = der.get("WMaxLimPct"), der.get("WMaxLimPctEna")
    else:
        limit, enabled = ctl.get("WMaxLimPct"), ctl.get("WMaxLim_Ena")
    values = {
        "p_w": ac["p_w"], "q_var": ac["q_var"], "dc_w": ac.get("dc_w"),
        "energy_wh": ac["energy_wh"], "voltage_v": ac["voltage_v"],
        "frequency_hz": ac["frequency_hz"], "limit_pct": limit, "limit_enabled": enabled,
        "rating_w": _pick((static.get(702, {}), "WMaxRtg"), (static.get(120, {}), "WRtg")),
        "temperature_c": ac["temperature_c"],
    }
    return values, {"state": ac["state"], "events": ac["events"]}


def _ratings(models: Mapping[int, Mapping[str, Any]],
             static: Mapping[int, Mapping[str, Any]]) -> tuple[Any, Any]:
    """(max charge W, max discharge W) from 802, 124, 702, 120 or 121, first stated wins."""
    b, s = models.get(802, {}), models.get(124, {})
    r702, r120, r121 = static.get(702, {}), static.get(120, {}), static.get(121, {})
    ch = _pick((s, "WChaMax"), (b, "WChaRteMax"), (r702, "WChaRteMax"), (r702, "WChaRteMaxRtg"),
               (r120, "MaxChaRte"))
    dis = _pick((b, "WDisChaRteMax"), (r702, "WDisChaRteMax"), (r702, "WDisChaRteMaxRtg"),
                (r120, "MaxDisChaRte"), (r121, "WMax"), (r702, "WMaxRtg"), (r120, "WRtg"))
    return ch, dis


def _battery_values(models: Mapping[int, dict], static: Mapping[int, dict]) -> tuple[dict, dict]:
    b, s, st = models.get(802, {}), models.get(124, {}), models.get(713, {})
    ac = _ac(models) if not b else {}
    max_ch, max_dis = _ratings(models, static)
    values = {
        "p_w": _pick((b, "W"), (ac, "p_w")), "setpoint_w": _setpoint(models, max_ch, max_dis),
        "soc_pct": _pick((b, "SoC"), (st, "SoC"), (s, "ChaState")),
        "capacity_wh": _pick((b, "WHRtg"), (st, "WHRtg"), (static.get(120, {}), "WHRtg")),
        "max_charge_w": max_ch, "max_discharge_w": max_dis,
        "soc_min_pct": _pick((b, "SoCMin"), (s, "MinRsvPct")), "soc_max_pct": b.get("SoCMax"),
        "voltage_v": _pick((b, "V"), (ac, "voltage_v")),
        "current_a": _pick((b, "A"), (ac, "current_a")),
    }
    evt = int(b.get("Evt1") or 0)
    clamps = [name for name, bit in (("charge_rate", 6), ("discharge_rate", 8),
                                     ("soc_min", 14), ("soc_max", 16)) if evt >> bit & 1]
    states = {1: "DISCONNECTED", 2: "INITIALIZING", 3: "CONNECTED", 4: "STANDBY",
              5: "SOC PROTECTION", 6: "SUSPENDING", 99: "FAULT"}
    cha = {1: "OFF", 2: "EMPTY", 3: "DISCHARGING", 4: "CHARGING", 5: "FULL", 6: "HOLDING", 7: "TESTING"}
    cha_st = _pick((b, "ChaSt"), (s, "ChaSt"))
    return values, {
        "state": states.get(b.get("State"), b.get("State")) if b else ac.get("state"),
        "charge_status": cha.get(cha_st, cha_st),
        "clamped": bool(clamps), "clamp": clamps[0] if clamps else None,
        "storctl_mod": s.get("StorCtl_Mod"),
    }


def _setpoint(models: Mapping[int, Mapping[str, Any]], max_ch: Any, max_dis: Any) -> Any:
    """The commanded power, + discharge: 802 ReqW, else 704 WSet, else 124's rates."""
    b, der, s = models.get(802, {}), models.get(704, {}), models.get(124, {})
    if b.get("ReqW") is not None:
        return b["ReqW"]
    if 704 in models and der.get("WSetEna") == 1:
        return der.get("WSet")
    mode = s.get("StorCtl_Mod")
    if mode is None:
        return None
    if mode & 2 and s.get("OutWRte") is not None and max_dis:
        return s["OutWRte"] / 100 * max_dis
    if mode & 1 and s.get("InWRte") is not None and max_ch:
        return -s["InWRte"] / 100 * max_ch
    return 0.0


def _meter_values(models: Mapping[int, dict], static: Mapping[int, dict]) -> tuple[dict, dict]:
    m = _first(models, METER_MODELS)
    return {
        "p_w": m.get("W"), "import_wh": m.get("TotWhImp"), "export_wh": m.get("TotWhExp"),
        "voltage_v": m.get("PhVphA", m.get("PhV")), "frequency_hz": m.get("Hz"),
        "current_a": m.get("A"),
    }, {"events": m.get("Evt")}


NEUTRAL = {DeviceKind.PV: _pv_values, DeviceKind.BATTERY: _battery_values,
           DeviceKind.METER: _meter_values}


def _cannot(dev: SunSpecDevice, what: str, needs: str) -> SetpointRejected:
    return SetpointRejected(dev._err(
        f"{what}: this device's models {sorted(m.id for m in dev.models)} cannot carry it "
        f"(needs {needs})"))


def _pv_limit(dev: SunSpecDevice, value: float) -> list[tuple[int, str, float]]:
    if not 0.0 <= value <= 100.0:
        raise SetpointRejected(dev._err(f"limit_pct {value:g} outside 0..100 %"))
    if 704 in dev.layout:
        return [(704, "WMaxLimPct", value), (704, "WMaxLimPctEna", 1)]
    if 123 in dev.layout:
        return [(123, "WMaxLimPct", value), (123, "WMaxLim_Ena", 1)]
    raise _cannot(dev, "limit_pct", "123 or 704")


def _pv_enable(dev: SunSpecDevice, value: float) -> list[tuple[int, str, float]]:
    if value not in (0.0, 1.0):
        raise SetpointRejected(dev._err(f"limit_enabled must be 0 or 1, got {value:g}"))
    if 704 in dev.layout:
        return [(704, "WMaxLimPctEna", value)]
    if 123 in dev.layout:
        return [(123, "WMaxLim_Ena", value)]
    raise _cannot(dev, "limit_enabled", "123 or 704")


def _battery_power(dev: SunSpecDevice, value: float) -> list[tuple[int, str, float]]:
    """+W discharge / -W charge: on a 1547 device 704 WSet (watts, enabled); else 124:
    StorCtl_Mod=DISCHARGE with OutWRte (% of the discharge rating) or CHARGE with InWRte."""
    max_ch, max_dis = _ratings(dev.last, dev.static)
    if 704 in dev.layout:
        lo = -max_ch if max_ch else -math.inf
        hi = max_dis if max_dis else math.inf
        if not lo <= value <= hi:
            raise SetpointRejected(dev._err(
                f"power_w {value:g} W outside {lo:g} (charge) .. +{hi:g} (discharge) W"))
        return [(704, "WSetMod", 1), (704, "WSet", value), (704, "WSetEna", 1)]
    if 124 not in dev.layout:
        raise _cannot(dev, "power_w", "124 or 704")
    if not max_dis or not max_ch:
        raise SetpointRejected(dev._err(
            "device does not state its charge/discharge ratings (124 WChaMax, 802, 702 or 120)"))
    if not -max_ch <= value <= max_dis:
        raise SetpointRejected(dev._err(
            f"power_w {value:g} W outside -{max_ch:g} (charge) .. +{max_dis:g} (discharge) W"))
    if value > 0:
        return [(124, "OutWRte", value / max_dis * 100), (124, "InWRte", 0), (124, "StorCtl_Mod", 2)]
    if value < 0:
        return [(124, "OutWRte", 0), (124, "InWRte", -value / max_ch * 100), (124, "StorCtl_Mod", 1)]
    return [(124, "StorCtl_Mod", 0), (124, "OutWRte", 0), (124, "InWRte", 0)]


SETPOINT_WRITERS = {
    (DeviceKind.PV, "limit_pct"): _pv_limit,
    (DeviceKind.PV, "limit_enabled"): _pv_enable,
    (DeviceKind.BATTERY, "power_w"): _battery_power,
}
SETPOINT_NAMES: dict[DeviceKind, set[str]] = {}
for _kind, _name in SETPOINT_WRITERS:
    SETPOINT_NAMES.setdefault(_kind, set()).add(_name)
