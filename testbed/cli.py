"""The `testbed` command line: thin over the package, renders with rich."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler
from rich.table import Table

from . import __version__
from .config import ConfigError, SiteConfig, load_site
from .devices.driver import SETPOINTS, DeviceError, DeviceKind, Reading
from .devices.modbus import scan as sunspec_scan
from .devices.site import SiteEmulators, open_devices

app = typer.Typer(help="Hardware-in-the-loop testbed for transactive energy.", no_args_is_help=True)
devices_app = typer.Typer(help="Serve, discover, read and command devices.", no_args_is_help=True)
app.add_typer(devices_app, name="devices")

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # our errors say it once, plainly
console = Console()
err = Console(stderr=True, soft_wrap=True)  # error lines stay whole, for logs and grep
T = TypeVar("T")

SiteArg = Annotated[str, typer.Argument(help="Site file, or a bundled site name (demo).")]


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; turn the package's errors into a message and an exit code."""
    try:
        return asyncio.run(coro)
    except ConfigError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    except DeviceError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    except OSError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None


def _site(ref: str) -> SiteConfig:
    try:
        return load_site(ref)
    except ConfigError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None


@app.callback(invoke_without_command=True)
def main(version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False) -> None:
    if version:
        console.print(f"testbed {__version__}")
        raise typer.Exit()


# --------------------------------------------------------------------------- serve


@devices_app.command("serve")
def serve(
    site: SiteArg = "demo",
    free_ports: Annotated[bool, typer.Option(help="Serve on free loopback ports instead of the site's.")] = False,
    host: Annotated[str | None, typer.Option(help="Listen on this address instead of the site's.")] = None,
    speed: Annotated[float | None, typer.Option(help="Simulated seconds per real second.")] = None,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds (default: until Ctrl-C).")] = None,
    endpoints_json: Annotated[Path | None, typer.Option("--endpoints-json", help="Also write the endpoint table here (JSON).")] = None,
    live: Annotated[bool, typer.Option(help="Show the emulated physics live (power, SOC, meter).")] = False,
) -> None:
    """Start every emulated device of SITE and serve until Ctrl-C or SIGTERM."""
    cfg = _site(site)
    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)])
    if speed is not None:
        cfg = cfg.model_copy(update={"emulation": cfg.emulation.model_copy(update={"speed": speed})})

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        emulators = SiteEmulators(cfg, free_ports=free_ports, host=host)
        endpoints = await emulators.start()
        try:
            table = Table(title=f"site {cfg.name}: emulated devices")
            for col in ("device", "kind", "prosumer", "endpoint", "unit", "SunSpec models"):
                table.add_column(col)
            for name, ep in endpoints.items():
                dev = emulators.devices.get(name)
                models = ", ".join(str(m) for m in dev.models) if dev else "(not emulated)"
                table.add_row(name, ep.kind.value, ep.prosumer, f"{ep.host}:{ep.port}", str(ep.unit), models)
            console.print(table)
            if endpoints_json:
                endpoints_json.write_text(json.dumps(
                    {n: {"kind": e.kind.value, "prosumer": e.prosumer, "host": e.host, "port": e.port,
                         "unit": e.unit, "protocol": e.protocol, "emulated": e.emulated}
                     for n, e in endpoints.items()}, indent=2))
            console.print(f"serving {len(emulators.devices)} devices; simulated clock x{cfg.emulation.speed:g} "
                          "from " + cfg.emulation.start + "; Ctrl-C to stop", highlight=False)
            if live:
                with Live(_physics_table(emulators), console=console, refresh_per_second=2) as view:
                    loop_end = None if duration is None else loop.time() + duration
                    while not stop.is_set() and (loop_end is None or loop.time() < loop_end):
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), timeout=1.0)
                        view.update(_physics_table(emulators))
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=duration)
        finally:
            await emulators.stop()
        console.print("stopped")

    _run(go())


def _physics_table(emulators: SiteEmulators) -> Table:
    t = emulators.physics.t_s
    table = Table(title=f"simulated {int(t // 3600) % 24:02d}:{int(t // 60) % 60:02d}:{int(t) % 60:02d}")
    for col in ("prosumer", "load W", "PV W", "battery W", "SOC %", "meter W", "import Wh", "export Wh", "V"):
        table.add_column(col, justify="right" if col != "prosumer" else "left")
    for name, pr in emulators.physics.prosumers.items():
        s = pr.state
        bat = s.battery
        table.add_row(
            name, f"{s.load_w:.0f}", f"{s.pv.ac_w:.0f}" if s.pv else "-",
            (f"{bat.power_w:.0f}" + (" [yellow](clamped)[/]" if bat.clamped else "")) if bat else "-",
            f"{bat.soc * 100:.1f}" if bat else "-", f"{s.meter.net_w:.0f}",
            f"{s.meter.import_wh:.0f}", f"{s.meter.export_wh:.0f}", f"{s.meter.voltage_v:.1f}")
    return table


# --------------------------------------------------------------------------- scan


def _parse_hostport(target: str, default_port: int = 502) -> tuple[str, int]:
    host, _, port = target.rpartition(":") if ":" in target else (target, "", "")
    if not port:
        return target, default_port
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise typer.BadParameter(f"{target!r}: expected HOST or HOST:PORT") from None


@devices_app.command("scan")
def scan(
    target: Annotated[str, typer.Argument(help="HOST[:PORT] (port defaults to 502).")],
    unit: Annotated[int, typer.Option(help="Modbus unit id.", min=1, max=247)] = 1,
    timeout: Annotated[float, typer.Option(help="Per-request timeout, seconds.")] = 1.0,
) -> None:
    """SunSpec discovery: find the map and list its models."""
    host, port = _parse_hostport(target)
    result = _run(sunspec_scan(host, port, unit, timeout))
    common = result["common"]
    console.print(f"[bold]{host}:{port} unit {unit}[/]: SunSpec map at {result['base']}; "
                  f"{common.get('Mn')} {common.get('Md')} SN {common.get('SN')}; "
                  f"kind: {result['kind'].value if result['kind'] else 'unknown'}", highlight=False)
    table = Table()
    for col in ("model", "name", "address", "length"):
        table.add_column(col)
    for m in result["models"]:
        table.add_row(str(m.id), m.name, str(m.address), str(m.length))
    console.print(table)


# --------------------------------------------------------------------------- read / write


def _reading_table(r: Reading) -> Table:
    table = Table(title=f"{r.device} ({r.kind.value})")
    table.add_column("point")
    table.add_column("value", justify="right")
    for k, v in r.values.items():
        table.add_row(k, "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v))
    for k, v in r.status.items():
        table.add_row(f"[dim]status.{k}[/]", str(v))
    return table


@devices_app.command("read")
def read(
    site: SiteArg,
    name: Annotated[str, typer.Argument(help="Device name in the site file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Read one device of SITE over its protocol."""
    cfg = _site(site)

    async def go() -> Reading:
        cfg.find(name)
        dev = open_devices(cfg, [name])[name]
        try:
            await dev.connect()
            return await dev.read()
        finally:
            await dev.close()

    r = _run(go())
    if as_json:
        print(json.dumps({"device": r.device, "kind": r.kind.value, "time": r.time,
                          "values": r.values, "status": r.status}))
    else:
        console.print(_reading_table(r))


@devices_app.command("write", context_settings={"ignore_unknown_options": True})  # VALUE may be negative
def write(
    site: SiteArg,
    name: Annotated[str, typer.Argument(help="Device name in the site file.")],
    point: Annotated[str, typer.Argument(help="Setpoint (limit_pct, limit_enabled, power_w) or MODEL.POINT.")],
    value: Annotated[str, typer.Argument(help="Value in engineering units.")],
) -> None:
    """Command one device of SITE, then read it back."""
    cfg = _site(site)
    try:
        number: float = float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a number", param_hint="VALUE") from None

    async def go() -> Reading:
        cfg.find(name)
        dev = open_devices(cfg, [name])[name]
        try:
            await dev.connect()
            await dev.write(point, number)
            return await dev.read()
        finally:
            await dev.close()

    r = _run(go())
    console.print(f"[green]ok[/]: {name}.{point} = {number:g}", highlight=False)
    console.print(_reading_table(r))


@devices_app.command("points")
def points() -> None:
    """List the neutral setpoints each device kind accepts."""
    table = Table()
    for col in ("kind", "setpoint", "unit", "meaning"):
        table.add_column(col)
    for kind in DeviceKind:
        for spec in SETPOINTS[kind].values():
            table.add_row(kind.value, spec.name, spec.unit, spec.description)
    console.print(table)
