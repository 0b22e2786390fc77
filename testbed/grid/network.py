"""Feeders: a pandapower network plus where each prosumer is connected.

A feeder is a bundled LV network (by name) or the user's pandapower JSON file. Prosumers
are mapped to buses explicitly (by bus name or index) or automatically: the bundled
feeders' house connection points in network order, round-robin, so prosumer i sits where
the feeder's designers put customer i.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class GridError(ValueError):
    """A grid set-up that cannot be used; the message names the field and what was expected."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


def _quiet_pandapower() -> Any:
    """Import pandapower without its numba advertisement (we never ask it for numba)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pandapower as pp
    return pp


def _cigre_lv() -> Any:
    import pandapower.networks as pn
    return pn.create_cigre_network_lv()


KERBER_SEED = 0
"""pandapower draws each Kerber house connection's cable type (NAYY 4x50 or NYY 4x35)
from the global `random` module: seeded, the bundled feeder is the same network in every
process (a replay, a HELICS feeder federate), not a new draw each time."""


def _kerber(name: str) -> Callable[[], Any]:
    def make() -> Any:
        import pandapower.networks as pn
        state = random.getstate()
        random.seed(KERBER_SEED)
        try:
            return getattr(pn, name)()
        finally:
            random.setstate(state)  # the caller's random stream is left as it was
    return make


FEEDERS: dict[str, tuple[Callable[[], Any], str]] = {
    "cigre-lv": (_cigre_lv, "CIGRE LV benchmark, 44 buses, 0.4 kV, three feeders (residential, "
                            "industrial, commercial)"),
    "kerber-landnetz": (_kerber("create_kerber_landnetz_kabel_1"),
                        "Kerber rural cable feeder, 18 buses, 8 houses"),
    "kerber-dorfnetz": (_kerber("create_kerber_dorfnetz"),
                        "Kerber village feeder, 116 buses, 57 houses"),
    "kerber-vorstadtnetz": (_kerber("create_kerber_vorstadtnetz_kabel_1"),
                            "Kerber suburban cable feeder, 294 buses, 146 houses"),
}
"""Bundled feeders: name -> (factory, description)."""


def load_network(spec: str | Path) -> Any:
    """A pandapower net from a bundled feeder name or a pandapower JSON file."""
    pp = _quiet_pandapower()
    if str(spec) in FEEDERS:
        return FEEDERS[str(spec)][0]()
    path = Path(spec)
    if not path.exists():
        raise GridError(f"{spec!r} is neither a bundled feeder ({', '.join(FEEDERS)}) "
                        "nor an existing pandapower JSON file", "grid.network")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = pp.from_json(str(path))
    except Exception as exc:  # pandapower raises anything from JSONDecodeError to KeyError
        raise GridError(f"{path}: not a pandapower network file ({type(exc).__name__}: "
                        f"{str(exc)[:200]})", "grid.network") from None
    if not hasattr(net, "bus") or len(net.bus) == 0:
        raise GridError(f"{path}: the network has no buses", "grid.network")
    if len(net.ext_grid) == 0:
        raise GridError(f"{path}: the network has no ext_grid (slack), so no power flow can "
                        "run", "grid.network")
    return net


def bus_label(net: Any, bus: int) -> str:
    name = net.bus.at[bus, "name"]
    return str(name) if isinstance(name, str) and name else f"bus {bus}"


def resolve_bus(net: Any, ref: str | int, field: str) -> int:
    """A bus index from a bus name or index; `GridError` naming `field` if there is none."""
    if isinstance(ref, bool):
        ref = str(ref)
    if isinstance(ref, int):
        if ref in net.bus.index:
            return int(ref)
    else:
        hits = net.bus.index[net.bus.name == ref]
        if len(hits) == 1:
            return int(hits[0])
        if len(hits) > 1:
            raise GridError(f"bus name {ref!r} is not unique in the network (buses "
                            f"{', '.join(map(str, hits))}); use the index", field)
        if ref.isdigit() and int(ref) in net.bus.index:
            return int(ref)
    sample = ", ".join(repr(bus_label(net, b)) for b in consumer_buses(net)[:6])
    raise GridError(f"no bus {ref!r} in the network ({len(net.bus)} buses; house "
                    f"connections include {sample})", field)


def consumer_buses(net: Any) -> list[int]:
    """The low-voltage buses that carry a load, minus transformer secondaries: where houses
    connect. Falls back to every LV bus when the network has no loads."""
    lv = set(net.bus.index[net.bus.vn_kv < 1.0])
    secondaries = set(net.trafo.lv_bus) if len(net.trafo) else set()
    loaded = [int(b) for b in dict.fromkeys(net.load.bus) if b in lv and b not in secondaries]
    return loaded or sorted(int(b) for b in lv - secondaries) or sorted(int(b) for b in lv)


@dataclass(frozen=True)
class Connection:
    prosumer: str
    bus: int
    label: str
    automatic: bool


def map_prosumers(net: Any, prosumers: Sequence[str],
                  explicit: Mapping[str, str | int]) -> list[Connection]:
    """Where each prosumer connects: `explicit` (prosumer -> bus name or index) first, the
    rest round-robin over `consumer_buses` in network order."""
    known = set(prosumers)
    for name in explicit:
        if name not in known:
            raise GridError(f"{name!r} is not a prosumer of this site (prosumers: "
                            f"{', '.join(prosumers)})", f"grid.buses.{name}")
    auto = consumer_buses(net)
    if not auto:
        raise GridError("the network has no low-voltage bus to connect prosumers to",
                        "grid.network")
    out, k = [], 0
    for name in prosumers:
        if name in explicit:
            bus = resolve_bus(net, explicit[name], f"grid.buses.{name}")
            out.append(Connection(name, bus, bus_label(net, bus), False))
        else:
            bus = auto[k % len(auto)]
            k += 1
            out.append(Connection(name, bus, bus_label(net, bus), True))
    return out
