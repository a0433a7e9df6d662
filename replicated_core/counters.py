"""Per-process counters of routing decisions, for export to Prometheus or statsd."""

from __future__ import annotations

import bisect
import threading
from collections import Counter, deque

__all__ = ["Counters", "Durations"]

# Events kept before they are folded: a few kilobytes.
_FOLD_AT = 256
# Durations kept for a drain, a second's worth of waits at thousands a second.
_MAX_SAMPLES = 10_000


class Counters:
    """Thread-safe named counters; ``snapshot()`` reads them all at once.

    An event that counts under several names is stored once, under the tuple of its
    names. The request path only appends the event to a deque (``append`` and
    ``popleft`` are atomic, so it takes no lock); the events are folded into the
    totals, oldest first, every few hundred and whenever the counters are read.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: Counter[tuple[str, ...]] = Counter()
        self._recent: deque[tuple[str, ...]] = deque()

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
        # Exactly the events there now, from the left: others may append on the right
        # meanwhile, for next time, and every event added before this read is counted.
        for _ in range(len(recent)):
            events[recent.popleft()] += 1


class Durations:
    """A thread-safe histogram of durations in seconds: counts per bucket and a sum.

    ``bounds`` are the buckets' upper bounds, ascending; a duration above the last
    falls in the "+Inf" bucket. Observed only when something waited (a catch-up
    wait is a round trip to a replica already), so a lock costs nothing that shows.

    After ``keep_samples()``, each duration is also kept until ``drain()`` takes it,
    for a copy elsewhere (prometheus_client's multiprocess files); at most
    ``_MAX_SAMPLES`` wait there, the oldest dropped first.
    """

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._lock = threading.Lock()
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0
        self._samples: deque[float] | None = None

    def observe(self, seconds: float) -> None:
        """Count one duration of ``seconds``."""
        index = bisect.bisect_left(self.bounds, seconds)
        with self._lock:
            self._counts[index] += 1
            self._sum += seconds
            if self._samples is not None:
                self._samples.append(seconds)

    def keep_samples(self) -> None:
        """From now on, keep each duration for ``drain()`` too."""
        with self._lock:
            if self._samples is None:
                self._samples = deque(maxlen=_MAX_SAMPLES)

    def drain(self) -> list[float]:
        """The durations observed since the last drain (none before ``keep_samples()``)."""
        with self._lock:
            samples = self._samples
            if not samples:
                return []
            taken = list(samples)
            samples.clear()
            return taken

    def snapshot(self) -> tuple[list[int], float]:
        """The count in each bucket (not cumulative; the last is "+Inf") and the sum."""
        with self._lock:
            return list(self._counts), self._sum
