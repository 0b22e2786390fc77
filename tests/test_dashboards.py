"""Grafana dashboards: queries checked against the sink's schema, export, push, lab stack.

No Grafana or InfluxDB runs here. The queries are checked by reading their Flux text
(independently of the generator, so a hand edit or a generator bug is caught too) and
compiled by InfluxData's own Flux analyser (libflux in the flux-lsp WebAssembly build,
run by Node); the push goes through grafana-client to a stand-in HTTP server that
implements the few endpoints it calls and records every request.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from testbed.cli import app
from testbed.dashboards.flux import DashboardError, flux
from testbed.dashboards.grafana import (
    DASHBOARDS_MOUNT,
    DATASOURCE_UID,
    GrafanaError,
    export,
    push,
)
from testbed.telemetry.schema import DEFAULT_BUCKET, DEFAULT_ORG, MEASUREMENTS

LAB = Path(__file__).resolve().parent.parent / "lab"
REQUIRED_VIEWS = {
    "Schedule vs metered", "Deviation and cover", "Auction prices", "Requested vs cleared",
    "Auction outcomes", "Battery state of charge", "Battery setpoint and power",
    "Feeder voltage band", "Feeder loading", "Transactions per block", "Blocks per proposer",
    "CPF per prosumer", "Events by kind", "Energy cleared", "Deviation covered"}
UNITS = {"Battery state of charge": "percent", "Battery setpoint and power": "watt",
         "Feeder voltage band": "suffix: p.u.", "Feeder loading": "percent",
         "Auction prices": "suffix: EUR/kWh", "Schedule vs metered": "kwatth",
         "Energy cleared": "kwatth"}


# ---------------------------------------------------------------- the schema check

def flux_errors(query: str) -> list[str]:
    """What in a Flux query the sink does not write: unknown measurement, field or tag."""
    errors = []
    measurements = re.findall(r'r\._measurement\s*==\s*"([^"]*)"', query)
    if len(measurements) != 1:
        return [f"expected one measurement filter, found {measurements}"]
    m = MEASUREMENTS.get(measurements[0])
    if m is None:
        return [f"unknown measurement {measurements[0]!r}"]
    tags = {*m.tags, "run"}
    fields = re.findall(r'r\._field\s*==\s*"([^"]*)"', query)
    if not fields:
        errors.append("no field filter")
    errors += [f"{m.name} has no field {f!r}" for f in fields if f not in m.fields]
    for ref in re.findall(r"\br\.(\w+)", query):
        if ref not in ("_measurement", "_field") and ref not in tags:
            errors.append(f"{m.name} has no tag {ref!r}")
    for cols in re.findall(r"(?:columns|rowKey|columnKey):\s*\[([^\]]*)\]", query):
        for col in re.findall(r'"([^"]*)"', cols):
            if not col.startswith("_") and col not in tags:
                errors.append(f"{m.name} has no tag {col!r} (grouped or kept)")
    if 'r.run == "${run}"' not in query:
        errors.append("not filtered by the run variable")
    if "range(start: v.timeRangeStart, stop: v.timeRangeStop)" not in query:
        errors.append("not limited to the dashboard's time range")
    return errors


def panel_errors(panel: dict[str, Any]) -> list[str]:
    """A panel's queries, plus the names its options refer to (bar chart x axis, formula)."""
    targets = panel.get("targets") or []
    if not targets:
        return [f"{panel.get('title')!r} has no query"]
    errors = [f"{panel['title']!r} {t['refId']}: {e}" for t in targets
              for e in flux_errors(t["query"])]
    text = "\n".join(t["query"] for t in targets)
    named = [(panel.get("options") or {}).get("xField")]
    for tr in panel.get("transformations") or []:
        binary = tr.get("options", {}).get("binary", {})
        named += [binary.get("left"), binary.get("right")]
    errors += [f"{panel['title']!r} refers to {n!r}, which no query returns"
               for n in named if n and f'"{n}"' not in text]
    return errors


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out += p.get("panels", []) if p["type"] == "row" else [p]
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("grafana")
    export(out)
    return out


@pytest.fixture(scope="module")
def dash(exported: Path) -> dict[str, Any]:
    return json.loads((exported / "dashboards" / "testbed-run.json").read_text())


def test_every_query_uses_only_what_the_sink_writes(dash: dict[str, Any]) -> None:
    ps = panels(dash)
    assert [e for p in ps for e in panel_errors(p)] == []
    assert {p["title"] for p in ps} >= REQUIRED_VIEWS
    used = {re.search(r'_measurement == "(\w+)"', t["query"])[1] for p in ps for t in p["targets"]}
    assert {"interval", "auction", "reading", "feeder", "block", "cpf", "event"} <= used
    for title, unit in UNITS.items():
        assert next(p for p in ps if p["title"] == title)["fieldConfig"]["defaults"]["unit"] \
            == unit, title
    (var,) = dash["templating"]["list"]
    assert var["name"] == "run" and 'tag: "run"' in var["query"]
    assert f'bucket: "{DEFAULT_BUCKET}"' in var["query"]


def test_checker_rejects_doctored_queries(dash: dict[str, Any]) -> None:
    """The check above is only worth something if a typo makes it fail."""
    soc = next(p for p in panels(dash) if p["title"] == "Battery state of charge")
    q = soc["targets"][0]["query"]
    assert flux_errors(q) == []
    for old, new in [('"soc_pct"', '"soc_pc"'), ('"reading"', '"readings"'),
                     ("r.kind", "r.knd"), ('["device", "_field"]', '["dev", "_field"]'),
                     ('r.run == "${run}"', 'r.run == "x"')]:
        assert old in q
        assert flux_errors(q.replace(old, new)), f"{old} -> {new} went unnoticed"
    blocks = next(p for p in panels(dash) if p["title"] == "Blocks per proposer")
    assert panel_errors(blocks) == []
    assert panel_errors({**blocks, "options": {**blocks["options"], "xField": "propser"}})
    assert panel_errors({**blocks, "targets": []})


# ---------------------------------------------------------------- InfluxData's Flux analyser

FLUX_CHECK = Path(__file__).resolve().parent / "flux"
"""tests/flux: a Node script around the pinned flux-lsp WebAssembly build (`npm ci --prefix
tests/flux`; .ci/run does it)."""


def grafana_interpolated(query: str) -> str:
    """The text Grafana's InfluxDB (Flux) back end sends: its macros replaced by literals
    (RFC 3339 times, a duration), the dashboard variable by the selected run."""
    return (query.replace("v.timeRangeStart", "2026-06-21T11:00:00Z")
            .replace("v.timeRangeStop", "2026-06-21T15:00:00Z")
            .replace("v.windowPeriod", "60000ms")
            .replace("${run}", "demo-s1-20261201T120000"))


def flux_analysed(queries: dict[str, str]) -> dict[str, dict[str, Any]]:
    import shutil
    import subprocess

    node = shutil.which("node")
    if node is None or not (FLUX_CHECK / "node_modules" / "@influxdata").is_dir():
        pytest.skip("Node.js or tests/flux/node_modules missing (npm ci --prefix tests/flux; "
                    ".ci/run installs it)")
    out = subprocess.run([node, str(FLUX_CHECK / "check.mjs")], check=True, timeout=120,
                         input=json.dumps([{"id": k, "flux": v} for k, v in queries.items()]),
                         capture_output=True, text=True)
    return {r["id"]: r for r in json.loads(out.stdout.strip().splitlines()[-1])}


def test_every_query_compiles_in_influxdatas_flux_analyser(dash: dict[str, Any]) -> None:
    """No InfluxDB runs here, so the queries are compiled (parsed, type-checked against
    the standard library's signatures) by libflux, InfluxData's own analyser, as a
    stand-in for executing them; a doctored copy of each kind must fail, so the check
    can fail."""
    queries = {f"{p['title']} {t['refId']}": grafana_interpolated(t["query"])
               for p in panels(dash) for t in p["targets"]}
    queries["variable run"] = dash["templating"]["list"][0]["query"]
    assert len(queries) > 20
    soc = queries["Battery state of charge A"]
    doctored = {
        "fn typo": soc.replace("fn: last", "fn: lats").replace("fn: mean", "fn: maen"),
        "argument typo": soc.replace("createEmpty:", "createEmtpy:"),
        "wrong type": soc.replace('from(bucket: "testbed")', "from(bucket: 7)"),
        "syntax": soc.replace("|> filter(fn: (r) =>", "|> filter(fn: (r) =", 1),
        "raw macro": queries["Battery state of charge A"].replace(
            "2026-06-21T11:00:00Z", "v.timeRangeStart"),
    }
    for name, q in doctored.items():
        assert q != soc, name
    res = flux_analysed({**queries, **{f"doctored {k}": v for k, v in doctored.items()}})
    bad = {k: r["diagnostics"] for k, r in res.items()
           if not k.startswith("doctored") and (not r["valid"] or r["diagnostics"])}
    assert bad == {}
    assert [k for k in doctored if res[f"doctored {k}"]["valid"]] == []
    assert any("undefined identifier" in d for d in res["doctored fn typo"]["diagnostics"])


def test_limits_are_dashed_lines(dash: dict[str, Any]) -> None:
    for title in ("Feeder voltage band", "Feeder loading"):
        p = next(p for p in panels(dash) if p["title"] == title)
        limits = {f for t in p["targets"] for f in re.findall(r'"(limit_\w+)"', t["query"])}
        assert limits and limits <= set(MEASUREMENTS["feeder"].fields)
        dashed = [o["matcher"]["options"] for o in p["fieldConfig"]["overrides"]
                  if {"id": "custom.lineStyle", "value": {"dash": [10, 10], "fill": "dash"}}
                  in o["properties"]]
        for f in limits:
            assert any(re.fullmatch(rx, f) for rx in dashed), f"{title}: {f} not dashed"
        assert p["fieldConfig"]["defaults"]["thresholds"]["steps"]


def test_flux_refuses_names_the_sink_does_not_write() -> None:
    with pytest.raises(DashboardError, match="unknown measurement 'readings'"):
        flux("readings", ["soc_pct"])
    with pytest.raises(DashboardError, match="'reading' has no field soc"):
        flux("reading", ["soc"])
    with pytest.raises(DashboardError, match="'feeder' has no tag device"):
        flux("feeder", ["vm_min_pu"], group_by=["device"])
    with pytest.raises(DashboardError, match="'auction' has no tag kind"):
        flux("auction", ["price"], where={"kind": "battery"})
    with pytest.raises(DashboardError, match="at least one field"):
        flux("auction", [])
    q = flux("reading", ["soc_pct"], where={"kind": "battery"}, group_by=["device"],
             bucket='odd "bucket"')
    assert flux_errors(q) == [] and 'from(bucket: "odd \\"bucket\\"")' in q


# ---------------------------------------------------------------- export and the lab

def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_export_is_deterministic_and_the_lab_copy_is_current(exported: Path,
                                                             tmp_path: Path) -> None:
    files = export(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in files) == sorted(_tree(tmp_path))
    assert _tree(tmp_path) == _tree(exported)
    lab = _tree(LAB / "grafana")
    assert lab == _tree(exported), ("lab/grafana is stale: run "
                                    "`testbed dashboards export lab/grafana` and commit it")


def test_provisioning_matches_the_dashboards(exported: Path, dash: dict[str, Any]) -> None:
    text = (exported / "provisioning" / "datasources" / "testbed.yaml").read_text()
    (ds,) = yaml.safe_load(text)["datasources"]
    assert ds["uid"] == DATASOURCE_UID and ds["type"] == "influxdb"
    assert ds["jsonData"] == {"version": "Flux", "organization": DEFAULT_ORG,
                              "defaultBucket": DEFAULT_BUCKET}
    assert ds["secureJsonData"] == {"token": "${INFLUX_TOKEN}"}
    refs = [dash["templating"]["list"][0]["datasource"]]
    refs += [x["datasource"] for p in panels(dash) for x in (p, *p["targets"])]
    assert {(r["type"], r["uid"]) for r in refs} == {("influxdb", DATASOURCE_UID)}
    (provider,) = yaml.safe_load(
        (exported / "provisioning" / "dashboards" / "testbed.yaml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == DASHBOARDS_MOUNT


def test_compose_stack() -> None:
    compose = yaml.safe_load((LAB / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"mosquitto", "influxdb", "grafana"} <= set(services)
    mounts = {}
    for svc in services.values():
        for v in svc.get("volumes", []):
            src, dst, *_ = v.split(":")
            if src.startswith("."):
                assert (LAB / src).exists(), f"{src} is mounted but not in lab/"
                mounts[src] = dst
    assert mounts["./grafana/dashboards"] == DASHBOARDS_MOUNT
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./mosquitto/mosquitto.conf"] == "/mosquitto/config/mosquitto.conf"
    env = services["influxdb"]["environment"]
    assert env["DOCKER_INFLUXDB_INIT_MODE"] == "setup"
    assert (env["DOCKER_INFLUXDB_INIT_ORG"], env["DOCKER_INFLUXDB_INIT_BUCKET"]) == \
        (DEFAULT_ORG, DEFAULT_BUCKET)
    assert "INFLUX_TOKEN" in env["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"]
    assert "INFLUX_TOKEN" in services["grafana"]["environment"]
    assert "1883:1883" in services["mosquitto"]["ports"]
    conf = (LAB / "mosquitto" / "mosquitto.conf").read_text()
    assert re.search(r"^listener 1883$", conf, re.M)
    assert re.search(r"^allow_anonymous false$", conf, re.M)
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (LAB / "grafana" / "dashboards" / Path(home).relative_to(DASHBOARDS_MOUNT)).exists()


# ---------------------------------------------------------------- push (stand-in Grafana)

@dataclass
class StandIn:
    """Just enough of Grafana's HTTP API for grafana-client, with every request recorded."""

    auth: str | None = None
    """Expected Authorization header; anything else gets 401."""
    requests: list[tuple[str, str, dict[str, str], Any]] = field(default_factory=list)
    datasources: dict[str, dict[str, Any]] = field(default_factory=dict)
    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    url: str = ""

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if path == "/api/frontend/settings" and method == "GET":
            return 200, {"buildInfo": {"version": "11.6.0"}}
        if m := re.fullmatch(r"/api/datasources/uid/([\w-]+)", path):
            if m[1] not in self.datasources:
                return 404, {"message": "Data source not found"}
            if method == "GET":
                return 200, self.datasources[m[1]]
            if method == "PUT":
                self.datasources[m[1]] = {**self.datasources[m[1]], **body}
                return 200, {"message": "Datasource updated"}
        if path == "/api/datasources" and method == "POST":
            self.datasources[body["uid"]] = {**body, "id": len(self.datasources) + 1}
            return 200, {"message": "Datasource added", "datasource": body}
        if path == "/api/folders" and method == "GET":
            return 200, list(self.folders.values())
        if path == "/api/folders" and method == "POST":
            self.folders[body["uid"]] = {"uid": body["uid"], "title": body["title"]}
            return 200, self.folders[body["uid"]]
        if path == "/api/dashboards/db" and method == "POST":
            uid = body["dashboard"]["uid"]
            if uid in self.dashboards and not body.get("overwrite"):
                return 412, {"message": "version-mismatch"}
            self.dashboards[uid] = body
            return 200, {"status": "success", "uid": uid, "url": f"/d/{uid}/testbed-run"}
        return 404, {"message": f"stand-in has no {method} {path}"}

    def paths(self, method: str) -> list[str]:
        return [p for m, p, _, _ in self.requests if m == method]


@pytest.fixture
def grafana() -> Iterator[StandIn]:
    stand_in = StandIn()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n)) if n else None
            stand_in.requests.append((self.command, self.path, dict(self.headers), body))
            if stand_in.auth is not None and self.headers.get("Authorization") != stand_in.auth:
                status, reply = 401, {"message": "Unauthorized"}
            else:
                status, reply = stand_in.handle(self.command, self.path.split("?")[0], body)
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    stand_in.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield stand_in
    server.shutdown()
    server.server_close()


def test_push_creates_then_updates(grafana: StandIn, dash: dict[str, Any]) -> None:
    grafana.auth = "Bearer tok-123"
    r = push(grafana.url, token="tok-123", influx_url="http://influx.lab:8086",
             influx_token="influx-secret")
    assert r.version == "11.6.0" and r.datasource == "created" and r.folder_created
    assert r.dashboards == (("testbed run", f"{grafana.url}/d/testbed-run/testbed-run"),)
    assert all(h.get("Authorization") == "Bearer tok-123" for *_, h, _ in grafana.requests)
    (_, _, _, ds), = [x for x in grafana.requests if x[:2] == ("POST", "/api/datasources")]
    assert ds["uid"] == DATASOURCE_UID and ds["type"] == "influxdb"
    assert ds["url"] == "http://influx.lab:8086" and ds["access"] == "proxy"
    assert ds["jsonData"] == {"version": "Flux", "organization": DEFAULT_ORG,
                              "defaultBucket": DEFAULT_BUCKET}
    assert ds["secureJsonData"] == {"token": "influx-secret"}
    (folder,) = grafana.folders.values()
    assert folder["title"] == "testbed"
    (upload,) = grafana.dashboards.values()
    assert upload["dashboard"] == dash  # the pushed dashboard is the exported one
    assert upload["overwrite"] is True and upload["folderUid"] == folder["uid"]

    posted = len(grafana.paths("POST"))
    again = push(grafana.url, token="tok-123", influx_url="http://influx.lab:8086")
    assert again.datasource == "updated" and not again.folder_created
    assert again.folder_uid == folder["uid"]
    assert (len(grafana.datasources), len(grafana.folders), len(grafana.dashboards)) == (1, 1, 1)
    assert grafana.paths("PUT") == [f"/api/datasources/uid/{DATASOURCE_UID}"]
    assert grafana.paths("POST")[posted:] == ["/api/dashboards/db"]  # no new source or folder
    # no token the second time: none is sent, so Grafana keeps the one it has
    (put,) = [body for m, _, _, body in grafana.requests if m == "PUT"]
    assert "secureJsonData" not in put and put["url"] == "http://influx.lab:8086"
    assert grafana.datasources[DATASOURCE_UID]["secureJsonData"] == {"token": "influx-secret"}


def test_push_with_user_and_password(grafana: StandIn) -> None:
    grafana.auth = "Basic " + base64.b64encode(b"admin:s3cret").decode()
    grafana.datasources[DATASOURCE_UID] = {"uid": DATASOURCE_UID, "id": 7, "readOnly": True}
    grafana.folders["abc"] = {"uid": "abc", "title": "Lab"}
    r = push(grafana.url + "/", user="admin", password="s3cret", folder="Lab")
    assert r.datasource.startswith("provisioned") and r.folder_uid == "abc"
    assert grafana.paths("PUT") == [] and "/api/folders" not in grafana.paths("POST")
    assert grafana.dashboards["testbed-run"]["folderUid"] == "abc"


def test_push_errors_name_the_url_and_status(grafana: StandIn) -> None:
    grafana.auth = "Bearer right"
    with pytest.raises(DashboardError, match=re.escape(grafana.url) + ".*HTTP 401") as exc:
        push(grafana.url, token="wrong")
    assert isinstance(exc.value, GrafanaError) and exc.value.status == 401
    assert grafana.dashboards == {} and grafana.paths("POST") == []

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(GrafanaError, match=f"cannot reach Grafana at {re.escape(closed)}"):
        push(closed, token="t", timeout=2)

    n = len(grafana.requests)
    for kwargs in ({"token": "t", "user": "u", "password": "p"}, {"user": "u"},
                   {"influx_url": "influxdb:8086"}, {"bucket": ""}):
        with pytest.raises(DashboardError) as bad:
            push(grafana.url, **kwargs)
        assert not isinstance(bad.value, GrafanaError)
    assert len(grafana.requests) == n  # refused before any request


# ---------------------------------------------------------------- CLI

def test_cli_export(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["dashboards", "export", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output
    assert "testbed-run.json" in res.output and "datasources" in res.output
    assert _tree(tmp_path / "g") == _tree(LAB / "grafana")  # CLI defaults = library defaults
    res = runner.invoke(app, ["dashboards", "export", str(tmp_path / "h"),
                              "--influx-url", "influxdb:8086"])
    assert res.exit_code == 2 and "expected http(s)://" in res.output


def test_cli_push(grafana: StandIn) -> None:
    grafana.auth = "Bearer env-token"
    runner = CliRunner()
    env = {"GRAFANA_TOKEN": "env-token", "INFLUX_TOKEN": "influx-env"}
    res = runner.invoke(app, ["dashboards", "push", "--grafana-url", grafana.url,
                              "--folder", "runs"], env=env)
    assert res.exit_code == 0, res.output
    assert "data source created" in res.output and "/d/testbed-run/" in res.output
    assert grafana.datasources[DATASOURCE_UID]["secureJsonData"] == {"token": "influx-env"}
    assert [f["title"] for f in grafana.folders.values()] == ["runs"]

    res = runner.invoke(app, ["dashboards", "push", "--grafana-url", grafana.url],
                        env={"GRAFANA_TOKEN": "nope"})
    assert res.exit_code == 1 and "HTTP 401" in res.output and grafana.url in res.output
    res = runner.invoke(app, ["dashboards", "push", "--grafana-url", grafana.url,
                              "--grafana-user", "admin"], env={"GRAFANA_TOKEN": "",
                                                               "GRAFANA_PASSWORD": ""})
    assert res.exit_code == 2 and "password" in res.output
