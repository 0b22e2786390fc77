"""Blocks, Merkle roots, votes and commit certificates.

A block is `{"header": ..., "signature": proposer's Ed25519 signature over the header}`;
its hash is sha256 of the block's canonical bytes. The header names the chain, height,
previous hash, time, round, proposer, the proposer's CPF evidence (its certified reading
ids and value) and the Merkle root of the transaction ids (RFC 6962 style: leaves and
nodes are domain-separated, so no two transaction lists share a root). A commit
certificate is the set of validator votes on (chain, height, block hash); a block commits
only with votes from more than two thirds of the registered validators.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

from testbed.ledger import canonical
from testbed.ledger.errors import Reason, Rejected
from testbed.ledger.identity import KeyPair, is_address, verify_signature

BLOCK_DOMAIN = b"testbed/block/v1\n"
VOTE_DOMAIN = b"testbed/vote/v1\n"
ZERO_HASH = "0" * 64
HEADER_FIELDS = {"chain", "height", "prev", "time", "round", "proposer", "evidence",
                 "merkle", "txs"}


def merkle_root(tx_ids: Sequence[str]) -> str:
    """Root over transaction ids. Remembered for the last few lists: a node computes it for
    the same block when proposing, checking and committing."""
    return _merkle_root(tuple(tx_ids))


@lru_cache(maxsize=8)
def _merkle_root(tx_ids: tuple[str, ...]) -> str:
    if not tx_ids:
        return hashlib.sha256(b"").hexdigest()
    level = [hashlib.sha256(b"\x00" + bytes.fromhex(t)).digest() for t in tx_ids]
    while len(level) > 1:
        nxt = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest()
               for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0].hex()


@dataclass(frozen=True)
class Block:
    header: dict[str, Any]
    signature: str

    @cached_property
    def raw(self) -> bytes:
        return canonical.encode({"header": self.header, "signature": self.signature})

    @cached_property
    def hash(self) -> str:
        return canonical.sha256_hex(self.raw)

    @property
    def height(self) -> int:
        return self.header["height"]

    @property
    def time(self) -> float:
        return self.header["time"]

    @property
    def proposer(self) -> str:
        return self.header["proposer"]

    @property
    def round(self) -> int:
        return self.header["round"]

    @staticmethod
    def signed_bytes(header: dict[str, Any]) -> bytes:
        return BLOCK_DOMAIN + canonical.encode(header)

    @classmethod
    def create(cls, key: KeyPair, header: dict[str, Any]) -> Block:
        return cls(header, key.sign(cls.signed_bytes(header)).hex())

    def signature_ok(self, public_key: bytes) -> bool:
        try:
            sig = bytes.fromhex(self.signature)
        except ValueError:
            return False
        return verify_signature(public_key, sig, self.signed_bytes(self.header))

    @classmethod
    def parse(cls, raw: bytes, *, genesis: bool = False) -> Block:
        try:
            obj = canonical.decode(raw)
        except canonical.NotCanonical as exc:
            raise Rejected(Reason.MALFORMED, f"block: {exc}") from None
        if not (isinstance(obj, dict) and set(obj) == {"header", "signature"}
                and isinstance(obj["header"], dict) and isinstance(obj["signature"], str)):
            raise Rejected(Reason.MALFORMED, "block must be {header, signature}")
        h = obj["header"]
        if not genesis:
            if set(h) != HEADER_FIELDS:
                raise Rejected(Reason.MALFORMED, f"block header fields {sorted(h)}; expected "
                               f"{sorted(HEADER_FIELDS)}")
            ok = (type(h["height"]) is int and type(h["round"]) is int and h["round"] >= 0
                  and type(h["time"]) in (int, float) and is_address(h["proposer"])
                  and type(h["txs"]) is int and isinstance(h["evidence"], dict)
                  and isinstance(h["prev"], str) and isinstance(h["merkle"], str))
            if not ok:
                raise Rejected(Reason.MALFORMED, "block header field of the wrong type")
        block = cls(h, obj["signature"])
        # strictly canonical: these bytes are the block's encoding (its hash needs no
        # encoding again)
        block.__dict__["raw"] = raw.encode() if isinstance(raw, str) else bytes(raw)
        return block


@dataclass(frozen=True)
class Vote:
    """A precommit for a block: what a commit certificate is made of. `round` is the
    consensus round it was cast in (Tendermint); certificates from before rounds existed
    carry none. A certificate's votes all come from one round."""

    chain: str
    height: int
    block: str
    voter: str
    signature: str
    round: int | None = None

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"chain": self.chain, "height": self.height, "block": self.block}
        if self.round is not None:
            body["round"] = self.round
        return body

    def as_dict(self) -> dict[str, Any]:
        return {**self.body(), "voter": self.voter, "signature": self.signature}

    @classmethod
    def cast(cls, key: KeyPair, chain: str, height: int, block: str,
             round_: int | None = None) -> Vote:
        unsigned = cls(chain, height, block, key.address, "", round_)
        sig = key.sign(VOTE_DOMAIN + canonical.encode(unsigned.body())).hex()
        return cls(chain, height, block, key.address, sig, round_)

    @classmethod
    def from_dict(cls, d: Any) -> Vote:
        fields = {"chain", "height", "block", "voter", "signature"}
        if not (isinstance(d, dict) and (set(d) == fields or set(d) == fields | {"round"})):
            raise Rejected(Reason.MALFORMED, "vote must be {chain, height, block, voter, "
                           "signature[, round]}")
        rnd = d.get("round")
        if rnd is not None and (type(rnd) is not int or rnd < 0):
            raise Rejected(Reason.MALFORMED, f"vote round {rnd!r} is not a round number")
        return cls(d["chain"], d["height"], d["block"], d["voter"], d["signature"], rnd)

    def signature_ok(self, public_key: bytes) -> bool:
        try:
            sig = bytes.fromhex(self.signature)
        except (ValueError, TypeError):
            return False
        return verify_signature(public_key, sig, VOTE_DOMAIN + canonical.encode(self.body()))


def encode_certificate(votes: Sequence[Vote]) -> bytes:
    return canonical.encode([v.as_dict() for v in sorted(votes, key=lambda v: v.voter)])


def check_certificate(raw: bytes, *, chain: str, block: Block, validators: dict[str, bytes],
                      quorum: int) -> list[Vote]:
    """Votes of more than 2/3 of the validators for exactly this block, each verified."""
    try:
        items = canonical.decode(raw)
    except canonical.NotCanonical as exc:
        raise Rejected(Reason.BAD_CERTIFICATE, f"certificate: {exc}") from None
    if not isinstance(items, list):
        raise Rejected(Reason.BAD_CERTIFICATE, "certificate must be a list of votes")
    votes = [Vote.from_dict(v) for v in items]
    voters = [v.voter for v in votes]
    if len({v.round for v in votes}) > 1:
        raise Rejected(Reason.BAD_CERTIFICATE, "certificate votes come from different rounds")
    if voters != sorted(set(voters)):
        raise Rejected(Reason.BAD_CERTIFICATE, "certificate votes must be distinct and sorted "
                       "by voter")
    for v in votes:
        if (v.chain, v.height, v.block) != (chain, block.height, block.hash):
            raise Rejected(Reason.BAD_CERTIFICATE, f"vote of {v.voter} is for another block")
        key = validators.get(v.voter)
        if key is None:
            raise Rejected(Reason.BAD_CERTIFICATE, f"vote of {v.voter}, not a registered "
                           "validator")
        if not v.signature_ok(key):
            raise Rejected(Reason.BAD_CERTIFICATE, f"vote of {v.voter} has a bad signature")
    if len(votes) < quorum:
        raise Rejected(Reason.BAD_CERTIFICATE, f"{len(votes)} votes; committing needs "
                       f"{quorum} of {len(validators)} validators (more than 2/3)")
    return votes
