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

import hashlib
import hmac
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ADDRESS_PREFIX = "tb"
ADDRESS_LEN = len(ADDRESS_PREFIX) + 40


def address_of(public_key: bytes) -> str:
    return ADDRESS_PREFIX + hashlib.sha256(public_key).hexdigest()[:40]


def is_address(value: object) -> bool:
    return (isinstance(value, str) and len(value) == ADDRESS_LEN
            and value.startswith(ADDRESS_PREFIX)
            and all(c in "0123456789abcdef" for c in value[len(ADDRESS_PREFIX):]))


@lru_cache(maxsize=65536)
def _public_key(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    try:
        _public_key(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


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
