"""Framework-agnostic core: routing intent, the routing decision, sticky-after-write."""

from __future__ import annotations

from .config import ReplicatedConfig, StickyMode
from .errors import ConfigError, ReplicaWriteError
from .intent import Intent, changes_database, use_primary, use_replica
from .rules import Reason

__all__ = [
    "ConfigError",
    "Intent",
    "Reason",
    "ReplicaWriteError",
    "ReplicatedConfig",
    "StickyMode",
    "changes_database",
    "use_primary",
    "use_replica",
]
