"""Modbus TCP pipelining: several requests in flight on one link, paired by transaction id.

Real servers on loopback: our emulator server, a plain pymodbus server (register images
from pysunspec2, as `test_sunspec_foreign` builds them), and a tiny raw asyncio Modbus TCP
server written here that answers the way a test needs (in reverse order, not at all, with
strangers' answers in between, in pieces, or by closing the connection).
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from test_config import GOOD
from test_sunspec_foreign import LEGACY_PV, Served, image

from testbed.config import ConfigError, load_site
from testbed.devices.driver import DeviceUnavailable
from testbed.devices.modbus import ModbusLink, RequestTimeout, SunSpecDevice
from testbed.devices.site import SiteEmulators, open_devices
from testbed.scenarios.phases.devices import DeviceIO
from testbed.telemetry.store import WALL_CLOCK_COLUMNS, RunStore

# ------------------------------------------------------------------ a raw Modbus TCP server

Request = tuple[int, int, int, int]
"""transaction id, unit, address, count of a holding-register read."""


def registers(unit: int, address: int, count: int) -> list[int]:
    """What the raw server answers: the unit and address first, so a test sees whose it is."""
    return [unit, address, *range(count - 2)]


def answer(tid: int, unit: int, address: int, count: int) -> bytes:
    regs = registers(unit, address, count)
    pdu = struct.pack(f">BB{count}H", 3, 2 * count, *regs)
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


class RawServer:
    """Collects `batch` read requests per connection, then lets `respond(transport,
    requests, connection)` answer them as the test wants (default: in order, one write)."""

    def __init__(self, respond: Callable[..., None] | None = None, batch: int = 3) -> None:
        self.respond = respond or (lambda tr, reqs, k: tr.write(b"".join(answer(*r) for r in reqs)))
        self.batch = batch
        self.connections = 0
        self.reads: list[bytes] = []
        """Every chunk the server read, as it came (one write of the client's: one chunk)."""
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _RawProtocol(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


class _RawProtocol(asyncio.Protocol):
    def __init__(self, server: RawServer) -> None:
        self.server, self.buf, self.requests = server, b"", []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.server.connections += 1
        self.connection = self.server.connections

    def data_received(self, data: bytes) -> None:
        self.server.reads.append(data)
        self.buf += data
        while len(self.buf) >= 12:
            tid, _, _, unit, fc, address, count = struct.unpack_from(">HHHBBHH", self.buf)
            assert fc == 3
            self.requests.append((tid, unit, address, count))
            self.buf = self.buf[12:]
        if len(self.requests) >= self.server.batch:
            requests, self.requests = self.requests, []
            self.server.respond(self.transport, requests, self.connection)


async def three_reads(link: ModbusLink, timeouts: tuple[float, float, float] = (2.0, 2.0, 2.0)):
    """Units 1, 2, 3 read at addresses 100, 200, 300, issued in the same loop pass (on a
    connected link: requests that find it down connect one after another)."""
    await link.ensure()
    return await asyncio.gather(*(link.read(100 * u, 6, u, timeout_s=t)
                                  for u, t in zip((1, 2, 3), timeouts, strict=True)),
                                return_exceptions=True)


# ------------------------------------------------------------------ pairing and failures

async def test_requests_of_one_pass_leave_in_one_write_and_answers_out_of_order_pair_right():
    def reverse(transport, requests, _):
        transport.write(b"".join(answer(*r) for r in reversed(requests)))

    async with RawServer(reverse) as srv:
        link = ModbusLink("127.0.0.1", srv.port, max_in_flight=3)
        try:
            got = await three_reads(link)
            assert got == [registers(u, 100 * u, 6) for u in (1, 2, 3)]
            assert [len(r) for r in srv.reads] == [36]  # three requests, one write
            assert link.requests == 3 and link.failures == 0
        finally:
            link.close()


async def test_a_request_left_unanswered_times_out_alone_and_its_late_answer_is_ignored():
    """The server never answers the 2nd of 3 pipelined requests in time: the 2nd gets
    its own timeout, the others their answers; its answer, sent late (just before the
    answer to a later request), is not taken for that later request's."""
    held: list[Request] = []

    def skip_second(transport, requests, _):
        if len(requests) == 3:
            held.append(requests[1])
            transport.write(answer(*requests[0]) + answer(*requests[2]))
        else:  # the next request: the late answer first, then its own
            transport.write(b"".join(answer(*r) for r in (*held, *requests)))

    async with RawServer(skip_second) as srv:
        link = ModbusLink("127.0.0.1", srv.port, max_in_flight=3)
        try:
            got = await three_reads(link, (5.0, 0.3, 5.0))
            assert got[0] == registers(1, 100, 6) and got[2] == registers(3, 300, 6)
            assert isinstance(got[1], RequestTimeout)
            assert "unit 2: timeout, no response within 0.3 s" in str(got[1])
            srv.batch = 1
            assert await link.read(400, 6, 2) == registers(2, 400, 6)
            assert link.connected and link.generation == 1 and srv.connections == 1
        finally:
            link.close()


@pytest.mark.parametrize("in_flight", [1, 3])
async def test_each_request_keeps_its_own_timeout_on_a_shared_link(in_flight):
    """The link's timeout is 5 s (its first device's); a read given 0.2 s that is never
    answered fails before a 1 s sleep started beside it ends (pymodbus keeps its own copy
    of the client's settings: the timeout must be set on that one)."""
    def all_but_unit_2(transport, requests, _):
        transport.write(b"".join(answer(*r) for r in requests if r[1] != 2))

    async with RawServer(all_but_unit_2, batch=1) as srv:
        link = ModbusLink("127.0.0.1", srv.port, timeout_s=5.0, max_in_flight=in_flight)
        try:
            assert await link.read(100, 6, 1) == registers(1, 100, 6)
            done: list[str] = []

            async def silent() -> None:
                with pytest.raises(RequestTimeout, match="no response within 0.2 s"):
                    await link.read(200, 6, 2, timeout_s=0.2)
                done.append("read")

            async def sleep() -> None:
                await asyncio.sleep(1.0)
                done.append("sleep")

            await asyncio.gather(silent(), sleep())
            assert done == ["read", "sleep"]
        finally:
            link.close()


async def test_strangers_and_pieces_never_pair_with_the_wrong_request():
    """Before each right answer: one with a transaction id nobody waits for and one from
    another unit with the right id; the right answers then come byte by byte in two
    writes split inside a frame."""

    def noisy(transport, requests, _):
        data = b""
        for tid, unit, address, count in requests:
            data += answer(tid + 1000, unit, address, count)  # an id not in flight
            data += answer(tid, unit + 10, address, count)  # the id, another unit
            data += answer(tid, unit, address, count)
        cut = len(data) - 20
        transport.write(data[:cut])
        asyncio.get_running_loop().call_later(0.05, transport.write, data[cut:])

    async with RawServer(noisy) as srv:
        link = ModbusLink("127.0.0.1", srv.port, max_in_flight=3)
        try:
            assert await three_reads(link) == [registers(u, 100 * u, 6) for u in (1, 2, 3)]
        finally:
            link.close()


async def test_connection_loss_fails_every_request_in_flight_and_the_next_reconnects():
    def close_first(transport, requests, connection):
        if connection == 1:
            transport.close()
        else:
            transport.write(b"".join(answer(*r) for r in requests))

    async with RawServer(close_first) as srv:
        link = ModbusLink("127.0.0.1", srv.port, max_in_flight=3)
        try:
            got = await three_reads(link)
            assert all(isinstance(g, DeviceUnavailable) and "connection lost" in str(g)
                       for g in got), got
            srv.batch = 1
            assert await link.read(100, 6, 1) == registers(1, 100, 6)
            assert link.generation == 2 and srv.connections == 2
        finally:
            link.close()


# ------------------------------------------------------------------ real SunSpec servers

def rows_in_order(path: Path) -> list[tuple[str, tuple]]:
    """Every row of a run store in the order it was written, wall-clock columns aside
    and the emulators' loopback ports (free ones, different in any two runs) masked."""
    db = RunStore.open_readonly(path)
    try:
        out = []
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table' "
                                   "ORDER BY name").fetchall():
            cols = [r[1] for r in db.execute(f"PRAGMA table_info({table})")
                    if (table, r[1]) not in WALL_CLOCK_COLUMNS]
            for row in db.execute(f"SELECT {', '.join(cols)} FROM {table} ORDER BY rowid"):
                if table == "meta" and ("meta", row[0]) in WALL_CLOCK_COLUMNS:
                    continue
                out.append((table, tuple(re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", v)
                                         if isinstance(v, str) else v for v in row)))
        return out
    finally:
        db.close()


async def _device_phase(site, store_path: Path, pipelined: bool) -> tuple[list, dict]:
    """Three steps of the run's device phase against fresh emulators (a unit silenced in
    the second), setpoints written after each: the store's rows and the links."""
    em = SiteEmulators(site, free_ports=True)
    await em.start(clock=False)
    served = em.resolved_site()
    if not pipelined:
        served = served.model_copy(update={"prosumers": [p.model_copy(update={"devices": [
            d.model_copy(update={"max_in_flight": 1}) for d in p.devices]})
            for p in served.prosumers]})
    store = RunStore(store_path)
    io = DeviceIO(site, open_devices(served), store, em)
    try:
        await io.connect()
        for k in range(4):
            em.silence("bat", k in (1, 2))
            em.physics.step(60.0)
            await io.step(60.0 * k, 60.0)
            await io.command(60.0 * k, {"p1": 800.0 * (k - 1)})
        links = io.summary()["links"]
        assert io.devices["pv"].link.generation == 1
    finally:
        await io.close()
        await em.stop()
        store.close()
    return rows_in_order(store_path), links


async def test_our_emulators_pipeline_and_the_store_is_the_same_as_one_at_a_time(site, tmp_path):
    piped, links = await _device_phase(site, tmp_path / "piped.db", True)
    plain, one = await _device_phase(site, tmp_path / "plain.db", False)
    assert links == {"pipelined": [{"devices": ["pv", "bat", "meter"], "in_flight": 3}],
                     "one_at_a_time": []}
    assert one == {"pipelined": [], "one_at_a_time": [["pv", "bat", "meter"]]}
    kinds = [r[1][1] for r in piped if r[0] == "events"]
    assert "read-failed" in kinds and "fault" in kinds and "setpoint" in kinds
    assert sum(1 for t, _ in piped if t == "measurements") > 3 * 20
    assert piped == plain


async def test_a_run_store_is_the_same_with_and_without_pipelining(tmp_path, monkeypatch):
    """The fast run of a bundled scenario with a faulted battery: pipelined links to the
    emulators (as the run has them) and one request at a time leave the same rows in the
    same order."""
    from testbed.devices import site as site_module
    from testbed.scenarios.engine import Run
    from testbed.scenarios.model import load_scenario

    sc = load_scenario("device-fault")
    sc = sc.model_copy(update={"start": 12 * 3600.0 + 15 * 60, "duration": 1200.0})
    piped = await Run(sc, out=tmp_path / "piped", report=False).execute()
    assert piped.summary["devices"]["links"]["pipelined"]
    monkeypatch.setattr(site_module, "pipeline_emulated", lambda site: site)
    plain = await Run(sc, out=tmp_path / "plain", report=False).execute()
    assert not plain.summary["devices"]["links"]["pipelined"]
    assert [f["device"] for f in piped.summary["faults"]] == ["house-1-battery"]
    rows = rows_in_order(piped.run_dir / "run.db")
    assert sum(1 for t, _ in rows if t == "measurements") > 1000
    assert rows == rows_in_order(plain.run_dir / "run.db")


async def test_our_server_answers_every_request_of_a_read_in_one_write(site):
    em = SiteEmulators(site, free_ports=True)
    endpoints = await em.start(clock=False)
    try:
        port = endpoints["pv"].port
        frames = b"".join(struct.pack(">HHHBBHH", tid, 0, 6, unit, 3, 40000, 2)
                          for tid, unit in ((7, 1), (8, 2), (9, 3), (10, 9)))

        def exchange() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(frames[:40])  # three requests and the start of the fourth
                first = s.recv(65536)
                s.sendall(frames[40:])
                return first + s.recv(65536)

        data = await asyncio.to_thread(exchange)
        # the three answers came in the one read; SunS at 40000 for each unit
        sunspec = struct.pack(">BB2H", 3, 4, 0x5375, 0x6E53)
        assert data[:3 * 13] == b"".join(struct.pack(">HHHB", tid, 0, 7, unit) + sunspec
                                        for tid, unit in ((7, 1), (8, 2), (9, 3)))
        # unit 9 is nobody: the gateway's exception 0x0B, paired by its transaction id
        assert data[39:] == struct.pack(">HHHBBB", 10, 0, 3, 9, 0x83, 0x0B)
    finally:
        await em.stop()


async def test_a_plain_pymodbus_server_works_one_at_a_time_and_drops_pipelined_requests():
    """Why `max_in_flight` defaults to 1: pymodbus' server takes the first request of a
    read and loses the others (its answer empties its receive buffer)."""
    async with Served({u: image(LEGACY_PV) for u in (1, 2, 3)}) as srv:
        link = ModbusLink("127.0.0.1", srv.port)  # the default: one in flight
        devices = [SunSpecDevice(f"pv{u}", link, u, "pv") for u in (1, 2, 3)]
        try:
            for d in devices:
                await d.connect()
            readings = await asyncio.gather(*(d.read() for d in devices))
            assert [r.values["p_w"] for r in readings] == [4990.0] * 3
            piped = ModbusLink("127.0.0.1", srv.port, max_in_flight=3)
            await piped.ensure()
            got = await asyncio.gather(*(piped.read(40000, 2, u, timeout_s=0.3) for u in (1, 2, 3)),
                                       return_exceptions=True)
            assert got[0] == [0x5375, 0x6E53]  # SunS
            assert [type(g) for g in got[1:]] == [RequestTimeout, RequestTimeout]
            piped.close()
        finally:
            link.close()


# ------------------------------------------------------------------ configuration

SITE = GOOD.replace("        unit: 2\n", "        unit: 2\n        FIELDS\n")
"""test_config's site, FIELDS (line 10) to be replaced by the battery's fields under test."""


@pytest.mark.parametrize("fields, expected", [
    ("max_in_flight: 0", r"site.yaml:10: prosumers\[0\].devices\[1\].max_in_flight: Input "
                         r"should be greater than or equal to 1"),
    ("max_in_flight: 33", r"site.yaml:10: .*max_in_flight: Input should be less than or equal to 32"),
    ("max_in_flight: many", r"site.yaml:10: .*max_in_flight: Input should be a valid integer"),
    ("transport: rtu-over-tcp\n        max_in_flight: 3",
     r"site.yaml:11: prosumers\[0\].devices\[1\].max_in_flight: 3 requests in flight need "
     r"Modbus TCP: RTU frames \(transport: rtu-over-tcp\) carry no transaction id"),
    ("transport: rtu\n        serial: {port: /dev/ttyUSB0}\n        max_in_flight: 2",
     r"site.yaml:12: .*max_in_flight: 2 requests in flight need Modbus TCP: RTU frames "
     r"\(transport: rtu\)"),
    ("min_gap_s: 0.05\n        max_in_flight: 2",
     r"site.yaml:11: .*max_in_flight: 2 requests in flight, but min_gap_s 0.05"),
])
def test_bad_max_in_flight_names_file_line_and_field(tmp_path: Path, fields, expected):
    path = tmp_path / "site.yaml"
    path.write_text(SITE.replace("FIELDS", fields))
    with pytest.raises(ConfigError, match=expected):
        load_site(path)


def test_links_take_the_smallest_max_in_flight_and_rtu_stays_at_one(tmp_path: Path):
    path = tmp_path / "site.yaml"
    path.write_text(SITE.replace("FIELDS", "max_in_flight: 4").replace(
        "unit: 1}", "unit: 1, max_in_flight: 2}"))
    devs = open_devices(load_site(path))
    assert devs["h1-pv"].link is devs["h1-bat"].link and devs["h1-pv"].link.window == 2
    with pytest.raises(ValueError, match="RTU frames carry no transaction id"):
        ModbusLink("127.0.0.1", 1502, framer="rtu", max_in_flight=2)
    link = ModbusLink("127.0.0.1", 1502, max_in_flight=3)
    link.min_gap_s = 0.1
    assert link.window == 1  # a gap between requests: one at a time


async def test_real_devices_keep_the_site_value_beside_pipelined_emulators(site):
    real = site.prosumers[0].devices[2].model_copy(update={
        "name": "lab-meter", "emulated": False, "port": 15999, "unit": 1})
    mixed = site.model_copy(update={"prosumers": [
        *site.prosumers, site.prosumers[0].model_copy(update={"name": "p2", "devices": [real]})]})
    em = SiteEmulators(mixed, free_ports=True)
    await em.start(clock=False)
    try:
        served = {d.name: d for _, d in em.resolved_site().devices()}
        assert {n: d.max_in_flight for n, d in served.items()} == {
            "pv": 3, "bat": 3, "meter": 3, "lab-meter": 1}
    finally:
        await em.stop()


async def test_the_link_window_keeps_turns_in_order_and_a_cancelled_turn_passes_on():
    from testbed.devices.modbus_link import _Window

    w = _Window(2, asyncio.get_running_loop())
    assert w.enter() is None and w.enter() is None  # two slots
    turns = [w.enter() for _ in range(3)]
    order: list[int] = []

    async def waiter(i: int) -> None:
        await w.wait(turns[i])
        order.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
    await asyncio.sleep(0)
    w.leave()  # the slot goes to waiter 0 ...
    tasks[0].cancel()  # ... cancelled before it runs: it passes the slot to waiter 1
    w.leave()  # the other slot: waiter 2
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError) and order == [1, 2]
    assert w.busy == 2 and not w.waiters
    w.leave()
    w.leave()
    assert w.busy == 0 and w.enter() is None
