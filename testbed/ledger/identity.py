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
from collections import OrderedDict
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


def _check(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """One Ed25519 verification, uncached."""
    try:
        _public_key(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


class SignatureCache:
    """Answers of Ed25519 checks already made in this process, keyed by a salted digest of
    (public key, signature, exact signed bytes): the same triple always verifies the same
    way, so a hit is the answer by construction (as Bitcoin Core's signature cache and
    Cosmos' sig-verify cache). Every in-process checker of one message (4 validators at
    admission, at commit, the market's freshness check, the end-of-run store verify)
    then pays one verification instead of several.

    A lookup costs one SHA-256 of the triple (~1 us for a 500-byte transaction, 2 % of a
    verification), so a forged message costs no more than before. Good and bad answers
    live in separate LRU tables, each bounded, so a flood of forgeries can neither grow
    memory nor push out the good answers honest traffic needs."""

    def __init__(self, maxsize: int = 1 << 17, max_bad: int = 1 << 12) -> None:
        self.maxsize, self.max_bad = maxsize, max_bad
        self._salt = os.urandom(16)
        self._good: OrderedDict[bytes, None] = OrderedDict()
        self._bad: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def key(self, public_key: bytes, signature: bytes, data: bytes) -> bytes:
        h = hashlib.sha256(self._salt)
        h.update(len(public_key).to_bytes(2, "big") + public_key)
        h.update(len(signature).to_bytes(2, "big") + signature)
        h.update(data)
        return h.digest()

    def get(self, key: bytes) -> bool | None:
        """The remembered answer for a key, or None."""
        with self._lock:
            for table, answer in ((self._good, True), (self._bad, False)):
                if key in table:
                    table.move_to_end(key)
                    self.hits += 1
                    return answer
            self.misses += 1
            return None

    def put(self, key: bytes, ok: bool) -> None:
        table, bound = (self._good, self.maxsize) if ok else (self._bad, self.max_bad)
        with self._lock:
            table[key] = None
            table.move_to_end(key)
            while len(table) > bound:
                table.popitem(last=False)

    def clear(self) -> None:
        """Forget everything (benches measuring the uncached cost)."""
        with self._lock:
            self._good.clear()
            self._bad.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._good) + len(self._bad)


_CACHE = SignatureCache()


def signature_cache() -> SignatureCache:
    """The process-wide cache every `verify_signature` and batch check goes through."""
    return _CACHE


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Ed25519 check of `signature` over `data`, answered from the process's cache when
    this exact triple was checked before."""
    key = _CACHE.key(public_key, signature, data)
    ok = _CACHE.get(key)
    if ok is None:
        ok = _check(public_key, signature, data)
        _CACHE.put(key, ok)
    return ok


SignedItem = tuple[bytes, bytes, bytes]
"""(public key, signature, signed bytes): one Ed25519 check."""


def verify_many(items: Sequence[SignedItem]) -> list[bool]:
    """Check each item, one by one (the reference the batch verifier must equal)."""
    return [verify_signature(pk, sig, data) for pk, sig, data in items]


def _check_many(items: Sequence[SignedItem]) -> list[bool]:
    return [_check(pk, sig, data) for pk, sig, data in items]


def _pack(items: Sequence[SignedItem]) -> bytes:
    """Items as one byte string (key 32, signature 64, length 4, data): shipping it to a
    worker costs a copy, not a pickle of thousands of tuples."""
    parts = []
    for pk, sig, data in items:
        if len(pk) != 32 or len(sig) != 64:  # cannot verify: keep the slot, fail it
            pk, sig = bytes(32), bytes(64)
        parts.append(pk + sig + len(data).to_bytes(4, "big") + data)
    return b"".join(parts)


def _verify_packed(buf: bytes | memoryview) -> bytes:
    out = bytearray()
    view, i = memoryview(buf), 0
    while i < len(buf):
        n = int.from_bytes(view[i + 96:i + 100], "big")
        out.append(_check(bytes(view[i:i + 32]), bytes(view[i + 32:i + 96]),
                          bytes(view[i + 100:i + 100 + n])))
        i += 100 + n
    return bytes(out)


def _serve(conn: Any, claims: Any, lock: Any) -> None:
    """A verifier worker: requests are read by a thread as they come (the caller never
    blocks on a busy worker) and taken in order. Before checking a job the worker claims
    it in `claims`, shared with the caller, who may have taken it back to check it itself.
    Every job gets one answer: its ticket, then one byte per item (none if taken back)."""
    jobs: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def read() -> None:
        try:
            while True:
                jobs.put(conn.recv_bytes())
        except (EOFError, OSError):
            jobs.put(None)

    threading.Thread(target=read, daemon=True).start()
    while (job := jobs.get()) is not None:
        slot = int.from_bytes(job[:4], "big") % len(claims)
        with lock:
            mine = claims[slot] == _PENDING
            if mine:
                claims[slot] = _WORKER
        try:
            conn.send_bytes(job[:4] + (_verify_packed(memoryview(job)[4:]) if mine else b""))
        except (EOFError, OSError):
            return


_PENDING, _WORKER, _CALLER = 0, 1, 2
"""Who checks a job: nobody yet, the worker, or the caller (who took it back)."""
_RING = 256
"""Claim slots per worker: jobs it can have outstanding (more are checked by the caller)."""
_LOCK_TIMEOUT_S = 5.0


class _Worker:
    """One worker process, its pipe and its claim slots. Answers carry their ticket."""

    def __init__(self, ctx: Any) -> None:
        self.conn, child = ctx.Pipe()
        self.claims = ctx.Array("b", _RING, lock=False)
        self.claim_lock = ctx.Lock()
        self.proc = ctx.Process(target=_serve, args=(child, self.claims, self.claim_lock),
                                daemon=True, name="testbed-verifier")
        self.proc.start()
        child.close()
        self.sent = 0
        self.received = 0
        self.taken_back = 0
        self.answers: dict[int, bytes] = {}
        self.dropped: set[int] = set()
        self.lock = threading.Lock()

    def send(self, items: list[SignedItem]) -> int | None:
        """Queue a job: its ticket, or None when every claim slot is in use."""
        with self.lock:
            ticket = self.sent + 1
            if ticket - self.received > _RING:
                return None
            self._claim(ticket, _PENDING, force=True)
            self.conn.send_bytes(ticket.to_bytes(4, "big") + _pack(items))
            self.sent = ticket
            return ticket

    def _claim(self, ticket: int, who: int, *, force: bool = False) -> bool:
        if not self.claim_lock.acquire(timeout=_LOCK_TIMEOUT_S):
            raise OSError("a verifier worker died holding its claim lock")
        try:
            slot = ticket % _RING
            if force or self.claims[slot] == _PENDING:
                self.claims[slot] = who
                return True
            return False
        finally:
            self.claim_lock.release()

    def take_back(self, ticket: int) -> bool:
        """Take back a job the worker has not started, for the caller to check instead of
        waiting (its answer, empty, is dropped when it comes)."""
        if not self._claim(ticket, _CALLER):
            return False
        with self.lock:
            self.taken_back += 1
            self.dropped.add(ticket)
            self._read(block=False)
        return True

    def _read(self, *, block: bool) -> None:
        """Read answers (all that wait, or at least one with `block`); lock held."""
        while block or self.conn.poll():
            got = self.conn.recv_bytes()
            self.received += 1
            ticket = int.from_bytes(got[:4], "big")
            if ticket in self.dropped:
                self.dropped.discard(ticket)
            else:
                self.answers[ticket] = got[4:]
            block = False

    def answer(self, ticket: int) -> bytes:
        with self.lock:
            while ticket not in self.answers:
                self._read(block=True)
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
    busy in Python waits for the GIL after every check, which defeats the overlap.

    `start` cuts a batch into jobs of `chunk` items, queues them all on the workers and
    returns at once, so the caller can do other work meanwhile (a node applying a block
    while the next transactions are checked). Collecting the answers shares the work: the
    caller takes back, from the end, every job no worker has started and checks it itself
    instead of waiting, so both sides stay busy whichever is faster at the moment (a
    shared machine changes that from one second to the next). Results come back in input
    order: the outcome is deterministic and identical to `verify_many`. Batches smaller
    than `min_batch` are checked inline (shipping them would cost more than checking
    them); a worker that dies is replaced by checking its share inline.
    """

    def __init__(self, workers: int | None = None, *, min_batch: int = 128,
                 chunk: int = 128) -> None:
        self.workers = max(0, (os.cpu_count() or 1) - 1) if workers is None else workers
        self.min_batch = min_batch
        self.chunk = max(1, chunk)
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
        """Check now, on the workers and in the caller alike."""
        return self.start(items)()

    def start(self, items: Sequence[SignedItem]) -> Callable[[], list[bool]]:
        """Queue the checks on the workers and return at once; calling the result collects
        the answers, checking itself whatever no worker has started yet. Triples the
        process's `SignatureCache` knows are answered from it and not shipped; the new
        answers are added to it."""
        items = list(items)
        cache = _CACHE
        keys = [cache.key(*it) for it in items]
        known = [cache.get(k) for k in keys]
        todo = [i for i, ok in enumerate(known) if ok is None]
        pending = self._start([items[i] for i in todo])

        def collect() -> list[bool]:
            for i, ok in zip(todo, pending(), strict=True):
                known[i] = ok
                cache.put(keys[i], ok)
            return known  # type: ignore[return-value]

        return collect

    def _start(self, items: list[SignedItem]) -> Callable[[], list[bool]]:
        n = len(items)
        if self.workers == 0 or n < self.min_batch:
            return lambda: _check_many(items)
        try:
            workers = self._workers()
        except OSError:
            return lambda: _check_many(items)  # no processes: the same answer, slower
        chunks = [items[i:i + self.chunk] for i in range(0, n, self.chunk)]
        jobs: list[tuple[_Worker, int | None]] = []
        for i, chunk in enumerate(chunks):
            w = workers[i % len(workers)]
            try:
                jobs.append((w, w.send(chunk)))
            except (OSError, ValueError):
                jobs.append((w, None))

        def collect() -> list[bool]:
            results: list[list[bool] | None] = [None] * len(chunks)
            busy: set[int] = set()  # workers that started a job: the earlier ones too
            for i in reversed(range(len(chunks))):
                w, ticket = jobs[i]
                if ticket is not None:
                    if id(w) in busy:
                        continue
                    try:
                        if not w.take_back(ticket):
                            busy.add(id(w))
                            continue
                    except (EOFError, OSError, ValueError):
                        self.close()  # a dead worker: new ones next time
                results[i] = _check_many(chunks[i])
            for i, (w, ticket) in enumerate(jobs):
                if results[i] is not None:
                    continue
                got = None
                try:
                    got = w.answer(ticket)  # type: ignore[arg-type]
                except (EOFError, OSError, ValueError):
                    self.close()
                if got is None or len(got) != len(chunks[i]):
                    results[i] = _check_many(chunks[i])
                else:
                    results[i] = [b == 1 for b in got]
            return [ok for part in results for ok in part]  # type: ignore[union-attr]

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
