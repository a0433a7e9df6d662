"""The errors the router raises on purpose."""

from __future__ import annotations


class ReplicaWriteError(RuntimeError):
    """A write was about to be sent to a read replica.

    Raised before the statement reaches the replica, or in place of a PostgreSQL
    standby's own refusal (SQLSTATE 25006), so the fix is always the same: route
    the write to the primary with ``@changes_database`` or ``use_primary()``.
    """


class ConfigError(ValueError):
    """A ``REPLICATED_*`` setting is wrong; raised at start-up, naming the key."""
