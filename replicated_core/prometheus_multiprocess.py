"""prometheus_client's multiprocess mode for pre-forking servers (gunicorn, uWSGI):
each worker copies its routers' metrics into the files of ``PROMETHEUS_MULTIPROC_DIR``
every second or so, and a scrape of any worker merges every worker's files.

A custom collector's values live in the memory of the process that has them, so
``register()`` of ``prometheus`` reports only the worker that answers a scrape.
``register_multiprocess()`` instead keeps, in each process, prometheus_client metrics of
the same names, labels and help (counters, gauges with ``livemostrecent``, the catch-up
histogram), and sets them from ``ReplicatedCollector`` in a daemon thread. The scrape
side is prometheus_client's own ``MultiProcessCollector``.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram, values

from .prometheus import ReplicatedCollector, labelled
from .router import live_routers

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from prometheus_client.metrics_core import Metric

    from .router import Router

__all__ = ["MultiprocessMirror", "register_multiprocess"]

logger = logging.getLogger("replicated")

_Metric = Counter | Gauge

_WAITS = "replicated_catch_up_wait_seconds"


class MultiprocessMirror:
    """Copies every live router's metrics into prometheus_client metrics of this
    process, which write to the multiprocess files.

    ``sync()`` copies once: counters by how much they grew since the last copy,
    gauges as they are now (merged across workers by the value a live one set last: an
    idle worker checks no replica and sets none), and each catch-up wait observed
    since. ``start()`` runs it every ``interval``
    seconds in a daemon thread; after a fork, the child starts its own.
    """

    def __init__(
        self, interval: float = 1.0, routers: Callable[[], Sequence[Router]] = live_routers
    ) -> None:
        if not interval > 0:
            raise ValueError("The interval must be a positive number of seconds.")
        self.interval = interval
        self._routers = routers
        self._collector = ReplicatedCollector(routers)
        self._metrics: dict[str, _Metric] = {}
        self._histogram: Histogram | None = None
        self._reset()

    def _reset(self) -> None:
        # The counters' values at the last copy, by sample name and label values.
        self._copied: dict[tuple[str, tuple[str, ...]], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Copy now and then every ``interval`` seconds, in a daemon thread."""
        thread = threading.Thread(target=self._run, name="replicated-metrics", daemon=True)
        self._thread = thread
        thread.start()

    def stop(self) -> None:
        """Stop the thread (one last copy is not made)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 1.0)

    def before_fork(self) -> None:
        """Right before a fork: wait for a copy in progress, and hold off the next until
        the fork is done. prometheus_client's multiprocess values share one lock, which
        nothing resets in a child: forked while this thread held it, the child would
        wait for it forever."""
        self._lock.acquire()

    def after_fork_in_parent(self) -> None:
        self._lock.release()

    def after_fork(self) -> None:
        """In a child right after a fork: the parent's thread is not here, and its
        routers' counters start from 0 again; copy afresh from a thread of our own
        (not here: nothing in an at-fork handler may wait)."""
        running = self._thread is not None and not self._stop.is_set()
        self._reset()
        for router in self._routers():
            if router.catch_up is not None:
                router.catch_up.durations.drain()  # the parent's, not yet copied
        if running:
            self.start()

    def sync(self) -> None:
        """Copy every router's metrics once."""
        with self._lock:
            waits_help = ""
            for family in self._collector.collect():
                if family.type == "histogram":
                    waits_help = family.documentation  # copied sample by sample, below
                else:
                    self._copy(family)
            for (app, database), router in labelled(self._routers()):
                catch_up = router.catch_up
                if catch_up is None:
                    continue
                durations = catch_up.durations
                durations.keep_samples()
                samples = durations.drain()
                if samples:
                    child = self._waits(waits_help, durations.bounds).labels(app, database)
                    for seconds in samples:
                        child.observe(seconds)

    def _copy(self, family: Metric) -> None:
        for sample in family.samples:
            names = tuple(sample.labels)
            values = tuple(sample.labels.values())
            metric = self._metric(family.name, family.type, names, family.documentation)
            child = metric.labels(*values)
            if isinstance(child, Counter):
                key = (sample.name, values)
                copied = self._copied.get(key, 0.0)
                # Fewer than last time: the router's counters started afresh.
                grown = sample.value - copied if sample.value >= copied else sample.value
                if grown:
                    child.inc(grown)
                self._copied[key] = sample.value
            elif isinstance(child, Gauge):
                child.set(sample.value)

    def _metric(self, name: str, kind: str, labels: Sequence[str], documentation: str) -> _Metric:
        metric = self._metrics.get(name)
        if metric is None:
            # registry=None: these only write to the files; the scrape reads those.
            if kind == "counter":
                metric = Counter(name, documentation, labels, registry=None)
            else:
                # The value set last by a live worker: one checks its replicas while
                # it serves requests, and writes nothing while idle (see prometheus).
                metric = Gauge(
                    name,
                    documentation,
                    labels,
                    registry=None,
                    multiprocess_mode="livemostrecent",
                )
            self._metrics[name] = metric
        return metric

    def _waits(self, documentation: str, bounds: Sequence[float]) -> Histogram:
        if self._histogram is None:
            self._histogram = Histogram(
                _WAITS,
                documentation,
                ("app", "database"),
                registry=None,
                buckets=(*bounds, float("inf")),
            )
        return self._histogram

    def _run(self) -> None:
        while True:
            try:
                self.sync()
            except Exception:
                logger.exception("Could not copy the router metrics to the multiprocess files.")
            if self._stop.wait(self.interval):
                return


_MIRROR: MultiprocessMirror | None = None


def register_multiprocess(interval: float = 1.0) -> MultiprocessMirror:
    """Copy every live router's metrics into ``PROMETHEUS_MULTIPROC_DIR`` every
    ``interval`` seconds, in this process and in every process forked from it.

    Call it once per process, where the app is made (before gunicorn forks, with
    ``--preload``, or in each worker without it); a second call returns the first
    mirror. Raises RuntimeError when prometheus_client is not in multiprocess mode.
    """
    global _MIRROR
    if values.ValueClass is values.MutexValue:  # chosen when prometheus_client was imported
        raise RuntimeError(
            "register_multiprocess() needs prometheus_client's multiprocess mode: set "
            "PROMETHEUS_MULTIPROC_DIR to a directory the workers share (emptied before "
            "the server starts) before prometheus_client is first imported. In one "
            "process, use replicated_core.prometheus.register() instead."
        )
    if _MIRROR is None:
        _MIRROR = MultiprocessMirror(interval)
        _MIRROR.start()
    return _MIRROR


def _before_fork() -> None:
    if _MIRROR is not None:
        _MIRROR.before_fork()


def _after_fork_in_parent() -> None:
    if _MIRROR is not None:
        _MIRROR.after_fork_in_parent()


def _after_fork_in_child() -> None:
    if _MIRROR is not None:
        _MIRROR.after_fork()


# Registered after the router module's own handler (imported above), so the routers
# have their fresh counters when the child's mirror starts.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
