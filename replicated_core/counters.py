"""Per-process counters of routing decisions, for export to Prometheus or statsd."""

from __future__ import annotations

import threading
from collections import Counter

__all__ = ["Counters"]

# Events kept unfolded at most: a few kilobytes.
_FOLD_AT = 256


class Counters:
    """Thread-safe named counters; ``snapshot()`` reads them all at once.

    An event that counts under several names is stored once, under the tuple of its
    names. The request path only appends the event to a list (``list.append`` and
    ``list.pop`` are atomic, so it takes no lock); the events are folded into the
    totals every few hundred and whenever the counters are read.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: Counter[tuple[str, ...]] = Counter()
        self._recent: list[tuple[str, ...]] = []

    def add(self, *names: str) -> None:
        """Add one to each of ``names``."""
        self.add_event(names)

    def add_event(self, names: tuple[str, ...]) -> None:
        """Add one to each of ``names``, a tuple the caller keeps and passes again."""
        recent = self._recent
        recent.append(names)
        if len(recent) >= _FOLD_AT:
            self._fold()

    def snapshot(self) -> dict[str, int]:
        """A copy of every counter, by name."""
        with self._lock:
            self._fold_locked()
            events = list(self._events.items())
        counts: Counter[str] = Counter()
        for names, times in events:
            for name in names:
                counts[name] += times
        return dict(counts)

    def _fold(self) -> None:
        with self._lock:
            self._fold_locked()

    def _fold_locked(self) -> None:
        recent, events = self._recent, self._events
        # Exactly the events there now: others may append meanwhile, for next time.
        for _ in range(len(recent)):
            events[recent.pop()] += 1
