"""How the sticky token travels: the ``Set-Cookie`` header the router writes, and
the scan that finds the cookie in a request's ``Cookie`` header.

What the value says and how it is signed is ``sticky.StickyCodec``'s business; this
module only carries it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote

__all__ = ["CookieUpdate", "find_cookie"]


class _Headers(Protocol):
    def add(self, key: str, value: str, /) -> None: ...


class _Response(Protocol):
    @property
    def headers(self) -> _Headers: ...


# What Werkzeug writes for a deleted cookie, for clients that ignore Max-Age=0.
_EPOCH = "Thu, 01 Jan 1970 00:00:00 GMT"


@functools.lru_cache(maxsize=16)
def _cookie_attributes(max_age: int, path: str, secure: bool) -> str:
    expires = f"; Expires={_EPOCH}" if max_age == 0 else ""
    quoted = quote(path, safe="%!$&'()*+,/:=@")
    return f"{expires}; Max-Age={max_age}; Path={quoted}; HttpOnly; SameSite=Lax" + (
        "; Secure" if secure else ""
    )


@dataclass(frozen=True, slots=True)
class CookieUpdate:
    """A change to the sticky cookie: set ``value``, or delete it when None.

    Always HttpOnly and SameSite=Lax; Secure when the request came over HTTPS; at
    the app's root path.
    """

    name: str
    value: str | None
    max_age: int
    path: str
    secure: bool
    # The Set-Cookie header value, written once: a time-mode update is reused by
    # every write of the same second.
    header_value: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        value = "" if self.value is None else self.value
        max_age = 0 if self.value is None else self.max_age
        attributes = _cookie_attributes(max_age, self.path, self.secure)
        object.__setattr__(self, "header_value", f"{self.name}={value}{attributes}")

    def header(self) -> str:
        """The ``Set-Cookie`` header value.

        Written here rather than by Werkzeug's ``set_cookie``, which formats an
        Expires date on every call (a third of the cost of a write's response in the
        overhead benchmark). Max-Age alone sets the lifetime in every current browser;
        the value is the signer's URL-safe alphabet and needs no quoting.
        """
        return self.header_value

    def apply(self, response: _Response) -> None:
        """Set or delete the cookie on a Werkzeug-style (Flask or Quart) response."""
        response.headers.add("Set-Cookie", self.header())


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
