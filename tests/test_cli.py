"""The CLI end to end: `devices serve` in its own process, read/write/scan against it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from testbed.cli import app

runner = CliRunner()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path: Path):
    """A two-prosumer site on fixed free ports, served by `testbed devices serve`."""
    p1, p2 = free_port(), free_port()
    site = tmp_path / "lab.yaml"
    site.write_text(f"""\
name: lab
emulation: {{start: "12:00", speed: 1.0, seed: 1}}
prosumers:
  - name: a
    devices:
      - {{name: a-pv, kind: pv, port: {p1}, unit: 1}}
      - {{name: a-bat, kind: battery, port: {p1}, unit: 2}}
      - {{name: a-meter, kind: meter, port: {p1}, unit: 3}}
  - name: b
    devices:
      - {{name: b-meter, kind: meter, port: {p2}, unit: 1}}
""")
    endpoints = tmp_path / "endpoints.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "testbed", "devices", "serve", str(site), "--endpoints-json", str(endpoints)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "200"})
    deadline = time.monotonic() + 30
    while not endpoints.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"serve did not start: {proc.stdout.read()}")
        time.sleep(0.05)
    yield site, json.loads(endpoints.read_text()), proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_serve_read_write_scan_and_stop_on_sigterm(served):
    site, endpoints, proc = served
    assert endpoints["a-bat"]["unit"] == 2 and endpoints["b-meter"]["port"] != endpoints["a-pv"]["port"]

    r = runner.invoke(app, ["devices", "read", str(site), "a-pv", "--json"])
    assert r.exit_code == 0, r.output
    reading = json.loads(r.output)
    assert reading["kind"] == "pv" and reading["values"]["rating_w"] == 5000
    assert reading["values"]["p_w"] > 4000  # noon, clear sky, 5 kW inverter

    r = runner.invoke(app, ["devices", "write", str(site), "a-bat", "power_w", "-2500"])
    assert r.exit_code == 0, r.output
    assert "ok" in r.output and "setpoint_w" in r.output
    time.sleep(1.5)  # one tick of the real-time clock
    r = runner.invoke(app, ["devices", "read", str(site), "a-bat", "--json"])
    values = json.loads(r.output)["values"]
    assert values["setpoint_w"] == -2500 and values["p_w"] == -2500

    r = runner.invoke(app, ["devices", "write", str(site), "a-bat", "power_w", "99999"])
    assert r.exit_code == 1 and "outside -5000 (charge) .. +5000 (discharge) W" in r.output

    r = runner.invoke(app, ["devices", "write", str(site), "a-pv", "123.WMaxLimPct", "150"])
    assert r.exit_code == 1 and "illegal data value" in r.output

    port = endpoints["a-pv"]["port"]
    r = runner.invoke(app, ["devices", "scan", f"127.0.0.1:{port}", "--unit", "2"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "SunSpec map at 40000" in r.output and "kind: battery" in r.output
    assert "802" in r.output and "storage_basic" in r.output

    r = runner.invoke(app, ["devices", "serve", str(site), "--duration", "1"])  # ports taken
    assert r.exit_code == 1
    assert f"cannot serve a-pv, a-bat, a-meter: cannot listen on 127.0.0.1:{port}: Address already in use" in r.output

    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    assert "stopped" in out and "a-meter" in out


def test_read_of_unknown_device_and_bad_site(tmp_path):
    r = runner.invoke(app, ["devices", "read", "demo", "nope"])
    assert r.exit_code == 2 and "site 'demo' has no device 'nope'" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nprosumers: []\n")
    r = runner.invoke(app, ["devices", "read", str(bad), "x"])
    assert r.exit_code == 2 and "bad.yaml:2: prosumers: List should have at least 1 item" in r.output


def test_scan_of_a_closed_port_is_a_clear_error():
    r = runner.invoke(app, ["devices", "scan", f"127.0.0.1:{free_port()}"])
    assert r.exit_code == 1 and "cannot connect" in r.output


def test_read_of_a_stopped_device_is_a_clear_error():
    r = runner.invoke(app, ["devices", "read", "demo", "house-1-meter"])
    assert r.exit_code == 1 and "house-1-meter (127.0.0.1:15021 unit 3)" in r.output


def test_opcua_certs_serve_read_write(tmp_path):
    """`devices certs`, then a site mixing Modbus and OPC UA served and commanded by the CLI."""
    r = runner.invoke(app, ["devices", "certs", str(tmp_path / "certs")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for f in ("server/cert.der", "server/key.pem", "client/cert.der", "client/key.pem",
              "trusted/clients/client.der", "trusted/servers/server.der"):
        assert (tmp_path / "certs" / f).is_file(), f
    assert oct((tmp_path / "certs/client/key.pem").stat().st_mode & 0o777) == "0o600"

    p_mb, p_ua = free_port(), free_port()
    site = tmp_path / "mixed.yaml"
    site.write_text(f"""\
name: mixed
opcua: {{certs: certs, username: lab, password: pw-1}}
prosumers:
  - name: a
    devices:
      - {{name: a-pv, kind: pv, port: {p_mb}, unit: 1}}
      - {{name: a-bat, kind: battery, protocol: opcua, port: {p_ua}}}
      - {{name: a-meter, kind: meter, protocol: opcua, port: {p_ua}}}
""")
    endpoints = tmp_path / "endpoints.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "testbed", "devices", "serve", str(site), "--endpoints-json", str(endpoints)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + 30
        while not endpoints.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"serve did not start: {proc.stdout.read()}")
            time.sleep(0.05)
        eps = json.loads(endpoints.read_text())
        assert eps["a-bat"] == {"kind": "battery", "prosumer": "a", "host": "127.0.0.1", "port": p_ua,
                                "unit": None, "protocol": "opcua", "emulated": True}

        r = runner.invoke(app, ["devices", "read", str(site), "a-bat", "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["values"]["capacity_wh"] == 10000
        r = runner.invoke(app, ["devices", "write", str(site), "a-bat", "power_w", "-1500"])
        assert r.exit_code == 0 and "ok" in r.output, r.output
        r = runner.invoke(app, ["devices", "read", str(site), "a-bat", "--json"])
        assert json.loads(r.output)["values"]["setpoint_w"] == -1500
        r = runner.invoke(app, ["devices", "write", str(site), "a-bat", "power_w", "-7000"])
        assert r.exit_code == 1
        assert (f"error: a-bat (opc.tcp://127.0.0.1:{p_ua} Devices/a-bat): power_w -7000 W is outside "
                "-5000..5000 W (range from the server's EURange); nothing written") in r.output
        r = runner.invoke(app, ["devices", "read", str(site), "a-pv", "--json"])  # Modbus, same site
        assert r.exit_code == 0 and json.loads(r.output)["kind"] == "pv"

        site.write_text(site.read_text().replace("password: pw-1", "password: wrong"))
        r = runner.invoke(app, ["devices", "read", str(site), "a-meter"])
        assert r.exit_code == 1
        assert "refused (BadUserAccessDenied): wrong username or password (user 'lab'" in r.output
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    assert f"opc.tcp://127.0.0.1:{p_ua}/" in out and "Devices/a-bat" in out
