"""Replica health: the state machine of replay positions, lag and down-marks.

One registry per router (so per process and app). Requests only read it; the
router's prober (replicated_core.prober) asks ``plan()`` once per check interval
which replicas to check, runs the checks off the request path, and hands each
answer to ``finish()``. Every change of state happens under one lock.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

from .backends import ErrorKind, classify_driver_error
from .lag import LagClock
from .rules import ReplicaView

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .backends import Position, ReplicaProbe
    from .nodes import Node

__all__ = ["INTERRUPTED", "Check", "Health", "Plan", "ReplicaState", "describe_error"]

# Set on an error that the router caused by cutting off a hung replica's connections.
INTERRUPTED = "_replicated_interrupted"

logger = logging.getLogger("replicated")

if TYPE_CHECKING:
    # A log line to write once the lock is released: its message, its arguments (the
    # replica's name first) and its reason field.
    _Note: TypeAlias = tuple[str, tuple[object, ...], str]


@dataclass(slots=True)
class ReplicaState:
    """What is known of one replica.

    ``overdue_since`` is set while a position check is still out past its deadline:
    the replica gets no reads until that check answers (then it counts at once) or
    fails (then it is marked down). ``epoch`` goes up at every down-mark: a check
    that started before it cannot say the replica is fine.
    """

    node: Node
    probe: ReplicaProbe | None = None
    lag_seconds: float = 0.0
    lag_clock: LagClock = field(default_factory=LagClock)
    down_until: float = 0.0
    down_since: float | None = None
    overdue_since: float | None = None
    needs_check: bool = False
    failures: int = 0
    warned_not_in_recovery: bool = False
    epoch: int = 0
    checking_since: float | None = None  # the start of the latest check still out
    checks_out: int = 0


@dataclass(frozen=True, slots=True)
class Check:
    """A position check handed out by ``Health.plan()``: give it back to ``finish()``."""

    node: Node
    epoch: int


@dataclass(frozen=True, slots=True)
class Plan:
    """What the prober does now: start ``checks``; ``overdue`` replicas just became so."""

    checks: list[Check]
    overdue: list[Node]


class Health:
    """Positions, lag and down-marks of a router's replicas; thread- and task-safe.

    ``probing`` is False where positions cannot be read (SQLite): replicas are then
    usable unless marked down. Where they can, a replica that was marked down serves
    reads again only once a check after its downtime says it is fine; before the
    first check of all, replicas count as usable.
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
        database: str = "",
    ) -> None:
        self._nodes = tuple(replicas)
        self._probing = probing
        self.check_interval = check_interval
        self.max_lag = max_lag
        self.downtime = downtime
        self.probe_timeout = probe_timeout
        self.clock = clock
        self.secrets = tuple(s for s in secrets if s)
        self.database = database  # the primary's bind name, for the log lines' fields
        self.reset()

    def reset(self) -> None:
        """Forget everything known of the replicas, as at creation.

        For a child process after a fork: the parent's checks never answer there, and
        a thread of the parent may have held the lock, which is replaced.
        """
        self._lock = threading.Lock()
        self.states = {node.name: ReplicaState(node) for node in self._nodes}
        self.refreshes = 0
        self.marked_down = 0
        self._starved = False
        self._version = 0
        self._views: tuple[int, float, tuple[ReplicaView, ...]] | None = None
        # What views() answers, while no downtime is running: until a change of state,
        # the request path reads this attribute and skips the call. None: call views().
        self.stable_views: tuple[ReplicaView, ...] | None = None

    def add(self, node: Node) -> None:
        """Count ``node``, a replica that joined (found through DNS). It serves no
        reads until a position check says it is fine (or, where positions cannot be
        read, at once)."""
        with self._lock:
            # A new dict, not a change to the one that views() may be reading.
            self.states = {**self.states, node.name: ReplicaState(node, needs_check=self._probing)}
            self._nodes = (*self._nodes, node)
            self._changed()

    def remove(self, node: Node) -> None:
        """Forget ``node``, a replica that left: it gets no reads from the next view
        on. Its checks still out answer into nothing."""
        with self._lock:
            self.states = {n: s for n, s in self.states.items() if s.node is not node}
            self._nodes = tuple(n for n in self._nodes if n is not node)
            self._changed()

    def _state(self, node: Node) -> ReplicaState | None:
        # The state of ``node`` if it is still one of the replicas (it may have left).
        state = self.states.get(node.name)
        return state if state is not None and state.node is node else None

    # -- reading -------------------------------------------------------------------

    @property
    def probing(self) -> bool:
        """Whether replica positions can be read (their backend has positions); fixed
        at creation."""
        return self._probing

    def views(self) -> Sequence[ReplicaView]:
        """Every replica as the routing decision sees it now.

        Built again only after a change of state or when a downtime ends, so the
        requests in between share one tuple. Takes no lock: a view built while a
        change lands is dropped, as the change bumped the version.
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
                s.lag_seconds,
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

    def _extra(self, node: str | None, reason: str) -> dict[str, object]:
        # The fields of a log line, as the Prometheus collector labels them: for JSON
        # loggers to index.
        return {"node": node, "reason": reason, "database": self.database}

    def _log(self, notes: Sequence[_Note]) -> None:
        # Logged once the lock is released: a slow handler must not hold up the others.
        for message, args, reason in notes:
            logger.warning(message, *args, extra=self._extra(str(args[0]), reason))

    def _changed(self) -> None:
        # Called, under the lock, after every change that may change a view.
        self._version += 1
        self.stable_views = None

    def usable(self, name: str) -> bool:
        """Whether the replica called ``name`` may serve reads now (False once it left)."""
        state = self.states.get(name)
        return state is not None and self._usable(state, self.clock())

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
            logger.warning(
                "No replica is usable: the primary serves all reads until one is.",
                extra=self._extra(None, "no_replica"),
            )
        elif any_usable and self._starved:
            self._starved = False
            logger.warning(
                "A replica is usable again: reads go back to the replicas.",
                extra=self._extra(None, "replica_usable"),
            )

    # -- checking ------------------------------------------------------------------

    def plan(self, slack: float = 0.0) -> Plan:
        """The position checks to start now; the prober calls it once per interval.

        A replica gets a check unless it is marked down or its last check is still
        out. A check out for longer than ``probe_timeout`` makes its replica overdue
        (no reads until the check answers); a hung replica is asked again only once
        a downtime has passed since its last check started, so that it collects one
        stuck check per downtime, not one per interval. ``slack`` is added to that
        timeout: how late the prober itself runs (an event loop busy with requests
        answers every check late, however fast the replica).
        """
        checks: list[Check] = []
        overdue: list[Node] = []
        if not self._probing:
            return Plan(checks, overdue)
        with self._lock:
            now = self.clock()
            for state in self.states.values():
                if now < state.down_until:
                    continue
                started = state.checking_since
                if started is not None:
                    if state.overdue_since is None and now - started >= self.probe_timeout + slack:
                        state.overdue_since = now
                        self._changed()
                        overdue.append(state.node)
                    if now < started + self.downtime:
                        continue
                state.checking_since = now
                state.checks_out += 1
                checks.append(Check(state.node, state.epoch))
            if checks:
                self.refreshes += 1
        for node in overdue:
            logger.warning(
                "Replica '%s' did not answer its position check within %g s; it gets no "
                "reads until it does.",
                node.name,
                self.probe_timeout,
                extra=self._extra(node.name, "overdue"),
            )
        return Plan(checks, overdue)

    def abandon_checks(self) -> None:
        """Forget the checks still out: their prober is gone (its event loop closed).

        A replica kept out only because such a check never answered gets checked
        again at the next ``plan()``; an answer that still comes counts as usual.
        """
        with self._lock:
            for state in self.states.values():
                state.checks_out = 0
                state.checking_since = None
                if state.overdue_since is not None:
                    state.overdue_since = None
                    self._changed()

    def drop(self, check: Check) -> None:
        """Forget ``check``, from ``plan()``, which its prober never ran (it stopped)."""
        with self._lock:
            state = self._state(check.node)
            if state is None:
                return
            state.checks_out = max(0, state.checks_out - 1)
            if state.checks_out == 0:
                state.checking_since = None
                if state.overdue_since is not None:
                    state.overdue_since = None
                    self._changed()

    def finish(self, check: Check, outcome: ReplicaProbe | BaseException) -> None:
        """Store the answer (or the error) of ``check``, from ``plan()``.

        An error marks the replica down. An answer to a check that started before
        the replica was last marked down is dropped: it says nothing of the replica
        since the failure.
        """
        notes: list[_Note] = []
        with self._lock:
            state = self._state(check.node)
            if state is None:
                return
            state.checks_out = max(0, state.checks_out - 1)
            if state.checks_out == 0:
                state.checking_since = None
            if state.overdue_since is not None:
                late_by = self.clock() - state.overdue_since + self.probe_timeout
                state.overdue_since = None
                self._changed()
                if not isinstance(outcome, BaseException) and check.epoch == state.epoch:
                    notes.append(
                        (
                            "Replica '%s' answered its position check after %.1f s; it "
                            "serves reads again.",
                            (check.node.name, late_by),
                            "answered_late",
                        )
                    )
            if isinstance(outcome, BaseException):
                self._mark_down(state, outcome, notes)
            elif check.epoch == state.epoch:
                self._record(state, outcome, notes)
        self._log(notes)

    def record(self, node: Node, probe: ReplicaProbe) -> None:
        """Store a successful probe of ``node``, made just now (status command)."""
        notes: list[_Note] = []
        with self._lock:
            state = self._state(node)
            if state is not None:
                self._record(state, probe, notes)
        self._log(notes)

    def _record(self, state: ReplicaState, probe: ReplicaProbe, notes: list[_Note]) -> None:
        state.probe = probe
        state.lag_seconds = state.lag_clock.lag(probe, self.clock())
        state.needs_check = False
        if state.down_since is not None:
            notes.append(
                (
                    "Replica '%s' answers again after %.1f s; it serves reads again.",
                    (state.node.name, self.clock() - state.down_since),
                    "answers_again",
                )
            )
            state.down_since = None
            state.down_until = 0.0
        self._changed()
        if not probe.in_recovery and not state.warned_not_in_recovery:
            state.warned_not_in_recovery = True
            notes.append(
                (
                    "Replica '%s' is not in recovery: it is a primary, not a standby. It "
                    "gets no reads until it is a standby again; check its URL in "
                    "SQLALCHEMY_BINDS.",
                    (state.node.name,),
                    "not_in_recovery",
                )
            )

    def advance(self, node: Node, replay: Position) -> None:
        """Note that ``node`` has replayed ``replay``, as a catch-up wait just saw: the
        requests after it find the replica caught up without asking. Only a replica
        known to be a standby moves, and only forward; its lag stays as last probed."""
        with self._lock:
            state = self._state(node)
            probe = state.probe if state is not None else None
            if state is None or probe is None or not probe.in_recovery:
                return
            if probe.replay_lsn is not None and probe.replay_lsn >= replay:
                return
            receive = probe.receive_lsn
            if receive is not None and not receive >= replay:
                receive = replay
            state.probe = dataclasses.replace(probe, replay_lsn=replay, receive_lsn=receive)
            self._changed()

    def mark_down(self, node: Node, error: BaseException) -> None:
        """Leave ``node`` alone for the downtime, after a failed connect or probe.

        Its last position is forgotten, and checks already out when it failed no
        longer count: after the downtime, a check started after it must say it is
        fine before it serves reads again. Except for a timeout while a check is out:
        the server is slow to answer, not gone, and that check tells which (the
        replica is overdue meanwhile, as if the check had run past its deadline).
        """
        if getattr(error, INTERRUPTED, False):
            return  # the router cut it off while it was overdue: it is out already
        notes: list[_Note] = []
        with self._lock:
            state = self._state(node)
            if state is None:
                return  # it left meanwhile
            if state.checking_since is not None and _is_timeout(error):
                state.failures += 1
                self.marked_down += 1
                if state.overdue_since is None:
                    state.overdue_since = self.clock()
                    self._changed()
            else:
                self._mark_down(state, error, notes)
        self._log(notes)

    def _mark_down(self, state: ReplicaState, error: BaseException, notes: list[_Note]) -> None:
        now = self.clock()
        state.failures += 1
        self.marked_down += 1
        state.epoch += 1
        state.probe = None
        state.needs_check = True
        state.lag_clock.reset()
        first = now >= state.down_until and state.down_since is None
        state.down_until = now + self.downtime
        if first:
            state.down_since = now
            notes.append(
                (
                    "Replica '%s' is down (%s); it gets no reads for %g s.",
                    (state.node.name, describe_error(error, self.secrets), self.downtime),
                    "down",
                )
            )
        self._changed()


def _is_timeout(error: BaseException) -> bool:
    # A driver's own connect timeout, or the socket's TimeoutError.
    cause = getattr(error, "orig", None) or error
    return isinstance(cause, TimeoutError) or classify_driver_error(cause) is ErrorKind.TIMEOUT


def describe_error(error: BaseException, secrets: Sequence[str] = ()) -> str:
    """A one-line description of a driver error: no SQL, no parameters, no ``secrets``."""
    cause = getattr(error, "orig", None) or error
    text = str(cause).strip()
    first_line = text.splitlines()[0] if text else ""
    for secret in secrets:
        first_line = first_line.replace(secret, "***")
    return f"{type(cause).__name__}: {first_line}" if first_line else type(cause).__name__
