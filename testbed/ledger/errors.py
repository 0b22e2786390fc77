"""One exception for everything the ledger refuses, with a machine-readable reason code."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad-signature"
    UNKNOWN_KEY = "unknown-key"
    NOT_AUTHORISED = "not-authorised"
    REPLAY = "replay"
    STALE = "stale"
    INVALID = "invalid"
    OVERDRAW = "overdraw"
    DOUBLE_SPEND = "double-spend"
    CONTRACT_MISMATCH = "contract-mismatch"
    WRONG_PROPOSER = "wrong-proposer"
    BAD_CERTIFICATE = "bad-certificate"
    BAD_BLOCK = "bad-block"


class Rejected(Exception):
    """A message, transaction or block the rules refuse. State is left unchanged."""

    def __init__(self, reason: Reason, detail: str, *, height: int | None = None,
                 tx: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.height = height
        self.tx = tx
        where = []
        if height is not None:
            where.append(f"height {height}")
        if tx is not None:
            where.append(f"tx {tx[:16]}")
        prefix = f"[{', '.join(where)}] " if where else ""
        super().__init__(f"{prefix}{reason.value}: {detail}")

    def at(self, *, height: int | None = None, tx: str | None = None) -> Rejected:
        """The same refusal, located."""
        return Rejected(self.reason, self.detail,
                        height=self.height if height is None else height,
                        tx=self.tx if tx is None else tx)
