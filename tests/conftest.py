"""Shared fixtures: small sites built in code, served on free loopback ports."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

from testbed.config import SiteConfig

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


def make_site(**emulation: object) -> SiteConfig:
    """One prosumer with PV, battery and meter behind one port (units 1, 2, 3)."""
    return SiteConfig.model_validate({
        "name": "unit-site",
        "emulation": {"start": "12:00", "seed": 3, **emulation},
        "prosumers": [{
            "name": "p1",
            "load": {"base_w": 500, "peak_w": 500, "noise": 0.0},
            "devices": [
                {"name": "pv", "kind": "pv", "port": 0, "unit": 1,
                 "params": {"rating_w": 5000, "efficiency": 0.96, "ramp_pct_per_s": 10}},
                {"name": "bat", "kind": "battery", "port": 0, "unit": 2,
                 "params": {"capacity_wh": 10000, "soc_init": 0.5, "max_charge_w": 4000,
                            "max_discharge_w": 5000, "eta_ch": 0.95, "eta_dis": 0.9}},
                {"name": "meter", "kind": "meter", "port": 0, "unit": 3},
            ],
        }],
    })


@pytest.fixture
def site() -> SiteConfig:
    return make_site()


@pytest.fixture(autouse=True, scope="session")
def _feeder_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The session's own feeder cache (`grid.cache`), not the user's ~/.cache: runs and
    CLI subprocesses of the session share it."""
    old = os.environ.get("TESTBED_CACHE_DIR")
    os.environ["TESTBED_CACHE_DIR"] = str(tmp_path_factory.mktemp("feeder-cache"))
    yield
    if old is None:
        os.environ.pop("TESTBED_CACHE_DIR", None)
    else:
        os.environ["TESTBED_CACHE_DIR"] = old


pytest_plugins = ["pytester"]
