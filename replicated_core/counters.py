"""Per-process counters of routing decisions, for export to Prometheus or statsd."""

from __future__ import annotations

import threading
from collections import Counter

__all__ = ["Counters"]


class Counters:
    """Thread-safe named counters; ``snapshot()`` reads them all at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, *names: str) -> None:
        """Add one to each of ``names``."""
        with self._lock:
            for name in names:
                self._counts[name] += 1

    def snapshot(self) -> dict[str, int]:
        """A copy of every counter, by name."""
        with self._lock:
            return dict(self._counts)
