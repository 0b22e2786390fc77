"""A cache of built feeders: what a fast-flow `GridChecker` is made of once pandapower has
built the network and its admittance matrices, so a run does not import pandapower (~1.6 s)
and build the Kerber village feeder (~0.6 s) each time it starts.

Correct by construction: an entry is keyed by everything it derives from - the network
(a bundled feeder's name and `KERBER_SEED`, or the SHA-256 of the user's JSON file), the
prosumers and their bus mapping, the engine, the versions of Python, pandapower,
lightsim2grid, numpy and scipy, and the source of the code that builds it (this package's
modules) - and the entry repeats its key, which must match. It is written to a temporary
file and renamed into place (readers never see half a file); an entry that cannot be read
or does not match (corrupt, truncated, another key) is rebuilt and replaced, never used.
Only successful builds are kept: a bad network or mapping still fails with its error.

Where: `$TESTBED_CACHE_DIR`, else `$XDG_CACHE_HOME/testbed`, else `~/.cache/testbed`;
`TESTBED_CACHE_DIR=` (empty) turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .check import CheckerState
from .network import FEEDERS, KERBER_SEED, Connection

log = logging.getLogger(__name__)

FORMAT = 1
"""Bumped when the entry's layout changes (the code hash below changes with it anyway)."""
_SPARSE = {"ybus": "csc", "yf": "csr", "yt": "csr"}
_SCALARS = ("base_mva", "ref_load_mw")
_CODE = ("cache.py", "check.py", "network.py", "powerflow.py", "feeder.py")


def cache_dir() -> Path | None:
    """The cache's folder, None when turned off (`TESTBED_CACHE_DIR=`)."""
    env = os.environ.get("TESTBED_CACHE_DIR")
    if env is not None:
        return Path(env) if env else None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "testbed"


def _versions() -> dict[str, str]:
    out = {"python": sys.version}
    for dist in ("pandapower", "lightsim2grid", "numpy", "scipy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def _code_hash() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _CODE:
        h.update(name.encode() + b"\0" + (here / name).read_bytes() + b"\0")
    return h.hexdigest()


def key(network: str | Path, prosumers: Sequence[str], buses: Mapping[str, str | int],
        engine: str) -> dict[str, Any] | None:
    """The entry's key, None when the network cannot be keyed (a file that cannot be read:
    the build reports it)."""
    spec: dict[str, Any]
    if str(network) in FEEDERS:
        spec = {"bundled": str(network), "kerber_seed": KERBER_SEED}
    else:
        try:
            spec = {"file_sha256": hashlib.sha256(Path(network).read_bytes()).hexdigest()}
        except OSError:
            return None
    return {"format": FORMAT, "network": spec, "prosumers": list(prosumers),
            "buses": {k: buses[k] for k in sorted(buses)}, "engine": engine,
            "versions": _versions(), "code": _code_hash()}


def _path(folder: Path, k: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(k, sort_keys=True).encode()).hexdigest()
    return folder / f"feeder-{digest[:40]}.npz"


def load(k: dict[str, Any], folder: Path | None = None) -> CheckerState | None:
    """The entry for key `k`, None when there is none or it is not sound (then it is
    rebuilt and replaced)."""
    folder = folder if folder is not None else cache_dir()
    if folder is None:
        return None
    path = _path(folder, k)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"][()]))
            if meta["key"] != json.loads(json.dumps(k)):
                raise ValueError("another key")
            flow: dict[str, Any] = {}
            from scipy import sparse
            for name, fmt in _SPARSE.items():
                make = sparse.csc_matrix if fmt == "csc" else sparse.csr_matrix
                flow[name] = make((z[f"{name}.data"], z[f"{name}.indices"],
                                   z[f"{name}.indptr"]), shape=tuple(z[f"{name}.shape"]))
            for name in _SCALARS:
                flow[name] = float(z[name][()])
            flow["sizes"] = tuple(int(n) for n in z["sizes"])
            for name in _flow_arrays():
                flow[name] = z[name].copy()
        conns = tuple(Connection(str(p), int(b), str(label), bool(auto))
                      for p, b, label, auto in meta["connections"])
        return CheckerState(conns, tuple(meta["bus_names"]), tuple(meta["line_names"]),
                            tuple(meta["trafo_names"]), tuple(int(r) for r in
                                                              meta["conn_rows"]), flow)
    except Exception as exc:  # noqa: BLE001 - any unreadable entry is rebuilt, never used
        log.warning("feeder cache entry %s not used (%s: %s); rebuilding it", path,
                    type(exc).__name__, str(exc)[:200])
        return None


def _flow_arrays() -> list[str]:
    from .powerflow import FastFlow
    return [n for n in FastFlow.STATE if n not in _SPARSE and n not in _SCALARS
            and n != "sizes"]


def store(k: dict[str, Any], state: CheckerState, folder: Path | None = None) -> Path | None:
    """Write the entry atomically; a cache that cannot be written is only logged."""
    folder = folder if folder is not None else cache_dir()
    if folder is None:
        return None
    path = _path(folder, k)
    arrays: dict[str, Any] = {}
    flow = state.flow
    for name in _SPARSE:
        m = flow[name]
        arrays |= {f"{name}.data": m.data, f"{name}.indices": m.indices,
                   f"{name}.indptr": m.indptr, f"{name}.shape": np.asarray(m.shape)}
    for name in _SCALARS:
        arrays[name] = np.asarray(flow[name], dtype=float)
    arrays["sizes"] = np.asarray(flow["sizes"], dtype=np.int64)
    for name in _flow_arrays():
        arrays[name] = np.asarray(flow[name])
    meta = {"key": k, "connections": [[c.prosumer, c.bus, c.label, c.automatic]
                                      for c in state.connections],
            "bus_names": list(state.bus_names), "line_names": list(state.line_names),
            "trafo_names": list(state.trafo_names), "conn_rows": list(state.conn_rows)}
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".feeder-", suffix=".tmp",
                                         delete=False) as f:
            tmp = Path(f.name)
            np.savez(f, meta=np.asarray(json.dumps(meta)), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path
    except Exception as exc:  # noqa: BLE001 - a cache that cannot be written costs a rebuild
        log.warning("feeder cache not written to %s (%s: %s)", folder, type(exc).__name__,
                    exc)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        return None
