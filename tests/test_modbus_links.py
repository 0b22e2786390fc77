"""Links that survive real gateways: dropped connections, slow answers, pacing, quiet logs.

The emulators sit behind `FaultProxy` (a real TCP proxy on loopback), so the driver meets
the same socket-level faults a flaky serial-to-Ethernet gateway produces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

import pytest
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from testbed.devices.driver import DeviceUnavailable
from testbed.devices.faults import FaultProxy
from testbed.devices.modbus import ModbusLink, SunSpecDevice
from testbed.devices.site import SiteEmulators, open_devices
from testbed.devices.sunspec import RegisterMap
from testbed.scenarios.phases.devices import FAULT_AFTER


@pytest.fixture
async def served(site):
    em = SiteEmulators(site, free_ports=True)
    await em.start(clock=False)
    em.physics.step(1.0)
    yield em
    await em.stop()


def _behind(em: SiteEmulators, proxy_port: int, **fields: object):
    """The served site with every device reached through the proxy (and extra fields)."""
    site = em.resolved_site()
    prosumers = [p.model_copy(update={"devices": [
        d.model_copy(update={"port": proxy_port, **fields}) for d in p.devices]})
        for p in site.prosumers]
    return site.model_copy(update={"prosumers": prosumers})


async def _poll(devs, rounds: int, cadence_s: float) -> dict[str, list[bool]]:
    """Poll every device once per round, concurrently as the engine does."""
    out: dict[str, list[bool]] = {n: [] for n in devs}

    async def one(name: str) -> None:
        try:
            await devs[name].read()
            out[name].append(True)
        except DeviceUnavailable:
            out[name].append(False)

    for _ in range(rounds):
        await asyncio.gather(*(one(n) for n in devs))
        await asyncio.sleep(cadence_s)
    return out


def _longest_failure_run(oks: list[bool]) -> int:
    run = best = 0
    for ok in oks:
        run = 0 if ok else run + 1
        best = max(best, run)
    return best


async def test_a_link_dropping_every_10th_request_keeps_every_unit_polled(served, capfd):
    port = served.endpoints["pv"].port
    async with FaultProxy("127.0.0.1", port, drop_every=10) as proxy:
        devs = open_devices(_behind(served, proxy.port))
        link = devs["pv"].link
        assert all(d.link is link for d in devs.values())  # three units, one link
        for d in devs.values():
            await d.connect()
        discoveries = proxy.requests
        results = await _poll(devs, rounds=40, cadence_s=0.02)
        for d in devs.values():
            await d.close()
    assert proxy.drops >= 10  # the link really was dropped, repeatedly
    for name, oks in results.items():
        share = sum(oks) / len(oks)
        assert share >= 0.9, (name, share, oks)
        assert _longest_failure_run(oks) < FAULT_AFTER, (name, oks)  # never declared faulted
    # a reconnect keeps the map (a rediscovery costs ~11 requests per unit): one read per
    # poll, plus the retried read of the poll that met the drop
    per_poll = (proxy.requests - discoveries) / (3 * 40)
    assert per_poll < 1.2, per_poll
    out, err = capfd.readouterr()
    assert "pymodbus" not in out + err and "0x" not in out + err


async def test_a_changed_map_is_discovered_again():
    """The free check is a real check: another device on the same port (models in another
    order) is discovered again on the next poll, and read correctly."""
    first = RegisterMap.build([1, 103, 120, 123])
    first.set(103, "W", 1234)
    second = RegisterMap.build([1, 120, 123, 103])  # the inverter model moved
    second.set(103, "W", 4321)

    async def serve(m: RegisterMap, port: int = 0) -> ModbusTcpServer:
        srv = ModbusTcpServer([SimDevice(1, [SimData(40000, values=m.registers,
                                                     datatype=DataType.REGISTERS)])],
                              address=("127.0.0.1", port))
        await srv.serve_forever(background=True)
        return srv

    srv = await serve(first)
    port = srv.transport.sockets[0].getsockname()[1]
    dev = SunSpecDevice("inv", ModbusLink("127.0.0.1", port, backoff_s=0.01), 1)
    try:
        assert (await dev.read()).values["p_w"] == 1234
        address = next(m.address for m in dev.models if m.id == 103)
        await srv.shutdown()
        srv = await serve(second, port)
        for _ in range(50):
            with contextlib.suppress(DeviceUnavailable):
                reading = await dev.read()
                break
            await asyncio.sleep(0.02)
        assert reading.values["p_w"] == 4321
        assert next(m.address for m in dev.models if m.id == 103) != address
    finally:
        dev.link.close()
        await srv.shutdown()


async def test_a_slow_device_is_reported_as_a_timeout_with_the_field_to_raise(served):
    port = served.endpoints["meter"].port
    async with FaultProxy("127.0.0.1", port) as proxy:
        devs = open_devices(_behind(served, proxy.port, timeout_s=1.0, retries=0), ["meter"])
        meter = devs["meter"]
        await meter.connect()
        proxy.latency_s = 1.2
        with pytest.raises(DeviceUnavailable, match=r"meter \(.*unit 3\): .*timeout, no response "
                                                     r"within 1 s .*raise timeout_s of device "
                                                     r"'meter' in the site file"):
            await meter.read()
        # once the device is quick again, the link recovers on the same connection: the
        # late answer to the timed-out request is skipped by its transaction id (pymodbus'
        # server drops the request queued behind the slow one, which the retry repeats)
        proxy.latency_s = 0.0
        meter.retries = 1
        generation = meter.link.generation
        for _ in range(3):
            assert (await meter.read()).values["import_wh"] == 1_000_000
        assert meter.link.generation == generation  # no reconnect was needed
        await meter.close()


async def test_discovery_of_a_slow_device_says_timeout_not_missing_sunspec(served):
    port = served.endpoints["meter"].port
    async with FaultProxy("127.0.0.1", port, latency_s=1.2) as proxy:
        link = ModbusLink("127.0.0.1", proxy.port, timeout_s=1.0)
        meter = SunSpecDevice("meter", link, 3, "meter", retries=0)
        with pytest.raises(DeviceUnavailable, match=r"timeout, no response within 1 s"):
            await meter.connect()
        link.close()


async def test_a_failed_request_fails_only_its_own_unit(served):
    """One unit silent behind the gateway: the others on the same link keep answering."""
    devs = open_devices(_behind(served, served.endpoints["pv"].port, retries=0))
    for d in devs.values():
        await d.connect()
    served.silence("bat")
    results = await _poll(devs, rounds=5, cadence_s=0.0)
    assert results["bat"] == [False] * 5
    assert results["pv"] == [True] * 5 and results["meter"] == [True] * 5
    served.silence("bat", False)
    assert (await devs["bat"].read()).values["soc_pct"] is not None
    await devs["pv"].close()


async def test_min_gap_paces_requests_on_a_link(served):
    """Requests on one link never overlap and keep the configured gap between them."""
    devs = open_devices(_behind(served, served.endpoints["pv"].port, min_gap_s=0.05))
    link = devs["pv"].link
    assert link.min_gap_s == 0.05
    stamps: list[tuple[float, float]] = []
    real = link._request

    async def spy(*args, **kwargs):
        result = await real(*args, **kwargs)
        stamps.append((link._last_done,))
        return result

    for d in devs.values():
        await d.connect()
    link._request = spy  # type: ignore[method-assign]
    await asyncio.gather(*(d.read() for d in devs.values()))
    done = sorted(s[0] for s in stamps)
    assert len(done) == 3
    assert all(b - a >= 0.05 for a, b in zip(done, done[1:], strict=False))  # paced, in order
    await devs["pv"].close()


async def test_pymodbus_logs_never_reach_the_console(served, capsys):
    """Even with pymodbus logging at DEBUG and a console handler on the root logger."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stdout)
    root.addHandler(handler)
    logging.getLogger("pymodbus").setLevel(logging.DEBUG)
    try:
        port = served.endpoints["pv"].port
        async with FaultProxy("127.0.0.1", port) as proxy:
            dev = open_devices(_behind(served, proxy.port), ["pv"])["pv"]
            await dev.connect()
            proxy.drop_every = 3
            oks = await _poll({"pv": dev}, rounds=6, cadence_s=0.0)
            await dev.close()
    finally:
        root.removeHandler(handler)
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    assert proxy.drops >= 2 and sum(oks["pv"]) >= 3
    out = capsys.readouterr().out
    assert "send:" not in out and "recv:" not in out and "0x" not in out, out


async def test_a_request_handler_that_waits_is_finished_by_a_task():
    """The server runs each request's handler on the spot; one that waits after all (a
    datastore that awaits) is taken over by a task from where it stopped, with what it
    waited for sent in, and its cancellation thrown in."""
    from testbed.devices.modbus_server import _resume

    seen: list[str] = []

    async def handler(delay: float) -> int:
        seen.append("start")
        await asyncio.sleep(delay)
        seen.append("after wait")
        return 7

    coro = handler(0.01)
    waiting = coro.send(None)  # runs to its first wait, as _Handler._run does
    assert seen == ["start"]
    assert await asyncio.get_running_loop().create_task(_resume(coro, waiting)) == 7
    assert seen == ["start", "after wait"]

    coro = handler(10.0)
    task = asyncio.get_running_loop().create_task(_resume(coro, coro.send(None)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["start", "after wait", "start"]
    assert coro.cr_frame is None  # the handler itself was cancelled, not left suspended


async def test_each_request_times_out_at_its_own_deadline(served):
    """One watch timer per connection: a short timeout after a long one still ends at the
    short one (the watch, armed for the long deadline, moves earlier), and a run of
    unanswered requests makes pymodbus close the connection, which the next request
    reopens."""
    port = served.endpoints["meter"].port
    async with FaultProxy("127.0.0.1", port) as proxy:
        link = ModbusLink("127.0.0.1", proxy.port, timeout_s=1.0)
        meter = SunSpecDevice("meter", link, 3, "meter", retries=0)
        await meter.connect()
        loop = asyncio.get_running_loop()
        assert await link.read(40000, 2, 3, timeout_s=30.0) == [0x5375, 0x6E53]
        proxy.latency_s = 2.5
        t = loop.time()
        with pytest.raises(DeviceUnavailable, match=r"timeout, no response within 0.3 s"):
            await link.read(40000, 2, 3, timeout_s=0.3)
        assert 0.3 <= loop.time() - t < 2.0
        generation = link.generation
        for _ in range(4):  # pymodbus closes after retries + 3 unanswered requests
            with contextlib.suppress(DeviceUnavailable):
                await link.read(40000, 2, 3, timeout_s=0.1)
        assert not link.connected
        proxy.latency_s = 0.0
        assert await link.read(40000, 2, 3) == [0x5375, 0x6E53]
        assert link.generation == generation + 1
        link.close()


async def test_the_run_reads_a_links_devices_in_one_task_and_a_silent_one_stops_none(
        served, tmp_path):
    """DeviceIO reads the devices sharing a Modbus link one after another (the link
    carries one request at a time): the first one silent, the others still answer, and
    the measurements keep the site's order."""
    from testbed.scenarios.phases.devices import DeviceIO
    from testbed.telemetry.store import RunStore

    site = served.resolved_site()
    store = RunStore(tmp_path / "run.db")
    io = DeviceIO(site, open_devices(site), store, served)
    assert io._groups == [["pv", "bat", "meter"]]
    await io.connect()
    try:
        served.silence("pv")
        for t in (60.0, 120.0):
            r = await io.step(t, 60.0)
        assert io.read_errors == 2 and r.metered["p1"].pv_w == 0.0  # dropped after 2 fails
        assert r.soc["p1"] is not None and r.metered["p1"].has_meter
        served.silence("pv", False)
        r = await io.step(180.0, 60.0)
        assert r.metered["p1"].pv_w > 0
    finally:
        await io.close()
    rows = store.db.execute("SELECT t, device FROM measurements ORDER BY rowid").fetchall()
    firsts = [d for i, (t, d) in enumerate(rows) if i == 0 or rows[i - 1][1] != d]
    assert firsts == ["bat", "meter", "bat", "meter", "pv", "bat", "meter"]
    store.close()


async def test_a_connection_closed_between_requests_leaves_no_stray_future() -> None:
    """A gateway closing an idle connection (no request in flight): the link fails nothing
    and asyncio has no "Future exception was never retrieved" to report."""
    import gc

    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    loop = asyncio.get_running_loop()
    reported: list[dict] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    server = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
    try:
        link = ModbusLink("127.0.0.1", server.sockets[0].getsockname()[1])
        first = await link.ensure()
        for _ in range(50):  # until the close has reached the client
            if not first.connected:
                break
            await asyncio.sleep(0.01)
        assert not first.connected
        link.drop("closed by the gateway")
        del first
        gc.collect()
        await asyncio.sleep(0)
        assert [c.get("message") for c in reported] == []
    finally:
        loop.set_exception_handler(None)
        server.close()
        await server.wait_closed()
