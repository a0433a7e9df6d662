"""Replica health: replay positions, lag, and replicas marked down after failures.

One registry per router (so per process and app). Positions are refreshed at most
once per check interval, by whichever request finds them due; the others read the
cached values. The probe itself is IO, so it is handed in by the adapter.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .routing import Node, ReplicaView

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from .wal import ReplicaProbe

__all__ = ["Health", "ReplicaState", "describe_error"]

logger = logging.getLogger("replicated")

# Positions remembered per replica while they wait for replay: one per check at most,
# so this covers far more than any sensible REPLICATED_MAX_LAG.
_MAX_WAITING = 10_000


@dataclass(slots=True)
class ReplicaState:
    """What is known of one replica.

    ``overdue_since`` is set while a position check is still out past its deadline:
    the replica gets no reads until that check answers (then it counts at once) or
    fails (then it is marked down).
    """

    node: Node
    probe: ReplicaProbe | None = None
    lag_seconds: float = 0.0
    waiting: deque[tuple[int, float]] = field(default_factory=deque)
    first_seen: float | None = None
    down_until: float = 0.0
    down_since: float | None = None
    overdue_since: float | None = None
    needs_check: bool = False
    failures: int = 0
    warned_not_in_recovery: bool = False


class Health:
    """Positions, lag and down-marks of a router's replicas; thread- and task-safe.

    ``probing`` is False where positions cannot be read (SQLite): replicas are then
    usable unless marked down. Where they can, a replica that was marked down serves
    reads again only once a check after its downtime says it is fine; before the
    first check of all (the very first request makes it), replicas count as usable.
    """

    def __init__(
        self,
        replicas: Sequence[Node],
        *,
        probing: bool,
        check_interval: float,
        max_lag: float,
        downtime: float,
        probe_timeout: float = 2.0,
        secrets: Sequence[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.states = {node.name: ReplicaState(node) for node in replicas}
        self._probing = probing
        self.check_interval = check_interval
        self.max_lag = max_lag
        self.downtime = downtime
        self.probe_timeout = probe_timeout
        self.clock = clock
        self.secrets = tuple(s for s in secrets if s)
        self.refreshes = 0
        self.marked_down = 0
        self._next_refresh = 0.0
        self._refresh_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._starved = False
        self._version = 0
        self._views: tuple[int, float, tuple[ReplicaView, ...]] | None = None
        # What views() answers, while no downtime is running: until a change of state,
        # the request path reads this attribute and skips the call. None: call views().
        self.stable_views: tuple[ReplicaView, ...] | None = None
        self._pending: set[asyncio.Future[ReplicaProbe]] = set()

    # -- reading -------------------------------------------------------------------

    @property
    def probing(self) -> bool:
        """Whether replica positions can be read (PostgreSQL); fixed at creation."""
        return self._probing

    def views(self) -> Sequence[ReplicaView]:
        """Every replica as the routing decision sees it now.

        Built again only after a change of state or when a downtime ends, so the
        requests in between share one tuple.
        """
        now = self.clock()
        cached = self._views
        if cached is not None and cached[0] == self._version and now < cached[1]:
            return cached[2]
        version = self._version
        states = list(self.states.values())
        views = tuple(
            ReplicaView(
                s.node,
                self._usable(s, now),
                s.probe.replay_lsn if s.probe is not None else None,
            )
            for s in states
        )
        # Until the first downtime still running ends, nothing changes without a
        # new version.
        valid_until = min((s.down_until for s in states if s.down_until > now), default=math.inf)
        self._views = (version, valid_until, views)
        if valid_until == math.inf:
            self.stable_views = views
            if self._version != version:
                self.stable_views = None  # a change came in meanwhile: rebuild next time
        self._note_starvation(any(v.usable for v in views))
        return views

    def _changed(self) -> None:
        # Called after every change that may change a view.
        self._version += 1
        self.stable_views = None

    def usable(self, name: str) -> bool:
        """Whether the replica called ``name`` may serve reads now."""
        return self._usable(self.states[name], self.clock())

    def _usable(self, state: ReplicaState, now: float) -> bool:
        if now < state.down_until or state.overdue_since is not None:
            return False
        if not self._probing:
            return True
        probe = state.probe
        if probe is None:
            return not state.needs_check
        return probe.in_recovery and state.lag_seconds <= self.max_lag

    def _note_starvation(self, any_usable: bool) -> None:
        # One warning per episode, not one per request.
        if not any_usable and not self._starved:
            self._starved = True
            logger.warning("No replica is usable: the primary serves all reads until one is.")
        elif any_usable and self._starved:
            self._starved = False
            logger.warning("A replica is usable again: reads go back to the replicas.")

    # -- refreshing ----------------------------------------------------------------

    def _claim(self) -> list[Node] | None:
        """The replicas to probe, if a refresh is due and nobody else is doing it."""
        if not self._probing:
            return None
        now = self.clock()
        if now < self._next_refresh or not self._refresh_lock.acquire(blocking=False):
            return None
        if now < self._next_refresh:  # another thread refreshed in between
            self._refresh_lock.release()
            return None
        self._next_refresh = now + self.check_interval
        self.refreshes += 1
        # A replica with an overdue check is asked again only after the downtime, so
        # that a hung server does not collect one stuck check per interval.
        return [
            s.node
            for s in self.states.values()
            if now >= s.down_until
            and (s.overdue_since is None or now >= s.overdue_since + self.downtime)
        ]

    def refresh(self, probe: Callable[[Node], ReplicaProbe]) -> None:
        """Probe the replicas if due (sync adapters). Never raises for a failed probe.

        The replicas are probed in parallel, each in a thread of its own, waited for
        ``probe_timeout`` seconds at most (a pooled connection to a stopped server
        never times out by itself); a late answer still counts when it comes.
        """
        nodes = self._claim()
        if nodes is None:
            return
        try:
            checks = []
            for node in nodes:
                done = threading.Event()

                def run(node: Node = node, done: threading.Event = done) -> None:
                    try:
                        self._finish(node, probe(node))
                    except Exception as error:
                        self._finish(node, error)
                    finally:
                        done.set()

                threading.Thread(
                    target=run, name=f"replicated-probe-{node.name}", daemon=True
                ).start()
                checks.append((node, done))
            deadline = self.clock() + self.probe_timeout
            for node, done in checks:
                if not done.wait(max(0.0, deadline - self.clock())):
                    self._overdue(node, done.is_set)
        finally:
            self._refresh_lock.release()

    async def refresh_async(self, probe: Callable[[Node], Awaitable[ReplicaProbe]]) -> None:
        """Probe the replicas if due (async adapters). Never raises for a failed probe.

        A probe still running after ``probe_timeout`` seconds is left to finish (its
        answer still counts) but not awaited: the replica gets no reads meanwhile.
        """
        nodes = self._claim()
        if nodes is None:
            return
        try:
            checks = {}
            for node in nodes:
                task = asyncio.ensure_future(probe(node))
                self._pending.add(task)
                task.add_done_callback(functools.partial(self._finish_task, node))
                checks[task] = node
            if checks:
                await asyncio.wait(checks, timeout=self.probe_timeout)
            for task, node in checks.items():
                if not task.done():
                    self._overdue(node, task.done)
        finally:
            self._refresh_lock.release()

    def _finish_task(self, node: Node, task: asyncio.Future[ReplicaProbe]) -> None:
        self._pending.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        self._finish(node, task.result() if error is None else error)

    def _overdue(self, node: Node, answered: Callable[[], bool]) -> None:
        with self._state_lock:
            state = self.states[node.name]
            if answered() or state.overdue_since is not None:
                return
            state.overdue_since = self.clock()
            self._changed()
        logger.warning(
            "Replica '%s' did not answer its position check within %g s; it gets no reads "
            "until it does.",
            node.name,
            self.probe_timeout,
        )

    def _finish(self, node: Node, outcome: ReplicaProbe | BaseException) -> None:
        with self._state_lock:
            state = self.states[node.name]
            late_by = None
            if state.overdue_since is not None:
                late_by = self.clock() - state.overdue_since + self.probe_timeout
                state.overdue_since = None
                self._changed()
        if isinstance(outcome, BaseException):
            self.mark_down(node, outcome)
            return
        if late_by is not None:
            logger.warning(
                "Replica '%s' answered its position check after %.1f s; it serves reads again.",
                node.name,
                late_by,
            )
        self.record(node, outcome)

    def record(self, node: Node, probe: ReplicaProbe) -> None:
        """Store a successful probe of ``node``."""
        state = self.states[node.name]
        state.probe = probe
        state.lag_seconds = self._lag(state, probe)
        state.needs_check = False
        self._changed()
        if state.down_since is not None:
            logger.warning(
                "Replica '%s' answers again after %.1f s; it serves reads again.",
                node.name,
                self.clock() - state.down_since,
            )
            state.down_since = None
            state.down_until = 0.0
            self._changed()
        if not probe.in_recovery and not state.warned_not_in_recovery:
            state.warned_not_in_recovery = True
            logger.warning(
                "Replica '%s' is not in recovery: it is a primary, not a standby. It gets "
                "no reads until it is a standby again; check its URL in SQLALCHEMY_BINDS.",
                node.name,
            )

    def _lag(self, state: ReplicaState, probe: ReplicaProbe) -> float:
        """How long the oldest WAL seen arriving at the replica has waited for replay.

        The server's own figure (the age of the last replayed commit) is right while
        the primary is busy, but after an idle spell it reports the whole idle time the
        moment one new write arrives. So each check remembers when it first saw a
        received position the replica had not replayed, and the lag is the age of the
        oldest such position still unreplayed. Only when the replica was already behind
        at the very first check, so nothing tells how long, is the server's figure used.
        """
        now = self.clock()
        if state.first_seen is None:
            state.first_seen = now
        waiting, replay, receive = state.waiting, probe.replay_lsn, probe.receive_lsn
        if replay is None or receive is None:
            return probe.lag_seconds
        while waiting and waiting[0][0] <= replay:
            waiting.popleft()
        newly_received = not waiting or waiting[-1][0] < receive
        if receive > replay and newly_received and len(waiting) < _MAX_WAITING:
            waiting.append((receive, now))
        if not waiting:
            return 0.0
        since = waiting[0][1]
        if since == state.first_seen:
            return max(probe.lag_seconds, now - since)
        return now - since

    def mark_down(self, node: Node, error: BaseException) -> None:
        """Leave ``node`` alone for the downtime, after a failed connect or probe.

        Its last position is forgotten: after the downtime, a fresh check must say
        it is fine before it serves reads again.
        """
        state = self.states[node.name]
        now = self.clock()
        state.failures += 1
        self.marked_down += 1
        state.probe = None
        state.needs_check = True
        state.waiting.clear()
        state.first_seen = None
        first = now >= state.down_until and state.down_since is None
        state.down_until = now + self.downtime
        self._changed()
        if first:
            state.down_since = now
            logger.warning(
                "Replica '%s' is down (%s); it gets no reads for %g s.",
                node.name,
                describe_error(error, self.secrets),
                self.downtime,
            )


def describe_error(error: BaseException, secrets: Sequence[str] = ()) -> str:
    """A one-line description of a driver error: no SQL, no parameters, no ``secrets``."""
    cause = getattr(error, "orig", None) or error
    text = str(cause).strip()
    first_line = text.splitlines()[0] if text else ""
    for secret in secrets:
        first_line = first_line.replace(secret, "***")
    return f"{type(cause).__name__}: {first_line}" if first_line else type(cause).__name__
