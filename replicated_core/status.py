"""The state of every node, for ``flask replicated status`` and ``quart replicated status``.

The adapters run the queries this module names and hand the rows (or the errors)
back; this module turns them into a table or JSON, with no credential in either.
"""

from __future__ import annotations

import json
import logging
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .health import describe_error
from .nodes import Node, Role

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from .health import ReplicaState
    from .router import Router

__all__ = [
    "AppStatus",
    "ClusterStatus",
    "DiscoveryStatus",
    "NodeStatus",
    "build_status",
    "reported_by_the_table",
    "status_queries",
]

_PLAIN_SQL = "SELECT 1"

_UNKNOWN = "unknown"

_logger = logging.getLogger("replicated")


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """One line of the status table.

    ``lag_bytes`` is how far the replica's replay trails the primary, in its backend's
    unit (for PostgreSQL, the WAL the primary has flushed and the replica has not
    replayed).
    ``weight`` is the replica's share of reads (``REPLICATED_REPLICA_WEIGHTS``; 0: out
    of rotation), None for the primary.
    ``balanced`` says the replica is one address in front of several servers
    (``REPLICATED_BALANCED_REPLICAS``): its row is the server this check's connection
    reached.
    ``lag_seconds`` is None where nothing tells how long those bytes have waited: one
    check sees bytes waiting but not since when, so a single ``status`` run (a process
    of its own) shows bytes and no time until the replica has caught up.
    """

    name: str
    role: str
    address: str
    reachable: bool
    in_recovery: bool | None
    lag_seconds: float | None
    lag_bytes: int | None
    marked_down: bool
    usable: bool
    error: str | None
    weight: float | None = None
    balanced: bool = False


@dataclass(frozen=True, slots=True)
class DiscoveryStatus:
    """``REPLICATED_REPLICA_DISCOVERY`` as it stands: the DNS name and record type,
    the replicas found (by node name), those still draining after they left, how long
    ago the last resolution that answered was (None: none yet), and the error of the
    last one if it failed (the replicas found before are kept meanwhile)."""

    name: str
    record: str
    interval: float
    replicas: tuple[str, ...]
    draining: tuple[str, ...]
    resolved_ago: float | None
    resolutions: int
    failures: int
    error: str | None

    def to_line(self) -> str:
        """One line for the status table."""
        resolved = (
            "never resolved"
            if self.resolved_ago is None
            else f"resolved {self.resolved_ago:.1f} s ago"
        )
        line = (
            f"discovery: {self.record} records of {self.name} every {self.interval:g} s: "
            f"{len(self.replicas)} replicas, {resolved}"
        )
        if self.error is not None:
            line += f"; the last resolution failed ({self.error}): the replicas found before stay"
        if self.draining:
            line += f"; draining: {', '.join(self.draining)}"
        return line


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    """Every node of one app's router, the sticky mode in force, and replica discovery
    (None without ``REPLICATED_REPLICA_DISCOVERY``)."""

    sticky_mode: str
    nodes: tuple[NodeStatus, ...]
    discovery: DiscoveryStatus | None = None

    @property
    def healthy(self) -> bool:
        """The primary answers, is not a standby, and at least one replica in rotation
        (its weight not 0) is usable."""
        primary = [n for n in self.nodes if n.role == Role.PRIMARY.value]
        replicas = [n for n in self.nodes if n.role == Role.REPLICA.value]
        primary_ok = all(n.reachable and not n.in_recovery for n in primary)
        return primary_ok and any(n.usable and n.weight != 0 for n in replicas)

    def to_json(self) -> str:
        """The status as a JSON document, for scripts."""
        return json.dumps(
            {
                "sticky_mode": self.sticky_mode,
                "healthy": self.healthy,
                "nodes": [asdict(n) for n in self.nodes],
                "discovery": None if self.discovery is None else asdict(self.discovery),
            },
            indent=2,
        )

    def to_table(self) -> str:
        """The status as a plain-text table; the ``balanced`` column only when a replica
        is balanced."""
        header: tuple[str, ...] = (
            "bind",
            "role",
            "address",
            "reachable",
            "recovery",
            "lag s",
            "lag bytes",
            "down",
            "usable",
            "weight",
        )
        rows = [header] + [
            (
                n.name,
                n.role,
                n.address,
                _yes(n.reachable),
                "-" if n.in_recovery is None else _yes(n.in_recovery),
                _lag_cell(n),
                "-" if n.lag_bytes is None else str(n.lag_bytes),
                _yes(n.marked_down),
                "-" if n.role == Role.PRIMARY.value else _yes(n.usable),
                "-" if n.weight is None else f"{n.weight:g}",
            )
            for n in self.nodes
        ]
        if any(n.balanced for n in self.nodes):
            rows = [(*header, "balanced")] + [
                (*row, "-" if n.role == Role.PRIMARY.value else _yes(n.balanced))
                for row, n in zip(rows[1:], self.nodes, strict=True)
            ]
            header = rows[0]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        lines.append(f"sticky mode: {self.sticky_mode}")
        if self.discovery is not None:
            lines.append(self.discovery.to_line())
        lines += [f"{n.name}: {n.error}" for n in self.nodes if n.error]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class AppStatus:
    """Every routed database of one app, by name (``(default)``, then bind keys), each
    with its ``ClusterStatus``: what the status command shows for several databases."""

    databases: tuple[tuple[str, ClusterStatus], ...]

    @property
    def healthy(self) -> bool:
        """Every database is healthy (``ClusterStatus.healthy``)."""
        return all(status.healthy for _, status in self.databases)

    def to_json(self) -> str:
        """The status as a JSON document, for scripts: each database's as
        ``ClusterStatus.to_json`` writes it, under ``databases`` by name."""
        return json.dumps(
            {
                "healthy": self.healthy,
                "databases": {
                    name: json.loads(status.to_json()) for name, status in self.databases
                },
            },
            indent=2,
        )

    def to_table(self) -> str:
        """One table per database, each under a line naming it."""
        return "\n\n".join(
            f"database: {name}\n{status.to_table()}" for name, status in self.databases
        )


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _lag_cell(node: NodeStatus) -> str:
    if node.lag_seconds is not None:
        return f"{node.lag_seconds:.3f}"
    # Bytes known to wait, for a time nothing has measured yet.
    return _UNKNOWN if node.lag_bytes else "-"


@contextmanager
def reported_by_the_table() -> Iterator[None]:
    """Hold back this thread's ``replicated`` log lines while the status command runs.

    The command's table reports every node it finds down or misconfigured; the same
    news as a log line on the terminal would say it twice. Other threads log as usual.
    """
    thread = threading.get_ident()

    def other_threads(record: logging.LogRecord) -> bool:
        return record.thread != thread

    _logger.addFilter(other_threads)
    try:
        yield
    finally:
        _logger.removeFilter(other_threads)


def status_queries(router: Router) -> dict[str, str]:
    """The SQL to run on each node, by node name."""
    probing = router.health.probing
    backends = router.backends
    return {
        node.name: (
            (
                backends[node.name].replica_probe_sql
                if node.role is Role.REPLICA
                else backends[node.name].primary_status_sql
            )
            if probing
            else _PLAIN_SQL
        )
        for node in (router.primary, *router.replicas)
    }


def build_status(
    router: Router, results: Mapping[str, tuple[object, ...] | BaseException]
) -> ClusterStatus:
    """Turn each node's row (or error) from ``status_queries`` into the status."""
    secrets = router.health.secrets
    probing = router.health.probing
    primary_row = results[router.primary.name]
    in_recovery, primary_position = None, None
    if probing and isinstance(primary_row, tuple):
        in_recovery, primary_position = router.backend.primary_status(primary_row)
    nodes = [_primary_status(router.primary, primary_row, in_recovery, secrets)]
    for node in router.replicas:
        row = results.get(node.name)
        if row is None:
            continue  # joined since the queries were named
        weight = router.spread.weight(node)
        balanced = node.name in router.config.balanced_replicas
        if isinstance(row, BaseException):
            router.health.mark_down(node, row)
            nodes.append(
                _unreachable(node, row, secrets, marked_down=True, weight=weight, balanced=balanced)
            )
            continue
        backend = router.backends[node.name]
        probe = backend.replica_probe(row) if probing else None
        checked_at = router.health.clock()
        lag_bytes = None
        if probe is not None:
            router.health.record(node, probe)
            lag_bytes = backend.distance(probe.receive_lsn, probe.replay_lsn)
            if primary_position is not None and probe.replay_lsn is not None:
                lag_bytes = backend.distance(primary_position, probe.replay_lsn)
        state = router.health.states.get(node.name)
        lag_seconds = None if state is None else _lag_seconds(state, lag_bytes, checked_at)
        usable = router.health.usable(node.name)
        if lag_seconds is None and lag_bytes and probe is not None and probe.in_recovery:
            # Bytes waiting for a time one check cannot tell: the router's first check
            # takes the server's figure, which after an idle spell counts the idle time
            # too, and keeps reads away until its next check. Say what is known: a
            # standby that answers, not one found too far behind.
            usable = True
        nodes.append(
            NodeStatus(
                name=node.name,
                role=node.role.value,
                address=address_of(node),
                reachable=True,
                in_recovery=probe.in_recovery if probe is not None else None,
                lag_seconds=lag_seconds,
                lag_bytes=lag_bytes,
                marked_down=False,
                usable=usable,
                error=None
                if probe is None or probe.in_recovery
                else "not in recovery: this is a primary, not a replica",
                weight=weight,
                balanced=balanced,
            )
        )
    discovery = router.discovery.status() if router.discovery is not None else None
    return ClusterStatus(router.sticky_mode.value, tuple(nodes), discovery)


def _lag_seconds(state: ReplicaState, lag_bytes: int | None, checked_at: float) -> float | None:
    """How long the replica has been behind, where the checks so far can tell; else None.

    Bytes waiting have a known age only when an earlier check, not the first of this
    process, saw the oldest of them arrive: the first check cannot tell how long the
    replica was already behind (the server's "age of the last replayed commit" counts
    an idle primary's quiet time), and the check that first sees them, how long they
    waited before it.
    """
    if lag_bytes is None:
        return None
    if lag_bytes == 0:
        return 0.0
    if state.lag_clock.known_since(checked_at) is not None:
        return state.lag_seconds
    return None


def _primary_status(
    node: Node,
    row: tuple[object, ...] | BaseException,
    in_recovery: bool | None,
    secrets: tuple[str, ...],
) -> NodeStatus:
    if isinstance(row, BaseException):
        return _unreachable(node, row, secrets, marked_down=False)
    return NodeStatus(
        name=node.name,
        role=node.role.value,
        address=address_of(node),
        reachable=True,
        in_recovery=in_recovery,
        lag_seconds=None,
        lag_bytes=None,
        marked_down=False,
        usable=True,
        error="in recovery: this is a standby, not the primary" if in_recovery else None,
    )


def _unreachable(
    node: Node,
    error: BaseException,
    secrets: tuple[str, ...],
    *,
    marked_down: bool,
    weight: float | None = None,
    balanced: bool = False,
) -> NodeStatus:
    return NodeStatus(
        name=node.name,
        role=node.role.value,
        address=address_of(node),
        reachable=False,
        in_recovery=None,
        lag_seconds=None,
        lag_bytes=None,
        marked_down=marked_down,
        usable=False,
        error=describe_error(error, secrets),
        weight=weight,
        balanced=balanced,
    )


def address_of(node: Node) -> str:
    """Where a node is, without its password: ``host:port/database`` or a file path."""
    url = node.engine.url
    if url.get_backend_name() == "sqlite":
        return url.database or ":memory:"
    return f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"
