"""The DSO check: run the power flow with the awarded setpoints and say what breaks, and
whose award breaks it.

Attribution is by trial removal, not by linear sensitivity: for every award, the power
flow is re-run without it, and the award's contribution to a violation is how much the
violated quantity (voltage or loading) moves when it goes. That is exact for the
non-linear flow (a sensitivity is only its tangent), costs one fast power flow per award
(~0.1-0.3 ms each, `powerflow.FastFlow`), and runs only when something is violated.

Violations that exist without any award (the feeder is already out of band, say at a
winter peak) are pre-existing: the market is not blamed for them, but awards may not make
them worse. A dispatch is *acceptable* when every enforced violation is pre-existing and
not worsened; the traffic light still shows the grid's state (red whenever a hard limit is
broken, whoever broke it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import numpy as np

from testbed.steps import run_steps

from .limits import GridLimits
from .network import Connection, GridError, bus_label
from .powerflow import FastFlow, Flow, FlowResult, make_flow


class Light(StrEnum):
    GREEN = "green"
    """Within the planning band and loading: the market runs freely."""
    AMBER = "amber"
    """Outside the planning band or loading, inside the hard limits: DSO attention."""
    RED = "red"
    """A hard limit broken, or no power-flow solution."""


class Kind(StrEnum):
    VOLTAGE_HIGH = "voltage_high"
    VOLTAGE_LOW = "voltage_low"
    LINE_LOADING = "line_loading"
    TRAFO_LOADING = "trafo_loading"
    NO_SOLUTION = "no_solution"


@dataclass(frozen=True)
class Cause:
    award: str
    """The award's key (the order id in the market)."""
    prosumer: str
    contribution: float
    """How much the violated quantity improves when this award is removed (p.u. or %)."""


@dataclass(frozen=True)
class Violation:
    kind: Kind
    element: str
    """Bus, line or transformer name."""
    value: float
    limit: float
    """The limit broken (hard limit when `band` is hard, planning limit otherwise)."""
    band: str
    """`hard` or `planning`."""
    target: float | None = None
    """The limit the re-clear must restore (None when `GridLimits.enforce` ignores it)."""
    base_value: float | None = None
    """The same quantity with no award (None when not computed)."""
    causes: tuple[Cause, ...] = ()
    index: int = -1
    """Row of the element in its table (names need not be unique in a user's network)."""

    @property
    def enforced(self) -> bool:
        return self.target is not None

    @property
    def pre_existing(self) -> bool:
        if self.kind == Kind.NO_SOLUTION:
            return False
        return self.base_value is not None and _beyond(self.kind, self.base_value, self.target)

    @property
    def excess(self) -> float:
        """How far the value must come back: past the target, or past the base value when
        the violation is pre-existing (awards may not worsen it)."""
        if self.kind == Kind.NO_SOLUTION:
            return math.inf
        if self.target is None:
            return 0.0
        ref = self.base_value if self.pre_existing else self.target
        assert ref is not None
        return max(0.0, (ref - self.value) if self.kind == Kind.VOLTAGE_LOW else
                   (self.value - ref))

    @property
    def acceptable(self) -> bool:
        if self.kind == Kind.NO_SOLUTION:
            return False
        return not self.enforced or (self.pre_existing and self.excess <= TOL[self.kind])

    def to_dict(self) -> dict[str, Any]:
        return {"kind": str(self.kind), "element": self.element, "value": _num(self.value),
                "limit": self.limit, "band": self.band, "target": self.target,
                "base_value": _num(self.base_value), "pre_existing": self.pre_existing,
                "causes": [{"award": c.award, "prosumer": c.prosumer,
                            "contribution": c.contribution} for c in self.causes]}


TOL = {Kind.VOLTAGE_HIGH: 1e-7, Kind.VOLTAGE_LOW: 1e-7, Kind.LINE_LOADING: 1e-5,
       Kind.TRAFO_LOADING: 1e-5, Kind.NO_SOLUTION: 0.0}
"""Changes smaller than this (p.u. / %) are solver noise, not a contribution."""


def _beyond(kind: Kind, value: float, limit: float | None) -> bool:
    if limit is None:
        return False
    return value < limit - TOL[kind] if kind == Kind.VOLTAGE_LOW else value > limit + TOL[kind]


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass(frozen=True)
class GridReport:
    """The check's answer for one dispatch."""

    light: Light
    acceptable: bool
    """No enforced violation caused or worsened by the awards (see module doc)."""
    converged: bool
    reason: str
    vm_min_pu: float
    vm_max_pu: float
    max_line_pct: float
    max_trafo_pct: float
    losses_w: float
    import_w: float
    violations: tuple[Violation, ...]
    flow: FlowResult = field(repr=False, compare=False)
    buses: tuple[str, ...] = field(default=(), repr=False)

    def voltages(self) -> dict[str, float]:
        """Per-bus voltage magnitude (p.u.), by bus name."""
        return {b: float(v) for b, v in zip(self.buses, self.flow.vm_pu, strict=True)
                if math.isfinite(v)}

    def to_dict(self, *, detail: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "light": str(self.light), "acceptable": self.acceptable,
            "converged": self.converged, "reason": self.reason,
            "vm_min_pu": _num(self.vm_min_pu), "vm_max_pu": _num(self.vm_max_pu),
            "max_line_pct": _num(self.max_line_pct), "max_trafo_pct": _num(self.max_trafo_pct),
            "losses_w": _num(self.losses_w), "import_w": _num(self.import_w),
            "violations": [v.to_dict() for v in self.violations]}
        if detail:
            d["vm_pu"] = self.voltages()
            d["line_loading_pct"] = [float(x) for x in self.flow.line_loading_pct]
            d["trafo_loading_pct"] = [float(x) for x in self.flow.trafo_loading_pct]
        return d


@dataclass(frozen=True)
class CheckerState:
    """A fast-flow `GridChecker` without its pandapower network (`grid.cache`)."""

    connections: tuple[Connection, ...]
    bus_names: tuple[str, ...]
    line_names: tuple[str, ...]
    trafo_names: tuple[str, ...]
    conn_rows: tuple[int, ...]
    flow: dict[str, Any]
    """`FastFlow.state()`"""


Awards = Mapping[str, tuple[str, float]]
"""award key -> (prosumer, injection W; + = into the grid)."""


class GridChecker:
    """The DSO's check for one feeder: prosumer injections in, `GridReport` out."""

    def __init__(self, net: Any, connections: Sequence[Connection],
                 limits: GridLimits | None = None, *, engine: str = "auto") -> None:
        self._net, self._make_net = net, None
        self.connections = tuple(connections)
        self.limits = limits or GridLimits()
        self.flow: Flow = make_flow(net, [c.bus for c in self.connections], engine)
        self._pos = {c.prosumer: i for i, c in enumerate(self.connections)}
        self._bus_names = tuple(bus_label(net, b) for b in net.bus.index)
        self._line_names = tuple(_names(net.line, "line"))
        self._trafo_names = tuple(_names(net.trafo, "trafo"))
        self._conn_rows = tuple(int(net.bus.index.get_loc(c.bus)) for c in self.connections)

    def state(self) -> CheckerState | None:
        """What this checker is made of, pandapower aside (None with the reference flow,
        which runs pandapower itself): `restore` makes the same checker from it."""
        if not isinstance(self.flow, FastFlow):
            return None
        return CheckerState(self.connections, self._bus_names, self._line_names,
                            self._trafo_names, self._conn_rows, self.flow.state())

    @property
    def net(self) -> Any:
        """The pandapower network (a restored checker builds it on first use: the run
        itself never needs it)."""
        if self._net is None and self._make_net is not None:
            self._net = self._make_net()
        return self._net

    @net.setter
    def net(self, net: Any) -> None:
        self._net = net

    @property
    def restored(self) -> bool:
        """Made from a `CheckerState` (`grid.cache`), not by pandapower in this process."""
        return self._make_net is not None

    @classmethod
    def restore(cls, state: CheckerState, limits: GridLimits | None = None, *,
                net: Callable[[], Any] | None = None) -> GridChecker:
        """The checker `state()` describes, without pandapower; `net` builds the network
        if something asks for it."""
        self = cls.__new__(cls)
        self._net, self._make_net = None, net or _no_net
        self.connections = tuple(state.connections)
        self.limits = limits or GridLimits()
        self.flow = FastFlow.restore(state.flow, [c.bus for c in self.connections])
        self._pos = {c.prosumer: i for i, c in enumerate(self.connections)}
        self._bus_names, self._line_names = state.bus_names, state.line_names
        self._trafo_names, self._conn_rows = state.trafo_names, state.conn_rows
        return self

    @property
    def prosumers(self) -> tuple[str, ...]:
        return tuple(self._pos)

    def _vector(self, base_w: Mapping[str, float], awards: Awards,
                skip: str | None = None) -> np.ndarray:
        # summed in Python floats, then one array: the same IEEE additions as into a numpy
        # array element by element, without a numpy scalar operation per prosumer
        p = [0.0] * len(self.connections)
        pos = self._pos
        for name, w in base_w.items():
            i = pos.get(name)
            p[self._index(name) if i is None else i] += w
        for key, (name, w) in awards.items():
            if key != skip:
                p[self._index(name)] += w
        return np.array(p, dtype=float)

    def _q_vector(self, base_q: Mapping[str, float] | None) -> np.ndarray | None:
        if not base_q:
            return None
        return self._vector(base_q, {})

    def prosumer_vm(self, report: GridReport) -> dict[str, float]:
        """Voltage magnitude (p.u.) at each prosumer's connection bus (NaN if no solution):
        what goes back to that prosumer's emulated devices."""
        vm = report.flow.vm_pu
        return {c.prosumer: float(vm[row]) for c, row in zip(self.connections, self._conn_rows,
                                                              strict=True)}

    def _index(self, prosumer: str) -> int:
        try:
            return self._pos[prosumer]
        except KeyError:
            raise GridError(f"{prosumer!r} is not connected to this feeder (connected: "
                            f"{', '.join(self._pos)})", "prosumer") from None

    def check(self, base_w: Mapping[str, float], awards: Awards | None = None, *,
              background: float = 1.0, base_q: Mapping[str, float] | None = None
              ) -> GridReport:
        """Power flow with measured injections `base_w` (prosumer -> W, + = export) and
        `base_q` (prosumer -> var, + = into the grid; none = unity power factor) plus the
        `awards` (active power); violations of the enforced band are attributed to awards,
        every flow (base case and trials) carrying the same reactive injections."""
        return run_steps(self.check_steps(base_w, awards, background=background,
                                          base_q=base_q))

    def check_steps(self, base_w: Mapping[str, float], awards: Awards | None = None, *,
                    background: float = 1.0, base_q: Mapping[str, float] | None = None
                    ) -> Generator[None, None, GridReport]:
        """`check` as a generator that pauses after every power flow and returns the
        report: a real-time run drives it in slices between its ticks
        (`reclear.reclear_async`), everyone else through `check`."""
        awards = dict(awards or {})
        q = self._q_vector(base_q)
        flow = self.flow.solve(self._vector(base_w, awards), q, background=background)
        violations = self._violations(flow)
        enforced = [v for v in violations if v.enforced]
        if enforced and awards:
            yield
            base = self.flow.solve(self._vector(base_w, {}), q, background=background)
            trials = {}
            for k in awards:
                yield
                trials[k] = self.flow.solve(self._vector(base_w, awards, skip=k), q,
                                            background=background)
            violations = [self._attribute(v, base, trials, awards) if v.enforced else v
                          for v in violations]
        elif enforced:  # no award: this flow is the base case, whatever is broken pre-exists
            violations = [replace(v, base_value=v.value) if v.enforced else v
                          for v in violations]
        return self._report(flow, tuple(violations))

    def _report(self, flow: FlowResult, violations: tuple[Violation, ...]) -> GridReport:
        hard = any(v.band == "hard" for v in violations)
        light = Light.RED if hard else Light.AMBER if violations else Light.GREEN
        vm = flow.vm_pu[np.isfinite(flow.vm_pu)] if flow.converged else np.array([math.nan])
        return GridReport(
            light=light, acceptable=all(v.acceptable for v in violations),
            converged=flow.converged, reason=flow.reason,
            vm_min_pu=float(vm.min()), vm_max_pu=float(vm.max()),
            max_line_pct=float(np.max(flow.line_loading_pct, initial=0.0)),
            max_trafo_pct=float(np.max(flow.trafo_loading_pct, initial=0.0)),
            losses_w=flow.losses_w, import_w=flow.import_w, violations=violations,
            flow=flow, buses=self._bus_names)

    def _violations(self, flow: FlowResult) -> list[Violation]:
        lim = self.limits
        planning = lim.enforce == "planning"
        if not flow.converged:
            return [Violation(Kind.NO_SOLUTION, "feeder", math.nan, math.nan, "hard",
                              target=math.nan)]
        out: list[Violation] = []

        def scan(kind: Kind, values: np.ndarray, names: Sequence[str], hard: float,
                 plan: float) -> None:
            # numpy picks the few elements beyond either band (the same float comparisons
            # as `_beyond`); the loop below classifies only those (was ~700 calls a flow)
            tol = TOL[kind]
            near = np.zeros(len(values), dtype=bool)
            for limit in (hard, plan):
                if limit is not None:
                    near |= (values < limit - tol) if kind == Kind.VOLTAGE_LOW \
                        else (values > limit + tol)
            for i in np.flatnonzero(near & np.isfinite(values)):
                v = float(values[i])
                if _beyond(kind, v, hard):
                    out.append(Violation(kind, names[i], v, hard, "hard",
                                         target=plan if planning else hard, index=int(i)))
                elif _beyond(kind, v, plan):
                    out.append(Violation(kind, names[i], v, plan, "planning",
                                         target=plan if planning else None, index=int(i)))

        scan(Kind.VOLTAGE_HIGH, flow.vm_pu, self._bus_names, lim.vm_max_pu, lim.plan_vm_max_pu)
        scan(Kind.VOLTAGE_LOW, flow.vm_pu, self._bus_names, lim.vm_min_pu, lim.plan_vm_min_pu)
        scan(Kind.LINE_LOADING, flow.line_loading_pct, self._line_names, lim.line_max_pct,
             min(lim.plan_loading_pct, lim.line_max_pct))
        scan(Kind.TRAFO_LOADING, flow.trafo_loading_pct, self._trafo_names, lim.trafo_max_pct,
             min(lim.plan_loading_pct, lim.trafo_max_pct))
        return out

    @staticmethod
    def _quantity(v: Violation, flow: FlowResult) -> float:
        if not flow.converged:
            return math.nan
        if v.kind in (Kind.VOLTAGE_HIGH, Kind.VOLTAGE_LOW):
            return float(flow.vm_pu[v.index])
        if v.kind == Kind.LINE_LOADING:
            return float(flow.line_loading_pct[v.index])
        return float(flow.trafo_loading_pct[v.index])

    def _attribute(self, v: Violation, base: FlowResult, trials: Mapping[str, FlowResult],
                   awards: Awards) -> Violation:
        if v.kind == Kind.NO_SOLUTION:
            # the awards together leave no solution: every award whose removal restores one
            # is a cause (all of them if none does), weighted by size: cut the biggest first
            causes = [Cause(k, awards[k][0], abs(awards[k][1]))
                      for k, f in trials.items() if f.converged] or \
                     [Cause(k, p, abs(w)) for k, (p, w) in awards.items()]
            causes.sort(key=lambda c: (-c.contribution, c.award))
            return replace(v, causes=tuple(causes))
        sign = -1.0 if v.kind == Kind.VOLTAGE_LOW else 1.0
        base_value = self._quantity(v, base)
        causes = []
        for k, f in trials.items():
            without = self._quantity(v, f)
            c = sign * (v.value - without) if math.isfinite(without) else math.inf
            if c > TOL[v.kind]:
                causes.append(Cause(k, awards[k][0], c))
        causes.sort(key=lambda c: (-c.contribution, c.award))
        return replace(v, base_value=base_value if math.isfinite(base_value) else None,
                       causes=tuple(causes))


def _no_net() -> Any:
    raise GridError("this checker was restored without a way to build its network")


def _names(df: Any, what: str) -> list[str]:
    return [n if isinstance(n, str) and n else f"{what} {i}" for i, n in zip(df.index, df.name,
                                                                             strict=True)]
