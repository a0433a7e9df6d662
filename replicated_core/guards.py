"""Listeners on every replica engine that keep its statements and errors honest.

- A write (or an advisory lock, or a session change) is refused before it is sent,
  with a sentence that says which view did it and how to fix it.
- A standby's own refusals ("read-only transaction", "... during recovery") become
  the same ``ReplicaWriteError``.
- A failed statement is tagged with its replica, for failover; one that the router
  cut off (its replica overdue) is tagged as interrupted, not as the replica's fault.
- A new connection's connect time is bounded, unless the app set its own timeout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import event

from .backends import ErrorKind, backend_for
from .errors import ReplicaWriteError
from .failover import note_replica_error
from .health import INTERRUPTED
from .intent import Intent, current_override, current_scope
from .statements import StatementKind, classify_sql

if TYPE_CHECKING:
    from collections.abc import Callable

    from .backends import Backend
    from .nodes import Node
    from .scope import RequestScope

__all__ = ["CUT_MARK", "EXECUTE_HOOKS", "guard_replica", "refusal_message"]

# The engine events that see every statement before it is sent.
EXECUTE_HOOKS = ("do_execute", "do_executemany", "do_execute_no_params")
# In a pooled connection's info: the router shut its socket down (Router.cut_off).
CUT_MARK = "replicated.cut"

_READ = StatementKind.READ


def guard_replica(
    node: Node,
    connect_timeout: float,
    scope: Callable[[], RequestScope | None] = current_scope,
) -> None:
    """Install the guards on ``node``'s engine. ``scope`` finds the request scope of
    its database (its router's ``requests.scope``), which the messages describe."""
    backend = backend_for(node.engine.dialect.name)
    refuse = _refuse_writes(node, backend, scope)
    for hook in EXECUTE_HOOKS:
        event.listen(node.engine, hook, refuse)
    event.listen(node.engine, "handle_error", _translate_errors(node, backend, scope))
    event.listen(node.engine, "do_connect", _connect_timeout(backend, connect_timeout))


def _refuse_writes(node: Node, backend: Backend, scope: Callable[[], RequestScope | None]) -> Any:
    pg = backend.postgresql_syntax

    # Listens to do_execute/do_executemany (cursor, statement, parameters, context)
    # and do_execute_no_params (cursor, statement, context).
    def refuse(cursor: Any, statement: str, _a: Any = None, _b: Any = None) -> None:
        kind = classify_sql(statement, postgresql=pg)
        if kind is not _READ:
            raise ReplicaWriteError(refusal_message(node, kind, scope))

    return refuse


def _translate_errors(
    node: Node, backend: Backend, scope: Callable[[], RequestScope | None]
) -> Any:
    def on_error(context: Any) -> None:
        orig = context.original_exception
        conn = context.connection
        if conn is not None and not conn.closed and conn.info.get(CUT_MARK):
            # Cut off by the router: not a failure of the replica.
            setattr(context.sqlalchemy_exception, INTERRUPTED, True)
            setattr(orig, INTERRUPTED, True)
        if backend.classify_error(orig) is ErrorKind.READ_ONLY:
            message = refusal_message(node, scope=scope)
            raise ReplicaWriteError(message) from context.sqlalchemy_exception
        # Failover needs to know which replica failed; the error is what it gets.
        note_replica_error(context, node)

    return on_error


def _connect_timeout(backend: Backend, timeout: float) -> Any:
    # A replica that hangs must not hang the request: bound the connect, unless the
    # app set its own timeout in the engine's connect_args.
    def limit(dialect: Any, rec: Any, cargs: Any, cparams: Any) -> None:
        backend.bound_connect(dialect.driver, cparams, timeout)

    return limit


def refusal_message(
    node: Node,
    kind: StatementKind = StatementKind.WRITE,
    scope: Callable[[], RequestScope | None] = current_scope,
) -> str:
    """The sentence that tells the user why a statement was refused and what to do.

    ``kind`` says what the statement did: a write, an advisory lock or a session
    change (``SET``, ``RESET``, ``ATTACH``, ``DETACH``); ``scope`` finds the request
    scope of ``node``'s database.
    """
    write = kind is StatementKind.WRITE
    subject, did, why = _REFUSALS[kind]
    override = current_override()
    if override is not None and override.intent is Intent.REPLICA:
        return (
            f"{subject} was sent to the replica '{node.name}' inside 'use_replica()'"
            f"{why}. Move {'the write' if write else 'it'} out of the 'use_replica()' "
            "block or wrap it in 'use_primary()'."
        )
    current = scope()
    if current is not None and current.decision.node is node:
        facts = current.facts
        request = "websocket" if facts.websocket else f"{facts.method} request"
        return (
            f"The view '{facts.view}' {did} during a {request}, which is routed to a "
            f"replica{why}. Decorate it with '@changes_database' or wrap the "
            f"{'write' if write else 'statement'} in 'use_primary()'."
        )
    return (
        f"{subject} was sent to the replica '{node.name}'"
        f"{', which only serves reads' if write else why}. Send it to the primary: "
        "wrap it in 'use_primary()'."
    )


# What a refused statement is, what a view that sent it did, and why a replica is
# the wrong place for it.
_REFUSALS: dict[StatementKind, tuple[str, str, str]] = {
    StatementKind.WRITE: ("A write", "wrote to the database", ""),
    StatementKind.LOCK: (
        "An advisory lock",
        "took an advisory lock",
        ": a lock taken on a replica coordinates nothing with the primary",
    ),
    StatementKind.SESSION: (
        "A session-level 'SET', 'RESET', 'ATTACH' or 'DETACH'",
        "changed its database session ('SET', 'RESET', 'ATTACH' or 'DETACH')",
        ": the change would outlive the request on a pooled replica connection "
        "('SET LOCAL' would not)",
    ),
    StatementKind.READ: ("A read", "read", ""),
}
