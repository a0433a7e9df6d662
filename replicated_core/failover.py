"""Transparent retry of a read whose replica failed, through ``do_orm_execute``.

A statement is retried on another node only when it is the first of its session's
transaction: nothing has run there, so rolling back loses nothing. A later statement
that fails propagates its error; the next position check or first statement on that
replica marks it down.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.exc import DBAPIError, OperationalError

from .intent import Intent, current_override, current_scope
from .routing import Role

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.orm import ORMExecuteState, Session

    from .router import Router

__all__ = ["Failure", "classify_failure", "install_failover", "lost_connection"]

_RECOVERY_CONFLICT = "40001"
_SERVER_GONE = frozenset({"57P01", "57P02", "57P03"})


class Failure(enum.Enum):
    """Why a replica could not answer."""

    DOWN = "unreachable"
    CONFLICT = "recovery conflict"


def classify_failure(error: BaseException) -> Failure | None:
    """Whether ``error`` means the replica is gone (or conflicted), not a bad query."""
    orig = getattr(error, "orig", None) or error
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code == _RECOVERY_CONFLICT and "conflict with recovery" in str(orig):
        return Failure.CONFLICT
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return Failure.DOWN
    if isinstance(code, str) and (code.startswith("08") or code in _SERVER_GONE):
        return Failure.DOWN
    if isinstance(error, OperationalError) and code is None:
        return Failure.DOWN  # the driver failed before the server said anything
    if isinstance(error, OSError):  # TimeoutError and ConnectionRefusedError included
        return Failure.DOWN
    return None


def lost_connection(error: BaseException) -> bool:
    """Whether closing a session failed only because its server connection is gone.

    The server rolls back a transaction whose connection died, so there is nothing
    left to roll back: a request that already has its answer must not fail for it.
    """
    return classify_failure(error) is Failure.DOWN


def _may_reach_replica() -> bool:
    override = current_override()
    if override is not None:
        return override.intent is Intent.REPLICA
    scope = current_scope()
    return scope is not None and not scope.closed and scope.decision.node.role is Role.REPLICA


def install_failover(target: Any, router_of: Callable[[Session], Router | None]) -> None:
    """Listen on ``target`` (a Session class, sessionmaker or scoped_session)."""

    def retry_elsewhere(state: ORMExecuteState) -> Any:
        # Cheap exits first, this runs for every ORM statement: only the first
        # statement of a transaction can be retried, and only a replica can fail over.
        if state.session.in_transaction() or not _may_reach_replica():
            return None
        router = router_of(state.session)
        if router is None:
            return None
        node = router.replica_of(state.session.get_bind(**state.bind_arguments))
        if node is None:
            return None
        try:
            return state.invoke_statement()
        except Exception as error:
            failure = classify_failure(error)
            if failure is None:
                raise
            if failure is Failure.DOWN:
                router.health.mark_down(node, error)
            state.session.rollback()
            router.reroute(node)
            return state.invoke_statement()

    event.listen(target, "do_orm_execute", retry_elsewhere)
