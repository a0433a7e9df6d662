"""Quart + SQLAlchemy asyncio adapter: reads to replicas, writes to the primary."""

from __future__ import annotations

from replicated_core import ReplicaWriteError, changes_database, use_primary, use_replica

from .extension import QuartReplicated

__all__ = [
    "QuartReplicated",
    "ReplicaWriteError",
    "changes_database",
    "use_primary",
    "use_replica",
]
