"""A VictoriaMetrics server on loopback: a real `/api/v2/write` endpoint for tests,
benchmarks and CI pipelines (Debian package `victoria-metrics`).

Started with deduplication at 1 ms (`-dedup.minScrapeInterval=1ms`), so a point written
twice is stored once, as InfluxDB does: without it a point the sink rewrites (a batch
whose acknowledgement was lost, `backfill --all`) is a second sample. With a retention
long enough for any simulated date, and without the search caches
(`-search.disableCache`), so a read right after a write or a restart sees the data.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any


def find_victoria_metrics() -> str | None:
    return shutil.which("victoria-metrics") or next(
        (p for p in ("/usr/bin/victoria-metrics", "/usr/local/bin/victoria-metrics")
         if Path(p).is_file()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VictoriaMetrics:
    """One server process with its own data folder; `stop()` and `start()` keep both
    the port and the data, as a restarted production server would."""

    def __init__(self, data: Path, port: int | None = None) -> None:
        exe = find_victoria_metrics()
        if exe is None:
            raise FileNotFoundError("victoria-metrics not found (apt-get install "
                                    "victoria-metrics)")
        self.exe = exe
        self.data = Path(data)
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> VictoriaMetrics:
        self.data.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.exe, f"-storageDataPath={self.data}", f"-httpListenAddr=127.0.0.1:{self.port}",
             "-retentionPeriod=100y", "-dedup.minScrapeInterval=1ms", "-search.disableCache",
             "-loggerLevel=ERROR"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"victoria-metrics exited: "
                                   f"{self.proc.stderr.read().decode()[-500:]}")  # type: ignore[union-attr]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"victoria-metrics on {self.url} did not become healthy")

    def stop(self) -> None:
        """Graceful stop (SIGTERM): VictoriaMetrics flushes what it holds to disk."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash or a power cut: points acknowledged in the last second or
        so (still in VictoriaMetrics' buffers) are lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> VictoriaMetrics:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def export(self, match: str = '{__name__!=""}') -> list[dict[str, Any]]:
        """Every raw sample of the matching series (`/api/v1/export`), newly written ones
        included (forces a flush first). Each item: metric labels, values, timestamps."""
        urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=10).close()
        body = urllib.parse.urlencode({"match[]": match, "start": "0",
                                       "end": str(int(time.time()) + 10 * 86400)}).encode()
        with urllib.request.urlopen(f"{self.url}/api/v1/export", data=body, timeout=30) as r:
            return [json.loads(line) for line in r.read().splitlines() if line.strip()]
