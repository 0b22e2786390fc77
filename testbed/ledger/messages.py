"""The paper's signed JSON envelope (sec. V.E), shared by the ledger and the market bus.

    {"clientId": address, "reqId": unique per client, "date": ISO-8601 UTC,
     "operation": name, "parameters": {...}, "signature": hex Ed25519}

The signature covers a domain tag and the canonical encoding of every field but
`signature`; the envelope travels and is stored as the canonical encoding of all fields,
so its id is sha256 of exactly those bytes. Verification is split in two: `verify` (key
known, signature good: a pure function of the message and the key table) and `Freshness`
(timestamp within the allowed skew, reqId never seen: needs a clock and memory).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from testbed.ledger import canonical
from testbed.ledger import transactions as T
from testbed.ledger.errors import Reason, Rejected
from testbed.ledger.identity import (
    BatchVerifier,
    KeyPair,
    address_of,
    batch_verifier,
    is_address,
    verify_signature,
)

DOMAIN = b"testbed/signed-message/v1\n"
FIELDS = ("clientId", "date", "operation", "parameters", "reqId", "signature")
MAX_REQ_ID = 64
MAX_MESSAGE_BYTES = 64 * 1024
"""Ceiling of an ordinary envelope: an order, a reading or a payment is well under 2 kB."""
MAX_LARGE_MESSAGE_BYTES = 4 * 1024 * 1024
"""Ceiling of the operations whose size grows with the market (`LARGE_OPERATIONS`)."""
LARGE_OPERATIONS = frozenset({T.AWARD, T.GRID_CHECK})
"""An award lists every order of its auction with a notice, award and cap per order, and
the DSO's check carries a cap per order: ~0.3-0.5 kB an order, i.e. past 64 kB from ~150
orders on (500 prosumers' awards are 120-160 kB)."""
_OPERATION_PREFIX = re.compile(rb'\{"clientId":"[^"]{1,100}","date":"[^"]{1,40}",'
                               rb'"operation":"([a-z-]{1,32})"')

KeyResolver = Callable[[str], bytes | None]
"""Maps a clientId (address) to its registered public key, or None if unknown."""


def format_date(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_date(text: str) -> float:
    if not isinstance(text, str) or not text.endswith("Z"):
        raise ValueError("expected ISO-8601 UTC like 2026-01-01T00:00:00.000Z")
    return datetime.fromisoformat(text[:-1]).replace(tzinfo=UTC).timestamp()


@dataclass(frozen=True)
class SignedMessage:
    client_id: str
    req_id: str
    date: str
    operation: str
    parameters: Mapping[str, Any]
    signature: str

    def body(self) -> dict[str, Any]:
        return {"clientId": self.client_id, "reqId": self.req_id, "date": self.date,
                "operation": self.operation, "parameters": self.parameters}

    def as_dict(self) -> dict[str, Any]:
        return {**self.body(), "signature": self.signature}

    @cached_property
    def raw(self) -> bytes:
        return canonical.encode(self.as_dict())

    @cached_property
    def id(self) -> str:
        return canonical.sha256_hex(self.raw)

    @cached_property
    def time(self) -> float:
        return parse_date(self.date)

    def signed_bytes(self) -> bytes:
        # "signature" sorts last, so the canonical body is the canonical envelope without
        # its last member: cut it off rather than encode everything again.
        raw = self.__dict__.get("raw")
        tail = f',"signature":"{self.signature}"}}'.encode()
        if raw is not None and raw.endswith(tail):
            return DOMAIN + raw[:-len(tail)] + b"}"
        return DOMAIN + canonical.encode(self.body())


def sign(key: KeyPair, operation: str, parameters: Mapping[str, Any], *, at: float,
         req_id: str | None = None, client_id: str | None = None) -> SignedMessage:
    """A new signed message. `at` is the signer's clock (scenario time in a run).

    The default reqId is derived from the content (signer, date, operation, parameters):
    a replayed run signs byte-identical messages, and re-sending the same request is
    recognisably the same request (the replay rules refuse the copy)."""
    client = client_id or key.address
    date = format_date(at)
    if req_id is None:
        req_id = canonical.sha256_hex(canonical.encode(
            [client, date, operation, dict(parameters)]))[:24]
    unsigned = SignedMessage(client, req_id, date, operation, dict(parameters), "")
    body = canonical.encode(unsigned.body())
    signature = key.sign(DOMAIN + body).hex()
    msg = SignedMessage(unsigned.client_id, unsigned.req_id, unsigned.date, operation,
                        unsigned.parameters, signature)
    # "signature" sorts after every other field: the canonical envelope is the canonical
    # body with it appended (`signed_bytes` cuts it off the same way)
    msg.__dict__["raw"] = body[:-1] + f',"signature":"{signature}"}}'.encode()
    return msg


MAX_PARSED = 4096
"""Envelopes remembered by `parse` (see `_PARSED`)."""
_PARSED: OrderedDict[bytes, SignedMessage] = OrderedDict()
"""Strictly parsed envelopes by their exact bytes, most recent last: the validators (and
market agents) of one process receive the same transaction each, and parsing is a pure
function of the bytes, so it is done once. Only envelopes that parsed are kept; messages
are immutable (nothing in the ledger writes to their parameters)."""


def parse(raw: bytes | str, *, strict: bool = True) -> SignedMessage:
    """Decode and shape-check an envelope. With `strict`, it must be canonical bytes."""
    if strict and type(raw) is bytes:
        hit = _PARSED.get(raw)
        if hit is not None:
            _PARSED.move_to_end(raw)
            return hit
        msg = _parse(raw, strict=True)
        _PARSED[raw] = msg
        if len(_PARSED) > MAX_PARSED:
            _PARSED.popitem(last=False)
        return msg
    return _parse(raw, strict=strict)


def _parse(raw: bytes | str, *, strict: bool) -> SignedMessage:
    if len(raw) > MAX_MESSAGE_BYTES:
        limit = size_limit(raw)
        if len(raw) > limit:
            raise Rejected(Reason.MALFORMED, f"message of {len(raw)} bytes exceeds {limit}")
    try:
        obj = canonical.decode(raw, strict=strict)
    except canonical.NotCanonical as exc:
        raise Rejected(Reason.MALFORMED, str(exc)) from None
    msg = from_dict(obj)
    if strict:  # the bytes are the canonical encoding: no need to encode them again
        msg.__dict__["raw"] = raw.encode() if isinstance(raw, str) else bytes(raw)
    return msg


def size_limit(raw: bytes | str) -> int:
    """The most bytes an envelope may have, read from its first ~200 bytes before any
    decoding: `MAX_LARGE_MESSAGE_BYTES` for the operations that grow with the market when
    the canonical key order names one (canonical JSON sorts `clientId`, `date`,
    `operation` first), else `MAX_MESSAGE_BYTES`. Signature and shape are checked later
    as for any message."""
    head = raw[:200]
    match = _OPERATION_PREFIX.match(head.encode() if isinstance(head, str) else head)
    if match is not None and match.group(1).decode() in LARGE_OPERATIONS:
        return MAX_LARGE_MESSAGE_BYTES
    return MAX_MESSAGE_BYTES


def from_dict(obj: Any) -> SignedMessage:
    if not isinstance(obj, dict):
        raise Rejected(Reason.MALFORMED, f"envelope must be a JSON object, got "
                       f"{type(obj).__name__}")
    missing = [f for f in FIELDS if f not in obj]
    extra = sorted(set(obj) - set(FIELDS))
    if missing or extra:
        raise Rejected(Reason.MALFORMED, f"envelope fields: missing {missing}, unexpected "
                       f"{extra}; expected {list(FIELDS)}")
    if not is_address(obj["clientId"]):
        raise Rejected(Reason.MALFORMED, f"clientId {obj['clientId']!r} is not an address "
                       "(tb + 40 hex)")
    req = obj["reqId"]
    if not isinstance(req, str) or not 0 < len(req) <= MAX_REQ_ID:
        raise Rejected(Reason.MALFORMED, f"reqId must be a string of 1-{MAX_REQ_ID} "
                       f"characters, got {req!r}")
    if not isinstance(obj["operation"], str) or not obj["operation"]:
        raise Rejected(Reason.MALFORMED, "operation must be a non-empty string")
    if not isinstance(obj["parameters"], dict):
        raise Rejected(Reason.MALFORMED, "parameters must be a JSON object")
    sig = obj["signature"]
    if not (isinstance(sig, str) and len(sig) == 128):
        raise Rejected(Reason.MALFORMED, "signature must be 128 hex characters")
    msg = SignedMessage(obj["clientId"], req, obj["date"], obj["operation"],
                        obj["parameters"], sig)
    try:
        t = msg.time
    except (ValueError, TypeError) as exc:
        raise Rejected(Reason.MALFORMED, f"date {obj['date']!r}: {exc}") from None
    if not math.isfinite(t):
        raise Rejected(Reason.MALFORMED, f"date {obj['date']!r} is not a finite time")
    return msg


def _key_and_signature(msg: SignedMessage, resolve: KeyResolver) -> tuple[bytes, bytes]:
    public = resolve(msg.client_id)
    if public is None:
        raise Rejected(Reason.UNKNOWN_KEY, f"clientId {msg.client_id} is not registered")
    if address_of(public) != msg.client_id:
        raise Rejected(Reason.UNKNOWN_KEY, f"registered key does not hash to {msg.client_id}")
    try:
        return public, bytes.fromhex(msg.signature)
    except ValueError:
        raise Rejected(Reason.MALFORMED, "signature is not hex") from None


def _bad_signature(msg: SignedMessage) -> Rejected:
    return Rejected(Reason.BAD_SIGNATURE, f"{msg.operation} from {msg.client_id} "
                    f"(reqId {msg.req_id}) does not verify against its registered key")


def verify(msg: SignedMessage, resolve: KeyResolver) -> bytes:
    """Check the signer is registered and the signature is good; returns the public key."""
    public, sig = _key_and_signature(msg, resolve)
    if not verify_signature(public, sig, msg.signed_bytes()):
        raise _bad_signature(msg)
    return public


def verify_batch(msgs: Sequence[SignedMessage], resolve: KeyResolver, *,
                 verifier: BatchVerifier | None = None) -> list[Rejected | None]:
    """`verify` for many messages at once, the signature checks spread over every core
    (`identity.BatchVerifier`). Returns, per message and in order, None when it verifies
    or the very refusal `verify` would raise for it."""
    return verify_batch_start(msgs, resolve, verifier=verifier)()


def verify_batch_start(msgs: Sequence[SignedMessage], resolve: KeyResolver, *,
                       verifier: BatchVerifier | None = None
                       ) -> Callable[[], list[Rejected | None]]:
    """`verify_batch` in two steps: start the checks, collect the answers later."""
    msgs = list(msgs)
    errors: list[Rejected | None] = [None] * len(msgs)
    items, where = [], []
    for i, msg in enumerate(msgs):
        try:
            public, sig = _key_and_signature(msg, resolve)
        except Rejected as exc:
            errors[i] = exc
            continue
        items.append((public, sig, msg.signed_bytes()))
        where.append(i)
    pending = (verifier or batch_verifier()).start(items)

    def collect() -> list[Rejected | None]:
        for i, ok in zip(where, pending(), strict=True):
            if not ok:
                errors[i] = _bad_signature(msgs[i])
        return errors

    return collect


@dataclass
class Freshness:
    """Stale-timestamp and replay rejection for live traffic.

    A message is accepted once, and only if its date is within `max_skew_s` of `now`.
    Remembered reqIds older than the skew window are forgotten: a replay of them is
    already stale.
    """

    max_skew_s: float = 300.0
    _seen: set[tuple[str, str]] = field(default_factory=set)
    _order: deque[tuple[float, str, str]] = field(default_factory=deque)

    def check(self, msg: SignedMessage, now: float) -> None:
        t = msg.time
        if abs(t - now) > self.max_skew_s:
            raise Rejected(Reason.STALE, f"{msg.operation} dated {msg.date} is "
                           f"{t - now:+.1f} s from now (allowed ±{self.max_skew_s:g} s)")
        key = (msg.client_id, msg.req_id)
        if key in self._seen:
            raise Rejected(Reason.REPLAY, f"reqId {msg.req_id} from {msg.client_id} was "
                           "already accepted")

    def remember(self, msg: SignedMessage, now: float) -> None:
        key = (msg.client_id, msg.req_id)
        self._seen.add(key)
        self._order.append((msg.time, *key))
        horizon = now - 2 * self.max_skew_s
        while self._order and self._order[0][0] < horizon:
            _, cid, rid = self._order.popleft()
            self._seen.discard((cid, rid))

    def accept(self, msg: SignedMessage, resolve: KeyResolver, now: float) -> None:
        """Full live check: signature first (a forgery must not burn a reqId), then time."""
        verify(msg, resolve)
        self.check(msg, now)
        self.remember(msg, now)
