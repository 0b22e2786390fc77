"""From a site file's `grid:` block to a ready `GridChecker`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .check import GridChecker
from .network import GridError, load_network, map_prosumers

if TYPE_CHECKING:
    from testbed.config import SiteConfig


def checker_for(site: SiteConfig) -> GridChecker:
    """The DSO check for `site`; a `GridError` names the site file and the field."""
    cfg = site.grid
    try:
        net = load_network(cfg.network)
        connections = map_prosumers(net, [p.name for p in site.prosumers], cfg.buses)
        return GridChecker(net, connections, cfg.limits, engine=cfg.engine)
    except GridError as exc:
        where = site.source or f"site {site.name!r}"
        raise GridError(f"{where}: {exc}", exc.field) from None
