"""Hostile input files: a corpus of malformed site, scenario and profile files, and
hypothesis-generated ones, through every command that reads them (in-process, typer's
CliRunner). The assertion is always the same: exit 2, one line `error: FILE:...: FIELD:
...` naming the file and the field, no traceback, and nothing created on disk (the cwd
and the --out folder are compared before and after). Validation refuses before any
server starts, so the whole file runs in seconds."""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from testbed.cli import app
from testbed.config import ConfigError, bundled_path, load_site
from testbed.scenarios.model import bundled_scenario_path, load_scenario

runner = CliRunner()

SITE = bundled_path("demo").read_text()
SCENARIO = bundled_scenario_path("demo").read_text().replace("site: demo", "site: site.yaml")
assert "site: site.yaml" in SCENARIO and "capacity_wh: 13500" in SITE

BOMB = "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]",
                  *(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]"
                    for p, c in zip("abcdefgh", "bcdefghi", strict=True)),
                  "name: bomb", "prosumers: *i", ""])
"""Billion laughs: 9^9 strings if expanded."""


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def site_commands(site: str, out: Path) -> list[list[str]]:
    """Every command that reads a site file."""
    return [["devices", "serve", site, "--duration", "0.1"],
            ["devices", "read", site, "house-1-pv"],
            ["devices", "write", site, "house-1-battery", "p_set_w", "100"],
            ["grid", "check", site],
            ["ledger", "init", site, "--out", str(out / "ledger")]]


def assert_refused(args: list[str], root: Path, file: str, field: str) -> str:
    """Run the CLI in `root`; exit 2, one line naming file and field, nothing created."""
    before = tree(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        res = runner.invoke(app, args)
    finally:
        os.chdir(cwd)
    out = res.output
    lines = [x for x in out.splitlines() if x.strip()]
    where = f"testbed {' '.join(args)}"
    assert res.exit_code == 2, f"{where}: exit {res.exit_code}\n{out}\n{res.exception!r}"
    assert "Traceback" not in out, f"{where}: traceback\n{out}"
    assert len(lines) == 1, f"{where}: {len(lines)} lines\n{out}"
    assert lines[0].startswith("error: "), f"{where}: {out}"
    assert file in lines[0], f"{where}: does not name {file}: {out}"
    assert field in lines[0], f"{where}: does not name {field!r}: {out}"
    assert tree(root) == before, f"{where}: created {tree(root) - before}"
    return lines[0]


# ------------------------------------------------------------------- the corpus

SITE_CASES: list[tuple[str, Callable[[str], str], str, str]] = [
    # (id, edit of the demo site, field the error names, where it is)
    ("alias-bomb", lambda s: BOMB, "b[0]", "site.yaml:2"),
    ("recursive-anchor", lambda s: s.replace('description: ', 'description: &r [*r] #'),
     "description[0]", "site.yaml:"),
    ("inf-capacity", lambda s: s.replace("capacity_wh: 13500", "capacity_wh: .inf", 1),
     "params.capacity_wh: Input should be a finite number", "site.yaml:"),
    ("nan-capacity", lambda s: s.replace("capacity_wh: 13500", "capacity_wh: .nan", 1),
     "params.capacity_wh", "site.yaml:"),
    ("huge-int", lambda s: s.replace("capacity_wh: 13500", "capacity_wh: 1" + "0" * 400, 1),
     "params.capacity_wh", "site.yaml:"),
    ("5000-digit-int", lambda s: s.replace("seed: 7", "seed: " + "9" * 5000), "not valid YAML",
     "site.yaml:"),
    ("seed-too-big", lambda s: s.replace("seed: 7", "seed: " + str(2**64)), "emulation.seed",
     "site.yaml:"),
    ("neg-inf-soc", lambda s: s.replace("soc_init: 0.3", "soc_init: -.inf", 1), "soc_init",
     "site.yaml:"),
    ("deep", lambda s: s + "x: " + "[" * 200 + "]" * 200 + "\n", "not valid YAML: nested",
     "site.yaml:"),
    ("dup-key", lambda s: s + "name: twice\n", "given twice", "site.yaml:"),
    ("bad-date", lambda s: s.replace("seed: 7", "seed: 2026-13-45"), "not valid YAML",
     "site.yaml:"),
    ("top-level-list", lambda s: "- a\n- b\n", "(top level)", "site.yaml:1"),
    ("empty", lambda s: "", "(top level)", "site.yaml:1"),
    ("syntax", lambda s: s + "  - {name: [\n", "not valid YAML", "site.yaml:"),
    ("tab-indent", lambda s: s.replace("  seed: 7", "\tseed: 7"), "not valid YAML", "site.yaml:"),
    ("binary", lambda s: "name: \x00\x01", "not valid YAML", "site.yaml:"),
    ("markup", lambda s: s.replace("name: demo", "name: '[/red]'", 1), "name", "site.yaml:"),
    ("python-tag", lambda s: s + "x: !!python/object/apply:os.system ['true']\n",
     "not valid YAML", "site.yaml:"),
    ("network-dev-zero", lambda s: s + "grid: {network: /dev/zero.json}\n", "grid.network",
     "site.yaml:"),
    ("network-dir", lambda s: s + "grid: {network: sub.json}\n", "grid.network: ",
     "site.yaml:"),
]


def _site_variants() -> list[tuple[str, str, str, str]]:
    return [(i, f(SITE), field, where) for i, f, field, where in SITE_CASES]


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    root = tmp_path / "lab"
    root.mkdir()
    (root / "sub.json").mkdir()
    (root / "scenario.yaml").write_text(SCENARIO)
    return root


@pytest.mark.parametrize("case, text, field, where", _site_variants(),
                         ids=[c[0] for c in SITE_CASES])
def test_malformed_site_files_are_refused_by_every_command(lab: Path, case: str, text: str,
                                                           field: str, where: str) -> None:
    (lab / "site.yaml").write_text(text, encoding="utf-8", errors="surrogatepass")
    out = lab / "out"
    for args in [*site_commands("site.yaml", out),
                 ["run", "scenario.yaml", "--out", str(out), "-q", "--no-report"]]:
        line = assert_refused(args, lab, "site.yaml", field)
        assert where in line


def test_alias_bomb_and_recursive_anchor_cost_nothing(tmp_path: Path) -> None:
    """Refused before anything is expanded, with memory bounded (the peak RSS barely
    moves; expanded, the bomb is 9^9 strings). bench-free figure: ~1 ms each."""
    path = tmp_path / "bomb.yaml"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for text in (BOMB, "name: x\ndescription: &r [*r]\nprosumers: []\n",
                 "name: x\nprosumers: &p [{name: a, devices: *p}]\n"):
        path.write_text(text)
        with pytest.raises(ConfigError, match=r"bomb.yaml:\d+: .*aliases"):
            load_site(path)
    # Many values (within the size limit) are bounded too, before pydantic sees them.
    path.write_text("name: x\nprosumers: [" + ",".join(["1"] * 250_000) + "]\n")
    with pytest.raises(ConfigError, match=r"bomb.yaml:2: prosumers\[\d+\]: not valid YAML: "
                                          r"more than 200000 values"):
        load_site(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200_000  # KiB


def test_a_site_file_over_the_size_limit_is_refused(lab: Path) -> None:
    (lab / "site.yaml").write_text(SITE + "# " + "x" * (1 << 20) + "\n")
    for args in site_commands("site.yaml", lab / "out"):
        assert_refused(args, lab, "site.yaml", "file too large: expected at most 1 MiB")
    os.mkfifo(lab / "fifo.yaml")
    assert_refused(["grid", "check", "fifo.yaml"], lab, "fifo.yaml", "expected a regular file")


SCENARIO_CASES: list[tuple[str, str, str, str]] = [
    # (id, edit "old=>new" of the demo scenario, field, where)
    ("nan-at", '"13:00"=>.nan', "events[0].at", "scenario.yaml:"),
    ("inf-duration", "duration: 4h=>duration: .inf", "duration", "scenario.yaml:"),
    ("event-inf-duration", "duration: 45m=>duration: .inf", "events[0].duration",
     "scenario.yaml:"),
    ("negative-start", 'start: "11:00"=>start: -900', "start", "scenario.yaml:"),
    ("start-next-day", 'start: "11:00"=>start: 90000', "start", "scenario.yaml:"),
    ("negative-at", 'at: "13:00"=>at: -5', "events[0].at", "scenario.yaml:"),
    ("huge-at", 'at: "13:00"=>at: 1' + "0" * 400, "events[0].at", "scenario.yaml:"),
    ("step-nan", "step: 60s=>step: .nan", "step", "scenario.yaml:"),
    ("seed-inf", "seed: 7=>seed: .inf", "seed", "scenario.yaml:"),
    ("price-nan", "buy_price: 0.40=>buy_price: .nan", "market.buy_price",
     "scenario.yaml:"),
    ("alias", "expect:=>x: &x 1\ny: *x\nexpect:", "y: not valid YAML: aliases",
     "scenario.yaml:"),
    ("dev-zero-profile", "expect:=>profiles: {irradiance: {file: /dev/zero}}\nexpect:",
     "profiles.irradiance.file: /dev/zero: expected a regular file", "scenario.yaml:"),
    ("dir-profile", "expect:=>profiles: {load: {file: .}}\nexpect:", "profiles.load.file",
     "scenario.yaml:"),
    ("missing-profile", "expect:=>profiles: {load: {file: nope.csv}}\nexpect:",
     "profiles.load.file", "scenario.yaml:"),
    ("unknown-device", "kind: cloud, at: \"13:00\", duration: 45m, depth: 0.6=>"
     "kind: device-silent, at: '12:00', device: x", "events", "scenario.yaml"),
    ("missing-site", "site: site.yaml=>site: nope.yaml", "nope.yaml", "scenario.yaml"),
    ("unknown-spike-prosumer", "kind: cloud, at: \"13:00\", duration: 45m, depth: 0.6=>"
     "kind: load-spike, at: '12:00', prosumer: x, extra_w: 100",
     "events[0].prosumer: load-spike for unknown prosumer 'x'", "scenario.yaml:16"),
    ("unknown-loss-prosumer", "kind: cloud, at: \"13:00\", duration: 45m, depth: 0.6=>"
     "kind: message-loss, at: '12:00', prosumer: x",
     "events[0].prosumer: message-loss for unknown prosumer 'x'", "scenario.yaml:16"),
    ("dev-zero-site", "site: site.yaml=>site: /dev/zero", "site: /dev/zero: expected a "
     "regular file", "scenario.yaml"),
    ("dir-site", "site: site.yaml=>site: sub.json", "expected a regular file, got a directory",
     "scenario.yaml"),
]


def test_a_scenario_that_is_not_a_regular_file_or_too_large(lab: Path) -> None:
    assert_refused(["run", "/dev/zero", "--out", "out"], lab, "/dev/zero",
                   "expected a regular file")
    (lab / "big.yaml").write_text(SCENARIO + "#" * (1 << 20))
    assert_refused(["run", "big.yaml", "--out", "out"], lab, "big.yaml", "file too large")
    (lab / "bad.yaml").write_bytes(b"name: \xff\xfe\n")
    assert_refused(["run", "bad.yaml", "--out", "out"], lab, "bad.yaml:1", "not UTF-8")

CSV_CASES: list[tuple[str, str, str, str]] = [
    # (id, irradiance CSV, field, where)
    ("blank-first-line", "\n\ntime,ghi\n0,0\n3600,500\n", None, None),  # blank lines are fine
    ("no-header", "0,0\n3600,500\n", "time: expected a header", "irr.csv:1"),
    ("header-only", "time,ghi\n", "time: the irradiance profile needs", "irr.csv:1"),
    ("one-row", "time,ghi\n0,1\n", "time", "irr.csv:2"),
    ("empty", "", "time", "irr.csv:1"),
    ("blank-only", "\n \n\n", "time", "irr.csv:1"),
    ("time-only", "time\n0\n60\n", "time: expected a header", "irr.csv:1"),
    ("not-monotone", "time,ghi\n0,0\n3600,5\n1800,4\n", "time: expected a time after",
     "irr.csv:4"),
    ("same-time", "time,ghi\n12:00,0\n12:00,5\n", "time", "irr.csv:3"),
    ("bad-time", "time,ghi\n0,0\nnoon,5\n", "time: expected", "irr.csv:3"),
    ("negative-time", "time,ghi\n-60,0\n60,5\n", "time", "irr.csv:2"),
    ("nan-value", "time,ghi\n0,nan\n60,5\n", "ghi: expected a number of W/m2", "irr.csv:2"),
    ("inf-value", "time,ghi\n0,inf\n60,5\n", "ghi", "irr.csv:2"),
    ("negative-value", "time,ghi\n0,-1\n60,5\n", "ghi", "irr.csv:2"),
    ("out-of-unit", "time,ghi\n0,0\n60,50000\n", "ghi: expected a number of W/m2 from 0 to 2000",
     "irr.csv:3"),
    ("text-value", "time,ghi\n0,0\n60,lots\n", "ghi: expected a number", "irr.csv:3"),
    ("short-row", "time,ghi\n0,0\n60\n", "row: expected 2 cells", "irr.csv:3"),
    ("dup-column", "time,ghi,ghi\n0,0,0\n60,5,5\n", "ghi: the column is named twice",
     "irr.csv:1"),
    ("empty-column", "time,,ghi\n0,0,0\n60,5,5\n", "column 2", "irr.csv:1"),
    ("latin-1", "time,ghi\n0,0\n60,5\xe9\n", "not UTF-8", "irr.csv:3"),
    ("huge-time", "time,ghi\n0,0\n" + "9" * 60 + ",5\n", "time", "irr.csv:3"),
]


def _edit(text: str, edit: str) -> str:
    old, new = edit.split("=>")
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.mark.parametrize("case, edit, field, where", SCENARIO_CASES,
                         ids=[c[0] for c in SCENARIO_CASES])
def test_malformed_scenario_files_are_refused(lab: Path, case: str, edit: str, field: str,
                                              where: str) -> None:
    (lab / "site.yaml").write_text(SITE)
    (lab / "scenario.yaml").write_text(_edit(SCENARIO, edit))
    line = assert_refused(["run", "scenario.yaml", "--out", str(lab / "out"), "-q",
                           "--no-report"], lab, "scenario.yaml", field)
    assert where in line


@pytest.mark.parametrize("case, csv, field, where", CSV_CASES, ids=[c[0] for c in CSV_CASES])
def test_malformed_csv_profiles_are_refused_before_anything_is_created(
        lab: Path, case: str, csv: str, field: str | None, where: str | None) -> None:
    (lab / "site.yaml").write_text(SITE)
    (lab / "irr.csv").write_bytes(csv.encode("latin-1"))
    (lab / "scenario.yaml").write_text(_edit(
        SCENARIO, "expect:=>profiles: {irradiance: {file: irr.csv}}\nexpect:"))
    if field is None:  # well-formed after all: the profile loads
        from testbed.scenarios.profiles import irradiance_fn
        f = irradiance_fn(load_scenario(lab / "scenario.yaml"))
        assert f(1800) == pytest.approx(250 * _cloud_free(f, 1800))
        return
    assert where is not None
    line = assert_refused(["run", "scenario.yaml", "--out", str(lab / "out"), "-q",
                           "--no-report"], lab, "irr.csv", field)
    assert where in line


def _cloud_free(f: Callable[[float], float], t: float) -> float:
    return 1.0  # the demo's cloud passes at 13:00; 00:30 is clear


def test_load_profile_for_a_prosumer_the_csv_lacks(lab: Path) -> None:
    (lab / "site.yaml").write_text(SITE)
    (lab / "load.csv").write_text("time,house-1\n0,100\n60,200\n")
    (lab / "scenario.yaml").write_text(_edit(
        SCENARIO, "expect:=>profiles: {load: {file: load.csv}}\nexpect:"))
    assert_refused(["run", "scenario.yaml", "--out", "out", "-q"], lab, "load.csv",
                   "house-2: no column for prosumer(s) house-2")
    (lab / "scenario.yaml").write_text(_edit(
        SCENARIO, "expect:=>profiles: {load: {file: load.csv, column: nope}}\nexpect:"))
    assert_refused(["run", "scenario.yaml", "--out", "out", "-q"], lab, "load.csv",
                   "nope: no such column")


def test_init_generated_files_edited_badly(lab: Path) -> None:
    res = runner.invoke(app, ["init", str(lab / "mine")])
    assert res.exit_code == 0, res.output
    site, scen = lab / "mine" / "site.yaml", lab / "mine" / "scenario.yaml"
    site.write_text(site.read_text().replace("capacity_wh: 13500", "capacity_wh: .inf", 1))
    assert_refused(["run", str(scen), "--out", "out", "-q"], lab, "site.yaml",
                   "capacity_wh")
    site.write_text(SITE)
    scen.write_text(scen.read_text().replace('start: "11:00"', "start: -900"))
    assert_refused(["run", str(scen), "--out", "out", "-q"], lab, "scenario.yaml", "start")


# ------------------------------------------------------------------- generated files

KEYS = st.sampled_from(["name", "prosumers", "devices", "kind", "params", "capacity_wh",
                        "soc_min", "start", "duration", "step", "events", "at", "seed",
                        "emulation", "grid", "network", "profiles", "irradiance", "file",
                        "market", "interval_s", "expect", "site", "description"])
SCALARS = st.one_of(
    st.sampled_from([".nan", ".inf", "-.inf", "-900", "1e999", "0", "''", "~", "[]", "{}",
                     "&a 1", "*a", "!!binary AAAA", "!!python/none", "'13:00'", "25:61",
                     "9" * 30, "2026-13-45", "/dev/zero", "[*r]", "demo", "pv", "battery"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
    .map(lambda s: repr(s)))


def _yaml(depth: int) -> st.SearchStrategy[str]:
    if depth == 0:
        return SCALARS
    inner = _yaml(depth - 1)
    return st.one_of(
        SCALARS,
        st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.dictionaries(KEYS, inner, max_size=3).map(
            lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"))


@st.composite
def mutated(draw: st.DrawFn, base: str) -> str:
    """The base file with a few lines replaced, dropped or appended."""
    lines = base.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        indent = len(lines[i]) - len(lines[i].lstrip())
        key = lines[i].strip().split(":")[0].lstrip("- ") or draw(KEYS)
        how = draw(st.sampled_from(["value", "drop", "append", "garbage"]))
        if how == "value":
            lines[i] = " " * indent + f"{key}: {draw(_yaml(2))}"
        elif how == "drop":
            del lines[i]
        elif how == "append":
            lines.append(f"{draw(KEYS)}: {draw(_yaml(2))}")
        else:
            lines[i] = draw(st.text(max_size=30).filter(lambda s: "\n" not in s and "\r" not in s))
    return "\n".join(lines) + "\n"


def _outcome(args: list[str], root: Path) -> tuple[int, str]:
    before = tree(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        res = runner.invoke(app, args)
    finally:
        os.chdir(cwd)
    assert tree(root) == before or res.exit_code != 2, f"created {tree(root) - before}"
    return res.exit_code, res.output


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=mutated(SITE))
def test_generated_site_files_are_refused_cleanly_or_load(tmp_path: Path, text: str) -> None:
    """A generated site either loads (then `grid check` runs on it, exit 0 or 1) or is
    refused the one way; never a traceback."""
    root = tmp_path / "gen-site"
    root.mkdir(exist_ok=True)
    (root / "site.yaml").write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_site(root / "site.yaml")
    except ConfigError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.startswith(str(root / "site.yaml")), msg
        assert_refused(["grid", "check", "site.yaml"], root, "site.yaml", ": ")
        assert_refused(["ledger", "init", "site.yaml", "--out", "ledger"], root, "site.yaml", ": ")


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=mutated(SCENARIO))
def test_generated_scenario_files_are_refused_cleanly_or_load(tmp_path: Path, text: str) -> None:
    root = tmp_path / "gen-scen"
    root.mkdir(exist_ok=True)
    (root / "site.yaml").write_text(SITE)
    (root / "scenario.yaml").write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        sc = load_scenario(root / "scenario.yaml")
    except ConfigError as exc:
        msg = str(exc)
        assert "\n" not in msg and "scenario.yaml" in msg, msg
        assert_refused(["run", "scenario.yaml", "--out", "out", "-q"], root, "scenario.yaml",
                       ": ")
        return
    # Loaded: every number finite and every time in range.
    import math
    assert math.isfinite(sc.start) and 0 <= sc.start < 86400
    assert all(math.isfinite(e.at) and e.at >= 0 for e in sc.events)
