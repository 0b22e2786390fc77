"""AC power flow per step, fast: the feeder's admittance matrix is built once by pandapower,
each step only changes the bus injections and runs lightsim2grid's compiled Newton-Raphson.

Why this is exact and not an approximation: a step changes nothing but P and Q at the
prosumers' buses, and for constant-power injections that is only the right-hand side
`Sbus` of the power-flow equations; Ybus, Yf, Yt (lines, transformers, taps, switches)
stay what pandapower built. The Newton-Raphson solution of the same equations to the same
tolerance is the same operating point as `pandapower.runpp` (tests check 1e-6 p.u. on the
bundled feeders). What `runpp` spends its ~20-35 ms on is rebuilding those matrices and
filling result DataFrames, both skipped here. Every solve starts from the base case's
solution, so a result depends only on its inputs (replays are exact).

Networks with voltage-dependent (ZIP) loads change Sbus with V, so they get
`ReferenceFlow` (plain `runpp`) instead; `make_flow` picks.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .network import GridError, _quiet_pandapower

SQRT3 = math.sqrt(3.0)


@dataclass(frozen=True)
class FlowResult:
    """One power flow. Arrays follow the network's own order (net.bus / net.line /
    net.trafo rows); out-of-service elements read NaN (buses) or 0 (branches)."""

    converged: bool
    iterations: int
    reason: str
    """Why it failed ('' when converged)."""
    vm_pu: np.ndarray
    line_loading_pct: np.ndarray
    trafo_loading_pct: np.ndarray
    losses_w: float
    import_w: float
    """Power drawn from the upstream grid (ext_grid); negative = the feeder exports."""


class Flow(Protocol):
    def solve(self, p_w: Sequence[float] | np.ndarray, q_var: Sequence[float] | np.ndarray | None
              = None, background: float = 1.0) -> FlowResult: ...


def _failed(sizes: tuple[int, int, int], iterations: int, reason: str) -> FlowResult:
    """No solution; `sizes`: the network's buses, lines, transformers."""
    n_bus, n_line, n_trafo = sizes
    return FlowResult(False, iterations, reason, np.full(n_bus, np.nan),
                      np.full(n_line, np.nan), np.full(n_trafo, np.nan), math.nan, math.nan)


def _sizes(net: Any) -> tuple[int, int, int]:
    return len(net.bus), len(net.line), len(net.trafo)


def _has_zip_loads(net: Any) -> bool:
    cols = [c for c in net.load.columns if c.startswith("const_")]
    return bool(len(net.load)) and bool((net.load[cols].fillna(0).to_numpy() != 0).any())


def _base_runpp(net: Any, **kw: Any) -> None:
    pp = _quiet_pandapower()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pp.runpp(net, numba=False, **kw)
    except Exception as exc:  # LoadflowNotConverged and friends
        raise GridError(f"the network's own base case has no power-flow solution "
                        f"({type(exc).__name__}: {str(exc)[:200]})", "grid.network") from None


class FastFlow:
    """Power flow with Ybus built once (see module doc). `buses` are the pandapower bus
    indices of the injections `solve` takes, in that order (repeats allowed)."""

    STATE = ("ybus", "yf", "yt", "base_mva", "sbus_bg", "v0", "ref", "pv", "pq",
             "ref_load_mw", "bus_index", "bus_ok", "bus_pos", "f", "t", "ika_f", "ika_t",
             "line_rows", "line_ok", "trafo_rows", "trafo_ok", "line_imax", "tr_hv", "tr_lv",
             "sizes")
    """What a FastFlow is made of once pandapower has built the network: `state()`,
    `restore()` (`grid.cache` keeps it between runs)."""

    def __init__(self, net: Any, buses: Sequence[int], *, max_iteration: int = 10,
                 tolerance_mva: float = 1e-8) -> None:
        self.net = net
        self._setup(self._compile(net), buses, max_iteration, tolerance_mva)

    @classmethod
    def restore(cls, state: dict[str, Any], buses: Sequence[int], *, max_iteration: int = 10,
                tolerance_mva: float = 1e-8) -> FastFlow:
        """The flow `state()` describes, without pandapower (`net` is None)."""
        self = cls.__new__(cls)
        self.net = None
        self._setup(state, buses, max_iteration, tolerance_mva)
        return self

    def state(self) -> dict[str, Any]:
        return {k: getattr(self, f"_{k}") for k in self.STATE}

    @staticmethod
    def _compile(net: Any) -> dict[str, Any]:
        from pandapower.pypower.idx_brch import F_BUS, T_BUS
        from pandapower.pypower.idx_bus import BASE_KV, PD

        _base_runpp(net)
        ppc = net._ppc
        internal = ppc["internal"]
        st: dict[str, Any] = {"sizes": _sizes(net)}
        st["ybus"] = internal["Ybus"].tocsc()
        st["yf"], st["yt"] = internal["Yf"].tocsr(), internal["Yt"].tocsr()
        st["base_mva"] = base_mva = float(internal["baseMVA"])
        st["sbus_bg"] = np.asarray(internal["Sbus"], dtype=complex).copy()
        st["v0"] = v0 = np.asarray(internal["V"], dtype=complex).copy()
        st["ref"] = ref = np.asarray(internal["ref"], dtype=np.int64)
        st["pv"] = np.asarray(internal["pv"], dtype=np.int64)
        st["pq"] = np.asarray(internal["pq"], dtype=np.int64)
        if len(ref) != 1:
            raise GridError(f"the network has {len(ref)} slack buses; the fast power "
                            "flow supports exactly one ext_grid", "grid.network")
        st["ref_load_mw"] = float(internal["bus"][ref[0], PD])

        lookup = net._pd2ppc_lookups["bus"]
        n_ppci = len(v0)
        st["bus_index"] = bus_idx = net.bus.index.to_numpy()
        pos = lookup[bus_idx]
        st["bus_ok"] = bus_ok = (pos >= 0) & (pos < n_ppci) & net.bus.in_service.to_numpy()
        st["bus_pos"] = np.where(bus_ok, pos, 0)

        branch = internal["branch"]
        st["f"] = f = branch[:, F_BUS].real.astype(np.int64)
        st["t"] = t = branch[:, T_BUS].real.astype(np.int64)
        base_kv = internal["bus"][:, BASE_KV]
        st["ika_f"] = base_mva / (SQRT3 * base_kv[f])
        st["ika_t"] = base_mva / (SQRT3 * base_kv[t])
        is_ = np.asarray(internal["branch_is"], dtype=bool)
        ppci_row = np.cumsum(is_) - 1
        ranges = net._pd2ppc_lookups.get("branch", {})

        def rows(element: str, n: int) -> tuple[np.ndarray, np.ndarray]:
            if element not in ranges or n == 0:
                return np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
            start, _ = ranges[element]
            r = np.arange(start, start + n)
            return np.where(is_[r], ppci_row[r], 0), is_[r]

        st["line_rows"], st["line_ok"] = rows("line", len(net.line))
        st["trafo_rows"], st["trafo_ok"] = rows("trafo", len(net.trafo))
        line = net.line
        st["line_imax"] = (line.max_i_ka * line.df * line.parallel).to_numpy(dtype=float) \
            if len(line) else np.zeros(0)
        tr = net.trafo
        if len(tr):
            scale = SQRT3 * 100.0 / (tr.sn_mva * tr.parallel).to_numpy(dtype=float)
            st["tr_hv"] = tr.vn_hv_kv.to_numpy(dtype=float) * scale
            st["tr_lv"] = tr.vn_lv_kv.to_numpy(dtype=float) * scale
        else:
            st["tr_hv"] = st["tr_lv"] = np.zeros(0)
        return st

    def _setup(self, st: dict[str, Any], buses: Sequence[int], max_iteration: int,
               tolerance_mva: float) -> None:
        from lightsim2grid.algorithm import NR_KLU

        for k in self.STATE:
            setattr(self, f"_{k}", st[k])
        self._sizes = tuple(int(n) for n in st["sizes"])
        self._base_mva, self._ref_load_mw = float(st["base_mva"]), float(st["ref_load_mw"])
        self._y_ref = self._ybus[self._ref[0], :]  # the slack's row, sliced once, not per flow
        self._slack_w = np.zeros(len(self._v0))
        self._slack_w[self._ref] = 1.0
        self._max_it, self._tol = max_iteration, tolerance_mva
        self._solver = NR_KLU()
        where = {int(b): k for k, b in enumerate(self._bus_index)}
        inj = []
        for b in buses:
            k = where[int(b)]
            if not self._bus_ok[k]:
                raise GridError(f"bus {b} is out of service or not connected to the slack",
                                "grid.buses")
            inj.append(self._bus_pos[k])
        self._inj = np.asarray(inj, dtype=np.int64)
        self._inj_unique = len(set(inj)) == len(inj)

    def solve(self, p_w: Sequence[float] | np.ndarray, q_var: Sequence[float] | np.ndarray | None
              = None, background: float = 1.0) -> FlowResult:
        """Injections (W, var; + = into the grid) at `buses`, with the network's own loads
        and generators scaled by `background`."""
        p = np.asarray(p_w, dtype=float)
        if p.shape != self._inj.shape:
            raise ValueError(f"expected {len(self._inj)} injections, got {p.shape}")
        s = p + 1j * (np.zeros_like(p) if q_var is None else np.asarray(q_var, dtype=float))
        if not np.all(np.isfinite(s)) or not math.isfinite(background):
            return _failed(self._sizes, 0, "an injection is not a finite number")
        sbus = self._sbus_bg * background
        if self._inj_unique:  # one injection per bus: plain fancy-index add, same sums
            sbus[self._inj] += s / (self._base_mva * 1e6)
        else:
            np.add.at(sbus, self._inj, s / (self._base_mva * 1e6))
        solver = self._solver
        solver.solve(self._ybus, self._v0, sbus, self._ref, self._slack_w, self._pv, self._pq,
                     self._max_it, self._tol)
        iterations = int(solver.get_nb_iter())
        if not solver.converged():
            return _failed(self._sizes, iterations,
                           f"power flow did not converge in {iterations} Newton-Raphson "
                           f"iterations ({solver.get_error().name}): the injections are "
                           "beyond what the feeder can carry")
        v = solver.get_Vm() * np.exp(1j * solver.get_Va())
        vm = np.where(self._bus_ok, np.abs(v)[self._bus_pos], np.nan)
        i_f, i_t = self._yf @ v, self._yt @ v
        ika_f, ika_t = np.abs(i_f) * self._ika_f, np.abs(i_t) * self._ika_t
        lr, tr = self._line_rows, self._trafo_rows
        line_pct = np.where(self._line_ok, np.maximum(ika_f[lr], ika_t[lr]) / self._line_imax
                            * 100.0, 0.0) if len(lr) else np.zeros(0)
        trafo_pct = np.where(self._trafo_ok, np.maximum(ika_f[tr] * self._tr_hv,
                                                        ika_t[tr] * self._tr_lv), 0.0) \
            if len(tr) else np.zeros(0)
        s_f, s_t = v[self._f] * np.conj(i_f), v[self._t] * np.conj(i_t)
        losses = float(np.sum(s_f.real + s_t.real)) * self._base_mva * 1e6
        s_ref = v[self._ref[0]] * np.conj(self._y_ref @ v)
        imports = (float(np.real(np.asarray(s_ref).ravel()[0])) * self._base_mva
                   + self._ref_load_mw * background) * 1e6  # ext_grid = injection + local load
        return FlowResult(True, iterations, "", vm, line_pct, trafo_pct, losses, imports)


class ReferenceFlow:
    """The same interface over plain `pandapower.runpp` on a private copy of the network,
    with one sgen per injection: the yardstick for tests and bench, and the engine for
    networks with voltage-dependent loads. `recycle` passes pandapower's own reuse option."""

    def __init__(self, net: Any, buses: Sequence[int], *, recycle: bool = False) -> None:
        pp = _quiet_pandapower()
        self.net = copy.deepcopy(net)
        self._n_load, self._n_sgen = len(self.net.load), len(self.net.sgen)
        self._load_scaling = self.net.load.scaling.to_numpy(dtype=float).copy()
        self._sgen_scaling = self.net.sgen.scaling.to_numpy(dtype=float).copy()
        self._sgens = [pp.create_sgen(self.net, int(b), p_mw=0.0, q_mvar=0.0,
                                      name=f"testbed-injection-{i}")
                       for i, b in enumerate(buses)]
        self._kw: dict[str, Any] = {"numba": False}
        if recycle:
            self._kw["recycle"] = {"trafo": False, "gen": False, "bus_pq": True}
        _base_runpp(self.net)

    def solve(self, p_w: Sequence[float] | np.ndarray, q_var: Sequence[float] | np.ndarray | None
              = None, background: float = 1.0) -> FlowResult:
        pp = _quiet_pandapower()
        net = self.net
        p = np.asarray(p_w, dtype=float) / 1e6
        q = np.zeros_like(p) if q_var is None else np.asarray(q_var, dtype=float) / 1e6
        if not (np.all(np.isfinite(p)) and np.all(np.isfinite(q)) and math.isfinite(background)):
            return _failed(_sizes(net), 0, "an injection is not a finite number")
        net.sgen.loc[self._sgens, "p_mw"] = p
        net.sgen.loc[self._sgens, "q_mvar"] = q
        if self._n_load:
            net.load.iloc[:, net.load.columns.get_loc("scaling")] = self._load_scaling * background
        if self._n_sgen:
            net.sgen.iloc[:self._n_sgen, net.sgen.columns.get_loc("scaling")] = \
                self._sgen_scaling * background
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pp.runpp(net, **self._kw)
        except Exception as exc:
            return _failed(_sizes(net), 0, f"power flow did not converge ({type(exc).__name__})")
        res_line = net.res_line.loading_percent.reindex(net.line.index).fillna(0.0)
        res_tr = net.res_trafo.loading_percent.reindex(net.trafo.index).fillna(0.0)
        losses = float(net.res_line.pl_mw.sum() + net.res_trafo.pl_mw.sum()) * 1e6
        return FlowResult(True, int(net._ppc.get("iterations", 0) or 0), "",
                          net.res_bus.vm_pu.reindex(net.bus.index).to_numpy(dtype=float),
                          res_line.to_numpy(dtype=float), res_tr.to_numpy(dtype=float),
                          losses, float(net.res_ext_grid.p_mw.sum()) * 1e6)


def make_flow(net: Any, buses: Sequence[int], engine: str = "auto") -> Flow:
    """`auto`: the fast path unless the network has voltage-dependent loads."""
    if engine == "fast" or (engine == "auto" and not _has_zip_loads(net)):
        return FastFlow(net, buses)
    if engine in ("auto", "pandapower"):
        return ReferenceFlow(net, buses)
    raise GridError(f"unknown power-flow engine {engine!r} (auto, fast, pandapower)",
                    "grid.engine")
