"""What the router needs to know of a database, and nothing else.

A backend says what a position is (how to read the primary's and a replica's, and
how to write one into the sticky token and read it back), what a probe of a replica
found, and which driver errors mean "this server is read-only" or "the connection
is gone". The rest of the core holds positions without looking inside: it stores
them, hands them back to their backend, and compares them with ``>=`` only (has a
replica replayed what a token asks for).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

__all__ = ["Backend", "ErrorKind", "Position", "ReplicaProbe"]

# A point in the primary's history: an int for PostgreSQL (a WAL byte position). Any
# type with ``>=`` (a replica at or past it has everything before it) will do, so the
# core's signatures name no backend's type.
Position: TypeAlias = Any


class ErrorKind(enum.Enum):
    """What a driver error means to the router."""

    # The server refused a write because it is a standby.
    READ_ONLY = "read-only"
    # The connection, or the server behind it, is gone.
    CONNECTION_LOST = "connection lost"
    # A standby cancelled the query so that replay could go on.
    RECOVERY_CONFLICT = "recovery conflict"
    # The driver gave up connecting in time.
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class ReplicaProbe:
    """What one probe of a replica found.

    ``replay_lsn``: what it has applied; ``receive_lsn``: what it has received from
    the primary (None where it cannot tell); ``lag_seconds``: the server's own figure
    for how far behind it is.
    """

    in_recovery: bool
    replay_lsn: Position | None
    receive_lsn: Position | None
    lag_seconds: float


class Backend(Protocol):
    """One database's answers to what the router asks of it.

    A backend without positions (``has_positions`` False) never sees its position
    members called: the router then keeps a writer on the primary for a time instead.
    """

    #: Its name, for messages.
    name: str
    #: SQLAlchemy dialect names (``engine.dialect.name``) it serves.
    dialects: tuple[str, ...]
    #: Whether positions can be read: replicas are then probed, and tokens carry them.
    has_positions: bool
    #: Whether its SQL lexes like PostgreSQL's (dollar quotes, E'' strings) rather
    #: than SQLite's (backtick and bracket identifiers), for the statement classifier.
    postgresql_syntax: bool
    #: A regular expression for what ``dump_position`` writes (never ``t``): a value
    #: of the token's shape that no key signed is worth a warning.
    token_pattern: str
    #: The status command's query on the primary, whose row ``primary_status`` reads.
    primary_status_sql: str
    #: The query that probes a replica, whose row ``replica_probe`` reads.
    replica_probe_sql: str

    def wrote_sql(self, server_version: tuple[int | str, ...] | None) -> str | None:
        """SQL whose scalar says whether the committing transaction wrote anything,
        run in it; None: the statements' text alone tells."""
        ...

    def read_primary_position(self, dbapi_connection: Any) -> Position | None:
        """The primary's position after the commit just made on ``dbapi_connection``
        (a DBAPI connection on its way back to the pool), leaving no transaction open."""
        ...

    def read_cluster(self, dbapi_connection: Any) -> str | None:
        """What identifies the cluster ``dbapi_connection`` (a new DBAPI connection to
        any of its servers) belongs to, the same on the primary and its replicas;
        None where there is no such thing. Leaves no transaction open."""
        ...

    def catch_up_sql(self, position: Position, timeout: float) -> str | None:
        """SQL run on a replica that waits there, up to ``timeout`` seconds, until it
        has replayed ``position``: one round trip, whose row ``caught_up`` reads.
        None where a replica cannot be asked."""
        ...

    def catch_up_on(
        self, dbapi_connection: Any, position: Position, timeout: float
    ) -> Position | None:
        """Run ``catch_up_sql`` on this DBAPI connection, in autocommit (no transaction
        left open), and return the replay position it ended at; None where there is
        none. For a replica behind a load balancer: the server this connection reached."""
        ...

    def caught_up(self, row: tuple[object, ...] | None) -> Position | None:
        """From the row of ``catch_up_sql`` (None: it gave none): how far the replica
        had replayed when the wait ended; None if it cannot tell (not a standby)."""
        ...

    def primary_status(self, row: tuple[object, ...]) -> tuple[bool | None, Position | None]:
        """From a row of ``primary_status_sql``: whether the server is in recovery
        (None: cannot tell) and the position every replica must reach to be caught up."""
        ...

    def replica_probe(self, row: tuple[object, ...]) -> ReplicaProbe:
        """From a row of ``replica_probe_sql``: what the probe found."""
        ...

    def distance(self, ahead: Position | None, behind: Position | None) -> int | None:
        """How far ``behind`` trails ``ahead``, in the backend's unit (bytes of WAL);
        None where either is unknown."""
        ...

    def dump_position(self, position: Position) -> bytes:
        """The position as the sticky token carries it: ASCII, no ``.``."""
        ...

    def load_position(self, payload: bytes) -> Position | None:
        """The position in a token's ``payload``; None if it is not one of ours."""
        ...

    def format_position(self, position: Position) -> str:
        """The position as the database itself writes it, for logs."""
        ...

    def classify_error(self, error: BaseException) -> ErrorKind | None:
        """What the driver's ``error`` means; None: an error of the query itself."""
        ...

    def bound_connect(self, driver: str, params: dict[str, Any], timeout: float) -> None:
        """Add to ``params`` (a dict of connect arguments of ``driver``) a connect
        timeout of ``timeout`` seconds, unless the app set its own."""
        ...
