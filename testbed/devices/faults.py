"""A fault-injecting Modbus TCP proxy: what a flaky gateway or a slow device does to a link.

`FaultProxy` listens on a loopback port and forwards each Modbus TCP request (framed by
its MBAP header) to the real server behind it, after `latency_s`, and drops the client's
connection instead of forwarding every `drop_every`-th request (counted over all
connections, as a gateway that resets itself does). Tests and `bench/devices.py` put it
between the driver and the emulators to show that polls survive a link that misbehaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)

MBAP_LEN = 7
"""Transaction id (2), protocol id (2), length (2), unit id (1)."""


class FaultProxy:
    """Forward Modbus TCP to host:port with latency and a dropped connection every Nth request."""

    def __init__(self, target_host: str, target_port: int, *, latency_s: float = 0.0,
                 drop_every: int = 0, host: str = "127.0.0.1", port: int = 0) -> None:
        if drop_every < 0 or latency_s < 0:
            raise ValueError("drop_every and latency_s must be >= 0")
        self.target = (target_host, target_port)
        self.latency_s, self.drop_every = latency_s, drop_every
        self.host, self.requested_port = host, port
        self.port: int | None = None
        self.requests = 0
        """Requests seen (forwarded or dropped)."""
        self.drops = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.requested_port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        with contextlib.suppress(asyncio.CancelledError):
            await self._forward(reader, writer)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError as exc:
            log.warning("fault proxy: cannot reach %s:%d: %s", *self.target, exc)
            writer.close()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        back = asyncio.create_task(self._pump(up_reader, writer))
        try:
            while True:
                head = await reader.readexactly(MBAP_LEN)
                body = await reader.readexactly(int.from_bytes(head[4:6], "big") - 1)
                self.requests += 1
                if self.drop_every and self.requests % self.drop_every == 0:
                    self.drops += 1
                    break
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                up_writer.write(head + body)
                await up_writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            back.cancel()
            for w in (writer, up_writer):
                w.close()
                self._writers.discard(w)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
