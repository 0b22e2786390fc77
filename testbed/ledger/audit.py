"""The end-of-run audit of the validators' stores, done as the stores grow.

`verify_stores` after a run reads back every validator's store and replays it fully checked
(hash links, signatures, certificates, every rule): "a server's acknowledgement is not proof
that it kept the data". Done after the loop it adds its whole duration to the run's wall
time (0.77 s for a 24 h run). `AuditWorker` does the same checks in a worker process on the
machine's other core while the run goes on: told after each committed block (`follow`), it
opens the stores read-only, fully verifies the heights added since (the first store
replayed with `verify_next`, the others compared with it as `verify_stores` does), and
closes them. At the end (`finish`, once the nodes closed their stores) it verifies what is
left (the last block), then reads every store back whole (`Store.read_all`) and requires
each height to be byte-identical to what it verified then, and no stray row: the final
report is the one `verify_stores` gives the stores as they are at the end. Whenever
anything differs or fails, it runs `verify_stores` from scratch, so the reports (failures
included, at their heights) are exactly `verify_stores`'s.

The worker reads commands on its stdin and exits when it closes: a parent that dies leaves
no worker behind; it opens the stores read-only and writes no file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import subprocess
import sys
import weakref
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import testbed
from testbed.ledger.blocks import Block
from testbed.ledger.chain import (
    Chain,
    VerifyReport,
    _Peer,
    verify_genesis,
    verify_next,
    verify_stores,
)
from testbed.ledger.store import Store, StoredBlock

PAUSE_TIMEOUT_S = 60.0
FINISH_TIMEOUT_S = 600.0
"""Bounds on waiting for the worker (else it is killed and the audit runs in the caller)."""


def _digest(b: StoredBlock) -> bytes:
    """What a height holds apart from its certificate (each node assembles its own)."""
    h = hashlib.sha256()
    for part in (str(b.height).encode(), b.hash.encode(), b.raw,
                 *(x for tid, raw in b.txs for x in (tid.encode(), raw))):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


class Follower:
    """The worker's side: `verify_stores` of `paths`, height by height as they grow."""

    def __init__(self, paths: Sequence[Path | str], genesis: Block | None) -> None:
        self.paths = list(paths)
        self.genesis = genesis
        self.chain: Chain | None = None
        self.digests: list[bytes] = []
        """Per verified height of the first store: `_digest` of what it held."""
        self.certs: list[bytes] = []
        self.txs = 0
        self.failed = False
        """The first store did not verify (or could not be read): `finish` starts over."""
        self.closed = False
        """The nodes closed the stores (`finish`): read without leaving SQLite's WAL files."""
        self.peers = [_Peer(p) for p in self.paths[1:]]
        for p in self.peers:
            p.close()

    def follow(self) -> None:
        """Verify the heights the stores gained since the last call (a failure is not
        reported here: `finish` verifies everything from scratch then)."""
        if self.failed or not self.paths:
            return
        try:
            store = Store(self.paths[0], readonly=True, closed=self.closed)
        except (ValueError, OSError):
            self.failed = True
            return
        live = [p for p in self.peers if not p.differs]
        try:
            store.snapshot()
            for p in live:
                p.open(closed=self.closed)
            if self.chain is None:
                self.chain = verify_genesis(store, self.genesis, live)
                self._remember(store.block(0))
            top = store.height()
            while self.chain.height < top:
                self._remember(verify_next(self.chain, store, live))
        except Exception:  # noqa: BLE001 - a failed check or a damaged row: `finish` reports it
            self.failed = True
        finally:
            store.close()
            for p in live:
                p.close()

    def _remember(self, b: StoredBlock | None) -> None:
        assert b is not None
        self.digests.append(_digest(b))
        self.certs.append(b.cert)
        self.txs += len(b.txs)

    def _holds(self, path: Path | str, certs: list[bytes]) -> bool:
        """The store holds exactly the verified heights, byte for byte, and nothing else."""
        try:
            store = Store(path, readonly=True, closed=True)
        except (ValueError, OSError):
            return False
        try:
            store.snapshot()
            blocks = list(store.read_all())
            return ([b.height for b in blocks] == list(range(len(self.digests)))
                    and [_digest(b) for b in blocks] == self.digests
                    and [b.cert for b in blocks] == certs
                    and store.tx_count() == self.txs)
        except Exception:  # noqa: BLE001 - damaged: the full verify says where
            return False
        finally:
            store.close()

    def finish(self) -> list[VerifyReport]:
        """The reports `verify_stores(paths)` gives now (the nodes have closed the stores)."""
        self.closed = True
        self.follow()
        chain = self.chain
        if (self.failed or chain is None
                or not self._holds(self.paths[0], self.certs)):
            return verify_stores(self.paths, genesis=self.genesis, closed=True)
        good = VerifyReport(True, chain.height, chain.id, self.txs)
        out = [good]
        for p in self.peers:
            same = not p.differs and len(p.certs) == len(self.digests)
            out.append(good if same and self._holds(p.path, p.certs)
                       else _verify_one(p.path, self.genesis))
        return out


def _verify_one(path: Path | str, genesis: Block | None) -> VerifyReport:
    return verify_stores([path], genesis=genesis, closed=True)[0]


def _report(r: VerifyReport) -> dict:
    return asdict(r)


def worker_main(argv: Sequence[str]) -> int:
    """`python -m testbed.ledger.audit GENESIS STORE...`: commands on stdin, one a line:
    `follow`, `pause` (answered `paused` once every earlier command is done: no store is
    open), `finish` (answered with the reports as one JSON line; then it exits)."""
    from testbed.ledger.identity import batch_verifier

    batch_verifier().workers = 0  # this process is the other core's work already
    genesis = Block.parse(Path(argv[0]).read_bytes().strip(), genesis=True)
    follower = Follower(argv[1:], genesis)
    for line in sys.stdin.buffer:
        cmd = line.strip()
        if cmd == b"follow":
            follower.follow()
        elif cmd == b"pause":
            sys.stdout.write("paused\n")
            sys.stdout.flush()
        elif cmd == b"finish":
            sys.stdout.write(json.dumps([_report(r) for r in follower.finish()]) + "\n")
            sys.stdout.flush()
            return 0
    return 0  # stdin closed: the parent is gone


class AuditWorker:
    """The parent's side: a worker process following the stores (see the module doc)."""

    def __init__(self, proc: subprocess.Popen[bytes], paths: list[Path],
                 genesis: Block) -> None:
        self.proc, self.paths, self.genesis = proc, paths, genesis
        self._finishing = False
        self._kill = weakref.finalize(self, _kill, proc)

    @classmethod
    def start(cls, genesis_path: Path, paths: Sequence[Path], genesis: Block) -> AuditWorker:
        root = str(Path(testbed.__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        proc = subprocess.Popen(
            [sys.executable, "-m", "testbed.ledger.audit", str(genesis_path),
             *map(str, paths)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=env, close_fds=True)
        return cls(proc, list(paths), genesis)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _send(self, cmd: bytes) -> bool:
        if not self.alive or self.proc.stdin is None:
            return False
        try:
            self.proc.stdin.write(cmd + b"\n")
            self.proc.stdin.flush()
        except OSError:
            return False
        return True

    def _answer(self, timeout_s: float) -> bytes | None:
        out = self.proc.stdout
        if out is None:
            return None
        ready, _, _ = select.select([out], [], [], timeout_s)
        return out.readline() if ready else None

    def follow(self) -> None:
        """Blocks were committed: verify them (the worker does it; this returns at once)."""
        self._send(b"follow")

    def pause(self) -> bool:
        """Wait until the worker holds no store open (before the nodes close theirs: the
        last connection to close a WAL store checkpoints it). False: it did not answer
        (it is killed)."""
        if self._send(b"pause") and self._answer(PAUSE_TIMEOUT_S) == b"paused\n":
            return True
        self.kill()
        return False

    def finish_start(self) -> None:
        """Start `finish`: the worker checks what is left while the caller goes on."""
        if not self._finishing:
            self._finishing = self._send(b"finish")

    def finish(self) -> list[VerifyReport]:
        """The reports of `verify_stores` over the stores as they are now (closed by
        their nodes); done in this process if the worker cannot."""
        self.finish_start()
        line = self._answer(FINISH_TIMEOUT_S) if self._finishing else None
        self.kill()
        try:
            return [VerifyReport(**r) for r in json.loads(line or b"")]
        except (ValueError, TypeError):
            return verify_stores(self.paths, genesis=self.genesis, closed=True)

    def kill(self) -> None:
        """Stop the worker (idempotent); it wrote nothing, so nothing is left."""
        self._kill()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for f in (proc.stdin, proc.stdout):
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
