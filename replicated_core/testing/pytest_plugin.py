"""pytest fixtures that start real PostgreSQL streaming-replication clusters.

Registered through the ``pytest11`` entry point, so installing the project is enough.
That also means every pytest run of every project that installs it loads this module:
it imports only the standard library and pytest, and the harness
(``replicated_core.testing.pgcluster``, which needs psycopg and a POSIX system) only when a
fixture runs. Where the tools are missing (a POSIX system, psycopg, the PostgreSQL
server binaries) the fixtures skip the test with the reason, or fail it when the
environment variable ``REPLICATED_REQUIRE_POSTGRES=1`` is set (as CI does).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from replicated_core.testing.dnsserver import DnsServer
    from replicated_core.testing.hacluster import HaCluster
    from replicated_core.testing.haproxy import BalancedAddress
    from replicated_core.testing.pgcluster import PgCluster, PgNode, ReplicaSpec

    ClusterFactory = Callable[[Sequence[ReplicaSpec]], PgCluster]
    BalancerFactory = Callable[[Sequence[PgNode]], BalancedAddress]
    HaClusterFactory = Callable[..., HaCluster]

__all__ = [
    "dns_server",
    "ha_cluster_factory",
    "haproxy_factory",
    "pg_cluster",
    "pg_cluster_factory",
]

REQUIRE_POSTGRES_ENV = "REPLICATED_REQUIRE_POSTGRES"

# The harness pauses servers with SIGSTOP and, as root, runs them as another OS user.
_POSIX = os.name == "posix"


def _find_bindir() -> tuple[Path | None, str]:
    """The PostgreSQL server binaries' directory, or None and why the cluster
    fixtures cannot run here."""
    if not _POSIX:
        return None, (
            "The PostgreSQL cluster fixtures run only on POSIX systems such as Linux: they"
            " pause servers with signals and, as root, run them as the OS user 'postgres'."
        )
    try:
        import psycopg  # noqa: F401  (the harness's driver: imported here, not at load)
    except ImportError:
        return None, (
            "The PostgreSQL cluster fixtures need psycopg, which is not installed. Install it"
            " ('pip install \"replicated-router[postgresql]\"') to run the tests that need it."
        )
    from replicated_core.testing import pgcluster

    bindir = pgcluster.find_bindir()
    if bindir is None:
        return None, (
            "PostgreSQL server binaries were not found by 'pg_config --bindir' nor in"
            " '/usr/lib/postgresql/*/bin'. Install the PostgreSQL server (Debian: 'apt-get"
            " install postgresql') to run the tests that need it."
        )
    return bindir, ""


def _bindir_or_skip() -> Path:
    bindir, reason = _find_bindir()
    if bindir is not None:
        return bindir
    if os.environ.get(REQUIRE_POSTGRES_ENV) == "1":
        pytest.fail(
            f"{reason} {REQUIRE_POSTGRES_ENV}=1 is set, so this fails instead of skipping;"
            f" unset it or set {REQUIRE_POSTGRES_ENV}=0 to skip them.",
            pytrace=False,
        )
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_cluster_factory() -> Iterator[ClusterFactory]:
    """Start PostgreSQL clusters on demand: ``pg_cluster_factory([ReplicaSpec("r")])``.

    Each call starts a new primary with the given replicas; all are stopped and deleted at
    the end of the session. Use it for tests that stop, pause or break nodes.
    """
    bindir = _bindir_or_skip()
    from replicated_core.testing.pgcluster import PgCluster

    # Not tmp_path_factory: /tmp/pytest-of-root is private to root, and the servers run as
    # the OS user 'postgres' when the tests run as root.
    root = Path(tempfile.mkdtemp(prefix="replicated-pg-"))
    root.chmod(0o755)
    clusters: list[PgCluster] = []
    numbers = itertools.count()

    def start(replicas: Sequence[ReplicaSpec]) -> PgCluster:
        cluster = PgCluster.start(root / f"cluster{next(numbers)}", replicas, bindir=bindir)
        clusters.append(cluster)
        return cluster

    try:
        yield start
    finally:
        for cluster in reversed(clusters):
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster(pg_cluster_factory: ClusterFactory) -> PgCluster:
    """A primary with the replicas 'replica' (no delay) and 'lagging' (500 ms apply delay).

    Shared by the whole session: leave its nodes running and unpaused.
    """
    from replicated_core.testing.pgcluster import ReplicaSpec

    return pg_cluster_factory([ReplicaSpec("replica"), ReplicaSpec("lagging", apply_delay_ms=500)])


def _ha_tools_or_skip() -> None:
    _bindir_or_skip()
    from replicated_core.testing.hacluster import find_patroni

    missing = [tool for tool in ("etcd", "haproxy", "pgbouncer") if shutil.which(tool) is None]
    if find_patroni() is None:
        missing.append("patroni")
    if not missing:
        return
    reason = (
        f"The HA cluster fixtures need {', '.join(missing)}: './dev test' installs them"
        " (Debian's etcd-server, haproxy, pgbouncer; Patroni into .venv-patroni)."
    )
    if os.environ.get(REQUIRE_POSTGRES_ENV) == "1":
        pytest.fail(f"{reason} {REQUIRE_POSTGRES_ENV}=1 is set, so this fails.", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def ha_cluster_factory() -> Iterator[HaClusterFactory]:
    """Start Patroni-managed clusters on demand (``replicated_core.testing.hacluster``):
    ``ha_cluster_factory(synchronous_mode=True, pgbouncer=True)``: etcd, three nodes,
    HAProxy's write and read ports, and PgBouncer if asked. All are stopped and deleted
    at the end of the session."""
    _ha_tools_or_skip()
    from replicated_core.testing.hacluster import HaCluster

    root = Path(tempfile.mkdtemp(prefix="replicated-ha-"))
    root.chmod(0o755)
    clusters: list[HaCluster] = []
    numbers = itertools.count()

    def start(**options: bool) -> HaCluster:
        cluster = HaCluster.start(root / f"ha{next(numbers)}", **options)
        clusters.append(cluster)
        return cluster

    try:
        yield start
    finally:
        for cluster in reversed(clusters):
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def haproxy_factory() -> Iterator[BalancerFactory]:
    """Start HAProxy on loopback in front of replicas: ``haproxy_factory([r1, r2])``
    (nodes of a cluster) returns a ``BalancedAddress`` whose port balances new
    connections over them round-robin (``mode tcp``); each is stopped at the end of
    the session. Skips without the ``haproxy`` binary (fails instead when
    ``REPLICATED_REQUIRE_POSTGRES=1``: CI installs both)."""
    from replicated_core.testing.haproxy import BalancedAddress, find_haproxy

    binary = find_haproxy()
    if binary is None:
        reason = (
            "HAProxy was not found on PATH nor in /usr/sbin. Install it (Debian: 'apt-get"
            " install haproxy') to run the tests of replicas behind one address."
        )
        if os.environ.get(REQUIRE_POSTGRES_ENV) == "1":
            pytest.fail(f"{reason} {REQUIRE_POSTGRES_ENV}=1 is set.", pytrace=False)
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="replicated-haproxy-"))
    running: list[BalancedAddress] = []

    def start(nodes: Sequence[PgNode]) -> BalancedAddress:
        balancer = BalancedAddress.start(root, [(n.name, n.port) for n in nodes], binary=binary)
        running.append(balancer)
        return balancer

    try:
        yield start
    finally:
        for balancer in running:
            balancer.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def dns_server(tmp_path: Path) -> Iterator[DnsServer]:
    """A DNS server (dnsmasq) on a free loopback port with no records, stopped at the
    end of the test: ``dns_server.set_a("replicas.test", ["127.0.0.2"])``.

    Skips the test where dnsmasq or dnspython is missing (fails it with
    ``REPLICATED_REQUIRE_POSTGRES=1``, as for the PostgreSQL fixtures).
    """
    from replicated_core.testing.dnsserver import DnsServer, find_dnsmasq

    reason = ""
    try:
        import dns.resolver  # noqa: F401  (what the server's answers are checked with)
    except ImportError:
        reason = (
            "The DNS server fixture needs dnspython, which is not installed. Install it"
            " ('pip install \"replicated-router[discovery]\"')."
        )
    binary = find_dnsmasq()
    if binary is None:
        reason = (
            "dnsmasq was not found, which the DNS server fixture runs. Install it"
            " (Debian: 'apt-get install dnsmasq-base')."
        )
    if reason:
        if os.environ.get(REQUIRE_POSTGRES_ENV) == "1":
            pytest.fail(f"{reason} {REQUIRE_POSTGRES_ENV}=1 is set.", pytrace=False)
        pytest.skip(reason)
    server = DnsServer.start_in(tmp_path / "dns", binary)
    try:
        yield server
    finally:
        server.stop()
