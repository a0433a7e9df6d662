"""Check the ``REPLICATED_*`` bind names against the app's engines and build nodes."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .config import DEFAULTS, ReplicatedConfig
from .errors import ConfigError
from .routing import Node, Role

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sqlalchemy.engine import URL, Engine

__all__ = ["DEFAULT_PRIMARY_NAME", "build_nodes"]

DEFAULT_PRIMARY_NAME = "(default)"


def build_nodes(
    config: ReplicatedConfig,
    binds: Mapping[str, Engine],
    default: Engine | None,
) -> tuple[Node, list[Node]]:
    """The primary and replica nodes, or a ``ConfigError`` naming the wrong key.

    ``binds`` maps bind names (``SQLALCHEMY_BINDS``) to engines; ``default`` is the
    engine of ``SQLALCHEMY_DATABASE_URI``. The primary is the bind named by
    ``REPLICATED_PRIMARY_BIND``; when that is the default name and no such bind
    exists, the default URI is the primary.
    """
    key = "REPLICATED_PRIMARY_BIND"
    if config.primary_bind in binds:
        primary = Node(config.primary_bind, Role.PRIMARY, binds[config.primary_bind])
        if default is not None and not same_database(default.url, primary.engine.url):
            raise ConfigError(
                f"'{key}' names the bind '{config.primary_bind}', whose URL differs from "
                "SQLALCHEMY_DATABASE_URI. Models without a bind key are routed between the "
                "primary and the replicas, so set SQLALCHEMY_DATABASE_URI to the primary's URL."
            )
    elif config.primary_bind == DEFAULTS[key] and default is not None:
        primary = Node(DEFAULT_PRIMARY_NAME, Role.PRIMARY, default)
    else:
        raise ConfigError(
            f"'{key}' names the bind '{config.primary_bind}', which is not in "
            "SQLALCHEMY_BINDS. Add it there, or fix the name."
        )
    replicas = []
    for name in config.replica_binds:
        if name not in binds:
            raise ConfigError(
                f"'REPLICATED_REPLICA_BINDS' names the bind '{name}', which is not in "
                "SQLALCHEMY_BINDS. Add it there, or fix the name."
            )
        if same_database(binds[name].url, primary.engine.url):
            raise ConfigError(
                f"'REPLICATED_REPLICA_BINDS' names the bind '{name}', whose URL is the "
                "primary's. Point it at a replica server, or remove it."
            )
        replicas.append(Node(name, Role.REPLICA, binds[name]))
    return primary, replicas


def same_database(a: URL, b: URL) -> bool:
    """Whether two URLs name the same database on the same server, whatever the driver."""
    if a.get_backend_name() != b.get_backend_name():
        return False
    if a.get_backend_name() == "sqlite":
        if not a.database or a.database == ":memory:":
            return False
        return os.path.realpath(a.database) == os.path.realpath(b.database or "")
    return (a.host or "localhost", a.port, a.database) == (
        b.host or "localhost",
        b.port,
        b.database,
    )
