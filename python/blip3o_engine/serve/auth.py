"""API keys: `Authorization: Bearer <key>` checked in constant time against every configured key."""

from __future__ import annotations

import hmac
from collections.abc import Sequence


class APIKeys:
    """The accepted keys; with none configured every request is allowed."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | None) -> bool:
        """Whether an Authorization header value carries one of the keys. Every key is compared, each with
        `hmac.compare_digest`, so the time taken does not tell how much of a guess was right."""
        if not self._keys:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        presented = token.strip().encode() if scheme.lower() == "bearer" else b""
        found = False
        for key in self._keys:
            found |= hmac.compare_digest(presented, key)
        return found


__all__ = ["APIKeys"]
