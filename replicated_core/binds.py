"""Check the ``REPLICATED_*`` bind names and replicas against the app's engines and
build nodes."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from .config import DEFAULT_PRIMARY_BIND, DEFAULT_PRIMARY_NAME, ReplicatedConfig
from .errors import ConfigError
from .nodes import Node, Role

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sqlalchemy.engine import URL, Engine

__all__ = [
    "DEFAULT_PRIMARY_NAME",
    "build_bind_nodes",
    "build_nodes",
    "is_read_only_sqlite",
    "is_shared_primary",
    "same_database",
]


def is_shared_primary(default: URL | None, bind: URL) -> bool:
    """Whether the primary bind's URL is SQLALCHEMY_DATABASE_URI's, so that the
    adapter makes one engine (one pool) serve both; compare URLs after the driver
    defaults (Flask-SQLAlchemy's SQLite paths) are applied."""
    return default is not None and default == bind and same_database(default, bind)


def build_nodes(
    config: ReplicatedConfig,
    binds: Mapping[str, Engine],
    default: Engine | None,
    replica_engines: Mapping[str, Engine] | None = None,
) -> tuple[Node, list[Node]]:
    """The primary and replica nodes, or a ``ConfigError`` naming the wrong key.

    ``binds`` maps bind names (``SQLALCHEMY_BINDS``) to engines; ``default`` is the
    engine of ``SQLALCHEMY_DATABASE_URI``. In the binds style the primary is the
    bind named by ``REPLICATED_PRIMARY_BIND`` (when that is the default name and no
    such bind exists, the default URI is the primary); a primary bind on the default
    URI's database must be the default engine itself (the adapters make it so).
    With ``REPLICATED_REPLICAS`` the primary is the default URI and the replicas are
    ``replica_engines``, by replica name.
    """
    if config.replicas or config.discovery is not None:
        return _nodes_from_urls(config, default, replica_engines or {})
    key = "REPLICATED_PRIMARY_BIND"
    name = config.primary_bind or DEFAULT_PRIMARY_BIND
    if name in binds:
        primary = Node(name, Role.PRIMARY, binds[name])
        if default is not None and not same_database(default.url, primary.engine.url):
            raise ConfigError(
                f"'{key}' names the bind '{name}', whose URL differs from "
                "SQLALCHEMY_DATABASE_URI. Models without a bind key are routed between the "
                "primary and the replicas, so set SQLALCHEMY_DATABASE_URI to the primary's URL."
            )
        if default is not None and primary.engine is not default:
            raise ConfigError(
                f"'{key}' names the bind '{name}', which is the database of "
                "SQLALCHEMY_DATABASE_URI by another URL (driver, user, password or options). "
                "One engine serves the primary: give both the same URL."
            )
    elif name == DEFAULT_PRIMARY_BIND and default is not None:
        primary = Node(DEFAULT_PRIMARY_NAME, Role.PRIMARY, default)
    else:
        raise ConfigError(
            f"'{key}' names the bind '{name}', which is not in "
            "SQLALCHEMY_BINDS. Add it there, or fix the name."
        )
    replicas = []
    for name in config.replica_binds:
        if name not in binds:
            raise ConfigError(
                f"'REPLICATED_REPLICA_BINDS' names the bind '{name}', which is not in "
                "SQLALCHEMY_BINDS. Add it there, or fix the name."
            )
        if _is_primary(binds[name].url, primary.engine.url):
            raise ConfigError(
                f"'REPLICATED_REPLICA_BINDS' names the bind '{name}', whose URL is the "
                "primary's. Point it at a replica server, or remove it."
            )
        replicas.append(Node(name, Role.REPLICA, binds[name]))
    return primary, replicas


def build_bind_nodes(
    config: ReplicatedConfig,
    binds: Mapping[str, Engine],
    default_primary: Node,
    replica_engines: Mapping[str, Engine],
) -> dict[str, tuple[Node, list[Node]]]:
    """The primary and replica nodes of each further database of
    ``REPLICATED_BIND_REPLICAS``, by bind key, or a ``ConfigError`` naming the key.

    A database's primary is its bind's engine in ``binds`` (named by its bind key);
    its replicas are ``replica_engines``, by replica name. ``default_primary`` is the
    default database's, which no other database may be.
    """
    key = "REPLICATED_BIND_REPLICAS"
    found: dict[str, tuple[Node, list[Node]]] = {}
    primaries = [default_primary]
    for bind_key, specs in config.bind_replicas.items():
        if bind_key not in binds:
            raise ConfigError(
                f"'{key}' gives replicas to the bind '{bind_key}', which is not in "
                "SQLALCHEMY_BINDS. Add it there (its URL is that database's primary), or fix "
                "the name."
            )
        primary = Node(bind_key, Role.PRIMARY, binds[bind_key])
        for other in primaries:
            if same_database(other.engine.url, primary.engine.url):
                which = (
                    "the default database's primary"
                    if other is default_primary
                    else f"the primary of the bind '{other.name}'"
                )
                raise ConfigError(
                    f"'{key}' gives replicas to the bind '{bind_key}', whose URL is {which}. "
                    "Each routed database needs a primary of its own: fix its URL in "
                    "SQLALCHEMY_BINDS, or give its replicas once."
                )
        primaries.append(primary)
        replicas = []
        for spec in specs:
            engine = replica_engines[spec.name]
            if _is_primary(engine.url, primary.engine.url):
                raise ConfigError(
                    f"'{key}['{bind_key}']' names the replica '{spec.name}', whose URL is the "
                    "primary's. Point it at a replica server, or remove it."
                )
            replicas.append(Node(spec.name, Role.REPLICA, engine))
        found[bind_key] = (primary, replicas)
    return found


def _nodes_from_urls(
    config: ReplicatedConfig, default: Engine | None, engines: Mapping[str, Engine]
) -> tuple[Node, list[Node]]:
    if default is None:
        key = "REPLICATED_REPLICAS" if config.replicas else "REPLICATED_REPLICA_DISCOVERY"
        raise ConfigError(
            f"'{key}' gives replicas of SQLALCHEMY_DATABASE_URI, which is not "
            "set. Set it to the primary's URL."
        )
    primary = Node(DEFAULT_PRIMARY_NAME, Role.PRIMARY, default)
    replicas = []
    for spec in config.replicas:
        engine = engines[spec.name]
        if _is_primary(engine.url, default.url):
            raise ConfigError(
                f"'REPLICATED_REPLICAS' names the replica '{spec.name}', whose URL is the "
                "primary's. Point it at a replica server, or remove it."
            )
        replicas.append(Node(spec.name, Role.REPLICA, engine))
    return primary, replicas


def _is_primary(replica: URL, primary: URL) -> bool:
    return same_database(replica, primary) and not is_read_only_sqlite(replica)


def same_database(a: URL, b: URL) -> bool:
    """Whether two URLs name the same database on the same server, whatever the driver.

    SQLite files compare by real path, written as a path or as a URI filename
    (``sqlite:///file:/srv/app.db?uri=true``); in-memory databases are never the same.
    """
    if a.get_backend_name() != b.get_backend_name():
        return False
    if a.get_backend_name() == "sqlite":
        path = _sqlite_path(a)
        return path is not None and path == _sqlite_path(b)
    return (a.host or "localhost", a.port, a.database) == (
        b.host or "localhost",
        b.port,
        b.database,
    )


def is_read_only_sqlite(url: URL) -> bool:
    """Whether ``url`` opens a SQLite file read-only (``?mode=ro&uri=true``).

    Such an opening of the primary's own file is accepted as a replica: it sees
    every write at once, and SQLite refuses its writes.
    """
    return url.get_backend_name() == "sqlite" and _is_uri(url) and url.query.get("mode") == "ro"


def _is_uri(url: URL) -> bool:
    return str(url.query.get("uri", "")).lower() in ("true", "1") and bool(
        url.database and url.database.startswith("file:")
    )


def _sqlite_path(url: URL) -> str | None:
    database = url.database
    if _is_uri(url):
        if url.query.get("mode") == "memory":
            return None
        # file:/abs, file:///abs or file:relative; any "?..." is already in url.query.
        database = unquote(urlsplit(database or "").path)
    if not database or database == ":memory:":
        return None
    return os.path.realpath(database)
