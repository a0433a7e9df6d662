"""PostgreSQL WAL positions: the SQL that reads them and the text form they come in."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "PRIMARY_POSITION_SQL",
    "PRIMARY_STATUS_SQL",
    "REPLICA_PROBE_SQL",
    "ReplicaProbe",
    "format_lsn",
    "parse_lsn",
]

# The insert position bounds every record this session's commit wrote; GitLab's load
# balancer records the same one.
PRIMARY_POSITION_SQL = "SELECT pg_current_wal_insert_lsn()::text"

# For the status command: is the primary really a primary, and where is it.
# (A standby cannot report an insert position: ask only a server that is not one.)
PRIMARY_STATUS_SQL = """\
SELECT pg_is_in_recovery(),
       CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_insert_lsn()::text END"""

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

_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


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


@dataclass(frozen=True, slots=True)
class ReplicaProbe:
    """What one probe of a replica found."""

    in_recovery: bool
    replay_lsn: int | None
    receive_lsn: int | None
    lag_seconds: float

    @classmethod
    def from_row(cls, row: tuple[object, ...]) -> ReplicaProbe:
        """Build from a row of ``REPLICA_PROBE_SQL``."""
        in_recovery, replay, receive, lag = row
        return cls(
            in_recovery=bool(in_recovery),
            replay_lsn=parse_lsn(replay if isinstance(replay, str) else None),
            receive_lsn=parse_lsn(receive if isinstance(receive, str) else None),
            lag_seconds=float(lag) if isinstance(lag, int | float) else 0.0,
        )

    @property
    def lag_bytes(self) -> int | None:
        """WAL received but not yet replayed, in bytes."""
        if self.replay_lsn is None or self.receive_lsn is None:
            return None
        return max(0, self.receive_lsn - self.replay_lsn)
