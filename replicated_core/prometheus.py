"""A Prometheus collector for every router of the process, on prometheus_client
(``pip install replicated-router[prometheus]``); the core imports it nowhere else.

``register()`` adds one collector to a registry (prometheus_client's default one
unless given); each scrape reads every live router, so apps created later are covered
too, each under its own ``app`` label. The values are this process's; for
prometheus_client's multiprocess mode (gunicorn's workers), see
``prometheus_multiprocess``.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from .router import live_routers
from .scope import REQUESTS_BY

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence

    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from .backends import Position
    from .router import Router

__all__ = ["ReplicatedCollector", "labelled", "register"]

# Router.metrics() names counted as such, with their help text.
_COUNTERS = (
    ("writes", "Requests that wrote to the primary."),
    ("sticky_hits", "Requests that came with a valid sticky token (cookie or header)."),
    ("fallbacks", "Read requests the primary served because no replica was usable."),
    ("retries", "Reads sent to another node after their replica failed."),
    ("replicas_marked_down", "Times a replica was marked down after a failure."),
    ("position_checks", "Rounds of replica position checks."),
    (
        "catch_up_waits",
        "Sticky reads that no replica could serve from the cached positions, so"
        " turned to the short wait for one.",
    ),
    ("catch_up_checks", "Catch-up queries run on a replica."),
    ("catch_up_timeouts", "Catch-up queries that ended before the replica replayed the write."),
    (
        "balanced_checks",
        "Position checks of a sticky read on its own connection to a balanced replica.",
    ),
    (
        "balanced_known",
        "Sticky reads whose connection to a balanced replica had replayed the write already.",
    ),
    (
        "balanced_behind",
        "Sticky reads moved to the primary: their connection to a balanced replica was behind.",
    ),
    (
        "discovery_resolutions",
        "DNS resolutions of REPLICATED_REPLICA_DISCOVERY that answered with replicas.",
    ),
    (
        "discovery_failures",
        "DNS resolutions of REPLICATED_REPLICA_DISCOVERY that failed (the last set is kept).",
    ),
)


class ReplicatedCollector(Collector):
    """Collects the routers' counters, replica gauges and catch-up wait histogram.

    ``routers`` returns the routers to report (default: every live one, oldest first).
    Each is labelled ``app`` (its app's name; a second app of the same name in the
    process gets "-2", and so on, in creation order) and ``database`` (its primary's
    bind name).
    """

    def __init__(self, routers: Callable[[], Sequence[Router]] = live_routers) -> None:
        self._routers = routers

    def collect(self) -> Iterator[Metric]:
        """Every metric family, read from the routers now."""
        labels = ["app", "database"]
        node_labels = [*labels, "node"]
        requests = CounterMetricFamily(
            "replicated_requests",
            "Requests seen by the router, whether or not they used the database.",
            labels=labels,
        )
        decisions = CounterMetricFamily(
            "replicated_decisions",
            "Requests by the node their reads went to and why, as decided at their first"
            " statement.",
            labels=[*node_labels, "reason"],
        )
        counters = {
            name: CounterMetricFamily(f"replicated_{name}", text, labels=labels)
            for name, text in _COUNTERS
        }
        gauges = {
            "lag_seconds": GaugeMetricFamily(
                "replicated_replica_lag_seconds",
                "How long the replica's replay has trailed, as of its last check.",
                labels=node_labels,
            ),
            "lag_bytes": GaugeMetricFamily(
                "replicated_replica_lag_bytes",
                "Bytes of WAL the replica has not replayed, behind the furthest position"
                " any replica of the router has received (no query to the primary).",
                labels=node_labels,
            ),
            "up": GaugeMetricFamily(
                "replicated_replica_up",
                "1 if the replica answered its last check and is not marked down (not"
                " reported while this process checks no replica: idle, or not started).",
                labels=node_labels,
            ),
            "usable": GaugeMetricFamily(
                "replicated_replica_usable",
                "1 if the replica may serve reads now.",
                labels=node_labels,
            ),
            "weight": GaugeMetricFamily(
                "replicated_replica_weight",
                "The replica's share of reads relative to the others (all weigh 1 today).",
                labels=node_labels,
            ),
        }
        waits = HistogramMetricFamily(
            "replicated_catch_up_wait_seconds",
            "How long sticky reads that waited for a replica to replay their client's"
            " write waited.",
            labels=labels,
        )
        for (app, database), router in labelled(self._routers()):
            base = [app, database]
            metrics = router.metrics()
            requests.add_metric(base, metrics.get("requests_total", 0))
            for name, count in metrics.items():
                if name.startswith(REQUESTS_BY):
                    reason, _, node = name.removeprefix(REQUESTS_BY).partition(".")
                    decisions.add_metric([*base, node, reason], count)
            for name, family in counters.items():
                family.add_metric(base, metrics.get(name, 0))
            _add_replicas(router, base, gauges)
            if router.catch_up is not None:
                durations = router.catch_up.durations
                counts, total = durations.snapshot()
                cumulative: list[tuple[str, float]] = []
                running = 0
                for bound, count in zip((*durations.bounds, math.inf), counts, strict=True):
                    running += count
                    cumulative.append((_bound(bound), float(running)))
                waits.add_metric(base, cumulative, total)
        yield requests
        yield decisions
        yield from counters.values()
        yield from gauges.values()
        yield waits


def register(registry: CollectorRegistry = REGISTRY) -> ReplicatedCollector:
    """Register a ``ReplicatedCollector`` of every live router with ``registry``; once
    per process (a second one in the same registry is refused as a duplicate)."""
    collector = ReplicatedCollector()
    registry.register(collector)
    return collector


def labelled(routers: Iterable[Router]) -> Iterator[tuple[tuple[str, str], Router]]:
    """Each router with its ``app`` and ``database`` labels, in the order given: a
    second app of the same name is "name-2", and so on; the routers of one app's
    several databases share its label."""
    seen: Counter[tuple[str, str]] = Counter()
    for router in routers:
        name = router.name or "app"
        key = (name, router.primary.name)
        seen[key] += 1
        app = name if seen[key] == 1 else f"{name}-{seen[key]}"
        yield (app, router.primary.name), router


def _add_replicas(router: Router, base: list[str], gauges: dict[str, GaugeMetricFamily]) -> None:
    health = router.health
    now = health.clock()
    states = list(health.states.values())
    # The furthest position any replica has received or replayed: a lower bound of the
    # primary's, known without a query (``flask replicated status`` asks the primary).
    furthest: Position | None = None
    for state in states:
        probe = state.probe
        if probe is None:
            continue
        for position in (probe.receive_lsn, probe.replay_lsn):
            if position is not None and (furthest is None or not furthest >= position):
                furthest = position
    # A process that serves no request stops checking after a while: what it knows of
    # its replicas is then of its last check, maybe long ago, and it reports none of
    # it (a replica that went down meanwhile must not read as up).
    prober = router.prober
    checking = not health.probing or (prober is not None and prober.running)
    for state in states:
        node = state.node
        labels = [*base, node.name]
        gauges["weight"].add_metric(labels, router.spread.weight(node))
        if not checking:
            continue
        probe = state.probe
        down = now < state.down_until or state.down_since is not None
        answered = probe is not None or not health.probing
        up = answered and not down and state.overdue_since is None
        gauges["up"].add_metric(labels, 1.0 if up else 0.0)
        gauges["usable"].add_metric(labels, 1.0 if health.usable(node.name) else 0.0)
        if probe is None:
            continue  # nothing known of its replay: no lag to report
        gauges["lag_seconds"].add_metric(labels, state.lag_seconds)
        backend = router.backends.get(node.name)  # None: it left DNS during the scrape
        lag_bytes = None if backend is None else backend.distance(furthest, probe.replay_lsn)
        if lag_bytes is not None:
            gauges["lag_bytes"].add_metric(labels, float(lag_bytes))


def _bound(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(bound)
