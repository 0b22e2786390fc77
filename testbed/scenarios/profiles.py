"""Profiles and events as pure functions of simulated time (seconds since day-0 midnight):
irradiance with cloud passages, household load with spikes, the day-ahead forecast with
its error model. Seeded, so a run replays exactly."""

from __future__ import annotations

import csv
import hashlib
import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import replace

from testbed.config import MAX_PROFILE_BYTES, ConfigError, SiteConfig, locate, read_bounded
from testbed.market.aggregator import Schedule
from testbed.physics.models import (
    LoadParams,
    PVParams,
    PVState,
    clear_sky_irradiance,
    household_load_w,
    household_shape,
    pv_step,
)

from .model import CloudEvent, CsvProfile, LoadSpikeEvent, Scenario


class Series:
    """A time series from CSV, linearly interpolated, held flat outside its range."""

    def __init__(self, times: Sequence[float], values: Sequence[float]) -> None:
        self.t, self.v = list(times), list(values)

    def __call__(self, t_s: float) -> float:
        i = bisect_right(self.t, t_s)
        if i == 0:
            return self.v[0]
        if i == len(self.t):
            return self.v[-1]
        t0, t1, v0, v1 = self.t[i - 1], self.t[i], self.v[i - 1], self.v[i]
        return v0 + (v1 - v0) * (t_s - t0) / (t1 - t0)


UNITS = {"irradiance": ("W/m2", 2000.0), "load": ("W", 1e8)}
"""What a profile's values are in, and the most a value may be (after `scale`): sunlight
at the top of the atmosphere is ~1361 W/m2; the load bound is the site file's."""


def read_csv(profile: CsvProfile, what: str) -> dict[str, Series]:
    """Columns of a profile CSV by name; errors name the file, the line and the cell.

    The file must be a regular file of bounded size; blank lines are skipped; the header
    starts with `time` and names each value column once; times (seconds, '15m' or HH:MM)
    lie within a year and increase; values are finite, >= 0 and within the unit's range."""
    from .model import MAX_SPAN_S, seconds, time_of_day

    path = profile.file
    unit, top = UNITS[what]
    rows = [(n, row) for n, row in enumerate(csv.reader(
        read_bounded(path, MAX_PROFILE_BYTES).splitlines()), start=1)
        if any(cell.strip() for cell in row)]
    if not rows:
        raise ConfigError(f"{path}:1: time: the {what} profile needs a header starting with "
                          "'time' and at least two rows (the file is empty)")
    n0, head = rows[0]
    header = [h.strip() for h in head]
    if header[0].lower() != "time" or len(header) < 2:
        raise ConfigError(f"{path}:{n0}: time: expected a header 'time,<column>,...', got "
                          f"{','.join(header)[:60]!r}")
    for i, h in enumerate(header[1:], start=2):
        if not h:
            raise ConfigError(f"{path}:{n0}: column {i}: expected a column name, got nothing")
        if header.index(h) != i - 1:
            raise ConfigError(f"{path}:{n0}: {h}: the column is named twice")
    if len(rows) < 3:
        raise ConfigError(f"{path}:{rows[-1][0]}: time: the {what} profile needs at least two "
                          "rows after its header")
    times: list[float] = []
    cols: dict[str, list[float]] = {h: [] for h in header[1:]}
    for n, row in rows[1:]:
        if len(row) != len(header):
            raise ConfigError(f"{path}:{n}: row: expected {len(header)} cells, got {len(row)}")
        cell = row[0].strip()
        try:
            t = time_of_day(cell) if ":" in cell else seconds(cell)
        except ValueError as exc:
            raise ConfigError(f"{path}:{n}: time: {exc}") from None
        if not 0 <= t <= MAX_SPAN_S:
            raise ConfigError(f"{path}:{n}: time: expected 0 to {MAX_SPAN_S:.0f} s, got {cell!r}")
        if times and t <= times[-1]:
            raise ConfigError(f"{path}:{n}: time: expected a time after the previous row's, "
                              f"got {cell!r}")
        times.append(t)
        for h, cell in zip(header[1:], row[1:], strict=True):
            try:
                v = float(cell) * profile.scale
            except ValueError:
                raise ConfigError(f"{path}:{n}: {h}: expected a number ({unit}), got "
                                  f"{cell[:40]!r}") from None
            if not (math.isfinite(v) and 0 <= v <= top):
                raise ConfigError(f"{path}:{n}: {h}: expected a number of {unit} from 0 to "
                                  f"{top:g}{' after scale' if profile.scale != 1 else ''}, "
                                  f"got {cell[:40]!r}")
            cols[h].append(v)
    return {h: Series(times, v) for h, v in cols.items()}


def cloud_factor(events: Sequence[CloudEvent], t_s: float) -> float:
    """Share of irradiance left by the cloud passages at t (edges ramp over 10 % each)."""
    f = 1.0
    for e in events:
        if not e.active(t_s):
            continue
        length = e.duration or 3600.0
        x = (t_s - e.at) / length
        edge = min(1.0, x / 0.1, (1.0 - x) / 0.1) if e.duration else min(1.0, x / 0.1)
        f *= 1.0 - e.depth * max(0.0, edge)
    return f


def irradiance_fn(sc: Scenario) -> Callable[[float], float]:
    clouds = [e for e in sc.events if isinstance(e, CloudEvent)]
    prof = sc.profiles.irradiance
    if isinstance(prof, CsvProfile):
        cols = read_csv(prof, "irradiance")
        if prof.column and prof.column not in cols:
            raise ConfigError(f"{prof.file}:1: {prof.column}: no such column (columns: "
                              f"{', '.join(cols)})")
        base = cols[prof.column] if prof.column else next(iter(cols.values()))
    else:
        base = clear_sky_irradiance
    return lambda t: base(t) * cloud_factor(clouds, t)


def load_fn(sc: Scenario, site: SiteConfig) -> Callable[[str, LoadParams, float], float]:
    """(prosumer, its load params, t) -> W, spikes included."""
    spikes = [e for e in sc.events if isinstance(e, LoadSpikeEvent)]
    names = {p.name for p in site.prosumers}
    from .model import MessageLossEvent

    for i, e in enumerate(sc.events):
        who = e.prosumer if isinstance(e, LoadSpikeEvent | MessageLossEvent) else None
        if who is not None and who not in names:
            where = locate(sc.source, ("events", i, "prosumer")) if sc.source \
                else f"{sc.name}: events[{i}].prosumer"
            raise ConfigError(f"{where}: {e.kind} for unknown prosumer {who!r} "
                              f"(prosumers: {', '.join(sorted(names))})")
    prof = sc.profiles.load
    csv_cols = read_csv(prof, "load") if isinstance(prof, CsvProfile) else None
    if csv_cols is not None and isinstance(prof, CsvProfile):
        if prof.column is not None and prof.column not in csv_cols:
            raise ConfigError(f"{prof.file}:1: {prof.column}: no such column (columns: "
                              f"{', '.join(csv_cols)})")
        missing = sorted(names - set(csv_cols)) if prof.column is None else []
        if missing:
            raise ConfigError(f"{prof.file}:1: {missing[0]}: no column for prosumer(s) "
                              f"{', '.join(missing)}")
    noise = sc.profiles.load_noise
    noisy: dict[LoadParams, LoadParams] = {}
    """Each household's params with the scenario's noise, made once (`replace` re-runs
    the dataclass's checks: it was a tenth of the physics step)."""

    def load(name: str, p: LoadParams, t: float) -> float:
        if csv_cols is not None:
            col = prof.column if isinstance(prof, CsvProfile) and prof.column else name
            w = csv_cols[col](t)
        else:
            q = noisy.get(p)
            if q is None:
                q = noisy[p] = replace(p, noise=noise, seed=p.seed)
            w = household_load_w(q, t, key=name)
        for e in spikes:
            if e.active(t) and (e.prosumer is None or e.prosumer == name):
                w += e.extra_w
        return w

    return load


def _noise(seed: int, *key: object) -> float:
    """A seeded standard-normal-ish draw (sum of 4 uniforms), stable across platforms."""
    h = hashlib.sha256(repr((seed, *key)).encode()).digest()
    return sum(int.from_bytes(h[i:i + 4], "big") / 2**32 for i in range(0, 16, 4)) * \
        math.sqrt(3.0) - 2 * math.sqrt(3.0)


def forecast_schedule(sc: Scenario, site: SiteConfig, sample_s: float = 60.0) -> Schedule:
    """The aggregator's day-ahead schedule for the run: expected net import per interval
    from noise-free clear-sky PV and household load, with the scenario's forecast errors
    (pv/load bias, seeded noise per interval). Covers the run's intervals."""
    iv = sc.market.interval_s
    first = int(sc.start // iv)
    n = math.ceil(sc.duration / iv) + 2
    fc = sc.forecast
    per = max(1, round(iv / sample_s))
    dt = iv / per
    physics = [p.physics(seed=0) for p in site.prosumers]
    # noise-free load (`household_load_w` with noise 0) from the one shared shape per
    # instant, and each distinct PV rating's output once per instant: the same floats as
    # a call per prosumer, added in the same order (24 h x 50 prosumers: 0.4 s -> 0.04 s)
    loads = [(ph.load.base_w, ph.load.peak_w - ph.load.base_w, ph.pv) for ph in physics]
    fresh = PVState()
    energy = []
    for k in range(first, first + n):
        pv_wh = load_wh = 0.0
        for s in range(per):
            t = k * iv + (s + 0.5) * dt
            irr = clear_sky_irradiance(t)
            shape = household_shape(t)
            ac: dict[PVParams, float] = {}
            for base_w, span_w, pv in loads:
                load_wh += max(0.0, base_w + span_w * shape) * dt / 3600
                if pv is not None:
                    w = ac.get(pv)
                    if w is None:
                        w = ac[pv] = pv_step(pv, fresh, irr, 1.0).ac_w
                    pv_wh += w * dt / 3600
        pv_wh *= 1 + fc.pv_bias_pct / 100
        load_wh *= 1 + fc.load_bias_pct / 100
        net = (load_wh - pv_wh) / 1000
        if fc.noise_pct:
            net += (load_wh + pv_wh) / 1000 * fc.noise_pct / 100 * _noise(sc.seed, "fc", k)
        energy.append(net)
    return Schedule(first_interval=first, interval_s=iv, energy_kwh=tuple(energy))


def loses(sc: Scenario, prosumer: str, t_s: float, order_id: str) -> bool:
    """Whether a message-loss event drops this prosumer's order (seeded per order)."""
    from .model import MessageLossEvent

    for e in sc.events:
        if isinstance(e, MessageLossEvent) and e.active(t_s) and e.prosumer in (None, prosumer):
            u = int.from_bytes(hashlib.sha256(f"{sc.seed}/{order_id}".encode()).digest()[:8],
                               "big") / 2**64
            if u < e.share:
                return True
    return False


