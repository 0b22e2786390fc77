"""The run as a HELICS federate, and `--shards N`: a broker and N shard processes.

`RunFederate` is the engine's bridge (`scenarios.engine.Run(helics=...)`): it learns
where the shards serve their devices (their `endpoint` publications), publishes each
step's inputs at t0 + dt/2 and is granted t1 + dt/10 once every shard has advanced its
physics, after which the run reads every device over its protocol as it always does.

A shard that dies ends the run within a bounded time: HELICS reports the lost
connection (or a shard's outputs stop), and the devices that no longer answer on their
endpoints are named (`FederateLost`)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from testbed.bus.broker import free_port
from testbed.config import SiteConfig
from testbed.devices.site import pipeline_emulated
from testbed.grid.limits import GridLimits

from . import names
from .errors import CosimError, FederateLost
from .federate import LOCAL_CORE, Federate, inputs_time, read_time
from .feeder import RemoteFeeder
from .shard import emulated_prosumers

PROBE_TIMEOUT_S = 1.0


def _endpoint(device: str, text: str | None) -> dict[str, Any]:
    """A shard's endpoint publication, checked (a forged one costs a cheap refusal)."""
    try:
        ep = json.loads(text or "")
        host, port = ep["host"], ep["port"]
        if not isinstance(host, str) or not host or len(host) > 255:
            raise ValueError("host")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError("port")
    except (ValueError, KeyError, TypeError) as exc:
        raise CosimError(f"{names.endpoint('…', device)}: expected JSON with host and port "
                         f"({exc})") from None
    return ep


def _outputs(text: str) -> list[str]:
    """The devices a shard's step message covers (`names`: {"t", "pq": {device: [P, Q]}})."""
    try:
        pq = json.loads(text)["pq"]
        if not isinstance(pq, dict):
            raise ValueError("pq must be an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise CosimError(f"{names.run_endpoint('…')}: malformed shard message ({exc})"
                         ) from None
    return list(pq)


class RunFederate:
    """The run's side of the federation (emulated devices served by shards)."""

    def __init__(self, site: SiteConfig, broker: str, *,
                 feeder_limits: GridLimits | None = None) -> None:
        """`feeder_limits`: a feeder federate power-flows the feeder (`self.feeder`)."""
        self.site = site
        self.broker = broker
        self.prosumers = emulated_prosumers(site)
        self.devices = [d.name for _, d in site.devices() if d.emulated]
        self.fed = Federate("testbed-run", broker)
        self.feeder: RemoteFeeder | None = None
        if feeder_limits is not None:
            self.feeder = RemoteFeeder(self.fed, site.name, [p.name for p in site.prosumers],
                                       feeder_limits)
        self.endpoints: dict[str, dict[str, Any]] = {}
        self._state: dict[str, str] = {}
        self._started = False
        self.wait_s = 0.0
        """Wall time `step` waited for the shards (HELICS hand-over and their physics)."""
        self._failed = False
        """A grant failed (a federate was lost): no more publications."""

    async def start(self) -> SiteConfig:
        """Join, wait for every federate (the broker's -f count), learn the endpoints;
        returns the site with the shards' hosts and ports."""
        s, fed = self.site.name, self.fed
        await fed.connect()
        try:
            fed.publish_to(names.inputs(s), "string")
            fed.endpoint(names.run_endpoint(s))
            for d in self.devices:
                fed.subscribe(names.endpoint(s, d))
            if self.feeder is not None:
                self.feeder.register()
            await fed.enter()
            missing = []
            for d in self.devices:
                text = fed.text(names.endpoint(s, d))
                if text is None:
                    missing.append(d)
                else:
                    self.endpoints[d] = _endpoint(d, text)
            if missing:
                raise CosimError(f"no shard serves {len(missing)} emulated devices of site "
                                 f"{s} ({', '.join(missing[:8])}{' …' if len(missing) > 8 else ''})"
                                 f": start `testbed devices serve SITE --shard K/N --helics "
                                 f"{self.broker}` for every K of N, and the broker with -f N+1")
        except BaseException:
            self.close()
            raise
        return self.resolved_site()

    def resolved_site(self) -> SiteConfig:
        prosumers = []
        for p in self.site.prosumers:
            devices = [d.model_copy(update={"host": self.endpoints[d.name]["host"],
                                            "port": self.endpoints[d.name]["port"]})
                       if d.name in self.endpoints and d.serial is None else d
                       for d in p.devices]
            prosumers.append(p.model_copy(update={"devices": devices}))
        return pipeline_emulated(self.site.model_copy(update={"prosumers": prosumers}))

    # device events, played by the shard that serves the device (DeviceIO's emulator API)
    def silence(self, device: str, silent: bool = True) -> None:
        self._state[device] = "silent" if silent else "online"

    async def offline(self, device: str) -> None:
        self._state[device] = "offline"

    async def online(self, device: str) -> None:
        self._state[device] = "online"

    async def step(self, t0: float, dt: float, physics: Any, volts: Mapping[str, float],
                   external: Mapping[str, float]) -> None:
        """Hand the step's inputs to the shards and wait until all have advanced. The
        inputs are what `EmulatedSite.step` would compute in this process.

        One grant per step: the inputs go out at the time the run already holds (the
        previous step's read or feeder time, strictly later than any shard's last grant);
        only the first step asks for t0 + dt/2 first."""
        s, fed = self.site.name, self.fed
        if not self._started:
            await self._request(inputs_time(t0, dt))
            self._started = True
        t_prev = physics.t_s
        t = physics.t_s = t_prev + dt
        prosumers = {}
        for p in self.prosumers:
            pr = physics.prosumers[p]
            v = volts.get(p, math.nan)
            prosumers[p] = [physics.load(p, pr.params.load, t),
                            v if math.isfinite(v) else None, external.get(p, 0.0)]
        states = {d: st for d, st in self._state.items() if st != "online"}
        fed.put(names.inputs(s), json.dumps({
            "t0": t_prev, "dt": dt, "irradiance_w_m2": physics.irradiance(t),
            "prosumers": prosumers, "states": states}))
        since = time.perf_counter()
        try:
            await self._request(read_time(t0 + dt, dt))
        finally:
            self.wait_s += time.perf_counter() - since
        seen: set[str] = set()
        for _, text in fed.messages(names.run_endpoint(s)):
            seen.update(_outputs(text))
        stale = [d for d in self.devices if d not in seen]
        if stale:
            self._failed = True
            raise FederateLost(f"{len(stale)} devices' shards stopped publishing at "
                               f"t={t0 + dt:g} s", stale)

    async def _request(self, t: float) -> None:
        try:
            await self.fed.request(t)
        except CosimError as exc:
            self._failed = True
            lost = await self.unreachable()
            raise FederateLost(f"{exc}; {len(lost)} devices no longer answer", lost) from None

    async def unreachable(self) -> list[str]:
        """The emulated devices whose endpoint refuses connections (their shard is gone)."""
        where: dict[tuple[str, int], list[str]] = {}
        for d, ep in self.endpoints.items():
            where.setdefault((ep["host"], ep["port"]), []).append(d)

        async def probe(host: str, port: int) -> bool:
            try:
                _, w = await asyncio.wait_for(asyncio.open_connection(host, port),
                                              PROBE_TIMEOUT_S)
            except (OSError, TimeoutError):
                return False
            w.close()
            return True

        keys = list(where)
        alive = await asyncio.gather(*(probe(h, p) for h, p in keys))
        return sorted(d for k, ok in zip(keys, alive, strict=True) if not ok for d in where[k])

    def close(self) -> None:
        """Leave the federation; the shards and the feeder federate are told first
        (`{"end": true}` as the inputs and as the injections, as `names` documents) so they
        finish without waiting for HELICS to notice the run has gone."""
        if self._started and not self._failed and self.fed.executing():
            end = json.dumps({"end": True})
            with contextlib.suppress(Exception):
                self.fed.put(names.inputs(self.site.name), end)
                if self.feeder is not None:
                    self.fed.put(names.injections(self.site.name), end)
        self.fed.close()


# --------------------------------------------------------------------------- --shards N


def helics_broker_binary() -> str:
    """The `helics_broker` binary of the pip package (not its Python launcher, which would
    leave the real broker behind when it is killed), or the one on PATH."""
    try:
        import helics
        real = Path(helics.__file__).parent / "install" / "bin" / "helics_broker"
    except ImportError:
        real = Path("/nonexistent")
    here = Path(sys.executable).parent / "helics_broker"
    found = (str(real) if real.exists() else str(here) if here.exists()
             else shutil.which("helics_broker"))
    if not found:
        raise CosimError("helics_broker not found beside the interpreter or on PATH "
                         "(pip install helics)")
    return found


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the run's process dies, even by SIGKILL
    (Linux prctl PR_SET_PDEATHSIG), so no shard or broker outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


def free_port_pair(host: str = "127.0.0.1", tries: int = 50) -> int:
    """A free port P with P + 1 free too: a zmq-core helics_broker listens on both."""
    for _ in range(tries):
        port = free_port(host)
        if port + 1 < 65536:
            with socket.socket() as s:
                try:
                    s.bind((host, port + 1))
                except OSError:
                    continue
            return port
    raise CosimError(f"no two adjacent free ports on {host} for the helics_broker")


class LocalFederation:
    """A helics_broker and N shard processes on this machine, on free loopback ports.
    Each is this process's child; `stop()` ends them all (SIGTERM, then SIGKILL)."""

    def __init__(self, site: str, n: int, seed: int, *, log_dir: Path,
                 feeder_background: float | None = None, feeder: bool = False) -> None:
        if n < 1:
            raise CosimError(f"--shards {n}: expected at least 1")
        self.site, self.n, self.seed = site, n, seed
        self.log_dir = log_dir
        self.feeder_args = ([] if feeder_background is None
                            else ["--background", repr(feeder_background)])
        self.federates = n + 1 + feeder
        self.with_feeder = feeder
        self.feeder: subprocess.Popen[bytes] | None = None
        self.broker: subprocess.Popen[bytes] | None = None
        self.shards: dict[int, subprocess.Popen[bytes]] = {}
        self.address = ""

    def start(self) -> str:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        port = free_port_pair()
        self.address = f"zmq://127.0.0.1:{port}"
        log = open(self.log_dir / "helics_broker.log", "wb")  # noqa: SIM115 (the child's)
        try:
            self.broker = subprocess.Popen(
                [helics_broker_binary(), "--coretype", LOCAL_CORE, "-f", str(self.federates),
                 "--port", str(port), "--local_interface", "127.0.0.1", "--loglevel", "error"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            self._wait_broker(port)
            for k in range(1, self.n + 1):
                self.shards[k] = self._child(
                    f"shard-{k}of{self.n}.log",
                    ["-m", "testbed", "devices", "serve", self.site, "--shard", f"{k}/{self.n}",
                     "--helics", self.address, "--free-ports", "--seed", str(self.seed),
                     "--quiet"])
            if self.with_feeder:
                self.feeder = self._child("feeder.log", [
                    "-m", "testbed.cosim.feeder", self.site, "--helics", self.address,
                    *self.feeder_args])
        except BaseException:
            self.stop()
            raise
        finally:
            log.close()
        return self.address

    def _wait_broker(self, port: int, limit_s: float = 10.0) -> None:
        """Until the broker listens (or has exited: its log's first line says why)."""
        assert self.broker is not None
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.broker.poll() is not None:
                text = (self.log_dir / "helics_broker.log").read_text(errors="replace")
                raise CosimError(f"helics_broker exited ({self.broker.returncode}): "
                                 f"{text.strip().splitlines()[0] if text.strip() else 'no output'}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port),
                                                                        0.2):
                return
            time.sleep(0.05)
        raise CosimError(f"helics_broker did not listen on 127.0.0.1:{port} within {limit_s:g} s")

    def _child(self, log: str, args: list[str]) -> subprocess.Popen[bytes]:
        """This interpreter running `args`, with this package first on its path."""
        with open(self.log_dir / log, "wb") as out:
            return subprocess.Popen(
                [sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(
                    p for p in (str(Path(__file__).resolve().parents[2]),
                                os.environ.get("PYTHONPATH")) if p)})

    def dead(self) -> list[int]:
        """Shards whose process has ended."""
        return [k for k, p in self.shards.items() if p.poll() is not None]

    def watch(self) -> str | None:
        """What `Federate.watch` asks: a dead shard or broker, with its log's last line."""
        gone = [(f"shard {k}/{self.n}", f"shard-{k}of{self.n}.log", self.shards[k])
                for k in self.dead()]
        if self.feeder is not None and self.feeder.poll() is not None:
            gone.append(("the feeder federate", "feeder.log", self.feeder))
        if self.broker is not None and self.broker.poll() is not None:
            gone.append(("helics_broker", "helics_broker.log", self.broker))
        if not gone:
            return None
        what, log, proc = gone[0]
        lines = (self.log_dir / log).read_text(errors="replace").strip().splitlines()
        return (f"{what} exited ({proc.returncode})"
                + (f": {lines[-1].strip()[:200]}" if lines else ""))

    def pids(self) -> list[int]:
        return [p.pid for p in (self.broker, self.feeder, *self.shards.values())
                if p is not None]

    def stop(self, grace_s: float = 5.0) -> None:
        """Each process gets `grace_s` to end on its own (shards do once the run has
        left the federation, the broker once all have), then SIGTERM, then SIGKILL."""
        procs = [p for p in (*self.shards.values(), self.feeder, self.broker) if p is not None]
        deadline = time.monotonic() + grace_s
        for p in procs:
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        p.send_signal(sig)
                try:
                    p.wait(max(0.0, deadline - time.monotonic()) if sig is None else 2.0)
                    break
                except subprocess.TimeoutExpired:
                    continue
