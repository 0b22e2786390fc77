"""An emulator shard: share K of N of a site's emulated prosumers, served over their
protocols (Modbus/OPC UA, as `devices serve`) and stepped as a HELICS federate.

Prosumers with an emulated device are dealt round robin in site-file order: shard K
(1-based) of N holds those at positions K-1, K-1+N, ... The shard subscribes to the
step's inputs (`names.inputs`, one JSON value for the whole site), is granted the time the
run publishes them, advances the physics from t0 to t1 = t0 + dt with exactly those values
(so a sharded run replays the single-process one bit for bit), then sends its devices' P
and Q to the run in one message. Its device endpoints are published once, before the
federation starts executing."""

from __future__ import annotations

import json
import logging
import math
import socket
from pathlib import Path
from typing import Any

from testbed.config import SiteConfig
from testbed.devices.emulator import EmulatedDevice
from testbed.devices.site import Endpoint, SiteEmulators

from . import names
from .errors import CosimError
from .federate import MAXTIME, Federate

log = logging.getLogger(__name__)


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N) with 1 <= K <= N."""
    k, sep, n = text.partition("/")
    if not sep or not k.isdigit() or not n.isdigit() or not 1 <= int(k) <= int(n):
        raise CosimError(f"--shard {text!r}: expected K/N with 1 <= K <= N (e.g. 2/4)")
    return int(k), int(n)


def emulated_prosumers(site: SiteConfig) -> list[str]:
    return [p.name for p in site.prosumers if any(d.emulated for d in p.devices)]


def shard_prosumers(site: SiteConfig, k: int, n: int) -> list[str]:
    return emulated_prosumers(site)[k - 1::n]


def shard_site(site: SiteConfig, k: int, n: int) -> SiteConfig:
    """The site restricted to shard K/N's prosumers (their emulated devices only)."""
    mine = set(shard_prosumers(site, k, n))
    prosumers = [p.model_copy(update={"devices": [d for d in p.devices if d.emulated]})
                 for p in site.prosumers if p.name in mine]
    return site.model_copy(update={"prosumers": prosumers})


def device_pq(dev: EmulatedDevice) -> tuple[float, float]:
    """A device's active power (W; PV and battery + out, meter + import) and reactive
    power (var; the emulated physics run at unity power factor)."""
    s = dev.prosumer.state
    if dev.kind == "pv" and s.pv is not None:
        return s.pv.ac_w, 0.0
    if dev.kind == "battery" and s.battery is not None:
        return s.battery.power_w, 0.0
    if dev.kind == "meter":
        return s.meter.net_w, 0.0
    return 0.0, 0.0


def endpoint_json(ep: Endpoint, advertise: str | None = None) -> str:
    host = advertise or ep.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    return json.dumps({"protocol": ep.protocol, "host": host, "port": ep.port,
                       "unit": ep.unit, "transport": ep.transport}, sort_keys=True)


class Shard:
    """`await Shard(...).serve()`: serve, join the federation, step until it ends."""

    def __init__(self, site: SiteConfig, k: int, n: int, broker: str, *,
                 free_ports: bool = True, host: str | None = None,
                 advertise: str | None = None) -> None:
        self.site_name = site.name
        self.k, self.n = k, n
        self.site = shard_site(site, k, n)
        if not self.site.prosumers:
            raise CosimError(f"--shard {k}/{n}: site {site.name} has "
                             f"{len(emulated_prosumers(site))} emulated prosumers; "
                             f"shard {k} of {n} would hold none")
        self.emulators = SiteEmulators(self.site, free_ports=free_ports, host=host)
        self.advertise = advertise
        self.fed = Federate(f"testbed-shard-{k}of{n}", broker,
                            interruptible=True)
        self.endpoint = names.shard_endpoint(site.name, k, n)
        self.steps = 0
        self._irr = 0.0
        self._load: dict[str, float] = {}
        self._state: dict[str, str] = {}

    async def start(self, endpoints_json: Path | None = None) -> dict[str, Endpoint]:
        em = self.emulators
        physics = em.physics
        physics.irradiance = lambda t: self._irr
        physics.load = lambda name, params, t: self._load.get(name, 0.0)
        endpoints = await em.start(clock=False)
        site, fed = self.site_name, self.fed
        try:
            await fed.connect()
            fed.subscribe(names.inputs(site))
            fed.endpoint(self.endpoint)
            for d in physics.devices:
                fed.publish_to(names.endpoint(site, d), "string")
            await fed.initializing()
            for d in physics.devices:
                fed.put(names.endpoint(site, d), endpoint_json(endpoints[d], self.advertise))
            if endpoints_json is not None:
                partial = endpoints_json.with_name(endpoints_json.name + ".partial")
                partial.write_text(json.dumps({d: json.loads(endpoint_json(endpoints[d],
                                                                           self.advertise))
                                               for d in physics.devices}, indent=2))
                partial.replace(endpoints_json)
            await fed.enter()
        except BaseException:
            await self.stop()
            raise
        return endpoints

    async def run(self) -> int:
        """Step at every grant until the federation ends; returns the steps taken."""
        site, fed, physics = self.site_name, self.fed, self.emulators.physics
        key, to = names.inputs(site), names.run_endpoint(site)
        first = True
        while True:
            granted = await fed.request(MAXTIME)
            if granted >= MAXTIME:
                return self.steps
            if not fed.updated(key):
                continue
            inp = _inputs(fed.text(key))
            if inp.get("end"):
                return self.steps
            dt = inp["dt"]
            if first:  # the run's physics start at its t0
                physics.t_s = inp["t0"]
                for pr in physics.prosumers.values():
                    pr.update(t_s=physics.t_s)
                first = False
            await self._states(inp.get("states") or {})
            self._irr = float(inp["irradiance_w_m2"])
            ext, volts = {}, {}
            given = inp["prosumers"]
            for p in physics.prosumers:
                load_w, v, x = given.get(p) or (0.0, None, 0.0)
                self._load[p] = float(load_w)
                ext[p] = float(x)
                if v is not None:
                    volts[p] = float(v)
            physics.step(dt, external_w=ext, voltage_v=volts)
            pq = {d: device_pq(dev) for d, dev in physics.devices.items()}
            fed.send(self.endpoint, json.dumps({"t": physics.t_s, "pq": pq}), to)
            self.steps += 1

    async def _states(self, states: dict[str, str]) -> None:
        """Apply the run's device events: offline (server off), silent, online."""
        em = self.emulators
        for d in em.physics.devices:
            want = states.get(d, "online")
            have = self._state.get(d, "online")
            if want == have:
                continue
            if have == "offline":
                await em.online(d)
            elif have == "silent":
                em.silence(d, False)
            if want == "offline":
                await em.offline(d)
            elif want == "silent":
                em.silence(d, True)
            self._state[d] = want

    async def stop(self) -> None:
        self.fed.close()
        await self.emulators.stop()

    async def serve(self, endpoints_json: Path | None = None) -> int:
        await self.start(endpoints_json)
        try:
            return await self.run()
        finally:
            await self.stop()


def _inputs(text: str | None) -> dict[str, Any]:
    """The run's inputs publication, checked (a malformed one ends the shard, named)."""
    try:
        inp = json.loads(text or "")
        if inp.get("end") is True:
            return inp  # type: ignore[no-any-return]
        dt = inp["dt"]
        if not (isinstance(dt, int | float) and math.isfinite(dt) and dt > 0):
            raise ValueError("dt must be a positive number")
        if not isinstance(inp["prosumers"], dict):
            raise ValueError("prosumers must be an object")
        float(inp["t0"])
        float(inp["irradiance_w_m2"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CosimError(f"{names.inputs('<site>')}: malformed ({exc})") from None
    return inp  # type: ignore[no-any-return]


async def serve_shard(site: SiteConfig, k: int, n: int, broker: str, **kw: object) -> int:
    return await Shard(site, k, n, broker, **kw).serve()  # type: ignore[arg-type]


__all__ = ["Shard", "parse_shard", "serve_shard", "shard_prosumers", "shard_site"]
