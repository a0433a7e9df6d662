"""How long a replica has been behind: the arithmetic behind ``REPLICATED_MAX_LAG``.

The server's own figure (the age of the last replayed commit) is right while the
primary is busy, but after an idle spell it reports the whole idle time the moment
one new write arrives. So each check remembers when it first saw a received position
the replica had not replayed, and the lag is the age of the oldest such position
still unreplayed. Only when the replica was already behind at the very first check,
so nothing tells how long, is the server's figure used.

Positions are compared with ``>=`` only, so any backend's positions will do.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .backends import Position, ReplicaProbe

__all__ = ["LagClock"]

# Positions remembered per replica while they wait for replay: one per check at most,
# so this covers far more than any sensible REPLICATED_MAX_LAG.
_MAX_WAITING = 10_000


@dataclass(slots=True)
class LagClock:
    """One replica's received-but-unreplayed positions, each with when it was first seen.

    ``first_seen`` is the time of the first check since the clock was (re)started.
    """

    waiting: deque[tuple[Position, float]] = field(default_factory=deque)
    first_seen: float | None = None

    def lag(self, probe: ReplicaProbe, now: float) -> float:
        """The replica's lag in seconds after ``probe``, made at ``now``."""
        if self.first_seen is None:
            self.first_seen = now
        waiting, replay, receive = self.waiting, probe.replay_lsn, probe.receive_lsn
        if replay is None or receive is None:
            return probe.lag_seconds
        if waiting and not (replay >= waiting[0][0] or waiting[0][0] >= replay):
            waiting.clear()  # another history (a new timeline): what waited is moot
        while waiting and replay >= waiting[0][0]:
            waiting.popleft()
        newly_received = not waiting or not waiting[-1][0] >= receive
        if not replay >= receive and newly_received and len(waiting) < _MAX_WAITING:
            waiting.append((receive, now))
        if not waiting:
            return 0.0
        since = waiting[0][1]
        if since == self.first_seen:
            return max(probe.lag_seconds, now - since)
        return now - since

    def known_since(self, now: float) -> float | None:
        """Since when the oldest position still waiting has waited, where a check
        before ``now``, not the first one, saw it arrive; else None (nothing waits,
        or nothing tells how long it has)."""
        if self.waiting:
            since = self.waiting[0][1]
            if since != self.first_seen and since < now:
                return since
        return None

    def reset(self) -> None:
        """Forget everything: the replica was marked down."""
        self.waiting.clear()
        self.first_seen = None
