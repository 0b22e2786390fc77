"""Scenario files: what to play, on which site, and what must come true.

YAML validated with pydantic; errors name the file, the line and the field, like site
files (`testbed.config`). Times of day are "HH:MM[:SS]" of simulated day 0; durations
are seconds or "90s", "15m", "6h", "1d".
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from testbed.clock import EPOCH  # noqa: F401 - re-exported for scenario users
from testbed.config import (
    MAX_PROFILE_BYTES,
    NAME,
    check_regular_file,
    library_file,
    load_model_file,
)

_DUR = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TOD = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?$")
DAY_S = 86400.0
MAX_SPAN_S = 366 * DAY_S
"""Longest run, event offset or event duration a scenario may name (a leap year)."""

def _finite(value: float) -> float:
    """A finite float (an integer too large for a float is an error, not OverflowError)."""
    try:
        x = float(value)
    except OverflowError:
        raise ValueError("expected a finite number, got one too large") from None
    if not math.isfinite(x):
        raise ValueError("expected a finite number")
    return x


def seconds(value: Any) -> float:
    """A duration: a number of seconds or '90s' / '15m' / '6h' / '1d'."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 900, '15m' or '6h', got {value!r}")
    if isinstance(value, int | float):
        return _finite(value)
    m = _DUR.match(str(value)[:64])
    if not m:
        raise ValueError(f"expected a duration like 900, '15m' or '6h', got {value!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def time_of_day(value: Any) -> float:
    """Seconds since midnight from 'HH:MM[:SS]' (or a number of seconds)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _finite(value)
    m = _TOD.match(str(value)[:64])
    if not m:
        raise ValueError(f"expected a time of day like '13:30', got {value!r}")
    return int(m.group(1)) * 3600.0 + int(m.group(2)) * 60.0 + int(m.group(3) or 0)


class _Strict(BaseModel):
    """Unknown keys refused; every float finite (NaN and infinities refused by name)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Duration = Annotated[float, Field(gt=0, le=MAX_SPAN_S)]
Offset = Annotated[float, Field(ge=0, le=MAX_SPAN_S)]


class _Timed(_Strict):
    at: Offset
    """Start: a time of day of day 0 ('14:00'), or a duration since its midnight ('30h')."""
    duration: Duration | None = None
    """How long; none = until the end of the run."""

    @field_validator("at", mode="before")
    @classmethod
    def _at(cls, v: Any) -> float:
        return time_of_day(v) if isinstance(v, str) and ":" in v else seconds(v)

    @field_validator("duration", mode="before")
    @classmethod
    def _dur(cls, v: Any) -> float | None:
        return None if v is None else seconds(v)

    def active(self, t_s: float) -> bool:
        return self.at <= t_s < (self.at + self.duration if self.duration else float("inf"))


class CloudEvent(_Timed):
    kind: Literal["cloud"]
    depth: Annotated[float, Field(ge=0, le=1)] = 0.7
    """Share of irradiance the cloud takes away at its core (edges ramp over 10 %)."""


class LoadSpikeEvent(_Timed):
    kind: Literal["load-spike"]
    prosumer: str | None = None
    """None: every prosumer."""
    extra_w: Annotated[float, Field(gt=0, le=1e6)]


class DeviceEvent(_Timed):
    kind: Literal["device-offline", "device-silent"]
    device: str
    """device-offline: the device's gateway (its host:port) goes off the network;
    device-silent: the device stops answering behind a live gateway (exception 0x0B)."""


class MessageLossEvent(_Timed):
    kind: Literal["message-loss"]
    prosumer: str | None = None
    share: Annotated[float, Field(ge=0, le=1)] = 1.0
    """Share of the prosumer's market orders lost (seeded draw per order)."""


class VoltageStepEvent(_Timed):
    """The grid voltage at a prosumer's connection point held at `v_pu` of nominal (a
    step for IEEE 1547 tests; it overrides the feeder's voltage while active)."""

    kind: Literal["voltage-step"]
    prosumer: str | None = None
    """None: every prosumer."""
    v_pu: Annotated[float, Field(ge=0.0, le=1.5)]


class VoltageRampEvent(_Timed):
    """The connection-point voltage moving linearly from `from_pu` to `to_pu` over
    `duration` (then released back to the feeder)."""

    kind: Literal["voltage-ramp"]
    prosumer: str | None = None
    from_pu: Annotated[float, Field(ge=0.0, le=1.5)]
    to_pu: Annotated[float, Field(ge=0.0, le=1.5)]
    duration: Duration

    def v_pu(self, t_s: float) -> float:
        x = min(1.0, max(0.0, (t_s - self.at) / self.duration))
        return self.from_pu + (self.to_pu - self.from_pu) * x


class FrequencyStepEvent(_Timed):
    """The grid frequency at a prosumer's connection point held at `f_hz`."""

    kind: Literal["frequency-step"]
    prosumer: str | None = None
    f_hz: Annotated[float, Field(ge=40.0, le=70.0)]


GridEvent = VoltageStepEvent | VoltageRampEvent | FrequencyStepEvent
Event = Annotated[CloudEvent | LoadSpikeEvent | DeviceEvent | MessageLossEvent
                  | VoltageStepEvent | VoltageRampEvent | FrequencyStepEvent,
                  Field(discriminator="kind")]


class ClockConfig(_Strict):
    mode: Literal["fast", "realtime"] = "fast"
    """fast: as fast as the work allows; realtime: on the wall clock (x speed)."""
    speed: Annotated[float, Field(gt=0, le=3600)] = 1.0


class CsvProfile(_Strict):
    file: Path
    """CSV with a `time` column (seconds or HH:MM) and value columns; linear in between."""
    column: str | None = None
    """Irradiance: the column (default the second). Load: none = one column per prosumer."""
    scale: Annotated[float, Field(gt=0, le=1e6)] = 1.0

    @field_validator("file")
    @classmethod
    def _regular(cls, v: Path, info: ValidationInfo) -> Path:
        """Resolved against the scenario's folder; a regular file of bounded size (a
        device such as /dev/zero would read without end)."""
        base = (info.context or {}).get("base")
        if base is None:
            return v
        path = v.expanduser()
        path = path if path.is_absolute() else (Path(base) / path).resolve()
        check_regular_file(path, MAX_PROFILE_BYTES)
        return path


class ProfilesConfig(_Strict):
    irradiance: Literal["clear-sky"] | CsvProfile = "clear-sky"
    load: Literal["synthetic"] | CsvProfile = "synthetic"
    load_noise: Annotated[float, Field(ge=0, le=1)] = 0.08
    """Relative noise of the synthetic household load (seeded)."""


class ForecastConfig(_Strict):
    """How the day-ahead schedule misses reality: biases and seeded noise per interval."""

    pv_bias_pct: Annotated[float, Field(ge=-100, le=100)] = 0.0
    """+ = the forecast expects this much more PV than the clear sky delivers."""
    load_bias_pct: Annotated[float, Field(ge=-100, le=100)] = 0.0
    noise_pct: Annotated[float, Field(ge=0, le=100)] = 0.0


class MarketConfig(_Strict):
    pricing: Literal["pay_as_bid", "pay_as_clear"] = "pay_as_bid"
    interval_s: Annotated[int, Field(ge=60, le=3600)] = 900
    threshold_kwh: Annotated[float, Field(gt=0, le=1e6)] = 0.2
    buy_price: Annotated[float, Field(ge=0, le=10)] = 0.30
    sell_price: Annotated[float, Field(ge=0, le=10)] = 0.05
    gate_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    """Wall-clock deadline for answers (fast mode closes earlier, once all are in). On
    the simulated clock, which dates orders and which the ledger checks them against,
    the gate is this times the realtime speed."""
    mode: Literal["TE", "RE+TE"] = "RE+TE"


class GridRunConfig(_Strict):
    enabled: bool = True
    background: Annotated[float, Field(ge=0, le=10)] | None = None
    """Override of the site's grid.background."""


class LedgerRunConfig(_Strict):
    enabled: bool = True
    validators: Annotated[int, Field(ge=1, le=64)] = 4
    """The first N prosumers validate (every prosumer meters)."""
    prosumer_funds_eur: Annotated[float, Field(ge=0, le=1e9)] = 50.0


class Expectations(_Strict):
    """What decides the exit code; unset ones are not checked."""

    covered_share_min: Annotated[float, Field(ge=0, le=1)] | None = None
    """Share of the measured deviation the market's deliveries covered."""
    deviation_reduced: bool | None = None
    auctions_cleared_min: Annotated[int, Field(ge=0)] | None = None
    voltage_in_band: bool | None = None
    """Every dispatch the grid check accepted, and no bus outside the hard band after it."""
    ledger_verifies: bool | None = None
    blocks_min: Annotated[int, Field(ge=0)] | None = None
    no_lost_messages: bool | None = None
    """Every signed message sent was received (injected losses excepted) and committed."""
    faults_excluded: bool | None = None
    """A faulted battery takes part in no auction after its fault."""
    lateness_p99_ms_max: Annotated[float, Field(gt=0, le=1e9)] | None = None


class Scenario(_Strict):
    name: Annotated[str, Field(pattern=NAME)]
    description: str = ""
    site: str = "demo"
    """A site file (relative to this file) or a bundled site name."""
    start: Annotated[float, Field(ge=0, lt=DAY_S)] = 10 * 3600.0
    """Time of day of simulated day 0 ('11:00')."""
    duration: Duration = 6 * 3600.0
    step: Duration = 60.0
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] = 0
    clock: ClockConfig = ClockConfig()
    profiles: ProfilesConfig = ProfilesConfig()
    forecast: ForecastConfig = ForecastConfig()
    events: list[Event] = []
    market: MarketConfig = MarketConfig()
    grid: GridRunConfig = GridRunConfig()
    ledger: LedgerRunConfig = LedgerRunConfig()
    expect: Expectations = Expectations()
    _source: str = PrivateAttr(default="")

    @field_validator("start", mode="before")
    @classmethod
    def _start(cls, v: Any) -> float:
        return time_of_day(v)

    @field_validator("duration", "step", mode="before")
    @classmethod
    def _durations(cls, v: Any) -> float:
        return seconds(v)

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        if self.step > self.market.interval_s or self.market.interval_s % self.step:
            raise ValueError(f"step ({self.step:g} s) must divide the market interval "
                             f"({self.market.interval_s} s)")
        if self.duration < self.market.interval_s:
            raise ValueError(f"duration ({self.duration:g} s) is shorter than one market "
                             f"interval ({self.market.interval_s} s)")
        if self.start % self.market.interval_s:
            raise ValueError(f"start must fall on a market interval boundary "
                             f"({self.market.interval_s} s)")
        return self

    @property
    def source(self) -> str:
        return self._source

    @property
    def steps(self) -> int:
        return int(round(self.duration / self.step))


BUNDLED = {"demo": "demo.yaml", "cloudy-afternoon": "cloudy-afternoon.yaml",
           "evening-surplus": "evening-surplus.yaml", "device-fault": "device-fault.yaml",
           "volt-var-far-end": "volt-var-far-end.yaml"}


def bundled_scenario_path(name: str) -> Path:
    return library_file(BUNDLED[name])


def load_scenario(ref: str | Path) -> Scenario:
    """A scenario file, or a bundled scenario by name (demo, cloudy-afternoon, ...)."""
    sc: Scenario
    sc, path = load_model_file(Scenario, ref, BUNDLED, "scenario")
    updates: dict[str, Any] = {}
    site = Path(sc.site)
    if not site.is_absolute() and (path.parent / site).exists():
        updates["site"] = str((path.parent / site).resolve())
    if updates:
        sc = sc.model_copy(update=updates)
    sc._source = str(path)
    return sc
