"""The signed sticky cookie: after a write, where the client's reads must go."""

from __future__ import annotations

import time
from dataclasses import dataclass

from itsdangerous import BadData, TimestampSigner

__all__ = ["CLOCK_SKEW", "MAX_COOKIE_LENGTH", "StickyCodec", "StickyToken"]

# A real token is about 60 characters; anything much longer is not ours.
MAX_COOKIE_LENGTH = 200
# App servers behind one load balancer disagree on the time a little, and stamps are
# whole seconds: a cookie stamped up to this far in the future is still honoured.
CLOCK_SKEW = 2.0
_HEX = frozenset(b"0123456789abcdef")


@dataclass(frozen=True, slots=True)
class StickyToken:
    """What a writing request tells the client's later requests.

    ``lsn`` is the primary's WAL position after the write (PostgreSQL, "wal" mode),
    or None when only the time of the write is known ("time" mode).
    """

    lsn: int | None = None


class StickyCodec:
    """Signs and checks sticky cookies with the app's secret key.

    The value is ``<position in hex, or "t">.<timestamp>.<signature>``: a signed
    string rather than signed JSON, which costs a few microseconds instead of tens.
    ``loads`` never raises: a missing, garbled, forged, expired or oversized cookie
    reads as no cookie at all.
    """

    def __init__(self, secret_key: str | bytes, salt: str = "replicated.sticky") -> None:
        self._signer = TimestampSigner(secret_key, salt=salt)

    def dumps(self, token: StickyToken) -> str:
        """The cookie value for ``token``, stamped with the current time."""
        payload = "t" if token.lsn is None else format(token.lsn, "x")
        return self._signer.sign(payload).decode("ascii")

    def loads(self, value: str | None, max_age: float) -> StickyToken | None:
        """The token in ``value`` if it is ours and younger than ``max_age`` seconds."""
        if not value or len(value) > MAX_COOKIE_LENGTH:
            return None
        try:
            payload, signed_at = self._signer.unsign(value, return_timestamp=True)
        except (BadData, ValueError, TypeError, OverflowError):
            return None
        # The stamp is in whole seconds, rounded down: the age read here is never less
        # than the true one, so a cookie never outlives max_age (plus the skew allowed
        # for a stamp from a host whose clock is ahead).
        age = time.time() - signed_at.timestamp()
        if not -CLOCK_SKEW <= age <= max_age:
            return None
        if payload == b"t":
            return StickyToken()
        if not 0 < len(payload) <= 16 or not all(c in _HEX for c in payload):
            return None
        return StickyToken(lsn=int(payload, 16))
