"""pytest plugin: emulated SunSpec devices for your own controller's tests.

Installed with testbed (entry point `pytest11`), so in any project that has testbed::

    def test_my_controller(testbed_emulators):
        site = testbed_emulators.site            # the site, with the ports in use
        ep = testbed_emulators.endpoints["house-1-battery"]
        my_controller.connect(ep.host, ep.port, unit=ep.unit)   # real Modbus TCP
        ...

The site comes from `--testbed-site PATH` on the command line, the `testbed_site` ini
option, or the bundled `demo` site; override the `testbed_site` fixture to choose per
test module. Each device is served on a free loopback port, so tests can run in parallel.
`testbed_emulators_factory(site, clock=False)` gives extra sites; with the clock off,
`handle.step(dt_s)` advances the physics deterministically.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .config import SiteConfig, load_site
from .devices.site import BackgroundEmulators


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("testbed", "testbed emulated devices")
    group.addoption("--testbed-site", default=None,
                    help="site file (or bundled site name) for the testbed_emulators fixture")
    parser.addini("testbed_site", "site file (or bundled name) for testbed_emulators", default="demo")


@pytest.fixture
def testbed_site(request: pytest.FixtureRequest) -> str | Path:
    """The site the `testbed_emulators` fixture serves (override to choose another)."""
    return request.config.getoption("--testbed-site") or request.config.getini("testbed_site")


@pytest.fixture
def testbed_emulators_factory() -> Iterator[Callable[..., BackgroundEmulators]]:
    """Start any number of sites' emulators; all are stopped at teardown."""
    started: list[BackgroundEmulators] = []

    def start(site: str | Path | SiteConfig, **kwargs: Any) -> BackgroundEmulators:
        cfg = site if isinstance(site, SiteConfig) else load_site(site)
        handle = BackgroundEmulators(cfg, **kwargs)
        handle.start()
        started.append(handle)
        return handle

    yield start
    for handle in reversed(started):
        handle.stop()


@pytest.fixture
def testbed_emulators(testbed_site: str | Path,
                      testbed_emulators_factory: Callable[..., BackgroundEmulators]) -> BackgroundEmulators:
    """The site's emulated devices, served on free loopback ports with a real-time clock."""
    return testbed_emulators_factory(testbed_site)
