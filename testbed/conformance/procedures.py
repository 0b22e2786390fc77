"""IEEE 1547.1-2020 test procedures through the driver, on the SunSpec 70x points.

Each procedure configures the function under test over SunSpec (704, 705, 711), steps the
grid source, samples 701 (W, Var, LNV, Hz) every `dt_s`, and judges every step by the
standard's criteria:
- steady state (the last samples of a step) within the minimum required accuracy of
  IEEE 1547-2018 Table 3: P and Q +-5 % of the rating, V +-1 % of nominal (carried
  through a curve's slope), f +-10 mHz;
- dynamic response: 90 % of the step's expected change reached within the open-loop
  response time (plus one sample interval of time accuracy).

What is simplified (documented in the README): one characteristic curve / setting per
function (the standard's defaults: volt-var Category B curve 1, droop 0.036 Hz / 5 % /
5 s), fewer steps than the full tables, no unbalanced or ramped variants.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from testbed.devices.driver import DeviceError
from testbed.devices.modbus import SunSpecDevice
from testbed.physics.der1547 import VOLT_VAR_B, volt_var_q_pu

from .source import GridSource

MRA_PQ = 0.05
"""Minimum required accuracy of P and Q, share of the rating (IEEE 1547-2018 Table 3)."""
MRA_V = 0.01
"""... of voltage, share of nominal."""
MRA_F_HZ = 0.010


@dataclass(frozen=True)
class Sample:
    t: float
    p_w: float
    q_var: float
    v: float
    f_hz: float


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    measured: float
    expected: float
    tolerance: float
    detail: str


@dataclass
class TestResult:
    id: str
    """The IEEE 1547.1-2020 clause."""
    name: str
    checks: list[Check] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    steps: list[tuple[float, str]] = field(default_factory=list)
    """(time, label) of each grid or setting step, for plots."""
    error: str | None = None
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def reason(self) -> str:
        if self.error:
            return self.error
        bad = [c for c in self.checks if not c.passed]
        return "; ".join(c.detail for c in bad[:3]) if bad else ""


@dataclass
class Ctx:
    dev: SunSpecDevice
    source: GridSource
    dt_s: float = 1.0
    rating_w: float = 0.0
    var_max: float = 0.0
    result: TestResult | None = None

    storage: bool = False
    """A battery: the tests that need output command full discharge (704 WSet) first."""

    async def setup(self) -> None:
        ids = {m.id for m in self.dev.models}
        if not {701, 702, 704} <= ids:
            raise DeviceError(f"{self.dev.name}: the conformance tests need the IEEE 1547 "
                              f"models 701, 702 and 704; the device serves {sorted(ids)}")
        self.storage = 713 in ids
        r702 = await self.dev.read_model(702)
        self.rating_w = float(r702.get("WMaxRtg") or r702.get("WMax") or 0.0)
        self.var_max = float(r702.get("VarMaxInjRtg") or r702.get("VarMaxInj") or
                             0.44 * self.rating_w)
        if self.rating_w <= 0:
            raise DeviceError(f"{self.dev.name}: 702 WMaxRtg is not stated")

    async def sample(self) -> Sample:
        m = await self.dev.read_model(701)
        s = Sample(self.source.now(), float(m.get("W") or 0.0), float(m.get("Var") or 0.0),
                   float(m.get("LNV") or m.get("VL1") or 0.0), float(m.get("Hz") or 0.0))
        assert self.result is not None
        self.result.samples.append(s)
        return s

    async def full_output(self, on: bool = True) -> None:
        """A battery discharges at its rating for the tests that need output (a PV
        inverter gives what its array has)."""
        if self.storage:
            if on:
                await self.dev.write("704.WSetMod", 1)
                await self.dev.write("704.WSet", self.rating_w)
            await self.dev.write("704.WSetEna", int(on))

    async def hold(self, seconds: float) -> list[Sample]:
        """Let `seconds` pass, sampling every dt_s; the samples of that time."""
        out = []
        for _ in range(max(1, round(seconds / self.dt_s))):
            await self.source.wait(self.dt_s)
            out.append(await self.sample())
        return out

    def mark(self, label: str) -> None:
        assert self.result is not None
        self.result.steps.append((self.source.now(), label))

    def check(self, name: str, measured: float, expected: float, tol: float, what: str) -> bool:
        ok = abs(measured - expected) <= tol + 1e-9
        assert self.result is not None
        self.result.checks.append(Check(name, ok, measured, expected, tol,
                                        f"{name}: {what} {measured:.1f}, expected "
                                        f"{expected:.1f} +- {tol:.1f}"))
        return ok

    def check_response(self, name: str, samples: list[Sample], attr: str, before: float,
                       target: float, olrt_s: float, t0: float) -> None:
        """90 % of (target - before) within the open-loop response time (one sample of
        time accuracy). Skipped when the expected change is inside the MRA."""
        delta = target - before
        if abs(delta) <= MRA_PQ * self.rating_w:
            return
        by = t0 + olrt_s + self.dt_s * 1.001
        reached = [s for s in samples if s.t <= by
                   and (getattr(s, attr) - before) / delta >= 0.9]
        measured = (getattr(samples[0], attr) - before) / delta if samples else 0.0
        at = [s for s in samples if s.t <= by]
        if at:
            measured = (getattr(at[-1], attr) - before) / delta
        assert self.result is not None
        self.result.checks.append(Check(
            name, bool(reached), 100 * measured, 90.0, 0.0,
            f"{name}: {100 * measured:.0f} % of the step after the open-loop response time "
            f"{olrt_s:g} s (need >= 90 %)"))


def _mean(samples: list[Sample], attr: str, n: int = 3) -> float:
    tail = samples[-n:]
    return sum(getattr(s, attr) for s in tail) / len(tail)


async def _try_write(dev: SunSpecDevice, point: str, value: Any) -> None:
    """Disable a function the device may not have (no such model: nothing to disable)."""
    try:
        await dev.write(point, value)
    except DeviceError as exc:
        if "no model" not in str(exc):
            raise


async def _reactive_off(ctx: Ctx) -> None:
    for point in ("704.PFWInjEna", "704.VarSetEna", "705.Ena", "712.Ena"):
        await _try_write(ctx.dev, point, 0)


# --------------------------------------------------------------------------- 5.14.3


async def constant_pf(ctx: Ctx) -> None:
    """5.14.3 constant power factor: injecting and absorbing at PF 0.90 (the minimum
    Category B must reach), Q = P tan(acos PF) in steady state, 90 % within 10 s."""
    dev, s = ctx.dev, ctx.source
    await _reactive_off(ctx)
    await s.set_voltage(s.nominal_v)
    await ctx.full_output()
    base = await ctx.hold(10.0)
    for pf, ext, sign in ((0.90, 1, -1.0), (0.90, 0, 1.0)):  # Ext 0 OVER_EXCITED = inject
        before_q = _mean(base, "q_var")
        await dev.write("704.PFWInj.PF", pf)
        await dev.write("704.PFWInj.Ext", ext)
        await dev.write("704.PFWInjEna", 1)
        ctx.mark(f"PF {pf:.2f} {'absorbing' if sign < 0 else 'injecting'}")
        t0 = s.now()
        seg = await ctx.hold(20.0)
        p = _mean(seg, "p_w")
        q_exp = sign * abs(p) * math.tan(math.acos(pf))
        tol = MRA_PQ * ctx.rating_w
        ctx.check(f"PF {pf:.2f} {'abs' if sign < 0 else 'inj'} steady Q", _mean(seg, "q_var"),
                  q_exp, tol, "Q (var)")
        ctx.check_response(f"PF {pf:.2f} {'abs' if sign < 0 else 'inj'} response", seg, "q_var",
                           before_q, q_exp, 10.0, t0)
        base = seg
    await dev.write("704.PFWInjEna", 0)
    await ctx.full_output(False)
    await ctx.hold(10.0)


# --------------------------------------------------------------------------- 5.14.4


VV_OLRT_S = 5.0


async def volt_var(ctx: Ctx) -> None:
    """5.14.4 volt-var, characteristic curve 1 (Category B defaults, VRef 1.0, OLRT 5 s):
    the curve written to entry 2 and adopted (AdptCrvReq), then voltage steps across both
    slopes and beyond; Q per the curve within the MRA (V's MRA carried through the
    slope), 90 % of each step within the OLRT."""
    dev, s = ctx.dev, ctx.source
    await _reactive_off(ctx)
    await s.set_voltage(s.nominal_v)
    q_pct = 100.0 * 0.44 * ctx.rating_w / ctx.var_max if ctx.var_max else 100.0
    for j, (v_pu, q_pu) in enumerate(VOLT_VAR_B, 1):
        await dev.write(f"705.Crv[2].Pt[{j}].V", 100.0 * v_pu)
        await dev.write(f"705.Crv[2].Pt[{j}].Var", math.copysign(q_pct, q_pu) if q_pu else 0.0)
    await dev.write("705.Crv[2].ActPt", 4)
    await dev.write("705.Crv[2].DeptRef", 1)  # VAR_MAX_PCT
    await dev.write("705.Crv[2].RspTms", VV_OLRT_S)
    await dev.write("705.Crv[2].VRef", 100.0)
    await dev.write("705.AdptCrvReq", 2)
    m705 = await dev.read_model(705)
    if m705.get("AdptCrvRslt") != 1:
        raise DeviceError(f"{dev.name}: curve adoption did not complete "
                          f"(AdptCrvRslt {m705.get('AdptCrvRslt')})")
    await dev.write("705.Ena", 1)
    ctx.mark("volt-var on")
    base = await ctx.hold(15.0)
    tol = MRA_PQ * ctx.rating_w
    for v_pu in (1.05, 1.09, 1.00, 0.95, 0.91, 1.00):
        before = _mean(base, "q_var")
        await s.set_voltage(v_pu * s.nominal_v)
        ctx.mark(f"V {v_pu:.2f} p.u.")
        t0 = s.now()
        seg = await ctx.hold(15.0)
        v_meas = _mean(seg, "v") / s.nominal_v
        q_exp = volt_var_q_pu(VOLT_VAR_B, v_meas) * ctx.rating_w
        slope = max(abs(volt_var_q_pu(VOLT_VAR_B, v_meas + MRA_V) * ctx.rating_w - q_exp),
                    abs(volt_var_q_pu(VOLT_VAR_B, v_meas - MRA_V) * ctx.rating_w - q_exp))
        ctx.check(f"V {v_pu:.2f} steady Q", _mean(seg, "q_var"), q_exp, tol + slope, "Q (var)")
        ctx.check_response(f"V {v_pu:.2f} response", seg, "q_var", before, q_exp, VV_OLRT_S, t0)
        base = seg
    await dev.write("705.Ena", 0)
    await s.set_voltage(s.nominal_v)
    await ctx.hold(10.0)


# --------------------------------------------------------------------------- 5.13


APL_RESPONSE_S = 30.0
"""IEEE 1547-2018 4.6.2: the active power limit reached within 30 s."""


async def active_power_limit(ctx: Ctx) -> None:
    """5.13 limit active power: 66 %, 33 %, 0 % of the rating from full output; P at or
    below the limit (when available power exceeds it) within the MRA, 90 % within 30 s."""
    dev, s = ctx.dev, ctx.source
    await s.set_voltage(s.nominal_v)
    await dev.write("704.WMaxLimPctEna", 0)
    await ctx.full_output()
    base = await ctx.hold(10.0)
    available = _mean(base, "p_w")
    tol = MRA_PQ * ctx.rating_w
    for pct in (66.0, 33.0, 0.0):
        before = _mean(base, "p_w")
        await dev.write("704.WMaxLimPct", pct)
        await dev.write("704.WMaxLimPctEna", 1)
        ctx.mark(f"limit {pct:g} %")
        t0 = s.now()
        seg = await ctx.hold(APL_RESPONSE_S + 10.0)
        p_exp = min(available, pct / 100.0 * ctx.rating_w)
        ctx.check(f"limit {pct:g} % steady P", _mean(seg, "p_w"), p_exp, tol, "P (W)")
        ctx.check_response(f"limit {pct:g} % response", seg, "p_w", before, p_exp,
                           APL_RESPONSE_S, t0)
        base = seg
    await dev.write("704.WMaxLimPctEna", 0)
    await ctx.full_output(False)
    await ctx.hold(10.0)


# --------------------------------------------------------------------------- 5.15


DROOP = (0.036, 0.036, 0.05, 0.05, 5.0)
"""dbOF, dbUF (Hz), kOF, kUF, OLRT (s): IEEE 1547-2018 Table 24 defaults."""


async def frequency_droop(ctx: Ctx) -> None:
    """5.15 frequency droop (over-frequency, from full output): steps above the deadband;
    P = P0 - (f - f0 - db) / (f0 k) x rating within the MRA (f's MRA through the slope),
    90 % within the OLRT."""
    dev, s = ctx.dev, ctx.source
    db_of, db_uf, k_of, k_uf, olrt = DROOP
    await s.set_voltage(s.nominal_v)
    await s.set_frequency(s.nominal_f)
    for point, value in (("DbOf", db_of), ("DbUf", db_uf), ("KOf", k_of), ("KUf", k_uf),
                         ("RspTms", olrt)):
        await dev.write(f"711.Ctl[2].{point}", value)
    await dev.write("711.AdptCtlReq", 2)
    await dev.write("711.Ena", 1)
    await ctx.full_output()
    ctx.mark("droop on")
    base = await ctx.hold(10.0)
    p0 = _mean(base, "p_w")
    f0 = s.nominal_f
    tol = MRA_PQ * ctx.rating_w
    for df in (0.3, 0.7, 0.0):
        before = _mean(base, "p_w")
        await s.set_frequency(f0 + df)
        ctx.mark(f"f {f0 + df:.2f} Hz")
        t0 = s.now()
        seg = await ctx.hold(15.0)

        def expected(f: float) -> float:
            return max(0.0, p0 - max(0.0, f - f0 - db_of) / (f0 * k_of) * ctx.rating_w)

        f_meas = _mean(seg, "f_hz")
        p_exp = expected(f_meas)
        slope = abs(expected(f_meas + MRA_F_HZ) - p_exp)
        ctx.check(f"f {f0 + df:.2f} steady P", _mean(seg, "p_w"), p_exp, tol + slope, "P (W)")
        ctx.check_response(f"f {f0 + df:.2f} response", seg, "p_w", before, p_exp, olrt, t0)
        base = seg
    await dev.write("711.Ena", 0)
    await ctx.full_output(False)
    await ctx.hold(5.0)


Procedure = Callable[[Ctx], Awaitable[None]]
PROCEDURES: dict[str, tuple[str, str, Procedure]] = {
    "constant-pf": ("5.14.3", "Constant power factor", constant_pf),
    "volt-var": ("5.14.4", "Voltage-reactive power", volt_var),
    "active-power-limit": ("5.13", "Limit maximum active power", active_power_limit),
    "frequency-droop": ("5.15", "Frequency-droop", frequency_droop),
}
"""CLI name -> (IEEE 1547.1-2020 clause, title, procedure)."""


async def run_tests(dev: SunSpecDevice, source: GridSource, names: list[str] | None = None,
                    dt_s: float = 1.0) -> list[TestResult]:
    """Run the named procedures (all by default) in order; a device error ends that test
    (its result says why) and the next one starts from nominal V and f."""
    ctx = Ctx(dev, source, dt_s)
    await dev.connect()
    await ctx.setup()
    out = []
    for name in names or list(PROCEDURES):
        clause, title, proc = PROCEDURES[name]
        ctx.result = TestResult(clause, f"{title} ({name})")
        t0 = source.now()
        try:
            await proc(ctx)
        except DeviceError as exc:
            ctx.result.error = f"device error: {exc}"
        ctx.result.duration_s = source.now() - t0
        out.append(ctx.result)
        await source.set_voltage(source.nominal_v)
        await source.set_frequency(source.nominal_f)
    return out
