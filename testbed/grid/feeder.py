"""From a site file's `grid:` block to a ready `GridChecker`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import cache
from .check import GridChecker
from .network import GridError, load_network, map_prosumers

if TYPE_CHECKING:
    from testbed.config import SiteConfig


def checker_for(site: SiteConfig, *, cache_dir: Path | None = None,
                use_cache: bool = True) -> GridChecker:
    """The DSO check for `site`; a `GridError` names the site file and the field.

    A feeder built before with the same network, mapping and software comes from
    `grid.cache` (no pandapower import, no build); a new one is built and kept there."""
    cfg = site.grid
    names = [p.name for p in site.prosumers]
    folder = (Path(cache_dir) if cache_dir is not None else cache.cache_dir()) if use_cache \
        else None
    k = cache.key(cfg.network, names, cfg.buses, cfg.engine) if folder is not None else None
    try:
        if k is not None and (state := cache.load(k, folder)) is not None:
            def net() -> Any:
                if cache.key(cfg.network, names, cfg.buses, cfg.engine) != k:
                    raise GridError(f"{cfg.network} changed since the checker was made",
                                    "grid.network")
                return load_network(cfg.network)
            return GridChecker.restore(state, cfg.limits, net=net)
        net = load_network(cfg.network)
        connections = map_prosumers(net, names, cfg.buses)
        checker = GridChecker(net, connections, cfg.limits, engine=cfg.engine)
    except GridError as exc:
        where = site.source or f"site {site.name!r}"
        raise GridError(f"{where}: {exc}", exc.field) from None
    if k is not None and (state := checker.state()) is not None:
        cache.store(k, state, folder)
    return checker
