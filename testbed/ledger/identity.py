"""Ed25519 identities, addresses and registry-certified pseudonyms.

An address is `tb` + the first 20 bytes of sha256(public key), in hex: short, checkable,
and it says nothing about who holds it. Identities (a prosumer's certified meter/HEM key,
the aggregator, the administrator) are listed in the registry (CSM-DB). On public market
channels prosumers use per-period pseudonym keys; the administrator certifies each one with
an escrow tag HMAC-SHA256(audit key, identity address | pseudonym address). Anyone can check
that a pseudonym is certified; only the holder of the audit key can map it back, by
recomputing the tag for each registered identity (see `reveal_owner`).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import hmac
import multiprocessing
import os
import queue
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ADDRESS_PREFIX = "tb"
ADDRESS_LEN = len(ADDRESS_PREFIX) + 40


def address_of(public_key: bytes) -> str:
    return ADDRESS_PREFIX + hashlib.sha256(public_key).hexdigest()[:40]


_ADDRESS = re.compile(ADDRESS_PREFIX + "[0-9a-f]{40}")


def is_address(value: object) -> bool:
    return isinstance(value, str) and _ADDRESS.fullmatch(value) is not None


@lru_cache(maxsize=65536)
def _public_key(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    try:
        _public_key(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


SignedItem = tuple[bytes, bytes, bytes]
"""(public key, signature, signed bytes): one Ed25519 check."""


def verify_many(items: Sequence[SignedItem]) -> list[bool]:
    """Check each item, one by one (the reference the batch verifier must equal)."""
    return [verify_signature(pk, sig, data) for pk, sig, data in items]


def _pack(items: Sequence[SignedItem]) -> bytes:
    """Items as one byte string (key 32, signature 64, length 4, data): shipping it to a
    worker costs a copy, not a pickle of thousands of tuples."""
    parts = []
    for pk, sig, data in items:
        if len(pk) != 32 or len(sig) != 64:  # cannot verify: keep the slot, fail it
            pk, sig = bytes(32), bytes(64)
        parts.append(pk + sig + len(data).to_bytes(4, "big") + data)
    return b"".join(parts)


def _verify_packed(buf: bytes) -> bytes:
    out = bytearray()
    view, i = memoryview(buf), 0
    while i < len(buf):
        n = int.from_bytes(view[i + 96:i + 100], "big")
        out.append(verify_signature(bytes(view[i:i + 32]), bytes(view[i + 32:i + 96]),
                                    bytes(view[i + 100:i + 100 + n])))
        i += 100 + n
    return bytes(out)


def _serve(conn: Any) -> None:
    """A verifier worker: requests are read by a thread as they come (the caller never
    blocks on a busy worker), checked in order, and answered as one byte per item."""
    jobs: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def read() -> None:
        try:
            while True:
                jobs.put(conn.recv_bytes())
        except (EOFError, OSError):
            jobs.put(None)

    threading.Thread(target=read, daemon=True).start()
    while (job := jobs.get()) is not None:
        try:
            conn.send_bytes(_verify_packed(job))
        except (EOFError, OSError):
            return


class _Worker:
    """One worker process and its pipe; answers come back in request order."""

    def __init__(self, ctx: Any) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True,
                                name="testbed-verifier")
        self.proc.start()
        child.close()
        self.sent = 0
        self.received = 0
        self.answers: dict[int, bytes] = {}
        self.lock = threading.Lock()

    def send(self, items: list[SignedItem]) -> int:
        with self.lock:
            self.conn.send_bytes(_pack(items))
            self.sent += 1
            return self.sent

    def answer(self, ticket: int) -> bytes:
        with self.lock:
            while ticket not in self.answers:
                self.received += 1
                self.answers[self.received] = self.conn.recv_bytes()
            return self.answers.pop(ticket)

    def close(self) -> None:
        self.conn.close()
        self.proc.join(timeout=2)
        if self.proc.is_alive():
            self.proc.kill()


class BatchVerifier:
    """Ed25519 checks of many signatures on every core, with the same result as one by one.

    The other cores are worker processes, fed through pipes with packed bytes (a pool that
    pickles tuples cost as much CPU as the checks it saved). Threads would do only where
    cryptography's `verify` releases the GIL (measured here with 50.0.2: two threads beat
    one at low load, not under load), and even then a verifier thread next to a caller
    busy in Python waits for the GIL after every check, which defeats the overlap. A batch is split
    between the workers and, with `caller`, the caller itself (`verify`); `start` hands it
    all to the workers so the caller can do other work meanwhile (a node applying a block
    while the next transactions are checked). Results come back in input order: the
    outcome is deterministic and identical to `verify_many`. Batches smaller than
    `min_batch` are checked inline (shipping them would cost more than checking them);
    a worker that dies is replaced by checking its share inline.
    """

    def __init__(self, workers: int | None = None, *, min_batch: int = 128) -> None:
        self.workers = max(0, (os.cpu_count() or 1) - 1) if workers is None else workers
        self.min_batch = min_batch
        self._pool: list[_Worker] = []
        self._owner = os.getpid()
        self._lock = threading.Lock()

    def _workers(self) -> list[_Worker]:
        with self._lock:
            if self._owner != os.getpid():  # a forked child: the pipes are the parent's
                self._pool, self._owner = [], os.getpid()
            if len(self._pool) != self.workers:  # first use, or the count was changed
                self._close()
                # forkserver: workers fork from a clean server process, so they inherit
                # none of the caller's sockets (a forked copy of a node's MQTT connection
                # would keep it open after the node closed it), threads or locks. Like
                # spawn, it re-imports a calling *script* as __mp_main__: scripts need the
                # usual `if __name__ == "__main__":` guard (`python -m` packages do not).
                methods = multiprocessing.get_all_start_methods()
                method = "forkserver" if "forkserver" in methods else "spawn"
                ctx = multiprocessing.get_context(method)
                if method == "forkserver":
                    ctx.set_forkserver_preload([__name__])
                self._pool = [_Worker(ctx) for _ in range(self.workers)]
            return list(self._pool)

    def verify(self, items: Sequence[SignedItem]) -> list[bool]:
        """Check now: the caller takes one share while the workers take the others."""
        return self.start(items, caller=True)()

    def start(self, items: Sequence[SignedItem], *, caller: bool = False
              ) -> Callable[[], list[bool]]:
        """Hand the checks to the workers and return at once; calling the result waits
        for the answers. With `caller`, the caller checks its own share inside that call."""
        items = list(items)
        n = len(items)
        if self.workers == 0 or n < self.min_batch:
            return lambda: verify_many(items)
        try:
            workers = self._workers()
        except OSError:
            return lambda: verify_many(items)  # no processes: the same answer, slower
        parts = len(workers) + (1 if caller else 0)
        size = -(-n // parts)
        chunks = [items[i:i + size] for i in range(0, n, size)]
        mine, theirs = (chunks[:1], chunks[1:]) if caller else ([], chunks)
        tickets: list[tuple[_Worker, int] | None] = []
        for w, chunk in zip(workers, theirs, strict=False):
            try:
                tickets.append((w, w.send(chunk)))
            except (OSError, ValueError):
                tickets.append(None)

        def collect() -> list[bool]:
            out = verify_many(mine[0]) if mine else []
            for chunk, ticket in zip(theirs, tickets, strict=True):
                got = None
                if ticket is not None:
                    try:
                        got = ticket[0].answer(ticket[1])
                    except (EOFError, OSError, ValueError):
                        self.close()  # a dead worker: new ones next time
                if got is None or len(got) != len(chunk):
                    out.extend(verify_many(chunk))
                else:
                    out.extend(b == 1 for b in got)
            return out

        return collect

    def _close(self) -> None:
        for w in self._pool:
            with contextlib.suppress(Exception):
                w.close()
        self._pool = []

    def close(self) -> None:
        with self._lock:
            if self._owner == os.getpid():
                self._close()
            self._pool = []


_BATCH = BatchVerifier()
atexit.register(_BATCH.close)


def batch_verifier() -> BatchVerifier:
    """The process-wide verifier (one pool per process, started on first big batch)."""
    return _BATCH


@dataclass(frozen=True)
class KeyPair:
    """A private signing key and what is derived from it."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> KeyPair:
        """Deterministic key from a 32-byte seed (tests and reproducible demos only)."""
        return cls(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest()))

    @property
    def public(self) -> bytes:
        return self._public

    @property
    def address(self) -> str:
        return self._address

    def __post_init__(self) -> None:
        pub = self.private.public_key().public_bytes_raw()
        object.__setattr__(self, "_public", pub)
        object.__setattr__(self, "_address", address_of(pub))

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)

    def save(self, path: Path) -> None:
        """PKCS#8 PEM, readable by the owner only."""
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = self.private.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)

    @classmethod
    def load(cls, path: Path) -> KeyPair:
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable Ed25519 private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: key is not Ed25519")
        return cls(key)


def escrow_tag(audit_key: bytes, identity: str, pseudonym: str) -> str:
    """The tag the administrator puts in a pseudonym certificate."""
    return hmac.new(audit_key, f"{identity}|{pseudonym}".encode(), hashlib.sha256).hexdigest()


def reveal_owner(audit_key: bytes, pseudonym: str, tag: str, identities: list[str]) -> str | None:
    """For an auditor holding the audit key: which registered identity owns a pseudonym."""
    for identity in identities:
        if hmac.compare_digest(escrow_tag(audit_key, identity, pseudonym), tag):
            return identity
    return None
