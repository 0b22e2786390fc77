"""The `testbed` command line: thin over the package, renders with rich."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from . import __version__
from .config import ConfigError, SiteConfig, load_site
from .devices.driver import SETPOINTS, DeviceError, DeviceKind, Reading
from .devices.modbus import SerialSettings
from .devices.modbus import scan as sunspec_scan
from .devices.site import SiteEmulators, open_devices

app = typer.Typer(help="Hardware-in-the-loop testbed for transactive energy.", no_args_is_help=True)
devices_app = typer.Typer(help="Serve, discover, read and command devices.", no_args_is_help=True)
app.add_typer(devices_app, name="devices")

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # our errors say it once, plainly
logging.getLogger("asyncua").setLevel(logging.CRITICAL)
console = Console()
err = Console(stderr=True, soft_wrap=True)  # error lines stay whole, for logs and grep
T = TypeVar("T")

SiteArg = Annotated[str, typer.Argument(help="Site file, or a bundled site name (demo).")]


def _fail(exc: BaseException, code: int) -> NoReturn:
    """Print an error the way every command does and exit with `code` (2: bad input)."""
    err.print(f"[red]error:[/] {escape(' '.join(str(exc).split()))}", highlight=False)
    raise typer.Exit(code) from None


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; turn the package's errors into a message and an exit code."""
    try:
        return asyncio.run(coro)
    except ConfigError as exc:
        _fail(exc, 2)
    except DeviceError as exc:
        _fail(exc, 1)
    except OSError as exc:
        _fail(exc, 1)


def _site(ref: str) -> SiteConfig:
    try:
        return load_site(ref)
    except ConfigError as exc:
        _fail(exc, 2)


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
    helics: Annotated[str | None, typer.Option("--helics", help="Join the HELICS broker at HOST:PORT as an emulator shard: the physics advance when the run's inputs arrive (README, HELICS).")] = None,
    shard: Annotated[str | None, typer.Option("--shard", help="K/N: serve shard K of N of the site's emulated prosumers (with --helics).")] = None,
    seed: Annotated[int | None, typer.Option(help="Override the site's emulation seed (a run's --seed).")] = None,
    advertise: Annotated[str | None, typer.Option(help="With --helics: the host name the run reaches this shard's devices at (default: the listen address).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No endpoint table.")] = False,
) -> None:
    """Start every emulated device of SITE and serve until Ctrl-C or SIGTERM; with
    --helics, serve shard K/N as a HELICS federate until the run ends."""
    cfg = _site(site)
    if seed is not None:
        cfg = cfg.model_copy(update={"emulation": cfg.emulation.model_copy(update={"seed": seed})})
    if shard is not None and helics is None:
        _fail(ValueError("--shard K/N needs --helics HOST:PORT (the broker the run joins)"), 2)
    if helics is not None:
        _serve_shard(cfg, helics, shard or "1/1", free_ports=free_ports, host=host,
                     advertise=advertise, endpoints_json=endpoints_json, quiet=quiet)
        return
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
            for col in ("device", "kind", "prosumer", "protocol", "endpoint", "unit / node", "SunSpec models"):
                table.add_column(col)
            for name, ep in endpoints.items():
                dev = emulators.devices.get(name)
                models = ", ".join(str(m) for m in dev.models) if dev else "(not emulated)"
                opcua = ep.protocol == "opcua"
                table.add_row(name, ep.kind.value, ep.prosumer, ep.protocol,
                              f"opc.tcp://{ep.host}:{ep.port}/" if opcua else ep.where,
                              f"Devices/{name}" if opcua else str(ep.unit), models)
            console.print(table)
            if endpoints_json:  # written whole, then renamed: a reader never sees half a file
                partial = endpoints_json.with_name(endpoints_json.name + ".partial")
                partial.write_text(json.dumps(
                    {n: {"kind": e.kind.value, "prosumer": e.prosumer, "host": e.host, "port": e.port,
                         "unit": e.unit, "protocol": e.protocol, "emulated": e.emulated,
                         **({"transport": e.transport, "serial_port": e.serial_port}
                            if e.protocol == "modbus" else {})}
                     for n, e in endpoints.items()}, indent=2))
                partial.replace(endpoints_json)
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


def _serve_shard(cfg: Any, broker: str, shard: str, *, free_ports: bool, host: str | None,
                 advertise: str | None, endpoints_json: Path | None, quiet: bool) -> None:
    """`devices serve --helics`: one emulator shard as a HELICS federate."""
    from .cosim.errors import CosimError, need_helics

    try:
        need_helics()
    except CosimError as exc:
        _fail(exc, 2)
    from .cosim.shard import Shard, parse_shard

    try:
        k, n = parse_shard(shard)
        sh = Shard(cfg, k, n, broker, free_ports=free_ports, host=host, advertise=advertise)
    except CosimError as exc:
        _fail(exc, 2)

    async def go() -> int:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        def stop() -> None:  # a blocked time request returns at once, then the task ends
            sh.fed.abort("stopped by a signal")
            task.cancel()  # type: ignore[union-attr]

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        endpoints = await sh.start(endpoints_json)
        try:
            if not quiet:
                console.print(f"shard {k}/{n} of site {cfg.name}: {len(sh.emulators.devices)} "
                              f"devices of {', '.join(p.name for p in sh.site.prosumers)}; "
                              f"federate of {broker}", highlight=False)
                for name, ep in endpoints.items():
                    console.print(f"  {name}: {ep.address}", highlight=False)
            return await sh.run()
        finally:
            await sh.stop()

    try:
        steps = _run(go())
    except CosimError as exc:
        _fail(exc, 1)
    except asyncio.CancelledError:
        console.print(f"shard {k}/{n}: stopped by a signal")
        raise typer.Exit(0) from None
    console.print(f"shard {k}/{n}: the run ended after {steps} steps", highlight=False)


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
    target: Annotated[str, typer.Argument(
        help="HOST[:PORT] (port defaults to 502), or a serial port (/dev/ttyUSB0) with --rtu.")],
    unit: Annotated[int, typer.Option(help="Modbus unit id.", min=1, max=247)] = 1,
    timeout: Annotated[float, typer.Option(help="Per-request timeout, seconds.")] = 1.0,
    rtu: Annotated[bool, typer.Option(
        help="Modbus RTU: on the serial port TARGET, or RTU framing to the gateway at HOST:PORT.")] = False,
    baudrate: Annotated[int, typer.Option(help="Serial port: baud rate.")] = 19200,
    parity: Annotated[str, typer.Option(help="Serial port: N, E or O.")] = "E",
    stopbits: Annotated[int, typer.Option(help="Serial port: 1 or 2.", min=1, max=2)] = 1,
) -> None:
    """SunSpec discovery: find the map and list its models."""
    serial = None
    if rtu and (target.startswith("/") or target.upper().startswith("COM")):
        if parity.upper() not in ("N", "E", "O"):
            raise typer.BadParameter(f"{parity!r}: expected N, E or O", param_hint="--parity")
        serial = SerialSettings(target, baudrate, 8, parity.upper(), stopbits)
        host, port = "", 0
    else:
        host, port = _parse_hostport(target)
    result = _run(sunspec_scan(host, port, unit, timeout, framer="rtu" if rtu else "socket",
                               serial=serial))
    common = result["common"]
    console.print(f"[bold]{result['endpoint']} unit {unit}[/]: SunSpec map at {result['base']}; "
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
    point: Annotated[str, typer.Argument(
        help="Setpoint (limit_pct, limit_enabled, power_w), MODEL.POINT or MODEL.GROUP[i].POINT.")],
    value: Annotated[str, typer.Argument(
        help="Value in engineering units (an enum point of a Modbus device also takes its symbol).")],
) -> None:
    """Command one device of SITE, then read it back."""
    cfg = _site(site)
    number: float | str
    try:
        number = float(value)
    except ValueError:
        modbus = any(d.name == name and d.protocol == "modbus" for _, d in cfg.devices())
        symbol = "." in point and modbus
        if not symbol:
            raise typer.BadParameter(f"{value!r} is not a number", param_hint="VALUE") from None
        number = value  # e.g. 705.Ena ENABLED: the driver checks it against the point's symbols

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
    shown = f"{number:g}" if isinstance(number, float) else number
    console.print(f"[green]ok[/]: {name}.{point} = {shown}", highlight=False)
    console.print(_reading_table(r))


@devices_app.command("certs")
def certs(
    directory: Annotated[Path, typer.Argument(help="Folder to write (the site's opcua.certs).")],
    host: Annotated[list[str] | None, typer.Option(help="Extra DNS name or IP for the certificates (repeatable).")] = None,
    force: Annotated[bool, typer.Option(help="Replace existing server and client certificates.")] = False,
    client: Annotated[str | None, typer.Option(help="Also make a client certificate NAME for another OPC UA client, trusted by the emulators.")] = None,
    uri: Annotated[str | None, typer.Option(help="Application URI of that client (must match what it sends).")] = None,
) -> None:
    """Make the OPC UA certificates a site's `opcua.certs` points to."""
    from .devices.opcua import CERTS_LAYOUT, add_trusted_client, make_certificates

    if (client is None) != (uri is None):
        raise typer.BadParameter("--client and --uri go together", param_hint="--client/--uri")
    hosts = tuple(host or ())
    try:
        made = make_certificates(directory, hosts=hosts, force=force)
        if client is not None and uri is not None:
            made[client] = add_trusted_client(directory, client, uri, hosts=hosts)
    except OSError as exc:
        err.print(f"[red]error:[/] {directory}: {exc}", highlight=False)
        raise typer.Exit(1) from None
    table = Table(title=f"OPC UA certificates in {directory}")
    for col in ("role", "certificate", "private key"):
        table.add_column(col)
    for role, folder in made.items():
        table.add_row(role, str(folder / "cert.der"), str(folder / "key.pem"))
    console.print(table)
    console.print(f"emulators trust the client certificates in {directory / CERTS_LAYOUT['trusted_clients']}; "
                  f"the driver trusts the server certificates in {directory / CERTS_LAYOUT['trusted_servers']}.\n"
                  f"In the site file: opcua: {{certs: {directory}, username: ..., password: ...}}",
                  highlight=False)


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


# ----------------------------------------------------------------------------- ledger
ledger_app = typer.Typer(help="The permissioned Proof-of-Energy ledger.", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")
DbArg = Annotated[Path, typer.Argument(help="A node's ledger database (nodes/<name>.db).")]


def _open_chain(db: Path) -> Any:
    """A node's chain, replayed from its store opened read-only (the file is not touched)."""
    from .ledger.chain import Chain
    from .ledger.errors import Rejected

    if not db.is_file():
        err.print(f"[red]error:[/] {db}: no such ledger database", highlight=False)
        raise typer.Exit(2)
    try:
        return Chain.open(db, readonly=True)
    except (Rejected, ValueError) as exc:
        err.print(f"[red]error:[/] {db}: {exc} (run `testbed ledger verify {db}`)",
                  highlight=False)
        raise typer.Exit(1) from None
    except Exception as exc:  # a damaged store is bad input, never a traceback
        err.print(f"[red]error:[/] {db}: unreadable ({type(exc).__name__}: {exc}); run "
                  f"`testbed ledger verify {db}`", highlight=False)
        raise typer.Exit(1) from None


@ledger_app.command("init")
def ledger_init(
    site: SiteArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for keys, genesis, node DBs.")] = Path("ledger"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing chain.")] = False,
    validators: Annotated[int | None, typer.Option(
        "--validators", min=1, max=64,
        help="Validators (BFT: n tolerates f < n/3 faulty). Default: every prosumer, at "
             "least 4 (operator nodes make up the rest).")] = None,
) -> None:
    """Keys, registry (CSM-DB) and genesis for SITE's prosumers; one node DB per validator."""
    from .ledger.identity import address_of
    from .ledger.setup import init_ledger
    from .ledger.validators import fault_note

    cfg = _site(site)
    n = validators if validators is not None else max(4, len(cfg.prosumers))
    try:
        layout = init_ledger(cfg, out, force=force, validators=n)
    except FileExistsError as exc:
        _fail(exc, 2)
    g = layout.genesis()
    table = Table(title=f"chain {g.hash[:16]}… ({cfg.name})")
    for col in ("name", "address", "roles", "mode", "node database"):
        table.add_column(col)
    for e in g.header["registry"]:
        db = str(layout.db_path(e["name"])) if "validator" in e["roles"] else ""
        table.add_row(e["name"], address_of(bytes.fromhex(e["public_key"])),
                      ",".join(e["roles"]), e["mode"], db)
    console.print(table)
    console.print(f"genesis: {layout.genesis_path}   keys: {layout.root / 'keys'} (private, 0600)")
    note = fault_note(len(layout.validators()))
    if len(layout.validators()) < 4:
        err.print(f"[yellow]warning:[/] {note}", highlight=False)
    else:
        console.print(note, highlight=False)


@ledger_app.command("verify")
def ledger_verify(
    db: DbArg,
    genesis: Annotated[Path | None, typer.Option(help="Expected genesis.json (pins the chain id).")] = None,
    against: Annotated[Path | None, typer.Option(help="A peer's store or a head certificate (`ledger head`): catches deleted last blocks.")] = None,
) -> None:
    """Recompute every hash, signature, election and contract result. Exit 1 at the first bad height."""
    from .ledger.blocks import Block
    from .ledger.chain import load_against, verify_store
    from .ledger.errors import Rejected

    expected = None
    if genesis is not None:
        try:
            expected = Block.parse(genesis.read_bytes().strip(), genesis=True)
        except (OSError, Rejected) as exc:
            _fail(ValueError(f"{genesis}: not a genesis block ({exc})"), 2)
    if not db.exists():
        err.print(f"[red]error:[/] {db}: no such ledger database", highlight=False)
        raise typer.Exit(2)
    try:
        other = load_against(against) if against is not None else None
        report = verify_store(db, genesis=expected, against=other)
    except ValueError as exc:
        _fail(ValueError(f"--against: {exc}"), 2)
    if not report.ok:
        where = "" if report.height is None else f" at height {report.height}"
        err.print(f"[red]FAILED[/]{where}: {report.error}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"[green]ok[/]: chain {report.chain_id[:16]}…, heights 0-{report.height}, "
                  f"{report.txs} transactions verified", highlight=False)


@ledger_app.command("head")
def ledger_head(
    db: DbArg,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the head certificate here (default: stdout).")] = None,
) -> None:
    """The store's head block with its commit certificate: keep it to catch a later truncation
    with `ledger verify --against`."""
    from .ledger.chain import head_certificate

    try:
        raw = head_certificate(db).encode()
    except (ValueError, OSError) as exc:
        _fail(exc, 1)
    if out is None:
        typer.echo(raw.decode())
    else:
        out.write_bytes(raw + b"\n")
        console.print(f"head certificate written to {out}")


@ledger_app.command("show")
def ledger_show(
    db: DbArg,
    height: Annotated[int | None, typer.Option("--height", help="Show one block's transactions.")] = None,
    last: Annotated[int, typer.Option(help="Blocks to list.")] = 20,
) -> None:
    """Blocks (proposer, CPF, round, transactions) or one block in detail."""
    from .ledger import messages
    from .ledger.blocks import Block

    chain = _open_chain(db)
    names = {a: e.name for a, e in chain.state.identities.items()}
    store = chain.store
    if height is None:
        table = Table(title=f"chain {chain.id[:16]}…, height {chain.height}")
        for col in ("height", "time (UTC)", "proposer", "round", "CPF", "txs", "hash"):
            table.add_column(col)
        for h in range(max(1, chain.height - last + 1), chain.height + 1):
            b = store.block(h)
            blk = Block.parse(b.raw)
            table.add_row(str(h), messages.format_date(blk.time),
                          names.get(blk.proposer, blk.proposer), str(blk.round),
                          f"{blk.header['evidence']['cpf']:.4f}", str(blk.header["txs"]),
                          b.hash[:16])
        console.print(table)
        return
    b = store.block(height)
    if b is None:
        err.print(f"[red]error:[/] {db} has no block {height} (height {chain.height})")
        raise typer.Exit(2)
    blk = Block.parse(b.raw, genesis=height == 0)
    console.print_json(data=blk.header)
    table = Table(title=f"block {height}: {len(b.txs)} transactions")
    for col in ("#", "operation", "from", "date", "parameters", "id"):
        table.add_column(col, overflow="fold")
    for i, (tid, raw) in enumerate(b.txs):
        m = messages.parse(raw)
        table.add_row(str(i), m.operation, names.get(m.client_id, m.client_id), m.date,
                      json.dumps(m.parameters, sort_keys=True)[:120], tid[:16])
    console.print(table)


@ledger_app.command("wallets")
def ledger_wallets(db: DbArg) -> None:
    """Account balances derived from the chain (EUR)."""
    from .ledger.state import MICRO, POOL

    chain = _open_chain(db)
    names = {a: e.name for a, e in chain.state.identities.items()} | {POOL: "(incentive pool)"}
    table = Table(title=f"wallets at height {chain.height}")
    table.add_column("account")
    table.add_column("address")
    table.add_column("balance EUR", justify="right")
    for address, amount in chain.wallets().items():
        table.add_row(names.get(address, "(pseudonym)"), address, f"{amount / MICRO:,.6f}")
    console.print(table)


def _node_started(node: Any) -> None:
    from .ledger.validators import fault_note

    console.print(f"node {node.name} ({node.key.address}) at height {node.chain.height}; "
                  f"{fault_note(node.n)}", highlight=False)


@ledger_app.command("reveal")
def ledger_reveal(
    db: DbArg,
    audit_key: Annotated[Path, typer.Option("--audit-key", help="The auditor's key (keys/audit.key made by `ledger init`).")],
) -> None:
    """Map every pseudonym on the chain back to its owner (needs the audit key), with the
    owners' wallets including what their pseudonyms hold. Exit 1 if the key opens none."""
    from .ledger.pseudonyms import load_audit_key, reveal
    from .ledger.state import MICRO

    try:
        key = load_audit_key(audit_key)
    except ValueError as exc:
        _fail(exc, 2)
    chain = _open_chain(db)
    found = reveal(chain.state, key)
    table = Table(title=f"pseudonyms at height {chain.height}")
    for col in ("pseudonym", "owner", "owner address", "balance EUR"):
        table.add_column(col)
    totals: dict[str, int] = {}
    for r in found:
        table.add_row(r.pseudonym, r.owner_name or "(unknown: not this audit key)",
                      r.owner or "", f"{r.balance / MICRO:,.6f}")
        if r.owner is not None:
            totals[r.owner] = totals.get(r.owner, 0) + r.balance
    console.print(table)
    if not found:
        console.print("no pseudonyms on this chain")
        return
    owners = Table(title="owners: identity wallet + pseudonym wallets")
    for col in ("owner", "identity EUR", "pseudonyms EUR", "total EUR"):
        owners.add_column(col, justify="right" if "EUR" in col else "left")
    for owner, held in sorted(totals.items()):
        own = chain.state.balance(owner)
        owners.add_row(chain.state.identities[owner].name, f"{own / MICRO:,.6f}",
                       f"{held / MICRO:,.6f}", f"{(own + held) / MICRO:,.6f}")
    console.print(owners)
    if not totals:
        err.print(f"[red]error:[/] {audit_key} opens none of the {len(found)} pseudonyms "
                  "(not this chain's audit key)", highlight=False)
        raise typer.Exit(1)


@ledger_app.command("node")
def ledger_node(
    folder: Annotated[Path, typer.Argument(help="Folder made by `testbed ledger init`.")],
    name: Annotated[str, typer.Argument(help="Validator (prosumer) name.")],
    bus: Annotated[str, typer.Option(help="Broker URL (mqtt://, mqtts://user:pass@host:port).")],
    site: Annotated[str, typer.Option(help="Site name in the topic scheme.")] = "demo",
    block_interval: Annotated[float, typer.Option(help="Seconds between blocks.")] = 0.5,
) -> None:
    """Run one validator node until interrupted (SIGINT/SIGTERM)."""
    from .bus.client import BusError
    from .ledger.node import run_node

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        node = await run_node(str(folder), name, bus_url=bus, site=site,
                              block_interval_s=block_interval, stop=stop,
                              on_start=_node_started)
        console.print(f"node {name} stopped at height {node.chain.height}")

    try:
        _run(go())
    except (BusError, ValueError) as exc:
        _fail(exc, 1)


# --------------------------------------------------------------------------- grid

grid_app = typer.Typer(help="The DSO check on the site's pandapower feeder.", no_args_is_help=True)
app.add_typer(grid_app, name="grid")
LIGHT_STYLE = {"green": "green", "amber": "yellow", "red": "red"}


@grid_app.command("feeders")
def grid_feeders() -> None:
    """List the bundled LV feeders a site's `grid.network` can name."""
    from .grid.network import FEEDERS

    t = Table("name", "feeder")
    for name, (_, desc) in FEEDERS.items():
        t.add_row(name, desc)
    console.print(t)


@grid_app.command("check")
def grid_check(
    site: SiteArg,
    inject: Annotated[list[str], typer.Option(
        "--inject", "-i", help="PROSUMER=W net injection (+ export, - import); repeatable.")] = [],  # noqa: B006
    background: Annotated[float | None, typer.Option(
        help="Scale of the network's own loads (default: the site's grid.background).")] = None,
    detail: Annotated[bool, typer.Option(help="Print every bus voltage.")] = False,
) -> None:
    """Run one power flow with the given injections: connections, voltages, loadings, light."""
    from .grid import GridError
    from .grid.feeder import checker_for

    s = _site(site)
    base: dict[str, float] = {}
    for item in inject:
        name, sep, value = item.partition("=")
        try:
            base[name] = base.get(name, 0.0) + float(value)
        except ValueError:
            sep = ""
        if not sep:
            err.print(f"[red]error:[/] --inject {item!r}: expected PROSUMER=WATTS, e.g. "
                      "house-1=3500", highlight=False)
            raise typer.Exit(2) from None
    try:
        checker = checker_for(s)
        report = checker.check(base, background=s.grid.background if background is None
                               else background)
    except GridError as exc:
        _fail(exc, 2)
    conn = Table("prosumer", "bus", "mapping", "injection W", "voltage p.u.",
                 title=f"{s.name} on {s.grid.network}")
    volts = report.voltages()
    for c in checker.connections:
        conn.add_row(c.prosumer, c.label, "auto" if c.automatic else "site file",
                     f"{base.get(c.prosumer, 0.0):,.0f}", f"{volts.get(c.label, float('nan')):.4f}")
    console.print(conn)
    style = LIGHT_STYLE[str(report.light)]
    lim = checker.limits
    console.print(f"[{style}]{str(report.light).upper()}[/]  V {report.vm_min_pu:.4f}-"
                  f"{report.vm_max_pu:.4f} p.u. (hard {lim.vm_min_pu}-{lim.vm_max_pu}, "
                  f"planning {lim.plan_vm_min_pu}-{lim.plan_vm_max_pu}); line max "
                  f"{report.max_line_pct:.1f} %, transformer max {report.max_trafo_pct:.1f} %; "
                  f"losses {report.losses_w:,.0f} W; import {report.import_w:,.0f} W"
                  + ("" if report.converged else f"\n{report.reason}"), highlight=False)
    if report.violations:
        vt = Table("band", "kind", "element", "value", "limit")
        for v in report.violations:
            vt.add_row(v.band, str(v.kind), v.element, f"{v.value:.4f}", f"{v.limit:g}")
        console.print(vt)
    if detail:
        bt = Table("bus", "V p.u.")
        for bus, v in volts.items():
            bt.add_row(bus, f"{v:.5f}")
        console.print(bt)
    raise typer.Exit(0 if report.light != "red" else 1)


# --------------------------------------------------------------------------- run


# --- report (issue 8): `testbed report RUN` -----------------------------------------

@app.command("report")
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (runs/<run-id>).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write the HTML "
                                             "(default: RUN/report.html).")] = None,
) -> None:
    """Write a run's self-contained HTML report (plots, KPIs, verdicts; works offline)."""
    from .dashboards.report import ReportError, write_report

    try:
        path = write_report(run_dir, out)
    except ReportError as exc:
        _fail(exc, 2)
    except OSError as exc:
        _fail(exc, 1)
    console.print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB)", highlight=False)

# --- dashboards (issue 8): `testbed dashboards export|push` ---------------------------
dashboards_app = typer.Typer(help="Grafana dashboards over the runs' InfluxDB time series.",
                             no_args_is_help=True)
app.add_typer(dashboards_app, name="dashboards")
InfluxUrlOpt = Annotated[str, typer.Option("--influx-url", help="InfluxDB as Grafana reaches "
                                           "it (the lab's compose service by default).")]
InfluxOrgOpt = Annotated[str, typer.Option("--influx-org", help="InfluxDB organisation.")]
InfluxBucketOpt = Annotated[str, typer.Option("--influx-bucket", help="InfluxDB bucket.")]


@dashboards_app.command("export")
def dashboards_export(
    folder: Annotated[Path, typer.Argument(help="Folder for dashboards/ and provisioning/ "
                                           "(the lab stack mounts lab/grafana).")],
    influx_url: InfluxUrlOpt = "http://influxdb:8086",
    influx_org: InfluxOrgOpt = "testbed",
    influx_bucket: InfluxBucketOpt = "testbed",
) -> None:
    """Write the dashboards' JSON and Grafana provisioning files (data source, file provider)."""
    from .dashboards.grafana import DashboardError, export

    try:
        files = export(folder, influx_url=influx_url, org=influx_org, bucket=influx_bucket)
    except DashboardError as exc:
        _fail(exc, 2)
    except OSError as exc:
        _fail(exc, 1)
    for f in files:
        console.print(f"wrote {f}", highlight=False)


@dashboards_app.command("push")
def dashboards_push(
    grafana_url: Annotated[str, typer.Option("--grafana-url", envvar="GRAFANA_URL",
                                             help="Grafana base URL, e.g. http://localhost:3000.")],
    grafana_token: Annotated[str | None, typer.Option(
        "--grafana-token", envvar="GRAFANA_TOKEN", help="Service account token.")] = None,
    grafana_user: Annotated[str | None, typer.Option(
        "--grafana-user", help="Admin user (instead of a token).")] = None,
    grafana_password: Annotated[str | None, typer.Option(
        "--grafana-password", envvar="GRAFANA_PASSWORD", help="Password of --grafana-user.")
    ] = None,
    folder: Annotated[str, typer.Option("--folder", help="Grafana folder title.")] = "testbed",
    influx_url: InfluxUrlOpt = "http://influxdb:8086",
    influx_token: Annotated[str | None, typer.Option(
        "--influx-token", envvar="INFLUX_TOKEN", help="InfluxDB token for the data source "
        "(kept as is when omitted and the data source exists).")] = None,
    influx_org: InfluxOrgOpt = "testbed",
    influx_bucket: InfluxBucketOpt = "testbed",
) -> None:
    """Create or update the InfluxDB data source, the folder and the dashboards in a Grafana."""
    from .dashboards.grafana import DashboardError, GrafanaError, push

    try:
        r = push(grafana_url, token=grafana_token, user=grafana_user, password=grafana_password,
                 folder=folder, influx_url=influx_url, influx_token=influx_token,
                 org=influx_org, bucket=influx_bucket)
    except GrafanaError as exc:
        _fail(exc, 1)
    except DashboardError as exc:
        _fail(exc, 2)
    console.print(f"Grafana {r.version or '(version unknown)'} at {r.grafana_url}: data source "
                  f"{r.datasource}, folder {r.folder_uid!r}"
                  f"{' (created)' if r.folder_created else ''}", highlight=False)
    t = Table("dashboard", "url")
    for title, url in r.dashboards:
        t.add_row(title, url)
    console.print(t)


@dashboards_app.command("link")
def dashboards_link(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (runs/<run-id>).")],
    grafana_url: Annotated[str | None, typer.Option(
        "--grafana-url", envvar="GRAFANA_URL",
        help="Grafana base URL (default: the lab stack's, http://localhost:3000).")] = None,
) -> None:
    """Print the run dashboard's URL for one run: the run picked, its points' time range."""
    from .dashboards.grafana import DashboardError, run_link
    from .telemetry.influx import TelemetryError

    try:
        print(run_link(run_dir, grafana_url))
    except (DashboardError, TelemetryError) as exc:
        _fail(exc, 2)


# --- telemetry (issue 8): `testbed telemetry backfill RUN` ----------------------------

telemetry_app = typer.Typer(help="Time series of runs in InfluxDB (or anything serving "
                            "/api/v2/write).", no_args_is_help=True)
app.add_typer(telemetry_app, name="telemetry")

InfluxUrl = Annotated[str | None, typer.Option(
    "--influx-url", help="InfluxDB URL, e.g. http://localhost:8086 (default: the run's or "
    "the site file's telemetry.influx).")]
InfluxToken = Annotated[str | None, typer.Option(
    "--influx-token", envvar="INFLUX_TOKEN", help="API token (or env INFLUX_TOKEN).")]
InfluxOrg = Annotated[str | None, typer.Option("--influx-org", help="Organisation "
                                               "(default testbed).")]
InfluxBucket = Annotated[str | None, typer.Option("--influx-bucket", help="Bucket "
                                                  "(default testbed).")]


def _influx(url: str | None, org: str | None, bucket: str | None,
            base: Any = None) -> Any:
    """InfluxConfig from flags over `base` (a site's or a run's); None if neither names a URL."""
    from .config import InfluxConfig

    if url is None and base is None:
        return None
    update = {k: v for k, v in (("url", url), ("org", org), ("bucket", bucket)) if v is not None}
    try:
        return InfluxConfig(**{**(base.model_dump() if base is not None else {}), **update})
    except ValueError as exc:
        raise ConfigError(f"--influx-*: {exc}") from None


@telemetry_app.command("backfill")
def telemetry_backfill(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (runs/<run-id>).")],
    influx_url: InfluxUrl = None,
    influx_token: InfluxToken = None,
    influx_org: InfluxOrg = None,
    influx_bucket: InfluxBucket = None,
    rewrite: Annotated[bool, typer.Option("--all", help="Write every point again without "
                                          "asking the server what it holds.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what is missing "
                                          "(from the server, or from the acknowledgements "
                                          "if it cannot be read).")] = False,
) -> None:
    """Make the server hold every point of a run once: ask it what it holds for the run
    and write exactly what it lacks (idempotent: a second backfill writes nothing)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .config import InfluxConfig
    from .telemetry.influx import TelemetryError, backfill, open_run

    try:
        db, _ = open_run(run_dir)
        row = db.execute("SELECT value FROM meta WHERE key = 'influx'").fetchone()
        db.close()
        base = InfluxConfig.model_validate_json(row[0]) if row else None
        cfg = _influx(influx_url, influx_org, influx_bucket, base)
        if cfg is None:
            raise ConfigError(f"{run_dir}: the run had no InfluxDB target; give --influx-url")
        with Progress(TextColumn("[bold]backfill[/] run-store rows"), BarColumn(),
                      MofNCompleteColumn(), console=console, transient=True) as bar:
            task = bar.add_task("rows", total=None)
            res = backfill(run_dir, cfg, token=influx_token, rewrite=rewrite, dry_run=dry_run,
                           progress=lambda done, total: bar.update(task, completed=done,
                                                                    total=total))
    except (ConfigError, TelemetryError) as exc:
        _fail(exc, 2)
    from .telemetry.schema import TABLES

    t = Table(title=f"{'missing at' if dry_run else 'backfill to'} {cfg.url} "
                    f"(org {cfg.org}, bucket {cfg.bucket})")
    t.add_column("measurement")
    if res.api:
        t.add_column("in the run store", justify="right")
        t.add_column("on the server", justify="right")
    t.add_column("missing" if dry_run else "written", justify="right")
    for table in (res.store if res.api else res.tables):
        counts = [res.store[table], res.held[table]] if res.api else []
        t.add_row(TABLES[table].name, *map(str, counts), str(res.tables.get(table, 0)))
    console.print(t)
    missing = sum(res.tables.values())
    if res.api:
        console.print(f"the server holds {sum(res.held.values())} of the run store's "
                      f"{sum(res.store.values())} points (asked through {res.api})",
                      highlight=False)
    if dry_run:
        console.print(f"{missing} points missing at {cfg.url}" if res.api else
                      f"{missing} points not acknowledged by {cfg.url} (the server could "
                      "not be asked what it holds)", highlight=False)
    else:
        console.print(f"wrote {res.points} points in {res.batches} batches"
                      + ("" if res.points else ": nothing was missing"), highlight=False)


@app.command("conformance")
def conformance(
    site: SiteArg,
    name: Annotated[str, typer.Argument(help="Device name in the site file (an IEEE 1547 "
                                             "inverter or battery, SunSpec 701-713).")],
    test: Annotated[list[str] | None, typer.Option(
        "--test", "-t", help="constant-pf, volt-var, active-power-limit, frequency-droop "
                             "(repeatable; default: all).")] = None,
    junit: Annotated[Path | None, typer.Option("--junit", help="Write JUnit XML here.")] = None,
    html_out: Annotated[Path | None, typer.Option(
        "--html", help="Write a page with each test's P, Q, V and f plotted per step.")] = None,
    v_nom: Annotated[float, typer.Option("--v-nom", min=1, help="Real device: nominal "
                                         "phase-to-neutral voltage of the grid source.")] = 230.0,
    f_nom: Annotated[float, typer.Option("--f-nom", min=1, help="Real device: nominal "
                                         "frequency of the grid source.")] = 50.0,
) -> None:
    """IEEE 1547.1-2020 tests through the driver; exit 1 if one fails.

    An emulated device runs on the simulated clock with its terminal voltage and frequency
    driven by the test (seconds); a real device runs in real time and the operator sets
    the grid source when prompted (see the README on plugging in an AC source)."""
    from testbed.conformance.runner import (
        ConformanceError,
        check_names,
        conform,
        html_report,
        write_junit,
    )

    cfg = _site(site)
    try:
        names = check_names(test)
    except ConformanceError as exc:
        _fail(exc, 2)

    async def go() -> Any:
        try:
            return await conform(cfg, name, names, nominal=(v_nom, f_nom))
        except ConformanceError as exc:
            _fail(exc, 2)

    results = _run(go())
    table = Table(title=f"IEEE 1547.1-2020: {name}")
    for col in ("clause", "test", "result", "reason"):
        table.add_column(col)
    for r in results:
        table.add_row(r.id, r.name, "[green]PASS[/]" if r.passed else "[red]FAIL[/]",
                      escape(r.reason))
    console.print(table)
    if junit is not None:
        write_junit(results, f"{cfg.name}.{name}", junit)
    if html_out is not None:
        html_out.write_text(html_report(results, f"{cfg.name}.{name}"))
    if not all(r.passed for r in results):
        raise typer.Exit(1)


@app.command("run")
def run(
    scenario: Annotated[str, typer.Argument(help="Scenario file, or a bundled scenario name "
                                            "(demo, cloudy-afternoon, evening-surplus, "
                                            "device-fault).")],
    broker: Annotated[str | None, typer.Option(
        help="External MQTT broker URL (default: an embedded broker for the run).")] = None,
    speed: Annotated[float | None, typer.Option(
        help="Real-time mode at this multiple of the wall clock (default: the scenario's).")
    ] = None,
    fast: Annotated[bool, typer.Option("--fast", help="As fast as possible (overrides the "
                                       "scenario's clock).")] = False,
    seed: Annotated[int | None, typer.Option(help="Override the scenario's seed.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for run stores.")] = Path("runs"),
    junit: Annotated[Path | None, typer.Option(help="Write the expectations as JUnit XML.")
                     ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    influx_url: InfluxUrl = None,
    influx_token: InfluxToken = None,
    influx_org: InfluxOrg = None,
    influx_bucket: InfluxBucket = None,
    report: Annotated[bool, typer.Option(help="Write report.html into the run directory.")
                      ] = True,
    helics: Annotated[str | None, typer.Option(
        "--helics", help="HELICS broker HOST:PORT whose emulator shards (`testbed devices "
        "serve SITE --shard K/N --helics ...`) serve the emulated devices.")] = None,
    shards: Annotated[int | None, typer.Option(
        "--shards", help="Start a HELICS broker and this many emulator shard processes on "
        "this machine (free loopback ports).")] = None,
    feeder_federate: Annotated[bool, typer.Option(
        "--feeder-federate", help="The feeder's power flow in its own HELICS federate (with "
        "--shards: started here; with --helics: `python -m testbed.cosim.feeder SITE "
        "--helics ...`, or your grid simulator on the same keys).")] = False,
) -> None:
    """Play a deviation scenario end to end; exit 1 if an expectation is not met.

    With --influx-url (or `telemetry.influx` in the site file) the run's time series go
    to InfluxDB as they are recorded; a server that is down does not stop the run
    (`testbed telemetry backfill` writes what it missed)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .cosim.errors import CosimError
    from .grid import GridError
    from .scenarios.engine import Run, junit_xml
    from .scenarios.model import load_scenario

    try:
        sc = load_scenario(scenario)
        runner_args: dict[str, Any] = {"out": out, "broker": broker, "seed": seed,
                                       "speed": speed, "fast": fast, "report": report,
                                       "influx_token": influx_token,
                                       "helics": helics, "shards": shards,
                                       "feeder_federate": feeder_federate}
        if influx_url is not None:
            runner_args["influx"] = _influx(influx_url, influx_org, influx_bucket)
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), console=console, disable=quiet)
        with progress:
            task = progress.add_task(sc.name, total=sc.steps, info="")

            def tick(k: int, n: int, info: dict[str, Any]) -> None:
                t = info["t"]
                progress.update(task, completed=k, info=(
                    f"{int(t // 3600) % 24:02d}:{int(t % 3600 // 60):02d}  auctions "
                    f"{info['auctions']}  blocks {info['blocks']}"))

            result = _run(Run(sc, progress=tick, **runner_args).execute())
    except (ConfigError, GridError) as exc:
        _fail(exc, 2)
    except CosimError as exc:
        _fail(exc, 1)
    console.print(_summary_table(result.summary))
    for v in result.verdicts:
        mark = "[green]PASS[/]" if v.ok else "[red]FAIL[/]"
        console.print(f"{mark} {v.name}: {v.message}", highlight=False)
    tel = result.summary.get("telemetry")
    if tel:
        pend = tel["pending_points"]
        console.print(f"telemetry: {tel['points']} points to {tel['target']}"
                      + (f"; [yellow]{pend} not acknowledged[/] ({'; '.join(tel['errors'])}): "
                         f"testbed telemetry backfill {result.run_dir}" if pend else ""),
                      highlight=False)
        from .dashboards.grafana import run_link

        console.print(f"dashboard: {run_link(result.run_dir)}", highlight=False,
                      soft_wrap=True)
    console.print(f"run store: {result.run_dir}")
    if report:
        console.print(f"report: {result.run_dir / 'report.html'}")
    if junit is not None:
        junit.parent.mkdir(parents=True, exist_ok=True)
        junit.write_text(junit_xml(result))
    lost = result.summary.get("cosim", {}).get("error")
    if lost:
        err.print(f"[red]error:[/] run ended early: {escape(lost)}; lost devices: "
                  f"{', '.join(result.summary['cosim']['lost_devices']) or 'none'}",
                  highlight=False)
    raise typer.Exit(0 if result.ok and not lost else 1)


def _summary_table(s: dict[str, Any]) -> Table:
    def num(x: Any, fmt: str = ".3f") -> str:
        return "-" if x is None else format(x, fmt)

    t = Table(title=f"{s['scenario']} (seed {s['seed']}, {s['steps']} steps, "
                    f"{s['clock']['mode']}, {s['clock']['wall_s']:.1f} s)", show_header=False)
    t.add_column("what")
    t.add_column("value")
    d, m, led, g = s["deviation"], s["market"], s["ledger"], s["grid"]
    t.add_row("deviation before -> after market",
              f"{num(d['before_kwh'])} -> {num(d['after_kwh'])} kWh "
              f"(covered {num(d['covered_share'], '.1%')})")
    t.add_row("auctions (cleared)", f"{m['auctions']} ({m['cleared']}); traded "
              f"{num(m['energy_traded_kwh'])} kWh for {num(m['value_eur'], '.2f')} EUR; price "
              f"{num(m['price_min'])}-{num(m['price_max'])} EUR/kWh")
    if g["enabled"]:
        t.add_row("grid", f"V {num(g['vm_min_pu'], '.4f')}-{num(g['vm_max_pu'], '.4f')} p.u., "
                  f"in band {num(g['in_band_share'], '.1%')} of steps, lights {g['lights']}, "
                  f"re-cleared {g['auctions_re_cleared']}, curtailed "
                  f"{num(m['grid_curtailed_kwh'])} kWh, losses {num(g['losses_kwh'])} kWh")
    if led["enabled"]:
        n, f = led.get("validators"), led.get("tolerates")
        faults = ("" if n is None else f"{n} validators (tolerate {f} faulty"
                  + (": none, use >= 4" if f == 0 else "") + "), ")
        t.add_row("ledger", f"{faults}{led['blocks']} blocks, proposers {led['proposers']}, "
                  f"{led['submitted']} txs, verifies: {led['verifies']}")
    msg = s["messages"]
    t.add_row("messages", f"orders {msg['orders_received']}/{msg['orders_published']} received "
              f"({msg['orders_lost_injected']} lost by design), refused {msg['refused_by_agents']}"
              f" + {msg['refused_by_ledger']} (ledger), read errors {msg['read_errors']}")
    real = s.get("devices", {})
    if real.get("real"):
        t.add_row("real devices", ", ".join(real["real"]))
    links = real.get("links") or {}
    piped, single = links.get("pipelined", []), links.get("one_at_a_time", [])
    if piped:
        depth = "/".join(str(n) for n in sorted({x["in_flight"] for x in piped}))
        t.add_row("Modbus links", f"{len(piped)} pipelined ({depth} requests in flight)"
                  + (f", {len(single)} one request at a time" if single else "")
                  + (f" ({'; '.join(', '.join(x) for x in single)})"
                     if 0 < len(single) <= 4 else ""))
    for note in real.get("unreached", []):
        t.add_row("[yellow]not reached[/]", note)
    for f in s["faults"]:
        t.add_row("[red]fault[/]", f"{f['device']} at {int(f['t'] // 3600):02d}:"
                  f"{int(f['t'] % 3600 // 60):02d}: {f['prosumer']} left the market "
                  f"({f['orders_after_fault']} orders after): {f['reason'][:80]}")
    for name, p in s["prosumers"].items():
        t.add_row(name, f"self-consumption {num(p['self_consumption'], '.0%')}, "
                  f"self-sufficiency {num(p['self_sufficiency'], '.0%')}, CPF "
                  f"{num(p['cpf'])}, traded {num(p['traded_kwh'])} kWh")
    lat = s["clock"]["lateness"]
    if lat:
        t.add_row("clock lateness", f"p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms, "
                  f"max {lat['max_ms']:.2f} ms")
    return t


@app.command("init")
def init(folder: Annotated[Path, typer.Argument(help="Folder to write site.yaml and "
                                                "scenario.yaml into.")]) -> None:
    """Write an editable example site and scenario (copies of the bundled demo)."""
    from .config import bundled_path
    from .scenarios.model import bundled_scenario_path

    folder.mkdir(parents=True, exist_ok=True)
    site, scen = folder / "site.yaml", folder / "scenario.yaml"
    for p in (site, scen):
        if p.exists():
            err.print(f"[red]error:[/] {p} exists; not overwriting it", highlight=False)
            raise typer.Exit(2)
    site.write_text(bundled_path("demo").read_text())
    text = bundled_scenario_path("demo").read_text().replace("site: demo", "site: site.yaml")
    scen.write_text(text)
    console.print(f"wrote {site} and {scen}; run it with: testbed run {scen}")


# --------------------------------------------------------------------------- sweeps


@app.command("sweep")
def sweep(
    file: Annotated[Path, typer.Argument(help="Sweep file (YAML): base scenario, overrides, "
                                         "KPIs.")],
    scheduler: Annotated[str | None, typer.Option(
        help="A Dask scheduler (tcp://HOST:8786); default: a local cluster, one process "
        "per core.")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, max=1024, help="Worker processes of the local cluster (default: cores).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for sweeps (this one goes to OUT/NAME).")
                   ] = Path("sweeps"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Run every point of a sweep on Dask; skip points already done (resumable); write
    results.parquet, results.csv and report.html. Exit 1 if a point failed."""
    import pandas as pd
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from .sweeps import load_sweep, plan, run_sweep, write_results
    from .sweeps.results import missing_kpis
    from .sweeps.runner import SchedulerError

    try:
        sw = load_sweep(file)
        points = plan(sw)
        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                       TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                       TextColumn("ETA"), TimeRemainingColumn(), console=console,
                       disable=quiet)
        with bar:
            task = bar.add_task(sw.name, total=len(points), info="")

            def tick(_: str, done: int, failed: int, skipped: int, total: int) -> None:
                # the bar and its ETA count this session's runs; skipped ones took no time
                bar.update(task, total=total - skipped, completed=done + failed, info=(
                    f"done {done + skipped}/{total}  failed {failed}  skipped {skipped}"))

            res = run_sweep(sw, points, out, scheduler=scheduler, workers=workers,
                            progress=tick)
        files = write_results(sw, points, res.folder)
        missing = missing_kpis(sw, pd.read_parquet(files["parquet"]))
    except ConfigError as exc:
        _fail(exc, 2)
    except SchedulerError as exc:
        _fail(exc, 1)
    except KeyboardInterrupt:
        err.print(f"interrupted: `testbed sweep {file}` again resumes it", highlight=False)
        raise typer.Exit(130) from None
    console.print(f"{sw.name}: {len(points)} points, {res.count('done')} run, "
                  f"{res.count('skipped')} already done, {res.count('failed')} failed "
                  f"({res.wall_s:.1f} s on {res.workers or 0} workers)", highlight=False)
    for key, s in res.status.items():
        if s["status"] == "failed":
            err.print(f"[red]failed[/] {key}: {escape(s['error'])}", highlight=False)
    for k in missing:
        err.print(f"[yellow]warning[/] kpis: {k!r} is in no run's summary.json", highlight=False)
    console.print(f"results: {files['parquet']} {files['csv']}\nreport: {files['report']}",
                  highlight=False)
    raise typer.Exit(1 if res.count("failed") else 0)
