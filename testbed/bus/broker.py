"""Brokers the testbed can start by itself: in-process amqtt, or a Mosquitto subprocess.

Why both: the default run must need no setup (``EmbeddedBroker``, pure Python, in the
orchestrator's event loop), while tests, benches and CI users want the broker people deploy
(``MosquittoBroker``: the Debian ``mosquitto`` binary with a generated config). Both bind
to loopback on a free port so parallel jobs never collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from testbed.bus.client import BusClient, BusError, TLSOptions
from testbed.bus.tls import TestCA, make_test_ca

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (another process may take it before we bind: callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _url(tls: bool, host: str, port: int) -> str:
    return f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"


class _TLSMixin:
    """TLS material: the caller's cert/key, or a throw-away CA made on demand."""

    ca: TestCA | None
    certfile: Path | None
    keyfile: Path | None
    cafile: Path | None

    def _setup_tls(self, tls: bool, certfile: Any, keyfile: Any, cafile: Any, tmp: Path) -> None:
        self.ca = None
        self.certfile = Path(certfile) if certfile else None
        self.keyfile = Path(keyfile) if keyfile else None
        self.cafile = Path(cafile) if cafile else None
        if tls and self.certfile is None:
            self.ca = make_test_ca(tmp / "tls")
            self.certfile, self.keyfile, self.cafile = (
                self.ca.server_cert, self.ca.server_key, self.ca.ca_cert)

    @property
    def tls_options(self) -> TLSOptions | None:
        """Client options that trust this broker's CA (None for a plain listener)."""
        if self.certfile is None:
            return None
        return TLSOptions(ca_file=self.cafile)


class EmbeddedBroker(_TLSMixin):
    """An amqtt broker in this process's event loop, on a free loopback port.

    With ``username``/``password`` anonymous clients are refused (amqtt's FileAuthPlugin with
    an Argon2-hashed password file); with ``tls=True`` (or ``certfile``/``keyfile``) the
    listener speaks TLS and `url` is ``mqtts://``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        certfile: str | Path | None = None,
        keyfile: str | Path | None = None,
        quiet: bool = True,
    ) -> None:
        self.host, self.port = host, port
        self.username, self.password = username, password
        self._tmp = tempfile.TemporaryDirectory(prefix="testbed-amqtt-")
        self._setup_tls(tls, certfile, keyfile, None, Path(self._tmp.name))
        self._quiet = quiet
        self._broker: Any = None

    @property
    def url(self) -> str:
        return _url(self.certfile is not None, self.host, self.port)

    def _config(self) -> dict[str, Any]:
        listener: dict[str, Any] = {"type": "tcp", "bind": f"{self.host}:{self.port}"}
        if self.certfile is not None:
            listener |= {"ssl": True, "certfile": str(self.certfile),
                         "keyfile": str(self.keyfile)}
        plugins: dict[str, Any]
        if self.username is not None:
            from pwdlib import PasswordHash
            from pwdlib.hashers.argon2 import Argon2Hasher

            digest = PasswordHash((Argon2Hasher(),)).hash(self.password or "")
            pwfile = Path(self._tmp.name) / "passwd"
            pwfile.write_text(f"{self.username}:{digest}\n")
            plugins = {"amqtt.plugins.authentication.FileAuthPlugin":
                       {"password_file": str(pwfile)}}
        else:
            plugins = {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                       {"allow_anonymous": True}}
        return {"listeners": {"default": listener}, "plugins": plugins}

    async def start(self) -> EmbeddedBroker:
        from amqtt.broker import Broker

        if self._quiet:
            for name in ("amqtt", "transitions"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
        self._broker = Broker(self._config())
        try:
            await self._broker.start()
        except Exception as exc:
            raise BusError(f"embedded broker on {self.host}:{self.port}: {exc}") from exc
        if self.port == 0:
            server = self._broker._servers["default"].instance  # noqa: SLF001 - bound port
            self.port = server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._broker is not None:
            broker, self._broker = self._broker, None
            with contextlib.suppress(Exception):
                await broker.shutdown()

    async def __aenter__(self) -> EmbeddedBroker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        self._tmp.cleanup()


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (PATH first, then Debian's /usr/sbin), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if os.access(p, os.X_OK)), None)


class MosquittoBroker(_TLSMixin):
    """A Mosquitto subprocess with a generated config on a free loopback port.

    ``stop()`` then ``start()`` restarts it on the same port (for reconnect tests). With
    credentials, anonymous access is off and the password file is made by
    ``mosquitto_passwd``; ``tls=True`` makes a throw-away CA (see `tls_options`).
    ``max_inflight``/``max_queued`` raise Mosquitto's per-client defaults (20 / 1000), which
    would otherwise drop QoS 1 messages to a subscriber that falls behind a burst.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        certfile: str | Path | None = None,
        keyfile: str | Path | None = None,
        cafile: str | Path | None = None,
        binary: str | None = None,
        max_inflight: int = 200,
        max_queued: int = 1_000_000,
        start_timeout: float = 10.0,
    ) -> None:
        self.binary = binary or find_mosquitto()
        if self.binary is None:
            raise BusError(
                "mosquitto is not installed (looked in PATH and /usr/sbin); "
                "install it with `apt-get install mosquitto` or pass binary=PATH"
            )
        self.host, self.port = host, port
        self.username, self.password = username, password
        self._tmp = tempfile.TemporaryDirectory(prefix="testbed-mosquitto-")
        self.dir = Path(self._tmp.name)
        self._setup_tls(tls, certfile, keyfile, cafile, self.dir)
        self.max_inflight, self.max_queued = max_inflight, max_queued
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return _url(self.certfile is not None, self.host, self.port)

    @property
    def log_path(self) -> Path:
        return self.dir / "mosquitto.log"

    def _write_config(self) -> Path:
        lines = [
            f"listener {self.port} {self.host}",
            "persistence false",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            f"max_inflight_messages {self.max_inflight}",
            f"max_queued_messages {self.max_queued}",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to `mosquitto`, who can't read dir
        if self.username is not None:
            pwfile = self.dir / "passwd"
            if not pwfile.exists():
                tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
                try:
                    subprocess.run([tool, "-c", "-b", str(pwfile), self.username,
                                    self.password or ""], check=True, capture_output=True)
                except (OSError, subprocess.CalledProcessError) as exc:
                    raise BusError(f"mosquitto_passwd failed: {exc}") from exc
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        if self.certfile is not None:
            lines += [f"certfile {self.certfile}", f"keyfile {self.keyfile}"]
            if self.cafile is not None:
                lines.append(f"cafile {self.cafile}")
        conf = self.dir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    async def start(self) -> MosquittoBroker:
        """Start and wait (up to ``start_timeout`` s) until the port accepts connections."""
        fixed = self.port != 0
        for _attempt in range(1 if fixed else 5):
            if not fixed:
                self.port = free_port(self.host)
            conf = self._write_config()
            self.log_path.unlink(missing_ok=True)
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - spawning does not block
                [self.binary, "-c", str(conf)],  # type: ignore[list-item]
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            if await self._wait_ready(self.start_timeout):
                return self
            err = self._failure_text()
            if "in use" not in err or fixed:
                raise BusError(f"mosquitto did not start on {self.host}:{self.port}: {err}")
        raise BusError(f"mosquitto could not find a free port on {self.host}")

    async def _wait_ready(self, limit_s: float) -> bool:
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while loop.time() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                _r, w = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 1)
            except (OSError, TimeoutError):
                await asyncio.sleep(0.02)
                continue
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()
            return True
        self._kill()
        return False

    def _failure_text(self) -> str:
        parts = []
        if self.proc is not None and self.proc.stderr is not None:
            with contextlib.suppress(Exception):
                parts.append(self.proc.stderr.read().decode(errors="replace"))
        with contextlib.suppress(OSError):
            parts.append(self.log_path.read_text(errors="replace"))
        text = " ".join(" ".join(parts).split())
        return text[-800:] or "no output"

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after 5 s); the port stays reserved for start()."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), 5.0)
            except TimeoutError:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    async def __aenter__(self) -> MosquittoBroker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        self._tmp.cleanup()


@contextlib.asynccontextmanager
async def open_bus(url: str | None = None, **client_kwargs: Any) -> AsyncIterator[BusClient]:
    """A connected `BusClient`; with no URL, to an `EmbeddedBroker` started for the occasion
    (so the default run needs no setup). The broker stops when the block exits.
    """
    if url is not None:
        async with BusClient(url, **client_kwargs) as bus:
            yield bus
        return
    async with EmbeddedBroker() as broker, BusClient(broker.url, **client_kwargs) as bus:
        yield bus
