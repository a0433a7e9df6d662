"""The prober: checks replica positions off the request path, once per interval.

One prober per router, so per process and app, started by the first request that
reads from replicas (or the first ``use_replica()`` outside a request); requests
only read what it found. ``ThreadProber`` serves sync adapters (a daemon thread,
plus one worker thread per replica, so that a hung replica holds up only its own
checks); ``TaskProber`` serves async ones (a task in the event loop that serves the
requests, one task per check). Both are restarted after a fork, and by the next
request after ``stop()``. Which checks to start, and what a late or failed one
means, is decided by ``Health.plan()``; the probe itself is IO, handed in by the
adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

    from sqlalchemy import Engine
    from sqlalchemy.pool import Pool

    from .backends import ReplicaProbe
    from .discovery import Discovery
    from .health import Check, Health
    from .nodes import Node

__all__ = ["TaskProber", "ThreadProber"]

# How long stop() waits for a check in flight to hand its connection back.
_STOP_WAIT = 2.0

# A prober that no request has used for this long stops; the next read starts it
# again. A process that served at import and then only forks (the parent process of a
# preloading server) or an app left behind (tests) then costs nothing.
IDLE_STOP = 10.0

# How often an idle worker thread looks whether its prober is still there.
_WORKER_POLL = 5.0


class _Worker:
    """One replica's long-lived checking thread: runs the checks handed to it in turn."""

    def __init__(self, prober: ThreadProber, name: str, stopped: threading.Event) -> None:
        self.inbox: queue.SimpleQueue[Check | None] = queue.SimpleQueue()
        self.busy = False
        self.thread = threading.Thread(
            target=self._run,
            args=(weakref.ref(prober), self.inbox, stopped),
            name=f"replicated-prober-{name}",
            daemon=True,
        )
        self.thread.start()

    def _run(
        self,
        ref: weakref.ref[ThreadProber],
        inbox: queue.SimpleQueue[Check | None],
        stopped: threading.Event,
    ) -> None:
        while True:
            try:
                check = inbox.get(timeout=_WORKER_POLL)
            except queue.Empty:
                if ref() is None:
                    return  # its router is gone
                continue
            prober = ref()
            if check is None or prober is None:
                return
            if stopped.is_set():
                # Handed over before its prober stopped: the engines may be disposed
                # of by now, and a check would open a connection nobody closes.
                prober.health.drop(check)
                return
            self.busy = True
            try:
                prober.run_check(check)
            finally:
                self.busy = False
                del prober  # a router that is gone must not be kept alive here


class ThreadProber:
    """Checks a router's replicas every check interval from a daemon thread.

    ``probe`` reads one replica's position, blocking; it may hang as long as its
    server does, which holds up that replica's worker only. ``on_overdue`` is called
    (from the prober's thread) when a replica's check runs past the probe timeout.
    The prober stops after ``idle_stop`` seconds in which no request set ``used``.
    """

    def __init__(
        self,
        health: Health,
        probe: Callable[[Node], ReplicaProbe],
        on_overdue: Callable[[Node], None] | None = None,
    ) -> None:
        self.health = health
        self.probe = probe
        self.on_overdue = on_overdue
        self.idle_stop = IDLE_STOP
        # Asked at every tick to resolve the replicas again when due (set by the adapter).
        self.discovery: Discovery | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the threads (after a fork: they do not exist in the child)."""
        self.running = False
        # Running, with its first round (in a process) answered or given up on: the
        # request path calls ensure_started() until then.
        self.ready = False
        self._first_pending = False
        # Set by every request that reads; the ticker clears it and notes the time.
        self.used = False
        self._used_at = 0.0
        self._rounds = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._first_round = threading.Event()
        self._first_left = 0
        self._workers: dict[str, _Worker] = {}
        self._thread: threading.Thread | None = None
        self._pools: list[tuple[Engine, Pool]] = []

    def ensure_started(self) -> None:
        """Start the prober unless it runs. The first start in a process (or since a
        fork) waits for the first round of checks, at most the probe timeout (a hung
        replica is then overdue, not waited for); a restart after an idle stop does
        not wait: the positions it left are known.

        The request path calls it only while ``ready`` is False.
        """
        self.used = True
        with self._lock:
            if not self.running:
                # Asked before the start, which dispatches (and counts) the first round.
                first = self._rounds == 0
                self._start()
                self._first_pending = first
            wait = self._first_pending
        if wait:
            # Also the requests that come while the first round is out: they would
            # find no positions (and, for tokens, no cluster) known yet.
            self._first_round.wait(self.health.probe_timeout)
            self._first_pending = False
        self.ready = self.running

    def _start(self) -> None:
        self._pools = [(s.node.engine, s.node.engine.pool) for s in self.health.states.values()]
        self._stop = threading.Event()
        self._first_round = threading.Event()
        self._thread = threading.Thread(
            target=_thread_loop,
            args=(weakref.ref(self), self._stop, self.health.check_interval),
            name="replicated-prober",
            daemon=True,
        )
        self.running = True
        self._used_at = self.health.clock()
        # The first round is dispatched here, so that ensure_started() can wait for it.
        self._dispatch(first=True)
        self._thread.start()

    def tick(self) -> bool:
        """Start the checks that are due (called once per check interval); False
        once the prober stopped, for want of use or by ``stop()``."""
        now = self.health.clock()
        if self.used:
            self.used = False
            self._used_at = now
        elif now - self._used_at > self.idle_stop:
            self.stop()
            return False
        disposed = [engine for engine, pool in self._pools if engine.pool is not pool]
        if disposed:
            # The app (or a test) shut down with engine.dispose(): checks would open
            # connections in the new pools that nobody closes. Once the checks in
            # flight are back, what they put there is closed too. The next read
            # starts the prober again. (Seen here rather than by an engine_disposed
            # listener, which would make SQLAlchemy join event dispatchers on every
            # connection of the engine: 90 function calls per request.)
            self.stop()
            for engine in disposed:
                engine.pool.dispose()
            return False
        with self._lock:  # a stop() meanwhile must not be followed by new checks
            if not self.running:
                return False
            self._dispatch()
        discovery = self.discovery
        if discovery is not None:
            discovery.poll()
        return True

    def track(self, node: Node) -> None:
        """Watch ``node``, a replica that joined, for its engine's disposal too."""
        with self._lock:
            if self.running:
                self._pools.append((node.engine, node.engine.pool))

    def untrack(self, node: Node) -> None:
        """Stop checking ``node``, a replica that left: its engine is about to be
        disposed of, which must not look like the app's shutdown."""
        with self._lock:
            self._pools = [(e, p) for e, p in self._pools if e is not node.engine]
            worker = self._workers.pop(node.name, None)
        if worker is not None:
            worker.inbox.put(None)

    def _dispatch(self, first: bool = False) -> None:
        # Called with the lock held.
        self._rounds += 1
        plan = self.health.plan()
        if first:
            self._first_left = len(plan.checks)
            if not plan.checks:
                self._first_round.set()
        if self.on_overdue is not None:
            for node in plan.overdue:
                self.on_overdue(node)
        for check in plan.checks:
            name = check.node.name
            worker = self._workers.get(name)
            if worker is None or worker.busy:
                # Busy here means stuck past a downtime (plan() asks again only then):
                # that thread ends when its check does; a new one takes over.
                if worker is not None:
                    worker.inbox.put(None)
                worker = self._workers[name] = _Worker(self, name, self._stop)
            worker.inbox.put(check)

    def run_check(self, check: Check) -> None:
        """Run one check and hand its outcome to the health registry; never raises."""
        try:
            outcome: ReplicaProbe | BaseException = self.probe(check.node)
        except Exception as error:
            outcome = error
        self.health.finish(check, outcome)
        if not self._first_round.is_set():
            with self._lock:
                self._first_left -= 1
                if self._first_left <= 0:
                    self._first_round.set()

    def stop(self, timeout: float = _STOP_WAIT) -> None:
        """Stop the threads and wait up to ``timeout`` for checks in flight to end (a
        hung replica's may not: its daemon thread is left to finish). The next read
        starts the prober again."""
        with self._lock:
            if not self.running:
                return
            self.running = False
            self.ready = False
            self._stop.set()
            thread, workers = self._thread, list(self._workers.values())
            self._workers = {}
            self._first_round.set()
        for worker in workers:
            worker.inbox.put(None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        for worker in workers:
            worker.thread.join(timeout)


def _thread_loop(ref: weakref.ref[ThreadProber], stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        prober = ref()
        if prober is None or not prober.tick():
            return  # its router is gone, or it stopped for want of use
        del prober


class TaskProber:
    """Checks a router's replicas every check interval from an asyncio task.

    The task lives in the event loop of the request that started it; a request in
    another loop (the old one closed, or a fork) starts it again there. A check is a
    task of its own, so a hung replica holds up only its own. The task ends after
    ``idle_stop`` seconds without a request; the next one starts it again.
    """

    def __init__(self, health: Health, probe: Callable[[Node], Awaitable[ReplicaProbe]]) -> None:
        self.health = health
        self.probe = probe
        self.idle_stop = IDLE_STOP
        # Asked at every tick to resolve the replicas again when due (set by the adapter).
        self.discovery: Discovery | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the tasks and rounds (after a fork: they do not exist in the child)."""
        self._rounds = 0
        self._clear()

    def _clear(self) -> None:
        self.used = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()
        self._first: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> bool:
        """Whether the prober's task runs (in whichever loop)."""
        task = self._task
        return task is not None and not task.done()

    def running_in(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether the prober runs in ``loop``."""
        task = self._task
        return self._loop is loop and task is not None and not task.done()

    async def ensure(self) -> None:
        """Start the prober in the running loop unless it runs there. The first start
        (in a process, or since a fork) waits for its first round of checks, at most
        the probe timeout; so do the requests that come meanwhile."""
        self.used = True
        loop = asyncio.get_running_loop()
        if not self.running_in(loop):
            self._start(loop)
        first = self._first
        if first:
            await asyncio.wait(first, timeout=self.health.probe_timeout)
            self._first = set()

    def ensure_started(self) -> None:
        """Start the prober in the running loop, if any, without waiting (sync code)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.used = True
        if not self.running_in(loop):
            self._start(loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        old_loop, old_task = self._loop, self._task
        if old_loop is not None and old_loop is not loop:
            if old_task is not None and not old_loop.is_closed():
                with contextlib.suppress(RuntimeError):  # closed meanwhile
                    old_loop.call_soon_threadsafe(old_task.cancel)
            # Checks of the old loop never answer here: do not wait for them.
            self.health.abandon_checks()
            self._clear()
        self._loop = loop
        self.used = True
        first = self._rounds == 0
        started = self.tick()
        self._first = set(started) if first else set()
        self._task = loop.create_task(self._loop_forever(), name="replicated-prober")

    async def _loop_forever(self) -> None:
        interval = self.health.check_interval
        used_at = self.health.clock()
        while True:
            asleep = self.health.clock()
            await asyncio.sleep(interval)
            now = self.health.clock()
            if self.used:
                self.used = False
                used_at = now
            elif now - used_at > self.idle_stop:
                return  # for want of use
            # How late the loop woke this task is how late it runs every check's
            # answer too: a replica is overdue past the probe timeout plus that.
            self.tick(slack=max(0.0, now - asleep - interval))

    def tick(self, slack: float = 0.0) -> list[asyncio.Task[None]]:
        """Start the checks that are due (once per check interval), as tasks."""
        self._rounds += 1
        started = []
        for check in self.health.plan(slack).checks:
            started.append(self._spawn(self._run_check(check)))
        discovery = self.discovery
        if discovery is not None:
            for work in discovery.work():
                self._spawn(work)  # not waited for by a first round
        return started

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        # A task that stop() waits for, or cancels.
        task = asyncio.ensure_future(work)
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)
        return task

    async def _run_check(self, check: Check) -> None:
        try:
            outcome: ReplicaProbe | BaseException = await self.probe(check.node)
        except Exception as error:
            outcome = error
        self.health.finish(check, outcome)

    async def stop(self, timeout: float = _STOP_WAIT) -> None:
        """Stop the prober's task, wait up to ``timeout`` for checks in flight (they
        hold pooled connections), and cancel those still hung. Call it in the loop it
        runs in, before disposing of the engines; the next request starts it again."""
        task, checks = self._task, set(self._checks)
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if checks:
            _, hung = await asyncio.wait(checks, timeout=timeout)
            for check in hung:
                check.cancel()
            if hung:
                await asyncio.wait(hung)
            self.health.abandon_checks()
        self._clear()
