"""Several databases of one app, each with its primary and replicas.

Each routed database has a ``Router`` of its own (its nodes, health, prober,
catch-up, spread and counters); ``Databases`` holds them for the app. What they
share is the request: its intent (``use_primary()``, ``use_replica()`` and
``@changes_database`` hold for every database), its facts, and the one consistency
token (cookie, header, job token), which carries one entry per database written.
Each database decides on its own: a GET reads each from its own usable replicas, a
write to one records that database's position only, and the token's entry of a
database pins that database's reads alone.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

from .cookie import CookieUpdate
from .errors import ConfigError
from .router import Router
from .sticky import StickyToken, database_tag

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    from .backends import Position
    from .config import ReplicatedConfig
    from .nodes import Node
    from .scope import RequestScope
    from .sticky import StickyCodec

__all__ = ["Databases"]


class Databases:
    """The routers of one app's routed databases, by bind key (None: the default
    database, which comes first).

    Build it with ``Databases.build``. With one database it is a thin wrapper: the
    adapters then serve requests exactly as they did before several were possible.
    """

    def __init__(self, routers: Mapping[str | None, Router]) -> None:
        if None not in routers:
            raise ValueError("The default database (bind key None) needs a router.")
        self.routers: dict[str | None, Router] = {None: routers[None]}
        self.routers.update((key, router) for key, router in routers.items() if key is not None)
        self.default = self.routers[None]
        # Every router, the default first: the order of a request's scopes.
        self.all = tuple(self.routers.values())
        for router in self.all:
            router.siblings = tuple(r for r in self.all if r is not router)

    @classmethod
    def build(
        cls,
        config: ReplicatedConfig,
        nodes: Mapping[str | None, tuple[Node, Sequence[Node]]],
        codec: Callable[[], StickyCodec | None],
        *,
        name: str = "",
    ) -> Databases:
        """A router for each database of ``nodes`` (its primary and replicas, by bind
        key; None: the default database), each with its own codec from ``codec``
        (None: no secret key) and, but for the default, its own scope variable."""
        routers: dict[str | None, Router] = {}
        tags: dict[str, str] = {}
        for key, (primary, replicas) in nodes.items():
            own = codec()
            scope_var: ContextVar[RequestScope | None] | None = None
            if key is not None:
                tag = database_tag(key)
                if tag in tags:
                    # Four characters of a hash: two keys of one app that share them
                    # would read each other's positions.
                    raise ConfigError(
                        f"'REPLICATED_BIND_REPLICAS' routes the binds '{tags[tag]}' and "
                        f"'{key}', whose tokens would not tell them apart. Rename one bind."
                    )
                tags[tag] = key
                if own is not None:
                    own.database = tag
                scope_var = ContextVar(f"replicated_scope_{key}", default=None)
            routers[key] = Router(config, primary, replicas, own, name=name, scope_var=scope_var)
        return cls(routers)

    def __iter__(self) -> Iterator[Router]:
        return iter(self.all)

    def __len__(self) -> int:
        return len(self.all)

    @property
    def several(self) -> bool:
        """Whether more than the default database is routed."""
        return len(self.all) > 1

    def router(self, bind_key: str | None = None) -> Router:
        """The router of the database of ``bind_key`` (None: the default database).

        Raises KeyError naming the routed keys for any other key."""
        try:
            return self.routers[bind_key]
        except KeyError:
            routed = ", ".join(repr(key) for key in self.routers)
            raise KeyError(
                f"The bind key {bind_key!r} is not a routed database. The routed ones are: "
                f"{routed}."
            ) from None

    def label(self, router: Router) -> str:
        """How the status command and errors name ``router``'s database."""
        for key, candidate in self.routers.items():
            if candidate is router:
                return "(default)" if key is None else key
        raise KeyError(router.primary.name)

    # -- requests ----------------------------------------------------------------

    def open(self, resolvers: Sequence[Callable[[RequestScope], None]]) -> list[RequestScope]:
        """Open one scope per database (``Requests.open``), each decided on its first
        use by its resolver (one per router, in order)."""
        return [
            router.requests.open(resolver)
            for router, resolver in zip(self.all, resolvers, strict=True)
        ]

    def end(self, scopes: Sequence[RequestScope]) -> None:
        """Close the scopes ``open`` opened, the last first."""
        for router, scope in zip(reversed(self.all), reversed(scopes), strict=True):
            router.requests.end_scope(scope)

    def current_scopes(self) -> list[RequestScope | None]:
        """The scope of the request being served on each database (None: not in one)."""
        return [router.requests.scope() for router in self.all]

    def describe(self, scopes: Sequence[RequestScope]) -> str:
        """The debug header's value: the node each database's reads go to, as
        ``(default)=r1, users=users_r2`` (``-``: not decided yet)."""
        return ", ".join(
            f"{self.label(router)}="
            f"{scope.settled_decision.node.name if scope.settled_decision else '-'}"
            for router, scope in zip(self.all, scopes, strict=True)
        )

    @staticmethod
    def touched(scopes: Sequence[RequestScope]) -> bool:
        """Whether the response may change the cookie: a database was written, or one
        found its token's write on every replica."""
        for scope in scopes:
            decision = scope.settled_decision
            if scope.wrote or (decision is not None and decision.drop_cookie):
                return True
        return False

    def cookie_update(
        self,
        scopes: Sequence[RequestScope],
        cookie: str | None,
        header: str | None,
        *,
        secure: bool = False,
        path: str = "/",
    ) -> CookieUpdate | None:
        """How the response must change the app's one sticky cookie, if at all.

        A database written gets a new entry (its primary's position after the write,
        in WAL mode; else the sticky time); one that found its token's write on every
        replica loses its entry; the others keep the entry they came with, re-signed.
        With no entry left the cookie is deleted. None when no codec reads cookies.
        """
        default = self.default
        if default.codec is None or not default.requests.codec_in_use:
            return None
        entries: list[tuple[StickyCodec, StickyToken]] = []
        changed = False
        for router, scope in zip(self.all, scopes, strict=True):
            requests, codec = router.requests, router.codec
            if codec is None or not requests.codec_in_use:
                continue
            if scope.wrote:
                changed = True
                position = scope.position if requests.needs_write_position(scope) else None
                entries.append((codec, StickyToken(position)))
                continue
            decision = scope.settled_decision
            if decision is not None and decision.drop_cookie:
                changed = True
                continue
            held = requests.read_token(cookie, header)
            if held is not None:
                entries.append((codec, held))
        if not changed:
            return None
        name = default.config.cookie_name
        if not entries:
            return CookieUpdate(name, None, 0, path, secure)
        value = default.codec.dumps_many(entries)
        return CookieUpdate(name, value, default.requests.max_age, path, secure)

    # -- jobs --------------------------------------------------------------------

    def token_for(self, positions: Mapping[Router, Position | None]) -> str:
        """A consistency token with an entry for each database of ``positions`` (its
        primary's position after the writes it must cover; None: only that its
        holder wrote, for the sticky time). Needs SECRET_KEY."""
        codec = self.default.codec
        if codec is None:
            raise RuntimeError(
                "A consistency token needs SECRET_KEY to be signed: set SECRET_KEY (the "
                "same on every server and worker)."
            )
        entries = [
            (router.codec, StickyToken(position))
            for router, position in positions.items()
            if router.codec is not None
        ]
        return codec.dumps_many(entries)
