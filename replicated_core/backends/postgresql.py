"""PostgreSQL: WAL positions (LSNs), its SQLSTATEs, and what its drivers need.

Positions are integers: ``16/B374D848`` is the byte ``0x16B374D848`` of the WAL.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .protocol import ErrorKind, ReplicaProbe

__all__ = ["PostgreSQL", "format_lsn", "parse_lsn"]

# The insert position bounds every record this session's commit wrote; GitLab's load
# balancer records the same one.
PRIMARY_POSITION_SQL = "SELECT pg_current_wal_insert_lsn()::text"

# The cluster's identity, made by initdb and copied to every replica by its base
# backup; another cluster (staging, a restored copy) has another. Any role may read it.
CLUSTER_SQL = "SELECT system_identifier::text FROM pg_control_system()"

# For the status command: is the primary really a primary, and how far has it flushed
# its WAL. The flush position, not the insert position the sticky cookie uses: right
# after a WAL page or segment boundary the insert position points past the new page's
# header, which no replica replays, so an idle, caught-up replica looked 40 bytes
# behind for good. (A standby cannot report either: ask only a server that is not one.)
PRIMARY_STATUS_SQL = """\
SELECT pg_is_in_recovery(),
       CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_flush_lsn()::text END"""

# One round trip per replica and check interval. Lag is zero when everything received
# has been replayed and the receiver is streaming; otherwise it is the age of the last
# replayed commit, which an idle primary would inflate, hence the LSN test first.
REPLICA_PROBE_SQL = """\
SELECT pg_is_in_recovery(),
       pg_last_wal_replay_lsn()::text,
       pg_last_wal_receive_lsn()::text,
       CASE
         WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()
              AND COALESCE((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false)
         THEN 0
         ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0)
       END::float8"""

# Waits on a standby, in one statement, until it has replayed a position or the time
# is up, and says how far it got. pg_sleep() runs only in the CASE's last branch, so
# once per row that did not end the wait, and the LIMIT stops at the first that did.
# The series only bounds the rows: each sleeps at least a millisecond. A server not
# in recovery has no replay position (NULL): it ends the wait at once.
CATCH_UP_SQL = """\
SELECT pg_last_wal_replay_lsn()::text
FROM generate_series(1, {rows}) AS i
WHERE CASE
        WHEN pg_last_wal_replay_lsn() IS NULL
             OR pg_last_wal_replay_lsn() >= '{position}'::pg_lsn
             OR clock_timestamp() >= statement_timestamp() + interval '{ms} milliseconds'
        THEN true
        ELSE pg_sleep(0.001) IS NULL
      END
LIMIT 1"""

# Whether the committing transaction was given a transaction id, i.e. wrote.
_XID_SQL = "SELECT pg_current_xact_id_if_assigned() IS NOT NULL"
_TXID_SQL = "SELECT txid_current_if_assigned() IS NOT NULL"  # before PostgreSQL 13

_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
_HEX = frozenset(b"0123456789abcdef")

_READ_ONLY = "25006"
# lo_create: XX000 "cannot assign OIDs during recovery"; SET TRANSACTION READ WRITE:
# 0A000 "cannot set transaction read-write mode during recovery". The codes alone
# are too broad.
_READ_ONLY_DURING_RECOVERY = frozenset({"XX000", "0A000"})
_RECOVERY_CONFLICT = "40001"
# Class 08 is "connection exception"; 57P01-57P03: the server shuts down or starts.
_CONNECTION_CLASS = "08"
_SERVER_GONE = frozenset({"57P01", "57P02", "57P03"})


def parse_lsn(text: str | None) -> int | None:
    """``'16/B374D848'`` as an integer byte position; None for None."""
    if text is None:
        return None
    match = _LSN.match(text)
    if match is None:
        raise ValueError(f"Not a WAL position: {text!r}.")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    """The PostgreSQL text form of an integer WAL position."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _scalar(dbapi_connection: Any, sql: str) -> object:
    """The first column of ``sql``'s first row, read in autocommit.

    One round trip, and no transaction left open (psycopg, psycopg2 and SQLAlchemy's
    asyncpg adaptation all have ``autocommit``). Inside an open transaction, which
    psycopg will not switch, it runs in that transaction: the pool rolls it back next.
    """
    switched = False
    if not dbapi_connection.autocommit:
        try:
            dbapi_connection.autocommit = True
            switched = True
        except Exception:
            pass  # in a transaction
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(sql)
            row = cursor.fetchone()
        finally:
            cursor.close()
    finally:
        if switched:
            dbapi_connection.autocommit = False
    return row[0] if row else None


class PostgreSQL:
    """The PostgreSQL backend: psycopg, psycopg2 and asyncpg."""

    name = "PostgreSQL"
    dialects: tuple[str, ...] = ("postgresql",)
    has_positions = True
    postgresql_syntax = True
    token_pattern = "[0-9a-f]{1,16}"
    primary_status_sql = PRIMARY_STATUS_SQL
    replica_probe_sql = REPLICA_PROBE_SQL

    def wrote_sql(self, server_version: tuple[int | str, ...] | None) -> str | None:
        """Ask for the transaction id, if one was assigned (no id: nothing written)."""
        return _XID_SQL if (server_version or (0,)) >= (13,) else _TXID_SQL

    def read_primary_position(self, dbapi_connection: Any) -> int | None:
        """The WAL insert position (see ``_scalar``)."""
        return parse_lsn(_text(_scalar(dbapi_connection, PRIMARY_POSITION_SQL)))

    def read_cluster(self, dbapi_connection: Any) -> str | None:
        """The system identifier (see ``_scalar``)."""
        return _text(_scalar(dbapi_connection, CLUSTER_SQL))

    def catch_up_sql(self, position: int, timeout: float) -> str:
        """``CATCH_UP_SQL`` for ``position`` (an int, so the literal is ours)."""
        ms = max(1, round(timeout * 1000))
        return CATCH_UP_SQL.format(rows=ms + 1, position=format_lsn(position), ms=ms)

    def catch_up_on(self, dbapi_connection: Any, position: int, timeout: float) -> int | None:
        """``catch_up_sql`` on this connection (see ``_scalar``): in autocommit, so that
        the wait is no snapshot of the transaction the request starts next."""
        return parse_lsn(_text(_scalar(dbapi_connection, self.catch_up_sql(position, timeout))))

    def caught_up(self, row: tuple[object, ...] | None) -> int | None:
        """The replay position the wait ended at."""
        return None if row is None else parse_lsn(_text(row[0]))

    def primary_status(self, row: tuple[object, ...]) -> tuple[bool | None, int | None]:
        """``pg_is_in_recovery()`` and the flush position."""
        return bool(row[0]), parse_lsn(_text(row[1]))

    def replica_probe(self, row: tuple[object, ...]) -> ReplicaProbe:
        """Read a row of ``REPLICA_PROBE_SQL``."""
        in_recovery, replay, receive, lag = row
        return ReplicaProbe(
            in_recovery=bool(in_recovery),
            replay_lsn=parse_lsn(_text(replay)),
            receive_lsn=parse_lsn(_text(receive)),
            lag_seconds=float(lag) if isinstance(lag, int | float) else 0.0,
        )

    def distance(self, ahead: int | None, behind: int | None) -> int | None:
        """Bytes of WAL between the two positions."""
        if ahead is None or behind is None:
            return None
        return max(0, ahead - behind)

    def dump_position(self, position: int) -> bytes:
        """Lower-case hex, no prefix."""
        return format(position, "x").encode("ascii")

    def load_position(self, payload: bytes) -> int | None:
        """Up to 16 lower-case hex digits."""
        if not 0 < len(payload) <= 16 or not all(c in _HEX for c in payload):
            return None
        return int(payload, 16)

    def format_position(self, position: int) -> str:
        """``16/B374D848``."""
        return format_lsn(position)

    def classify_error(self, error: BaseException) -> ErrorKind | None:
        """By SQLSTATE (psycopg's ``sqlstate``, psycopg2's ``pgcode``; asyncpg's
        adaptation has ``sqlstate`` too), and the psycopg connect timeout by type."""
        code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if not isinstance(code, str):
            # psycopg's own ConnectionTimeout carries no SQLSTATE.
            return ErrorKind.TIMEOUT if type(error).__name__ == "ConnectionTimeout" else None
        if code == _READ_ONLY or (
            code in _READ_ONLY_DURING_RECOVERY and "during recovery" in str(error)
        ):
            return ErrorKind.READ_ONLY
        if code == _RECOVERY_CONFLICT and "conflict with recovery" in str(error):
            return ErrorKind.RECOVERY_CONFLICT
        if code.startswith(_CONNECTION_CLASS) or code in _SERVER_GONE:
            return ErrorKind.CONNECTION_LOST
        return None

    def bound_connect(self, driver: str, params: dict[str, Any], timeout: float) -> None:
        """libpq's ``connect_timeout`` counts whole seconds; asyncpg's ``timeout`` does not."""
        if driver in ("psycopg", "psycopg2"):
            params.setdefault("connect_timeout", max(1, math.ceil(timeout)))
        elif driver == "asyncpg":
            params.setdefault("timeout", timeout)
