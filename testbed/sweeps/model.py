"""Sweep files: a base scenario, overrides by dotted path, which KPIs to collect.

```yaml
name: pricing-study
base: demo                      # a bundled scenario or a file (relative to this one)
set: {duration: 2h}             # applied to every point
grid:                           # every combination (a cartesian product)
  seed: [1, 2, 3, 4]
  market.pricing: [pay_as_bid, pay_as_clear]
  site.prosumers[*].devices[kind=battery].params.capacity_wh: [5000, 10000]
points:                         # optional: each entry crossed with the grid
  - {forecast.noise_pct: 0}
sample: {n: 8, seed: 1}         # optional: a seeded random subset of the points
kpis: [deviation.covered_share, market.cleared]
```

A path names a scenario field (`market.threshold_kwh`, `forecast.noise_pct`, `seed`) or,
after `site.`, a field of the scenario's site; list items are picked by `[2]`, by name
`[house-1]`, by a field `[kind=battery]`, or all of them `[*]`. Every override is applied
to the scenario and site models up front: an unknown field or a bad value is a
ConfigError naming the sweep file's line, before anything runs.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from testbed.config import (
    MAX_FILE_BYTES,
    NAME,
    ConfigError,
    SiteConfig,
    load_model,
    load_site,
    locate,
    read_bounded,
)
from testbed.scenarios.engine import check_rules
from testbed.scenarios.model import BUNDLED, Scenario, load_scenario

MAX_POINTS = 10_000
"""Points of one sweep: more is a typo in a grid (or an attack), not a study."""
MAX_VALUES = 10_000
"""Values of one grid axis."""

_SEG = r"[A-Za-z0-9_][A-Za-z0-9_-]*"
_SEL = r"\[(?:\*|\d+|[A-Za-z0-9_.-]+(?:=[A-Za-z0-9_.-]+)?)\]"
PATH = rf"^{_SEG}(?:{_SEL})*(?:\.{_SEG}(?:{_SEL})*)*$"
_TOKEN = re.compile(rf"\.?({_SEG})|({_SEL})")
DEFAULT_KPIS = ("deviation.covered_share", "deviation.before_kwh", "deviation.after_kwh",
                "market.cleared",
                "market.energy_traded_kwh", "market.value_eur", "market.price_mean",
                "grid.auctions_re_cleared", "grid.vm_min_pu", "grid.vm_max_pu",
                "ledger.blocks", "passed")
"""Collected when a sweep file names none (dotted paths into a run's summary.json)."""
SUMMARY_KEYS = ("run_id", "scenario", "seed", "site", "steps", "step_s", "start_s",
                "duration_s", "clock", "deviation", "market", "prosumers", "devices", "ledger",
                "grid", "messages", "faults", "expectations", "passed", "telemetry")
"""Top-level keys of a run's summary.json: a KPI path starts with one of them."""



def _path(value: str) -> str:
    if not re.match(PATH, value):
        raise ValueError("expected a dotted path such as market.pricing, seed or "
                         "site.prosumers[house-1].load.base_w")
    return value


Path_ = Annotated[str, Field(max_length=256), AfterValidator(_path)]


class Sample(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    n: Annotated[int, Field(ge=1, le=MAX_POINTS)]
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0


class Sweep(BaseModel):
    """A sweep file, validated; `plan()` turns it into points."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: Annotated[str, Field(pattern=NAME)]
    description: str = ""
    base: str = "demo"
    """A scenario file (relative to the sweep file) or a bundled scenario name."""
    set: dict[Path_, Any] = {}
    grid: dict[Path_, Annotated[list[Any], Field(min_length=1, max_length=MAX_VALUES)]] = {}
    points: Annotated[list[dict[Path_, Any]], Field(max_length=MAX_POINTS)] = []
    sample: Sample | None = None
    kpis: Annotated[list[Path_], Field(min_length=1, max_length=256)] = list(DEFAULT_KPIS)
    report: bool = True
    """Each run writes its report.html (the sweep report links to them)."""
    source: str = ""


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its overrides and the scenario (and site) they make."""

    key: str
    """Stable hash of the overrides: the point's folder, and how a rerun knows it is done."""
    overrides: dict[str, Any]
    scenario: dict[str, Any]
    """The validated scenario as JSON data (`site` points at the base site file)."""
    site: dict[str, Any] | None
    """The validated site as JSON data when the point overrides site fields, else None."""
    source: str
    """The base scenario file (error messages of the run name it)."""
    base: str
    """Hash of the base scenario and site: a rerun into a folder made from another base
    would mix two studies."""


def point_key(overrides: dict[str, Any]) -> str:
    text = json.dumps(overrides, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_sweep(path: str | Path) -> Sweep:
    """Parse and validate a sweep file (same loader as site and scenario files: size
    limit, no aliases, no duplicate keys, finite numbers, errors as FILE:LINE: FIELD)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such sweep file")
    text = read_bounded(path, MAX_FILE_BYTES)
    sweep: Sweep = load_model(Sweep, text, str(path))
    return sweep.model_copy(update={"source": str(path)})


# --------------------------------------------------------------------------- overrides


class _Miss(ValueError):
    """An override path that does not name a field of the model."""


def _tokens(path: str) -> list[str]:
    return [m.group(1) or m.group(2) for m in _TOKEN.finditer(path)]


def _apply(node: Any, tokens: list[str], value: Any, done: str = "") -> None:
    """Set `value` at `tokens` in JSON data, in place; _Miss if a step names nothing."""
    tok, rest = tokens[0], tokens[1:]
    if tok.startswith("["):
        if not isinstance(node, list):
            raise _Miss(f"{done or '(top level)'} is not a list")
        sel = tok[1:-1]
        if sel == "*":
            idx = list(range(len(node)))
        elif sel.isdigit():
            idx = [int(sel)] if int(sel) < len(node) else []
        elif "=" in sel:
            k, v = sel.split("=", 1)
            idx = [i for i, x in enumerate(node) if isinstance(x, dict) and str(x.get(k)) == v]
        else:
            idx = [i for i, x in enumerate(node) if isinstance(x, dict) and x.get("name") == sel]
        if not idx:
            names = [x.get("name") for x in node if isinstance(x, dict) and "name" in x]
            raise _Miss(f"{done}{tok} matches no item of {len(node)}"
                        + (f" (names: {', '.join(map(str, names[:8]))})" if names else ""))
        for i in idx:
            if rest:
                _apply(node[i], rest, value, f"{done}[{i}]")
            else:
                node[i] = copy.deepcopy(value)
        return
    if not isinstance(node, dict) or tok not in node:
        fields = ", ".join(sorted(node)) if isinstance(node, dict) else ""
        raise _Miss(f"unknown field {(done + '.' if done else '') + tok!r}"
                    + (f" (fields: {fields})" if fields else ""))
    if rest:
        if node[tok] is None:
            raise _Miss(f"{done + '.' if done else ''}{tok} is not set in the base, so it "
                        "has no fields to override; set it whole")
        _apply(node[tok], rest, value, f"{done + '.' if done else ''}{tok}")
    else:
        node[tok] = copy.deepcopy(value)


def first_error(exc: ValidationError) -> str:
    """The error that got furthest into the input (of a union's alternatives, the one
    the value was meant for)."""
    err = max(exc.errors(), key=lambda e: len(e["loc"]))
    loc = ".".join(str(p) for p in err["loc"] if not re.search(r"[\[\]()]", str(p)))
    text = repr(err.get("input"))
    got = "" if isinstance(err.get("input"), dict | list) else (
        f" (got {text if len(text) <= 60 else text[:57] + '...'})")
    msg = " ".join(err["msg"].removeprefix("Value error, ").split())
    return f"{loc + ': ' if loc else ''}{msg}{got}"


class _Base:
    """The base scenario and its sites as JSON data; builds and validates points."""

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep
        self.folder = Path(sweep.source).parent if sweep.source else Path.cwd()
        ref = sweep.base
        path = self.folder / ref
        try:
            self.scenario = load_scenario(path if path.exists() or ref not in BUNDLED else ref)
        except ConfigError as exc:
            raise ConfigError(f"{locate(sweep.source, ('base',))}: {exc}") from None
        self.data = self.scenario.model_dump(mode="json")
        self.sites: dict[str, tuple[SiteConfig, dict[str, Any]]] = {}

    def site(self, ref: str, where: tuple[str | int, ...]) -> tuple[SiteConfig, dict[str, Any]]:
        if ref not in self.sites:
            try:
                site = load_site(ref)
            except ConfigError as exc:
                raise ConfigError(f"{locate(self.sweep.source, where)}: {exc}") from None
            self.sites[ref] = (site, site.model_dump(mode="json"))
        return self.sites[ref]

    def build(self, overrides: dict[str, Any], where: dict[str, tuple[str | int, ...]],
              fallback: tuple[str | int, ...]) -> Point:
        """The point of these overrides; `where` maps each path to its place in the
        sweep file, for errors (`fallback` when no single override is to blame)."""
        src = self.sweep.source
        data = copy.deepcopy(self.data)
        site_over = {p: v for p, v in overrides.items() if p.startswith("site.")}
        for p, v in overrides.items():
            if p in site_over:
                continue
            if p == "site" and isinstance(v, str) and (self.folder / v).exists():
                v = str((self.folder / v).resolve())
            try:
                _apply(data, _tokens(p), v)
            except _Miss as exc:
                raise ConfigError(f"{locate(src, where[p])}: {exc}") from None
        try:
            # the base's own files are absolute already: relative ones are the overrides',
            # resolved against the sweep file's folder
            sc = Scenario.model_validate(data, context={"base": self.folder})
        except ValidationError as exc:
            raise ConfigError(f"{locate(src, self._blame(exc, overrides, where, fallback))}: "
                              f"scenario: {first_error(exc)}") from None
        site_data = None
        site, base_site = self.site(sc.site, where.get("site", ("base",)))
        if site_over:
            site_data = copy.deepcopy(base_site)
            for p, v in site_over.items():
                try:
                    _apply(site_data, _tokens(p)[1:], v)
                except _Miss as exc:
                    raise ConfigError(f"{locate(src, where[p])}: {exc}") from None
            try:
                site = SiteConfig.model_validate(site_data, context={"base": self.folder})
            except ValidationError as exc:
                raise ConfigError(f"{locate(src, self._blame(exc, overrides, where, fallback, 'site.'))}"
                                  f": site: {first_error(exc)}") from None
            site_data = site.model_dump(mode="json")
        real = sorted(d.name for _, d in site.devices() if not d.emulated)
        if real:
            raise ConfigError(
                f"{locate(src, fallback)}: site {site.name!r} has real devices "
                f"({', '.join(real)}; emulated: false): a sweep runs its points in parallel "
                "and one device cannot serve two runs at once; sweep emulated sites only, "
                "or play real hardware one run at a time with `testbed run`")
        try:
            check_rules(sc, site)
        except ConfigError as exc:
            raise ConfigError(f"{locate(src, fallback)}: {exc}") from None
        return Point(point_key(overrides), dict(overrides), sc.model_dump(mode="json"),
                     site_data, self.scenario.source,
                     point_key({"scenario": self.data, "site": base_site}))

    @staticmethod
    def _blame(exc: ValidationError, overrides: dict[str, Any],
               where: dict[str, tuple[str | int, ...]], fallback: tuple[str | int, ...],
               prefix: str = "") -> tuple[str | int, ...]:
        loc = ".".join(str(p) for p in max(exc.errors(), key=lambda e: len(e["loc"]))["loc"])
        for p in overrides:
            bare = re.sub(r"\[[^\]]*\]", "", p.removeprefix(prefix)) if p.startswith(prefix) else ""
            if bare and (loc.startswith(bare) or bare.startswith(loc or "\0")):
                return where[p]
        return fallback


def plan(sweep: Sweep) -> list[Point]:
    """Every point of the sweep, validated (ConfigError naming the sweep file's line)."""
    src = sweep.source
    for i, k in enumerate(sweep.kpis):
        if k.split(".")[0].split("[")[0] not in SUMMARY_KEYS:
            raise ConfigError(f"{locate(src, ('kpis', i))}: {k!r} is not in a "
                              f"run's summary.json (top-level keys: {', '.join(SUMMARY_KEYS)})")
    n = max(1, len(sweep.points))
    for values in sweep.grid.values():
        n *= len(values)
    if n > MAX_POINTS:
        raise ConfigError(f"{locate(src, ('grid',))}: grid: {n} points, expected at most "
                          f"{MAX_POINTS}")
    for i, entry in enumerate(sweep.points):
        for p in entry:
            if p in sweep.grid or p in sweep.set:
                raise ConfigError(f"{locate(src, ('points', i, p))}: points[{i}].{p}: "
                                  "also given in grid or set; give each path in one place")
    for p in sweep.grid:
        if p in sweep.set:
            raise ConfigError(f"{locate(src, ('grid', p))}: grid.{p}: also given in set")
    base = _Base(sweep)
    where_set = {p: ("set", p) for p in sweep.set}
    # each override alone first, so a bad value is blamed on its own line
    base.build(dict(sweep.set), where_set, ("set",))
    for p, values in sweep.grid.items():
        for j, v in enumerate(values):
            base.build({**sweep.set, p: v}, {**where_set, p: ("grid", p, j)}, ("grid", p, j))
    for i, entry in enumerate(sweep.points):
        base.build({**sweep.set, **entry}, {**where_set, **{p: ("points", i, p) for p in entry}},
                   ("points", i))
    combos: list[tuple[dict[str, Any], dict[str, tuple[str | int, ...]]]] = []
    axes = list(sweep.grid.items())
    for values in itertools.product(*(range(len(v)) for _, v in axes)):
        ov = {p: axes[a][1][j] for a, (p, j) in enumerate(zip((p for p, _ in axes), values,
                                                              strict=True))}
        loc = {p: ("grid", p, j) for (p, _), j in zip(axes, values, strict=True)}
        for i, entry in enumerate(sweep.points or [{}]):
            combos.append(({**sweep.set, **ov, **entry},
                           {**where_set, **loc, **{p: ("points", i, p) for p in entry}}))
    if sweep.sample is not None and sweep.sample.n < len(combos):
        rng = random.Random(sweep.sample.seed)
        combos = [combos[i] for i in sorted(rng.sample(range(len(combos)), sweep.sample.n))]
    points: list[Point] = []
    seen: dict[str, int] = {}
    for ov, where in combos:
        pt = base.build(ov, where, ("grid",) if sweep.grid else ("points",))
        if pt.key in seen:
            continue  # the same overrides twice are one run
        seen[pt.key] = len(points)
        points.append(pt)
    return points
