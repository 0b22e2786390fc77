"""Pseudonyms on the market channels (paper V.E): a fresh certified address per auction.

A prosumer answers each auction under a new key derived from its identity key and the
auction id (`derive`): deterministic, so a replayed run signs the same bytes, and nobody
without the identity key can derive or link it. The registry administrator certifies the
pseudonym with a `pseudonym` ledger transaction carrying an escrow tag
HMAC(audit key, identity | pseudonym) and a validity window; validators then accept
orders signed by it inside the window. Only the holder of the audit key can map a
pseudonym back to its owner (`reveal`).

Settlement: an award pays the pseudonym's wallet, and the pseudonym's key spends it
(a pseudonym may sign payments from its window's start on; only bidding is limited to the
window). When a pseudonym has to pay (it bought energy, or owes a shortfall penalty),
its owner first tops it up from its identity wallet with exactly the amount due:
that payment links the two on the ledger, after the market has closed, and only for
prosumers that pay. `reveal` adds each owner's pseudonym balances to its own.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.ledger import messages
from testbed.ledger import transactions as T
from testbed.ledger.identity import KeyPair, escrow_tag, reveal_owner
from testbed.ledger.messages import SignedMessage
from testbed.ledger.state import LedgerState


def derive(owner: KeyPair, context: str) -> KeyPair:
    """The owner's pseudonym key for `context` (an auction id): HMAC of its private key."""
    secret = owner.private.private_bytes_raw()
    seed = hmac.new(secret, b"testbed/pseudonym/v1\n" + context.encode(), hashlib.sha256)
    return KeyPair.from_seed(seed.digest())


def load_audit_key(path: Path | str) -> bytes:
    """The auditor's key file (`keys/audit.key`: 64 hex characters)."""
    try:
        text = Path(path).read_text().strip()
        key = bytes.fromhex(text)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not an audit key (expected 64 hex characters: {exc})") \
            from None
    if len(key) != 32:
        raise ValueError(f"{path}: not an audit key (expected 32 bytes, got {len(key)})")
    return key


@dataclass
class PseudonymDesk:
    """The administrator's pseudonym service in a run, and the prosumers' key ring.

    `issue` is what a TCR calls when it answers an auction: it derives the owner's
    pseudonym, certifies it (signed by the administrator, escrow tag from the audit key)
    and hands the certificate to `submit` (the ledger) before the order can be recorded.
    `resolve` gives the key of a certified pseudonym (market inboxes); `aliases`, if
    given, is the caller's address -> name map, extended with each pseudonym (the run
    locates a pseudonymous bidder on the feeder as the aggregator would: it is told where
    its bidders connect, not who they are). `payments` signs a settlement transfer from a
    pseudonym (with the owner's top-up first)."""

    admin: KeyPair
    audit_key: bytes
    submit: Callable[[SignedMessage], Any] | None = None
    aliases: MutableMapping[str, str] | None = None
    _keys: dict[str, tuple[KeyPair, KeyPair]] = field(default_factory=dict)
    certificates: list[SignedMessage] = field(default_factory=list)

    def issue(self, owner: KeyPair, request: SignedMessage) -> KeyPair:
        """The owner's certified pseudonym for answering `request` (an auction-open),
        valid from the request's date until one second after its gate."""
        pseudo = derive(owner, request.id)
        if pseudo.address in self._keys:
            return pseudo
        cert = messages.sign(self.admin, T.PSEUDONYM, {
            "public_key": pseudo.public.hex(),
            "escrow": escrow_tag(self.audit_key, owner.address, pseudo.address),
            "valid_from": math.floor(request.time),
            "valid_to": int(request.parameters["gate"]) + 1}, at=request.time)
        self._keys[pseudo.address] = (pseudo, owner)
        self.certificates.append(cert)
        if self.aliases is not None and owner.address in self.aliases:
            self.aliases[pseudo.address] = self.aliases[owner.address]
        if self.submit is not None:
            self.submit(cert)
        return pseudo

    def resolve(self, address: str) -> bytes | None:
        got = self._keys.get(address)
        return got[0].public if got else None

    def owner(self, address: str) -> str | None:
        got = self._keys.get(address)
        return got[1].address if got else None

    def payments(self, payer: str, payee: str, amount: int, *, award: str | None,
                 memo: str, at: float) -> list[SignedMessage]:
        """A settlement transfer from `payer`. From a pseudonym: the owner's top-up of
        exactly `amount`, then the pseudonym's payment (which settles the award line).
        An address this desk did not issue gives [] (the caller signs it itself)."""
        got = self._keys.get(payer)
        if got is None:
            return []
        pseudo, owner = got
        top_up = messages.sign(owner, T.PAYMENT, {"to": pseudo.address, "amount": amount,
                                                  "award": None, "memo": f"top-up {memo}"[:200]},
                               at=at)
        pay = messages.sign(pseudo, T.PAYMENT, {"to": payee, "amount": amount,
                                                "award": award, "memo": memo}, at=at)
        return [top_up, pay]


@dataclass(frozen=True)
class Revealed:
    pseudonym: str
    owner: str | None
    """The identity address, or None when the audit key does not open the tag."""
    owner_name: str | None
    balance: int


def reveal(state: LedgerState, audit_key: bytes) -> list[Revealed]:
    """Every pseudonym certified on the chain, mapped to its owner with the audit key.

    The escrow tag is an HMAC under the audit key: without the key, no owner is found
    (each tag is checked against every registered identity, so a wrong key finds none)."""
    identities = sorted(state.identities)
    out = []
    for address, p in sorted(state.pseudonyms.items()):
        owner = reveal_owner(audit_key, address, p.escrow, identities)
        out.append(Revealed(address, owner, state.identities[owner].name if owner else None,
                            state.balance(address)))
    return out
