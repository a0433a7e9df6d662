"""Transparent retry of a read whose replica failed.

A statement is retried on another node only when the request sent it to the replica
that failed and the view did not bind it to an engine itself. The first statement of
its session's transaction (nothing has run there, so rolling back loses nothing;
SQLAlchemy begins the transaction as soon as an object is added or changed) tries
each other replica once, then the primary. A later statement is retried, on the
primary only, when its transaction did nothing but read on the failed replica at
READ COMMITTED (each statement had its own snapshot anyway, and the primary has
everything that replica had, so the request never sees time go backwards) and the
session holds no unflushed change; the rollback expires the objects loaded so far,
which reload from the primary. With several routed databases, the transaction may
also have read on the other databases' replicas (at READ COMMITTED too): the replica
that failed is retried by its own database's router. Anything else (a savepoint,
another database's primary in the transaction, REPEATABLE READ) propagates its error:
rerouting would break what the view relied on.

The retry wraps the session's ``execute``, ``scalar`` and ``scalars``, the three
doors every ORM read goes through (``get``, ``Query`` and lazy loads call
``execute``). A ``do_orm_execute`` listener would do the same but makes SQLAlchemy
build an execution state and pre-process every statement twice, whether or not it
ever fails: the wrapper costs one ``in_transaction()`` check. Which replica failed is
told by the router's ``handle_error`` listener on the replica engines, which tags
the error with its node and with whether it was raised while connecting.

Only a connection-level failure is a replica failure, on every backend: a connect
that failed, a connection SQLAlchemy's dialect found broken (``is_disconnect``, seen
as ``connection_invalidated``), or an error its backend calls "connection lost"
(PostgreSQL's "connection exception" or "server shut down"). A bad query (a missing
table, a syntax error) is the view's error, raised from the replica as it is: SQLite's
driver errors carry no SQLSTATE, so the kind of exception alone cannot tell one from
the other.
"""

from __future__ import annotations

import enum
import functools
import inspect
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.exc import DBAPIError

from .backends import ErrorKind, classify_driver_error
from .balanced import ReplicaBehind
from .intent import current_override, current_scope
from .nodes import Node, Role

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from sqlalchemy.engine import Connection, Engine, ExceptionContext
    from sqlalchemy.orm import Session, SessionTransaction

    from .router import Router

__all__ = [
    "Failure",
    "classify_failure",
    "lost_connection",
    "note_replica_error",
    "with_failover",
]

_NODE_ATTRIBUTE = "_replicated_failed_node"
_CONNECTING_ATTRIBUTE = "_replicated_failed_to_connect"


class Failure(enum.Enum):
    """Why a replica could not answer."""

    DOWN = "unreachable"
    CONFLICT = "recovery conflict"


def classify_failure(error: BaseException) -> Failure | None:
    """Whether ``error`` means the replica is gone (or conflicted), not a bad query."""
    orig = getattr(error, "orig", None) or error
    kind = classify_driver_error(orig)
    if kind is ErrorKind.RECOVERY_CONFLICT:
        return Failure.CONFLICT
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return Failure.DOWN  # the dialect's is_disconnect: the connection broke
    if getattr(error, _CONNECTING_ATTRIBUTE, False):
        return Failure.DOWN  # the driver could not connect, whatever the reason
    if kind is ErrorKind.CONNECTION_LOST:
        return Failure.DOWN
    if isinstance(error, OSError):  # TimeoutError and ConnectionRefusedError included
        return Failure.DOWN
    return None


def lost_connection(error: BaseException) -> bool:
    """Whether closing a session failed only because its server connection is gone.

    The server rolls back a transaction whose connection died, so there is nothing
    left to roll back: a request that already has its answer must not fail for it.
    """
    return classify_failure(error) is Failure.DOWN


def note_replica_error(context: ExceptionContext, node: Node) -> None:
    """Tag the error of ``context``, from the ``handle_error`` event of ``node``'s
    engine (a replica), with that node and with whether it was raised while
    connecting (SQLAlchemy reports a failed connect with no connection)."""
    connecting = context.connection is None and not context.is_pre_ping
    for error in (context.sqlalchemy_exception, context.original_exception):
        if error is not None:
            setattr(error, _NODE_ATTRIBUTE, node)
            if connecting:
                setattr(error, _CONNECTING_ATTRIBUTE, True)


def _failed_replica(error: BaseException, session: Session | None = None) -> Node | None:
    node = getattr(error, _NODE_ATTRIBUTE, None)
    if node is None and isinstance(error, OSError):
        # A driver's own timeout at connect (asyncpg) is no DBAPI error, so no engine
        # listener saw it: it came from the node the session last routed to (its
        # database may not be the default one), else the replica the intent points to.
        override = current_override()
        scope = current_scope()
        routed = getattr(session, "routed_node", None)
        if isinstance(routed, Node):
            node = routed
        elif override is not None:
            node = override.node
        elif scope is not None and not scope.closed:
            node = scope.decision.node
    if isinstance(node, Node) and node.role is Role.REPLICA:
        return node
    return None


S = TypeVar("S", bound="Session")

_METHODS = ("execute", "scalar", "scalars")


def with_failover(session_class: type[S], router_of: Callable[[Session], Router | None]) -> type[S]:
    """A subclass of ``session_class`` whose reads fail over to another node.

    ``router_of`` finds the router of a session (None: no routing, no retry).
    """
    namespace = {}
    for name in _METHODS:
        method = getattr(session_class, name)
        fast = _retrying_execute(method, router_of) if name == "execute" else None
        namespace[name] = fast or _retrying(method, router_of)
    return type(session_class.__name__, (session_class,), namespace)


def _retrying(method: Callable[..., Any], router_of: Callable[[Session], Router | None]) -> Any:
    @functools.wraps(method)
    def call(session: Session, *args: Any, **kwargs: Any) -> Any:
        # This runs for every ORM statement and costs one check until one fails.
        failed: list[Node] = []
        while True:
            first = not session.in_transaction()
            try:
                return method(session, *args, **kwargs)
            except Exception as error:
                bound = kwargs.get("bind_arguments")
                if not _ready_to_retry(session, error, router_of, bound, failed, first=first):
                    raise

    return call


def _retrying_execute(
    method: Callable[..., Any], router_of: Callable[[Session], Router | None]
) -> Any | None:
    """``_retrying`` for ``Session.execute`` with its own parameters spelled out, or
    None when ``method`` has other parameters (another SQLAlchemy version).

    Every ORM read goes through it, with keyword arguments (scoped_session and the
    ORM's loaders pass all five): a ``*args, **kwargs`` wrapper would build and
    unpack a dict for each statement.
    """
    parameters = inspect.signature(method).parameters
    if "execution_options" not in parameters:
        return None
    options = parameters["execution_options"].default

    @functools.wraps(method)
    def execute(
        session: Session,
        statement: Any,
        params: Any = None,
        *,
        execution_options: Any = options,
        bind_arguments: Any = None,
        _parent_execute_state: Any = None,
        _add_event: Any = None,
    ) -> Any:
        failed: list[Node] = []
        while True:
            first = not session.in_transaction()
            try:
                return method(
                    session,
                    statement,
                    params,
                    execution_options=execution_options,
                    bind_arguments=bind_arguments,
                    _parent_execute_state=_parent_execute_state,
                    _add_event=_add_event,
                )
            except Exception as error:
                if not _ready_to_retry(
                    session, error, router_of, bind_arguments, failed, first=first
                ):
                    raise

    ours = inspect.signature(execute, follow_wrapped=False).parameters
    return execute if _shape(ours) == _shape(parameters) else None


def _shape(parameters: Mapping[str, inspect.Parameter]) -> list[tuple[str, object, object]]:
    """Name, kind and default of each parameter after the first (self)."""
    return [(p.name, p.kind, p.default) for p in list(parameters.values())[1:]]


def _ready_to_retry(
    session: Session,
    error: Exception,
    router_of: Callable[[Session], Router | None],
    bind_arguments: Any,
    failed: list[Node],
    *,
    first: bool,
) -> bool:
    """After a statement of ``session`` raised ``error``: whether it may run again, on
    another node (then the session is rolled back and the request rerouted). Only an
    error a replica raised is retried, and only when the request (or block) sends its
    reads there: the primary's, a bad query's, or that of a replica the view chose
    itself propagates as it is. A statement the caller bound to an engine
    (``bind_arguments={"bind": ...}``) is never retried: rerouting cannot move it.

    ``first`` says whether the statement began its transaction; ``failed`` holds the
    replicas this statement already failed on: each gets it once (two replicas gone
    since their last check: the primary answers the third try). A later statement
    goes to the primary, and only when its transaction just read on that replica.
    """
    if isinstance(bind_arguments, dict) and bind_arguments.get("bind") is not None:
        return False
    if isinstance(error, ReplicaBehind):
        # Raised as the transaction began on a balanced replica's connection, before
        # the statement ran, with the reads already moved to the primary. A new
        # transaction gives the connection back; a transaction that held more keeps
        # it, unused (it read nothing there).
        if first:
            session.rollback()
        return True
    node = _failed_replica(error, session)
    failure = classify_failure(error) if node is not None else None
    router = router_of(session) if failure is not None else None
    if router is not None and node is not None and node not in router.replicas:
        # A replica of another database of the app: its own router reroutes.
        router = next((r for r in router.siblings if node in r.replicas), None)
    if router is None or node is None or node in failed or not router.reads_go_to(node):
        return False
    if not first:
        others = {n.engine for r in router.siblings for n in r.replicas}
        if not _only_read_on(session, node, others):
            return False
        # Every replica counts as failed: the primary is the one node known to be
        # at least as far along as the one this transaction read from.
        failed.extend(n for n in router.replicas if n is not node and n not in failed)
    failed.append(node)
    if failure is Failure.DOWN:
        router.health.mark_down(node, error)
    session.rollback()
    router.reroute(failed)
    return True


_READ_COMMITTED_OR_LOWER = frozenset({"READ COMMITTED", "READ UNCOMMITTED", "AUTOCOMMIT"})


def _only_read_on(session: Session, node: Node, other_replicas: set[Engine] | None = None) -> bool:
    """Whether rolling back ``session`` loses nothing a view relied on: its transaction
    (no savepoint) holds one connection, to ``node``'s engine, at READ COMMITTED or
    lower, and the session has no unflushed change.

    With several databases, ``other_replicas`` holds the replica engines of the app's
    other databases: the transaction may also hold connections to those (which cannot
    have written), each at READ COMMITTED or lower, and none to ``node``'s when its
    connect failed."""
    if session.new or session.dirty or session.deleted:
        return False
    if session.get_nested_transaction() is not None:
        return False
    transaction = session.get_transaction()
    if transaction is None:
        return False
    connections = _connections_of(transaction)
    own = [conn for conn in connections if conn.engine is node.engine]
    others = [conn for conn in connections if conn.engine is not node.engine]
    if not connections or len(own) > 1:
        return False
    if any(conn.engine not in (other_replicas or ()) for conn in others):
        return False
    return all(_read_committed(conn) for conn in connections)


def _read_committed(conn: Connection) -> bool:
    level = conn.get_execution_options().get("isolation_level") or _engine_isolation(conn)
    return isinstance(level, str) and level.upper() in _READ_COMMITTED_OR_LOWER


def _connections_of(transaction: SessionTransaction) -> frozenset[Connection]:
    # SessionTransaction.connections is SQLAlchemy 2.1.7's; before it, the same
    # entries sit in a private dict (values: connection, transaction, two flags).
    connections = getattr(transaction, "connections", None)
    if connections is not None:
        return frozenset(connections)
    entries = getattr(transaction, "_connections", {})
    return frozenset(entry[0] for entry in entries.values())


def _engine_isolation(conn: Connection) -> str | None:
    # The engine's isolation_level= (applied to each new connection), else the
    # server's default as the dialect read it at the first connect.
    configured = getattr(conn.dialect, "_on_connect_isolation_level", None)
    return configured if isinstance(configured, str) else conn.default_isolation_level
