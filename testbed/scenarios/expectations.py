"""A scenario's expectations against its run's summary: a table of small checkers (pure),
each saying by how much it passed or failed; and the verdicts as JUnit XML for CI."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .model import Scenario


@dataclass
class Verdict:
    name: str
    ok: bool
    actual: Any
    target: Any
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "actual": self.actual, "target": self.target,
                "message": self.message}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _short(n: int, want: int) -> str:
    return "" if n >= want else f", {want - n} short"


def covered_share_min(want: float, s: dict[str, Any]) -> Verdict:
    share = s["deviation"]["covered_share"]
    ok = share is not None and share >= want
    return Verdict("covered_share_min", ok, share, want,
                   f"market covered {_pct(share)} of the deviation "
                   f"({'>=' if ok else '<'} {want:.0%} required"
                   + ("" if ok or share is None else f", short by {want - share:.1%}") + ")")


def deviation_reduced(want: bool, s: dict[str, Any]) -> Verdict:
    d = s["deviation"]
    ok = (d["after_kwh"] < d["before_kwh"]) == want
    return Verdict("deviation_reduced", ok, d["after_kwh"], d["before_kwh"],
                   f"deviation {d['before_kwh']:.3f} kWh before the market, "
                   f"{d['after_kwh']:.3f} kWh after")


def auctions_cleared_min(want: int, s: dict[str, Any]) -> Verdict:
    n = s["market"]["cleared"]
    return Verdict("auctions_cleared_min", n >= want, n, want,
                   f"{n} auctions cleared (>= {want} required{_short(n, want)})")


def voltage_in_band(want: bool, s: dict[str, Any]) -> Verdict:
    g = s["grid"]
    ok = g["enabled"] and g["dispatch_accepted"] and (g["in_band_share"] or 0) == 1.0
    return Verdict("voltage_in_band", ok == want, g["in_band_share"], 1.0,
                   f"{_pct(g['in_band_share'])} of steps inside the hard band "
                   f"(V {_fmt(g['vm_min_pu'])}-{_fmt(g['vm_max_pu'])} p.u.); every dispatch "
                   f"{'accepted' if g['dispatch_accepted'] else 'NOT accepted'} by "
                   "the grid check")


def ledger_verifies(want: bool, s: dict[str, Any]) -> Verdict:
    led = s["ledger"]
    bad = {k: v["error"] for k, v in led["verified"].items() if not v["ok"]}
    return Verdict("ledger_verifies", led["verifies"] == want, led["verifies"], want,
                   f"{len(led['verified'])} validator stores verified"
                   + (f"; failed: {bad}" if bad else ""))


def blocks_min(want: int, s: dict[str, Any]) -> Verdict:
    n = s["ledger"]["blocks"]
    return Verdict("blocks_min", n >= want, n, want,
                   f"{n} blocks committed (>= {want} required{_short(n, want)})")


def no_lost_messages(want: bool, s: dict[str, Any]) -> Verdict:
    m = s["messages"]
    lost = (m["orders_published"] - m["orders_received"]) + m["ledger_uncommitted"]
    return Verdict("no_lost_messages", (lost == 0) == want, lost, 0,
                   f"{m['orders_published'] - m['orders_received']} published orders "
                   f"not received, {m['ledger_uncommitted']} ledger transactions not "
                   f"committed ({m['orders_lost_injected']} losses injected by the scenario)")


def faults_excluded(want: bool, s: dict[str, Any]) -> Verdict:
    f = s["faults"]
    after = sum(x["orders_after_fault"] for x in f[:1])
    ok = bool(f) and after == 0
    return Verdict("faults_excluded", ok == want, after, 0,
                   f"{len(f)} faulted batteries; {after} orders from them after "
                   "their fault" if f else "no battery faulted during the run")


def lateness_p99_ms_max(want: float, s: dict[str, Any]) -> Verdict:
    lat = s["clock"]["lateness"]
    p99 = lat["p99_ms"] if lat else None
    ok = p99 is not None and p99 <= want
    return Verdict("lateness_p99_ms_max", ok, p99, want,
                   f"tick lateness p99 {p99 if p99 is not None else 'n/a'} ms "
                   f"(<= {want} ms required; realtime mode only)")


CHECKS: dict[str, Callable[[Any, dict[str, Any]], Verdict]] = {
    f.__name__: f for f in (covered_share_min, deviation_reduced, auctions_cleared_min,
                            voltage_in_band, ledger_verifies, blocks_min, no_lost_messages,
                            faults_excluded, lateness_p99_ms_max)}
"""Expectation field -> its checker, in the order verdicts are reported."""


def evaluate(sc: Scenario, summary: dict[str, Any]) -> list[Verdict]:
    """The scenario's expectations (those set) against the run's summary."""
    return [check(getattr(sc.expect, name), summary) for name, check in CHECKS.items()
            if getattr(sc.expect, name) is not None]


def junit_xml(summary: dict[str, Any], verdicts: list[Verdict]) -> str:
    """The expectations as a JUnit XML test suite (one test case each), for CI."""
    from xml.sax.saxutils import escape, quoteattr

    name = summary.get("scenario", "scenario")
    fails = sum(not v.ok for v in verdicts)
    cases = []
    for v in verdicts:
        body = "" if v.ok else (f"<failure message={quoteattr(v.message)}>"
                                f"{escape(json.dumps(v.to_dict()))}</failure>")
        cases.append(f'  <testcase classname={quoteattr("testbed.run." + name)} '
                     f'name={quoteattr(v.name)}>{body}<system-out>{escape(v.message)}'
                     "</system-out></testcase>")
    return ("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n"
            f"<testsuite name={quoteattr('testbed run ' + name)} tests=\"{len(verdicts)}\" "
            f"failures=\"{fails}\" errors=\"0\">\n" + "\n".join(cases) + "\n</testsuite>\n")
