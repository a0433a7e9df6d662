"""The consistency token: what it says (the primary's position, or only that its
client wrote) and how it is signed, with the app's key and its fallbacks, bound to
one cluster and one app. The same token travels in the sticky cookie, in a request
or response header, and into jobs; how it travels is the adapters' and ``cookie``'s
business, how a position is written into it its backend's."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .backends import TOKEN_POSITIONS

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from .backends import Backend, Position

__all__ = [
    "CLOCK_SKEW",
    "KEY_MISMATCH_WARNING",
    "MAX_COOKIE_LENGTH",
    "StickyCodec",
    "StickyToken",
    "cluster_tag",
    "database_tag",
    "later",
    "token_salt",
]

# A real token is about 50 characters, and about 30 more for each further database
# written (see "Several databases" in the README): room for ten.
MAX_COOKIE_LENGTH = 400
# App servers behind one load balancer disagree on the time a little, and stamps are
# whole seconds: a cookie stamped up to this far in the future is still honoured.
CLOCK_SKEW = 2.0
_CHECKED_VALUES = 256

logger = logging.getLogger("replicated")

KEY_MISMATCH_WARNING = (
    "A consistency token (sticky cookie or token header) came signed with a key this "
    "app does not have, so it was ignored and its client may read from a replica that "
    "has not caught up with its write. Most likely the app servers or their workers do "
    "not all have the same SECRET_KEY, or SECRET_KEY was changed without keeping the "
    "old key in SECRET_KEY_FALLBACKS, or the token was made by another app (another "
    "REPLICATED_COOKIE_NAME). Give every server and worker the same SECRET_KEY, and "
    "list the keys it replaces in SECRET_KEY_FALLBACKS. (Logged once.)"
)

# What a token says of a cluster it was not bound to: nothing (a time-mode token).
_NO_CLUSTER = b"-"
# A token of several databases starts with this, then one entry per database, each
# ``<database tag>.<cluster>.<position, or "t">``, joined by it.
_MANY = b"~"
# The default database's tag in such a token.
_DEFAULT_DATABASE = "-"


@dataclass(frozen=True, slots=True)
class StickyToken:
    """What a writing request tells the client's later requests.

    ``lsn`` is the primary's position after the write ("wal" mode, a backend with
    positions), or None when only the time of the write is known ("time" mode).
    """

    lsn: Position | None = None


_TIME_TOKEN = StickyToken()


def later(first: StickyToken | None, second: StickyToken | None) -> StickyToken | None:
    """The token that asks more of the two (a request may carry a cookie and a
    header): the later position, and a token without a position (the primary for the
    sticky time) over any position."""
    if first is None:
        return second
    if second is None:
        return first
    if first.lsn is None or second.lsn is None:
        return _TIME_TOKEN
    return first if first.lsn >= second.lsn else second


def token_salt(cookie_name: str) -> str:
    """The salt of an app's tokens: its cookie name binds them to it, so a token one
    app made does not steer another that shares its secret key."""
    return f"replicated.token.{cookie_name}"


def cluster_tag(identifier: str) -> str:
    """What a token carries of the cluster whose position it holds: 8 characters of a
    hash of ``identifier`` (a backend's ``read_cluster``), not the identifier itself."""
    digest = hashlib.sha256(b"replicated.cluster\0" + identifier.encode("utf-8")).digest()
    return _encode(digest[:6]).decode("ascii")


def database_tag(bind_key: str) -> str:
    """What a token of several databases calls the database of ``bind_key``: 4
    characters of a hash of the key (the default database is ``-``)."""
    digest = hashlib.sha256(b"replicated.database\0" + bind_key.encode("utf-8")).digest()
    return _encode(digest[:3]).decode("ascii")


class StickyCodec:
    """Signs and checks consistency tokens with the app's secret key.

    The value is ``<cluster>.<position, or "t">.<timestamp>.<signature>``, byte for
    byte what itsdangerous's ``TimestampSigner(secret_key, salt=salt)`` makes of the
    first two parts (HMAC-SHA1 over a key derived once, URL-safe base64). It is
    written out here because the library derives the key again and sets up a new
    HMAC on every call, which the overhead benchmark measured at a good part of a
    sticky request's routing cost.

    ``cluster`` is ``cluster_tag()`` of the cluster the app's router serves, set by
    the router once a connection has told it (None before). A token with a position
    is bound to it: one from another cluster reads as no token, and while this
    codec's cluster is not known yet, as a token without a position (the primary).
    A token without a position carries ``-`` and holds on any cluster.

    ``secret_key`` signs; it and each of ``fallbacks`` (the app's
    ``SECRET_KEY_FALLBACKS``, older keys) check, as Flask's session does, so that a
    key rotation keeps clients sticky. ``loads`` never raises: a missing, garbled,
    forged, expired or oversized cookie reads as no cookie at all. A value of this
    codec's shape that no key matches most likely comes from a server with another
    secret key: that is logged once, as a warning.

    ``positions`` is the backend that writes and reads the position (by default
    PostgreSQL's: lower-case hex); the router sets its primary's.

    ``database`` is ``database_tag()`` of the bind key whose database this codec's
    router serves, None for the app's default database. An app routing several
    databases has one codec each, with the same keys: a token then carries one entry
    per database written (``dumps_many``), each bound to its own cluster, and each
    codec reads its own entry. A token of the one-database shape is the default
    database's, so tokens made before a second database was routed still hold.
    """

    def __init__(
        self,
        secret_key: str | bytes,
        salt: str = token_salt("replicated_sticky"),
        fallbacks: str | bytes | Iterable[str | bytes] | None = None,
        positions: Backend = TOKEN_POSITIONS,
    ) -> None:
        # Copied for each signature: a copy skips OpenSSL's lookup of the algorithm,
        # which a one-shot hmac.digest() makes on every call (up to 20 us in a busy
        # process).
        self._hmac = _keyed_hmac(secret_key, salt)
        if fallbacks is None:
            fallbacks = ()
        elif isinstance(fallbacks, (str, bytes)):
            fallbacks = (fallbacks,)  # one key, not one key per character
        self._fallbacks = tuple(_keyed_hmac(key, salt) for key in fallbacks)
        self._warned = False
        # Time mode signs the same payload all second long: keep the last value.
        self._last: tuple[bytes, int, str] = (b"", -1, "")
        # A client sends the same value with each request until its next write, so
        # the check of a value is kept (not its age, which is computed each time). A
        # few hundred entries of under 200 characters: bounded, whatever clients send.
        self._check = functools.lru_cache(maxsize=_CHECKED_VALUES)(self._verify)
        self.positions = positions
        self.cluster: str | None = None
        self.database: str | None = None

    def dumps(self, token: StickyToken, now: int | None = None) -> str:
        """The cookie value for ``token``, stamped with ``now`` (whole seconds since
        the epoch; default: the current time)."""
        # ``_entry`` and ``_sign`` written out: every write's response makes one, and
        # the two calls measured about a quarter of a time-mode token's cost.
        cluster = self.cluster
        if token.lsn is None or cluster is None:
            payload = _NO_CLUSTER + b".t"
        else:
            payload = cluster.encode("ascii") + b"." + self._positions.dump_position(token.lsn)
        if now is None:
            now = int(time.time())
        last = self._last
        if last[0] == payload and last[1] == now:
            return last[2]
        body = payload + b"." + _encode(now.to_bytes(8, "big").lstrip(b"\0"))
        value = (body + b"." + self._signature(body)).decode("ascii")
        self._last = (payload, now, value)
        return value

    def dumps_many(
        self, entries: Sequence[tuple[StickyCodec, StickyToken]], now: int | None = None
    ) -> str:
        """One value for the tokens of several databases, each with the codec of its
        database (which tells its tag, cluster and positions), signed with this codec's
        key. One entry of the default database alone is written as ``dumps`` writes it."""
        if len(entries) == 1 and entries[0][0].database is None:
            codec, token = entries[0]
            return self._sign(codec._entry(token), now)
        parts = [
            (codec.database or _DEFAULT_DATABASE).encode("ascii") + b"." + codec._entry(token)
            for codec, token in entries
        ]
        return self._sign(_MANY + _MANY.join(parts), now)

    def _entry(self, token: StickyToken) -> bytes:
        cluster = self.cluster
        if token.lsn is None or cluster is None:
            # Without a cluster to bind it to, a position would be ignored everywhere:
            # the token then keeps its client on the primary for the sticky time.
            return _NO_CLUSTER + b".t"
        position = self._positions.dump_position(token.lsn)
        return cluster.encode("ascii") + b"." + position

    def _sign(self, payload: bytes, now: int | None) -> str:
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
        """The token in ``value`` if it is ours and younger than ``max_age`` seconds
        (of several databases: this codec's database's entry, None if it has none)."""
        if not value or len(value) > MAX_COOKIE_LENGTH:
            return None
        checked = self._check(value)
        if checked is None:
            return None
        signed_at, cluster, token = checked
        if token is None:
            return None
        if token.lsn is not None and cluster != self.cluster:
            # Another cluster's position means nothing here; while ours is not known
            # (no connection made yet), the primary is right for any position.
            return _TIME_TOKEN if self.cluster is None else None
        # The stamp is in whole seconds, rounded down, so the age is counted in whole
        # seconds too: a cookie is honoured for at least max_age and less than one
        # second more (plus the skew allowed for a stamp from a host whose clock is
        # ahead). Counting the fraction as well would cut a cookie signed late in a
        # second short by up to a second, and with it a writer's stickiness.
        age = int(time.time()) - signed_at
        if not -CLOCK_SKEW <= age <= max_age:
            return None
        return token

    def no_entry(self, value: str | None) -> bool:
        """Whether ``value`` is a token signed with our key, of any age, that has no
        entry for this codec's database (it tells only of other databases' writes)."""
        if not value or len(value) > MAX_COOKIE_LENGTH:
            return False
        checked = self._check(value)
        return checked is not None and checked[2] is None

    def _verify(self, value: str) -> tuple[int, str, StickyToken | None] | None:
        """The stamp, cluster tag and token of a value signed with our key, else None.

        The token is None when the value has no entry for this codec's database."""
        try:
            raw = value.encode("utf-8")
            body, _, signature = raw.rpartition(b".")
            head, _, stamp = body.rpartition(b".")
            cluster, _, payload = head.partition(b".")
            if not self._signed_by_a_key(body, signature):
                if self._shape.fullmatch(value):
                    self._warn_key_mismatch()
                return None
            stamp_bytes = _decode(stamp)
        except (ValueError, binascii.Error):  # UnicodeError is a ValueError
            return None
        if len(stamp_bytes) > 8:
            return None
        signed_at = int.from_bytes(stamp_bytes, "big")
        if head.startswith(_MANY):
            cluster, payload = self._own_entry(head)
            if not payload:
                return signed_at, "", None
        elif self.database is not None:
            return signed_at, "", None  # the one-database shape: the default database's
        tag = cluster.decode("ascii")  # signed, so ours: ASCII
        if payload == b"t":
            return signed_at, tag, _TIME_TOKEN
        position = self._positions.load_position(payload)
        if position is None or cluster == _NO_CLUSTER:
            return None
        return signed_at, tag, StickyToken(lsn=position)

    def _own_entry(self, head: bytes) -> tuple[bytes, bytes]:
        # The cluster and payload of this codec's database in a token of several
        # databases; empty when it has none.
        own = (self.database or _DEFAULT_DATABASE).encode("ascii")
        for entry in head[len(_MANY) :].split(_MANY):
            database, _, rest = entry.partition(b".")
            if database == own:
                cluster, _, payload = rest.partition(b".")
                return cluster, payload
        return b"", b""

    @property
    def positions(self) -> Backend:
        """The backend whose positions the token carries."""
        return self._positions

    @positions.setter
    def positions(self, backend: Backend) -> None:
        self._positions = backend
        # What this codec makes: a cluster tag (8 characters, or "-"), a position or
        # "t", a stamp of up to 8 bytes and an HMAC-SHA1 (20 bytes), base64url without
        # padding. Only a value of this shape whose signature no key matches is
        # reported: anything else is not a token at all.
        entry = r"(?:-|[A-Za-z0-9_-]{4})\.(?:-|[A-Za-z0-9_-]{8})\.[0-9A-Za-z_-]{1,32}"
        self._shape = re.compile(
            rf"(?:(?:-|[A-Za-z0-9_-]{{8}})\.(?:t|{backend.token_pattern})|~{entry}(?:~{entry})*)"
            r"\.[A-Za-z0-9_-]{2,11}\.[A-Za-z0-9_-]{27}"
        )
        self._check.cache_clear()  # values read with the previous backend's positions

    def _signature(self, body: bytes, keyed: hmac.HMAC | None = None) -> bytes:
        mac = (keyed or self._hmac).copy()
        mac.update(body)
        return _encode(mac.digest())

    def _signed_by_a_key(self, body: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is that of ``body`` with the secret key or a fallback."""
        if hmac.compare_digest(self._signature(body), signature):
            return True
        return any(
            hmac.compare_digest(self._signature(body, keyed), signature)
            for keyed in self._fallbacks
        )

    def _warn_key_mismatch(self) -> None:
        # Once: every request of such a client would say it again. A race between
        # threads may say it twice, which is harmless.
        if not self._warned:
            self._warned = True
            logger.warning(KEY_MISMATCH_WARNING)


def _keyed_hmac(secret_key: str | bytes, salt: str) -> hmac.HMAC:
    """An HMAC-SHA1 set up with ``secret_key``, derived as itsdangerous does by
    default ("django-concat"), ready to be copied for each signature."""
    secret = secret_key.encode("utf-8") if isinstance(secret_key, str) else secret_key
    key = hashlib.sha1(salt.encode("utf-8") + b"signer" + secret).digest()
    return hmac.new(key, digestmod=hashlib.sha1)


def _encode(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _decode(data: bytes) -> bytes:
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))
