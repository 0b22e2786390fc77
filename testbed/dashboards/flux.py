"""Flux queries generated from the time-series schema, and the InfluxDB target they ride in.

A panel's query names measurements, fields and tags only through `flux()`, which refuses
any name `testbed.telemetry.schema.MEASUREMENTS` does not list: a renamed field breaks
the export (and its test), not a panel that silently shows "No data" in the lab.

The Grafana foundation SDK ships no InfluxDB query type, so `FluxQuery` is one: a cog
builder whose product serialises to the target Grafana's InfluxDB plugin reads in Flux
mode (`refId`, `query`, `datasource`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Self

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models.dashboard import DataSourceRef

from testbed.telemetry.schema import DEFAULT_BUCKET, MEASUREMENTS

RUN_VAR = "run"
"""The dashboard variable (and the tag every point carries) that selects one run."""

Fn = Literal["last", "mean", "min", "max", "sum", "count"]
ALWAYS_TAGS = ("run",)


class DashboardError(ValueError):
    """A dashboard, export or push request that cannot be honoured; the message says why."""


def _s(text: str) -> str:
    """A Flux string literal (JSON's escaping is Flux's for quotes and backslashes)."""
    return json.dumps(text)


def _cols(names: Sequence[str]) -> str:
    return "[" + ", ".join(_s(n) for n in names) + "]"


def check(measurement: str, fields: Sequence[str] = (), tags: Sequence[str] = ()) -> None:
    """Raise DashboardError unless the sink writes `measurement` with these fields and tags."""
    m = MEASUREMENTS.get(measurement)
    if m is None:
        raise DashboardError(f"unknown measurement {measurement!r}; the sink writes: "
                             f"{', '.join(sorted(MEASUREMENTS))}")
    if bad := [f for f in fields if f not in m.fields]:
        raise DashboardError(f"measurement {measurement!r} has no field {', '.join(bad)}; "
                             f"its fields: {', '.join(m.fields)}")
    if bad := [t for t in tags if t not in (*m.tags, *ALWAYS_TAGS)]:
        raise DashboardError(f"measurement {measurement!r} has no tag {', '.join(bad)}; "
                             f"its tags: {', '.join((*ALWAYS_TAGS, *m.tags))}")


def flux(measurement: str, fields: Sequence[str], *, where: Mapping[str, str] | None = None,
         group_by: Sequence[str] = (), fn: Fn | None = "last", total: Fn | None = None,
         bucket: str = DEFAULT_BUCKET) -> str:
    """Flux for `fields` of `measurement` in the selected run and the dashboard's time range.

    Series mode (default): one series per field and `group_by` tag values, thinned to the
    panel's resolution with `aggregateWindow(fn)` (fn=None: raw points), only the group's
    tags kept so legends stay short. Total mode (`total="sum"`, "count", ...): one row per
    `group_by` tag value with one column per field, the function applied over the whole
    range: what stat, bar and pie panels want.
    """
    if not fields:
        raise DashboardError(f"{measurement}: a query needs at least one field")
    where = dict(where or {})
    check(measurement, fields, [*where, *group_by])
    match = " and ".join([f"r._measurement == {_s(measurement)}",
                          f"r.{RUN_VAR} == {_s('${' + RUN_VAR + '}')}",
                          *(f"r.{k} == {_s(v)}" for k, v in where.items())])
    lines = [f"from(bucket: {_s(bucket)})",
             "|> range(start: v.timeRangeStart, stop: v.timeRangeStop)",
             f"|> filter(fn: (r) => {match})",
             "|> filter(fn: (r) => " + " or ".join(f"r._field == {_s(f)}" for f in fields) + ")"]
    if total is None:
        lines += [f"|> group(columns: {_cols([*group_by, '_field'])})",
                  '|> sort(columns: ["_time"])']
        if fn is not None:
            lines.append(f"|> aggregateWindow(every: v.windowPeriod, fn: {fn}, createEmpty: false)")
        lines.append(f"|> keep(columns: {_cols(['_time', '_value', '_field', *group_by])})")
    else:
        # `_start` is the same on every row: a row key that also works without tags.
        lines += [f"|> group(columns: {_cols(['_start', *group_by, '_field'])})",
                  f"|> {total}()",
                  "|> group()",
                  f"|> pivot(rowKey: {_cols(['_start', *group_by])}, columnKey: [\"_field\"], "
                  'valueColumn: "_value")',
                  '|> drop(columns: ["_start"])']
        if group_by:
            lines.append(f"|> sort(columns: {_cols(group_by)})")
    return "\n  ".join(lines) + "\n"


def run_values(bucket: str = DEFAULT_BUCKET) -> str:
    """Flux listing the run ids; a fast run's points lie ahead of now, hence the stop."""
    return ('import "influxdata/influxdb/schema"\n'
            f"schema.tagValues(bucket: {_s(bucket)}, tag: {_s(RUN_VAR)}, "
            "start: -30d, stop: 30d)\n")


class FluxDataquery(cogvariants.Dataquery):
    """One target of Grafana's InfluxDB data source in Flux mode."""

    def __init__(self, ref_id: str = "", query: str = "",
                 datasource: DataSourceRef | None = None, hide: bool | None = None) -> None:
        self.ref_id = ref_id
        self.query = query
        self.datasource = datasource
        self.hide = hide

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"refId": self.ref_id, "query": self.query}
        if self.datasource is not None:
            out["datasource"] = self.datasource
        if self.hide is not None:
            out["hide"] = self.hide
        return out


class FluxQuery(cogbuilder.Builder[FluxDataquery]):
    """Builder for `FluxDataquery`, shaped like the SDK's own (e.g. `prometheus.Dataquery`)."""

    def __init__(self) -> None:
        self._internal = FluxDataquery()

    def build(self) -> FluxDataquery:
        return self._internal

    def ref_id(self, ref_id: str) -> Self:
        self._internal.ref_id = ref_id
        return self

    def query(self, query: str) -> Self:
        self._internal.query = query
        return self

    def datasource(self, datasource: DataSourceRef) -> Self:
        self._internal.datasource = datasource
        return self

    def hide(self, hide: bool) -> Self:
        self._internal.hide = hide
        return self
