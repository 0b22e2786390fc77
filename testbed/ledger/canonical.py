"""The one byte encoding that is hashed and signed.

JSON with sorted keys, no whitespace, UTF-8, no NaN/Infinity. A message is stored and
sent in exactly these bytes, so its id (sha256 of them) is stable and any change of a
single byte is detectable.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                            allow_nan=False)


class NotCanonical(ValueError):
    """Bytes that are not the canonical encoding of what they contain."""


def encode(obj: Any) -> bytes:
    return _ENCODER.encode(obj).encode()


def decode(raw: bytes | str, *, strict: bool = True) -> Any:
    """Parse JSON; with `strict`, the input must already be canonical."""
    try:
        obj = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise NotCanonical(f"not valid JSON: {exc}") from None
    if strict:
        data = raw.encode() if isinstance(raw, str) else raw
        if encode(obj) != data:
            raise NotCanonical("JSON is valid but not in canonical form "
                               "(sorted keys, no whitespace, UTF-8)")
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest(obj: Any) -> str:
    return sha256_hex(encode(obj))
