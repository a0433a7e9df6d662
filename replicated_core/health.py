"""Replica health: replay positions, lag, and replicas marked down after failures.

One registry per router (so per process and app). Positions are refreshed at most
once per check interval, by whichever request finds them due; the others read the
cached values. The probe itself is IO, so it is handed in by the adapter.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .routing import Node, ReplicaView

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from .wal import ReplicaProbe

__all__ = ["Health", "ReplicaState", "describe_error"]

logger = logging.getLogger("replicated")


@dataclass(slots=True)
class ReplicaState:
    """What is known of one replica."""

    node: Node
    probe: ReplicaProbe | None = None
    down_until: float = 0.0
    down_since: float | None = None
    failures: int = 0
    warned_not_in_recovery: bool = False


class Health:
    """Positions, lag and down-marks of a router's replicas; thread- and task-safe.

    ``probing`` is False where positions cannot be read (SQLite): replicas are then
    usable unless marked down.
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
        self.probing = probing
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
        self._starved = False
        self._abandoned: set[asyncio.Task[ReplicaProbe]] = set()

    # -- reading -------------------------------------------------------------------

    def views(self) -> list[ReplicaView]:
        """Every replica as the routing decision sees it now."""
        now = self.clock()
        views = [
            ReplicaView(
                s.node,
                self._usable(s, now),
                s.probe.replay_lsn if s.probe is not None else None,
            )
            for s in self.states.values()
        ]
        self._note_starvation(any(v.usable for v in views))
        return views

    def usable(self, name: str) -> bool:
        """Whether the replica called ``name`` may serve reads now."""
        return self._usable(self.states[name], self.clock())

    def _usable(self, state: ReplicaState, now: float) -> bool:
        if now < state.down_until:
            return False
        probe = state.probe
        if probe is None:
            return True
        return probe.in_recovery and probe.lag_seconds <= self.max_lag

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
        if not self.probing:
            return None
        now = self.clock()
        if now < self._next_refresh or not self._refresh_lock.acquire(blocking=False):
            return None
        if now < self._next_refresh:  # another thread refreshed in between
            self._refresh_lock.release()
            return None
        self._next_refresh = now + self.check_interval
        self.refreshes += 1
        return [s.node for s in self.states.values() if now >= s.down_until]

    def refresh(self, probe: Callable[[Node], ReplicaProbe]) -> None:
        """Probe the replicas if due (sync adapters). Never raises for a failed probe.

        Each probe runs in a thread of its own and is waited for ``probe_timeout``
        seconds at most: a hung replica (a pooled connection to a stopped server
        never times out by itself) is marked down, and its thread is left to finish
        whenever the server answers.
        """
        nodes = self._claim()
        if nodes is None:
            return
        try:
            for node in nodes:
                try:
                    result = _call_with_timeout(probe, node, self.probe_timeout)
                except Exception as error:
                    self.mark_down(node, error)
                else:
                    self.record(node, result)
        finally:
            self._refresh_lock.release()

    async def refresh_async(self, probe: Callable[[Node], Awaitable[ReplicaProbe]]) -> None:
        """Probe the replicas if due (async adapters). Never raises for a failed probe.

        A probe still running after ``probe_timeout`` seconds is cancelled but not
        awaited (its clean-up may wait for the hung server), and the replica is
        marked down.
        """
        nodes = self._claim()
        if nodes is None:
            return
        try:
            for node in nodes:
                task = asyncio.ensure_future(probe(node))
                done, _ = await asyncio.wait({task}, timeout=self.probe_timeout)
                if not done:
                    task.cancel()
                    self._abandoned.add(task)
                    task.add_done_callback(self._abandoned.discard)
                    self.mark_down(node, _timeout(node, self.probe_timeout))
                elif task.exception() is not None:
                    self.mark_down(node, task.exception() or Exception())
                else:
                    self.record(node, task.result())
        finally:
            self._refresh_lock.release()

    def record(self, node: Node, probe: ReplicaProbe) -> None:
        """Store a successful probe of ``node``."""
        state = self.states[node.name]
        state.probe = probe
        if state.down_since is not None:
            logger.warning(
                "Replica '%s' answers again after %.1f s; it serves reads again.",
                node.name,
                self.clock() - state.down_since,
            )
            state.down_since = None
            state.down_until = 0.0
        if not probe.in_recovery and not state.warned_not_in_recovery:
            state.warned_not_in_recovery = True
            logger.warning(
                "Replica '%s' is not in recovery: it is a primary, not a standby. It gets "
                "no reads until it is a standby again; check its URL in SQLALCHEMY_BINDS.",
                node.name,
            )

    def mark_down(self, node: Node, error: BaseException) -> None:
        """Leave ``node`` alone for the downtime, after a failed connect or probe."""
        state = self.states[node.name]
        now = self.clock()
        state.failures += 1
        self.marked_down += 1
        first = now >= state.down_until and state.down_since is None
        state.down_until = now + self.downtime
        if first:
            state.down_since = now
            logger.warning(
                "Replica '%s' is down (%s); it gets no reads for %g s.",
                node.name,
                describe_error(error, self.secrets),
                self.downtime,
            )


def _timeout(node: Node, seconds: float) -> TimeoutError:
    return TimeoutError(f"no answer to the position check within {seconds:g} s")


def _call_with_timeout(
    probe: Callable[[Node], ReplicaProbe], node: Node, seconds: float
) -> ReplicaProbe:
    outcome: list[ReplicaProbe | BaseException] = []

    def run() -> None:
        try:
            outcome.append(probe(node))
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=run, name=f"replicated-probe-{node.name}", daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise _timeout(node, seconds)
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


def describe_error(error: BaseException, secrets: Sequence[str] = ()) -> str:
    """A one-line description of a driver error: no SQL, no parameters, no ``secrets``."""
    cause = getattr(error, "orig", None) or error
    text = str(cause).strip()
    first_line = text.splitlines()[0] if text else ""
    for secret in secrets:
        first_line = first_line.replace(secret, "***")
    return f"{type(cause).__name__}: {first_line}" if first_line else type(cause).__name__
