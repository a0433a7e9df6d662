"""The short wait for a replica: a sticky read (or a job's ``use_replica(after=)``)
that finds no replica caught up in the cached positions asks one replica live.

One round trip waits on the replica itself (``Backend.catch_up_sql``) until it has
replayed the position or the timeout is up, and says how far it got. Readers that
need no more than a wait already out on that replica share it. Each answer moves the
replica's cached position forward (``Health.advance``), so the readers after it find
it caught up without asking. A replica whose wait ran out rests for a check interval:
meanwhile the primary serves those reads at once rather than after the same wait.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .counters import Durations
from .health import describe_error

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from .backends import Backend, Position
    from .counters import Counters
    from .health import Health
    from .nodes import Node
    from .rules import ReplicaView

    # Runs a catch-up query on a replica: its first row, or None if it gave none.
    Run = Callable[[Node, str], "tuple[object, ...] | None"]
    RunAsync = Callable[[Node, str], "Awaitable[tuple[object, ...] | None]"]

__all__ = ["WAIT_BUCKETS", "CatchUp"]

# The upper bounds, in seconds, of the histogram of catch-up waits: around the default
# timeout (0.1 s), with room for a longer one and a replica slow to answer.
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

logger = logging.getLogger("replicated")

_WAITS = ("catch_up_waits",)
_CHECK = ("catch_up_waits", "catch_up_checks")
_CHECK_MISSED = ("catch_up_waits", "catch_up_checks", "catch_up_timeouts")


@dataclass(slots=True)
class _Flight:
    """One catch-up query out on a replica, and who waits for its answer."""

    target: Position
    event: threading.Event | None = None
    future: asyncio.Future[None] | None = None
    answer: Position | None = field(default=None)


class CatchUp:
    """Waits briefly, per replica and shared, for replay of a client's position.

    ``run`` (sync adapters) or ``run_async`` (async ones) is the IO, set by the
    adapter: it runs the backend's query on a fresh pooled connection of the node, in
    autocommit, and returns its row. ``timeout`` 0 turns the wait off. ``durations``
    holds how long each reader waited (its own query or one it joined), for the
    Prometheus collector; a reader whose replica already had the position waits none.
    """

    def __init__(
        self,
        health: Health,
        counters: Counters,
        backends: Mapping[str, Backend],
        timeout: float,
    ) -> None:
        self.health = health
        self.counters = counters
        self.timeout = timeout
        self._backends = backends
        self.run: Run | None = None
        self.run_async: RunAsync | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the waits out and the rests (after a fork: they are the parent's)."""
        self._lock = threading.Lock()
        self._flights: dict[str, list[_Flight]] = {}
        self._resting: dict[str, float] = {}
        self.durations = Durations(WAIT_BUCKETS)

    @property
    def blocks(self) -> bool:
        """Whether a sync caller may wait (the adapter gave blocking IO)."""
        return self.run is not None and self.timeout > 0

    @property
    def awaits(self) -> bool:
        """Whether an async caller may wait (the adapter gave async IO)."""
        return self.run_async is not None and self.timeout > 0

    def pick(
        self, position: Position, views: Sequence[ReplicaView], max_lag: float | None = None
    ) -> Node | None:
        """The replica to wait on for ``position``: of the usable ones (within
        ``max_lag``, if given) not resting, the one that has replayed the most."""
        now = self.health.clock()
        best: tuple[Position, Node] | None = None
        for view in views:
            replay = view.replay_lsn
            if not view.usable or replay is None:
                continue
            if max_lag is not None and view.lag_seconds > max_lag:
                continue
            if self._resting.get(view.node.name, 0.0) > now:
                continue
            if best is None or not best[0] >= replay:
                best = (replay, view.node)
        return None if best is None else best[1]

    # -- waiting -------------------------------------------------------------------

    def wait(self, node: Node, position: Position) -> bool:
        """Block until ``node`` has replayed ``position``, at most the timeout (plus
        the probe timeout, if the replica stops answering); whether it has."""
        run = self.run
        if run is None:
            raise RuntimeError("This router's adapter cannot wait in a blocking call.")
        flight, own = self._board(node, position, None)
        if flight is None:
            return True
        assert flight.event is not None
        start = time.perf_counter()
        if not own:
            flight.event.wait(self.timeout + self.health.probe_timeout)
            self.durations.observe(time.perf_counter() - start)
            return _reached(flight.answer, position)
        answer = None
        try:
            answer = self._backend(node).caught_up(run(node, self._sql(node, position)))
        except Exception as error:
            self._failed(node, error)
        finally:
            self._land(node, flight, answer)
            self.durations.observe(time.perf_counter() - start)
        return _reached(answer, position)

    async def wait_async(self, node: Node, position: Position) -> bool:
        """``wait()`` for async callers: awaited, the event loop runs meanwhile."""
        run = self.run_async
        if run is None:
            raise RuntimeError("This router's adapter cannot wait in an async call.")
        loop = asyncio.get_running_loop()
        flight, own = self._board(node, position, loop)
        if flight is None:
            return True
        assert flight.future is not None
        limit = self.timeout + self.health.probe_timeout
        start = time.perf_counter()
        if not own:
            try:
                await asyncio.wait_for(asyncio.shield(flight.future), limit)
            except TimeoutError:
                return False
            finally:
                self.durations.observe(time.perf_counter() - start)
            return _reached(flight.answer, position)
        answer = None
        try:
            row = await asyncio.wait_for(run(node, self._sql(node, position)), limit)
            answer = self._backend(node).caught_up(row)
        except Exception as error:
            self._failed(node, error)
        finally:
            self._land(node, flight, answer)
            self.durations.observe(time.perf_counter() - start)
        return _reached(answer, position)

    # -- the shared flights --------------------------------------------------------

    def _board(
        self, node: Node, position: Position, loop: asyncio.AbstractEventLoop | None
    ) -> tuple[_Flight | None, bool]:
        # A flight out on the node that covers the position to join, or a new one
        # (True: the caller runs it). None: the replica is known to have it already.
        state = self.health.states.get(node.name)  # None: it left DNS meanwhile
        with self._lock:
            probe = state.probe if state is not None else None
            if probe is not None and _reached(probe.replay_lsn, position):
                self.counters.add_event(_WAITS)
                return None, False
            flights = self._flights.setdefault(node.name, [])
            for flight in flights:
                if flight.target >= position and (
                    loop is None or (flight.future is not None and flight.future.get_loop() is loop)
                ):
                    self.counters.add_event(_WAITS)
                    return flight, False
            if loop is None:
                flight = _Flight(position, event=threading.Event())
            else:
                flight = _Flight(position, future=loop.create_future())
            flights.append(flight)
            return flight, True

    def _land(self, node: Node, flight: _Flight, answer: Position | None) -> None:
        flight.answer = answer
        reached = _reached(answer, flight.target)
        with self._lock:
            flights = self._flights.get(node.name, [])
            if flight in flights:
                flights.remove(flight)
            if not reached:
                rest = max(self.health.check_interval, self.timeout)
                self._resting[node.name] = self.health.clock() + rest
        self.counters.add_event(_CHECK if reached else _CHECK_MISSED)
        if answer is not None:
            self.health.advance(node, answer)
        if flight.event is not None:
            flight.event.set()
        future = flight.future
        if future is not None and not future.done():
            future.set_result(None)

    def _failed(self, node: Node, error: BaseException) -> None:
        # The prober, not a wait, says whether the replica is down.
        logger.debug(
            "The catch-up wait on replica '%s' failed (%s); the primary serves the read.",
            node.name,
            describe_error(error, self.health.secrets),
        )

    def _backend(self, node: Node) -> Backend:
        return self._backends[node.name]

    def _sql(self, node: Node, position: Position) -> str:
        sql = self._backend(node).catch_up_sql(position, self.timeout)
        if sql is None:
            raise RuntimeError(f"Replica '{node.name}' cannot be asked to wait.")
        return sql


def _reached(replay: Position | None, position: Position) -> bool:
    return replay is not None and replay >= position
