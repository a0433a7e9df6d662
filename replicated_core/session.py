"""A SQLAlchemy Session whose default bind is chosen by a Router, per statement."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sqlalchemy.engine import Connection, Engine

    from .nodes import Node
    from .router import Router

__all__ = ["RoutingSession", "bind_key_of"]


class RoutingSession(Session):
    """Routes tables without a bind key through ``router``, those of a routed bind key
    through its database's router in ``routers``; others use their bind.

    A table's bind key is ``metadata.info["bind_key"]``, the convention of
    Flask-SQLAlchemy's ``__bind_key__``. Pass it to ``async_sessionmaker`` as
    ``sync_session_class`` with ``router=``, ``routers=`` (by bind key) and
    ``bind_engines=`` (sync engines by bind key); ``AsyncSession`` hands the keywords
    through.
    """

    def __init__(
        self,
        *args: Any,
        router: Router,
        bind_engines: Mapping[str, Engine] | None = None,
        routers: Mapping[str, Router] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.router = router
        self.bind_engines = bind_engines or {}
        self.routers = routers or {}
        # The node the last routed statement went to: which replica an error that no
        # engine listener tagged came from (asyncpg's refused connect), when several
        # databases may each be reading from a replica.
        self.routed_node: Node | None = None

    def get_bind(
        self,
        mapper: Any | None = None,
        clause: Any | None = None,
        bind: Engine | Connection | None = None,
        **kwargs: Any,
    ) -> Engine | Connection:
        if bind is not None:
            return bind
        key = bind_key_of(mapper, clause)
        if key is not None:
            routed = self.routers.get(key)
            if routed is not None:
                node = self.routed_node = routed.node()
                return node.engine
            try:
                return self.bind_engines[key]
            except KeyError:
                raise sa.exc.UnboundExecutionError(
                    f"Bind key '{key}' is not in 'SQLALCHEMY_BINDS' config."
                ) from None
        node = self.routed_node = self.router.node()
        return node.engine


def bind_key_of(mapper: Any | None, clause: Any | None) -> str | None:
    """The bind key of the table a statement targets, or None for the default."""
    table = getattr(mapper, "local_table", None) if mapper is not None else None
    if table is None and clause is not None:
        if isinstance(clause, sa.Table):
            table = clause
        elif isinstance(clause, sa.UpdateBase) and isinstance(clause.table, sa.Table):
            table = clause.table
    if isinstance(table, sa.Table):
        key = table.metadata.info.get("bind_key")
        return key if isinstance(key, str) else None
    return None
