"""PostgreSQL: WAL positions (LSNs) with their timelines, its SQLSTATEs, and what its
drivers need.

A position is a ``WalPosition``: the byte of the WAL (``16/B374D848`` is
``0x16B374D848``) and the timeline it was written or replayed on. A failover starts
a new timeline, which forks from the old one: the same byte on two timelines may hold
different writes, and PostgreSQL's own comparisons (``pg_lsn``, ``WAIT FOR LSN``) do
not see it. So a replica's position covers a token's only on the token's timeline.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from .protocol import ErrorKind, ReplicaProbe

__all__ = ["PostgreSQL", "WalPosition", "format_lsn", "parse_lsn"]

# The insert position bounds every record this session's commit wrote; GitLab's load
# balancer records the same one. Its timeline is the first 8 hex digits of its WAL
# file's name (pg_walfile_name, which only a server not in recovery answers).
PRIMARY_POSITION_SQL = """SELECT pg_current_wal_insert_lsn()::text || '@'
       || ('x' || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8))::bit(32)::int"""


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

# One round trip per replica and check interval. The last column is the timeline the
# standby receives from its primary (so replays, past the fork): NULL while no WAL
# receiver runs (replaying from an archive, between two connections, or stuck on a
# history its primary forked from), when nothing tells which history it follows and
# it covers no token of a known timeline. Lag is zero when everything received
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
       END::float8,
       (SELECT received_tli FROM pg_stat_wal_receiver)"""

# Waits on a standby, in one statement, until it has replayed a position or the time
# is up, and says how far it got. pg_sleep() runs only in the CASE's last branch, so
# once per row that did not end the wait, and the LIMIT stops at the first that did.
# The series only bounds the rows: each sleeps at least a millisecond. A server not
# in recovery has no replay position (NULL): it ends the wait at once, as one that
# does not stream the position's timeline does (it never will replay that history).
CATCH_UP_SQL = """\
SELECT pg_last_wal_replay_lsn()::text, (SELECT received_tli FROM pg_stat_wal_receiver)
FROM generate_series(1, {rows}) AS i
WHERE CASE
        WHEN pg_last_wal_replay_lsn() IS NULL{other_timeline}
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
# Between a token's WAL byte and its timeline: not a hex digit.
_ON = b"g"

_READ_ONLY = "25006"
# lo_create: XX000 "cannot assign OIDs during recovery"; SET TRANSACTION READ WRITE:
# 0A000 "cannot set transaction read-write mode during recovery". The codes alone
# are too broad.
_READ_ONLY_DURING_RECOVERY = frozenset({"XX000", "0A000"})
_RECOVERY_CONFLICT = "40001"
# Class 08 is "connection exception"; 57P01-57P03: the server shuts down or starts.
_CONNECTION_CLASS = "08"
_SERVER_GONE = frozenset({"57P01", "57P02", "57P03"})


@dataclass(frozen=True, slots=True)
class WalPosition:
    """A WAL byte position and its timeline (None: not known).

    ``a >= b`` says whether a server at ``a`` has replayed everything up to ``b``:
    ``b``'s timeline must be ``a``'s (a token of another history is not covered, even
    by a higher byte), unless ``b`` names none (a token made before timelines were
    written, or a position whose history is not asked), when the bytes alone decide.
    """

    lsn: int
    timeline: int | None = None

    def __ge__(self, other: object) -> bool:
        if isinstance(other, int):
            other = WalPosition(other)
        if not isinstance(other, WalPosition):
            return NotImplemented
        if other.timeline is not None and other.timeline != self.timeline:
            return False
        return self.lsn >= other.lsn

    def __le__(self, other: object) -> bool:
        if isinstance(other, int):
            other = WalPosition(other)
        if not isinstance(other, WalPosition):
            return NotImplemented
        return other >= self


def _lsn_of(position: WalPosition | int) -> int:
    return position.lsn if isinstance(position, WalPosition) else position


def parse_position(text: str | None, timeline: object = None) -> WalPosition | int | None:
    """``'16/B374D848'`` (or ``'16/B374D848@3'``, with its timeline) as a position: a
    ``WalPosition`` when the timeline is known, else the byte alone (an int, which
    compares as a ``WalPosition`` of no timeline)."""
    if text is None:
        return None
    lsn, _, on = text.partition("@")
    parsed = parse_lsn(lsn)
    assert parsed is not None
    if on:
        timeline = int(on)
    return WalPosition(parsed, timeline) if isinstance(timeline, int) else parsed


def parse_lsn(text: str | None) -> int | None:
    """``'16/B374D848'`` as an integer byte position; None for None."""
    if text is None:
        return None
    match = _LSN.match(text)
    if match is None:
        raise ValueError(f"Not a WAL position: {text!r}.")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: WalPosition | int) -> str:
    """The PostgreSQL text form of a WAL position (its byte; not its timeline)."""
    lsn = _lsn_of(lsn)
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _scalar(dbapi_connection: Any, sql: str) -> object:
    """The first column of ``sql``'s first row, read in autocommit (see ``_row``)."""
    row = _row(dbapi_connection, sql)
    return row[0] if row else None


def _row(dbapi_connection: Any, sql: str) -> tuple[object, ...] | None:
    """The first row of ``sql``, read in autocommit.

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
    return None if row is None else tuple(row)


def _is_hex(payload: bytes, digits: int) -> bool:
    return 0 < len(payload) <= digits and all(c in _HEX for c in payload)


class PostgreSQL:
    """The PostgreSQL backend: psycopg, psycopg2 and asyncpg."""

    name = "PostgreSQL"
    dialects: tuple[str, ...] = ("postgresql",)
    has_positions = True
    postgresql_syntax = True
    token_pattern = "[0-9a-f]{1,16}(?:g[0-9a-f]{1,8})?"
    primary_status_sql = PRIMARY_STATUS_SQL
    replica_probe_sql = REPLICA_PROBE_SQL

    def wrote_sql(self, server_version: tuple[int | str, ...] | None) -> str | None:
        """Ask for the transaction id, if one was assigned (no id: nothing written)."""
        return _XID_SQL if (server_version or (0,)) >= (13,) else _TXID_SQL

    def read_primary_position(self, dbapi_connection: Any) -> WalPosition | int | None:
        """The WAL insert position and its timeline (see ``_scalar``)."""
        return parse_position(_text(_scalar(dbapi_connection, PRIMARY_POSITION_SQL)))

    def read_cluster(self, dbapi_connection: Any) -> str | None:
        """The system identifier (see ``_scalar``)."""
        return _text(_scalar(dbapi_connection, CLUSTER_SQL))

    def catch_up_sql(self, position: WalPosition | int, timeout: float) -> str:
        """``CATCH_UP_SQL`` for ``position`` (ints only, so the literals are ours)."""
        ms = max(1, round(timeout * 1000))
        other_timeline = ""
        if isinstance(position, WalPosition) and position.timeline is not None:
            other_timeline = (
                "\n             OR COALESCE((SELECT received_tli FROM pg_stat_wal_receiver), 0)"
                f" <> {int(position.timeline)}"
            )
        return CATCH_UP_SQL.format(
            rows=ms + 1, position=format_lsn(position), ms=ms, other_timeline=other_timeline
        )

    def catch_up_on(
        self, dbapi_connection: Any, position: WalPosition | int, timeout: float
    ) -> WalPosition | int | None:
        """``catch_up_sql`` on this connection (see ``_row``): in autocommit, so that
        the wait is no snapshot of the transaction the request starts next."""
        return self.caught_up(_row(dbapi_connection, self.catch_up_sql(position, timeout)))

    def caught_up(self, row: tuple[object, ...] | None) -> WalPosition | int | None:
        """The replay position the wait ended at, on the timeline received."""
        return None if row is None else parse_position(_text(row[0]), row[1])

    def primary_status(
        self, row: tuple[object, ...]
    ) -> tuple[bool | None, WalPosition | int | None]:
        """``pg_is_in_recovery()`` and the flush position (its timeline not asked)."""
        return bool(row[0]), parse_position(_text(row[1]))

    def replica_probe(self, row: tuple[object, ...]) -> ReplicaProbe:
        """Read a row of ``REPLICA_PROBE_SQL``."""
        in_recovery, replay, receive, lag, timeline = row
        return ReplicaProbe(
            in_recovery=bool(in_recovery),
            replay_lsn=parse_position(_text(replay), timeline),
            receive_lsn=parse_position(_text(receive), timeline),
            lag_seconds=float(lag) if isinstance(lag, int | float) else 0.0,
        )

    def distance(
        self, ahead: WalPosition | int | None, behind: WalPosition | int | None
    ) -> int | None:
        """Bytes of WAL between the two positions (whatever their timelines)."""
        if ahead is None or behind is None:
            return None
        return max(0, _lsn_of(ahead) - _lsn_of(behind))

    def dump_position(self, position: WalPosition | int) -> bytes:
        """The byte in lower-case hex, no prefix, then ``g`` and the timeline in hex."""
        if isinstance(position, int):
            position = WalPosition(position)
        payload = format(position.lsn, "x").encode("ascii")
        if position.timeline is not None:
            payload += _ON + format(position.timeline, "x").encode("ascii")
        return payload

    def load_position(self, payload: bytes) -> WalPosition | int | None:
        """Up to 16 lower-case hex digits, then maybe ``g`` and up to 8 more (a token
        made before timelines were written has none: the bytes alone then decide)."""
        lsn, on, timeline = payload.partition(_ON)
        if not _is_hex(lsn, 16) or (on and not _is_hex(timeline, 8)):
            return None
        return WalPosition(int(lsn, 16), int(timeline, 16)) if on else int(lsn, 16)

    def format_position(self, position: WalPosition | int) -> str:
        """``16/B374D848``, and ``(timeline 3)`` when known."""
        if isinstance(position, WalPosition) and position.timeline is not None:
            return f"{format_lsn(position)} (timeline {position.timeline})"
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
