"""An emulator shard: share K of N of a site's emulated prosumers, served over their
protocols (Modbus/OPC UA, as `devices serve`) and stepped as a HELICS federate.

Prosumers with an emulated device are dealt round robin in site-file order: shard K
(1-based) of N holds those at positions K-1, K-1+N, ... The shard subscribes to its
prosumers' inputs (`names`), is granted the time the run publishes them (t0 + dt/2),
advances the physics to t1 = t0 + dt with exactly those values (so a sharded run replays
the single-process one bit for bit), then publishes each device's P and Q. Its device
endpoints are published once, before the federation starts executing."""

from __future__ import annotations

import json
import logging
import math
import socket
from pathlib import Path

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
            fed.subscribe(names.irradiance(site))
            fed.subscribe(names.dt_s(site))
            for p in physics.prosumers:
                for key in (names.load_w(site, p), names.v_v(site, p),
                            names.external_w(site, p)):
                    fed.subscribe(key)
            for d in physics.devices:
                fed.subscribe(names.state(site, d))
                fed.publish_to(names.p_w(site, d))
                fed.publish_to(names.q_var(site, d))
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
        first = True
        while True:
            granted = await fed.request(MAXTIME)
            if granted >= MAXTIME:
                return self.steps
            dt = fed.get(names.dt_s(site))
            if not math.isfinite(dt) or dt <= 0:
                continue
            if first:  # the run's physics start at t0 = granted - dt/2
                physics.t_s = granted - 0.5 * dt
                for pr in physics.prosumers.values():
                    pr.update(t_s=physics.t_s)
                first = False
            await self._states()
            self._irr = fed.get(names.irradiance(site), 0.0)
            ext, volts = {}, {}
            for p in physics.prosumers:
                self._load[p] = fed.get(names.load_w(site, p), 0.0)
                ext[p] = fed.get(names.external_w(site, p), 0.0)
                v = fed.get(names.v_v(site, p))
                if math.isfinite(v):
                    volts[p] = v
            physics.step(dt, external_w=ext, voltage_v=volts)
            for d, dev in physics.devices.items():
                p, q = device_pq(dev)
                fed.put(names.p_w(site, d), p)
                fed.put(names.q_var(site, d), q)
            self.steps += 1

    async def _states(self) -> None:
        """Apply the run's device events: offline (server off), silent, online."""
        em = self.emulators
        for d in em.physics.devices:
            want = self.fed.text(names.state(self.site_name, d)) or "online"
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


async def serve_shard(site: SiteConfig, k: int, n: int, broker: str, **kw: object) -> int:
    return await Shard(site, k, n, broker, **kw).serve()  # type: ignore[arg-type]


__all__ = ["Shard", "parse_shard", "serve_shard", "shard_prosumers", "shard_site"]
