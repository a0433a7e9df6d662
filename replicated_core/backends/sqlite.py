"""SQLite, and any database without a backend of its own: no positions.

Nothing tells how far a replica has replayed, so the router keeps a writer on the
primary for the sticky time instead, and replicas are usable unless marked down.
"""

from __future__ import annotations

from typing import Any

from .protocol import ErrorKind, ReplicaProbe

__all__ = ["NoPositions", "SQLite"]

_PLAIN_SQL = "SELECT 1"


class NoPositions:
    """A backend that reads no positions and knows no driver error."""

    has_positions = False
    postgresql_syntax = False
    # Never written: a token carries no position of this backend.
    token_pattern = "(?!)"
    primary_status_sql = _PLAIN_SQL
    replica_probe_sql = _PLAIN_SQL

    def __init__(self, name: str = "no positions", dialects: tuple[str, ...] = ()) -> None:
        self.name = name
        self.dialects = dialects

    def wrote_sql(self, server_version: tuple[int | str, ...] | None) -> str | None:
        """None: the statements' text alone tells whether a transaction wrote."""
        return None

    def read_primary_position(self, dbapi_connection: Any) -> None:
        """None: there is no position to read."""
        return

    def read_cluster(self, dbapi_connection: Any) -> None:
        """None: nothing names a set of SQLite files."""
        return

    def catch_up_sql(self, position: object, timeout: float) -> None:
        """None: there is no position to wait for."""
        return

    def catch_up_on(self, dbapi_connection: Any, position: object, timeout: float) -> None:
        """None: there is no position to wait for."""
        return

    def caught_up(self, row: tuple[object, ...] | None) -> None:
        """None: nothing is known."""
        return

    def primary_status(self, row: tuple[object, ...]) -> tuple[bool | None, None]:
        """Nothing is known beyond that the server answered."""
        return None, None

    def replica_probe(self, row: tuple[object, ...]) -> ReplicaProbe:
        """A replica that answered: usable, nothing known of its position."""
        return ReplicaProbe(in_recovery=True, replay_lsn=None, receive_lsn=None, lag_seconds=0.0)

    def distance(self, ahead: object, behind: object) -> None:
        """Unknown."""
        return

    def dump_position(self, position: object) -> bytes:
        """Never called: this backend has no positions."""
        raise TypeError(f"The {self.name} backend has no positions to write.")

    def load_position(self, payload: bytes) -> None:
        """None: no payload is a position of this backend."""
        return

    def format_position(self, position: object) -> str:
        """The position as Python writes it."""
        return repr(position)

    def classify_error(self, error: BaseException) -> ErrorKind | None:
        """None: SQLite's driver errors carry no code that tells a lost connection
        from a bad query (a connection-level failure is seen by SQLAlchemy's
        ``is_disconnect`` instead)."""
        return None

    def bound_connect(self, driver: str, params: dict[str, Any], timeout: float) -> None:
        """Nothing to bound: a file opens at once."""


SQLite = NoPositions("SQLite", ("sqlite",))
