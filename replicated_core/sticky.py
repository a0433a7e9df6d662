"""The signed sticky cookie: after a write, where the client's reads must go."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import time
from dataclasses import dataclass

__all__ = ["CLOCK_SKEW", "MAX_COOKIE_LENGTH", "StickyCodec", "StickyToken", "find_cookie"]

# A real token is about 40 characters; anything much longer is not ours.
MAX_COOKIE_LENGTH = 200
# App servers behind one load balancer disagree on the time a little, and stamps are
# whole seconds: a cookie stamped up to this far in the future is still honoured.
CLOCK_SKEW = 2.0
_CHECKED_VALUES = 256
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

    The value is ``<position in hex, or "t">.<timestamp>.<signature>``, byte for byte
    what itsdangerous's ``TimestampSigner(secret_key, salt=salt)`` makes (HMAC-SHA1
    over a key derived once, URL-safe base64). It is written out here because the
    library derives the key again and sets up a new HMAC on every call, which the
    overhead benchmark measured at a good part of a sticky request's routing cost.
    ``loads`` never raises: a missing, garbled, forged, expired or oversized cookie
    reads as no cookie at all.
    """

    def __init__(self, secret_key: str | bytes, salt: str = "replicated.sticky") -> None:
        secret = secret_key.encode("utf-8") if isinstance(secret_key, str) else secret_key
        # itsdangerous's default "django-concat" key derivation.
        key = hashlib.sha1(salt.encode("utf-8") + b"signer" + secret).digest()
        # Copied for each signature: a copy skips OpenSSL's lookup of the algorithm,
        # which a one-shot hmac.digest() makes on every call (up to 20 us in a busy
        # process).
        self._hmac = hmac.new(key, digestmod=hashlib.sha1)
        # Time mode signs the same payload all second long: keep the last value.
        self._last: tuple[bytes, int, str] = (b"", -1, "")
        # A client sends the same value with each request until its next write, so
        # the check of a value is kept (not its age, which is computed each time). A
        # few hundred entries of under 200 characters: bounded, whatever clients send.
        self._check = functools.lru_cache(maxsize=_CHECKED_VALUES)(self._verify)

    def dumps(self, token: StickyToken, now: int | None = None) -> str:
        """The cookie value for ``token``, stamped with ``now`` (whole seconds since
        the epoch; default: the current time)."""
        payload = b"t" if token.lsn is None else format(token.lsn, "x").encode("ascii")
        if now is None:
            now = int(time.time())
        last = self._last
        if last[0] == payload and last[1] == now:
            return last[2]
        body = payload + b"." + _encode(now.to_bytes(8, "big").lstrip(b"\0"))
        value = (body + b"." + self._signature(body)).decode("ascii")
        self._last = (payload, now, value)
        return value

    def loads(self, value: str | None, max_age: float) -> StickyToken | None:
        """The token in ``value`` if it is ours and younger than ``max_age`` seconds."""
        if not value or len(value) > MAX_COOKIE_LENGTH:
            return None
        checked = self._check(value)
        if checked is None:
            return None
        signed_at, token = checked
        # The stamp is in whole seconds, rounded down: the age read here is never less
        # than the true one, so a cookie never outlives max_age (plus the skew allowed
        # for a stamp from a host whose clock is ahead).
        age = time.time() - signed_at
        if not -CLOCK_SKEW <= age <= max_age:
            return None
        return token

    def _verify(self, value: str) -> tuple[int, StickyToken] | None:
        """The stamp and token of a cookie value signed with our key, else None."""
        try:
            raw = value.encode("utf-8")
            body, _, signature = raw.rpartition(b".")
            payload, _, stamp = body.rpartition(b".")
            if not hmac.compare_digest(self._signature(body), signature):
                return None
            stamp_bytes = _decode(stamp)
        except (ValueError, binascii.Error):  # UnicodeError is a ValueError
            return None
        if len(stamp_bytes) > 8:
            return None
        signed_at = int.from_bytes(stamp_bytes, "big")
        if payload == b"t":
            return signed_at, StickyToken()
        if not 0 < len(payload) <= 16 or not all(c in _HEX for c in payload):
            return None
        return signed_at, StickyToken(lsn=int(payload, 16))

    def _signature(self, body: bytes) -> bytes:
        mac = self._hmac.copy()
        mac.update(body)
        return _encode(mac.digest())


def _encode(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _decode(data: bytes) -> bytes:
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))


def find_cookie(header: str | None, name: str) -> str | None:
    """The first value of the cookie ``name`` in a ``Cookie`` request header, or None.

    A scan for one name instead of the framework's parse of every cookie, which the
    overhead benchmark showed costing more than the rest of a sticky request's
    routing. Sticky values never need quoting, so a quoted value is returned as is
    and then fails its signature check, as any foreign value does.
    """
    if not header:
        return None
    key = name + "="
    start = header.find(key)
    while start >= 0:
        if start == 0 or header[start - 1] in " \t;":
            end = header.find(";", start)
            return header[start + len(key) : end if end >= 0 else len(header)].strip()
        start = header.find(key, start + 1)
    return None
