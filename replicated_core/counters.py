"""Per-process counters of routing decisions, for export to Prometheus or statsd."""

from __future__ import annotations

import threading
from collections import Counter

__all__ = ["Counters"]


class Counters:
    """Thread-safe named counters; ``snapshot()`` reads them all at once.

    An event that counts under several names is stored once, under the tuple of its
    names, so the request path does one increment whatever it counts.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: Counter[tuple[str, ...]] = Counter()

    def add(self, *names: str) -> None:
        """Add one to each of ``names``."""
        self.add_event(names)

    def add_event(self, names: tuple[str, ...]) -> None:
        """Add one to each of ``names``, a tuple the caller keeps and passes again."""
        with self._lock:
            self._events[names] += 1

    def snapshot(self) -> dict[str, int]:
        """A copy of every counter, by name."""
        with self._lock:
            events = list(self._events.items())
        counts: Counter[str] = Counter()
        for names, times in events:
            for name in names:
                counts[name] += times
        return dict(counts)
