"""When the primary changes (issue 16): a Patroni-managed cluster of three nodes, with
etcd, HAProxy's write port as the app's primary URL and the three nodes' own URLs as
its replicas (whichever is the leader is "not in recovery" and takes no reads), served
by gunicorn (Flask, gthread) and hypercorn (Quart), 100 concurrent HTTP clients.

Each scenario runs the load before, during and after a switchover (``patronictl``) or
a failover (SIGKILL of the leader's postmaster), and reports what the clients saw under
"reliability figures" at the end of the run: failed reads (the target is 0), the
window in which writes failed, and whether every write that answered success is on
the new leader exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import ServerProcess, listening_socket

pytestmark = [pytest.mark.ha, pytest.mark.slow]

APPS = Path(__file__).parent / "server_apps"
HOST = "127.0.0.1"
CLIENTS = 100
WRITERS = 20  # of the clients; the others read
BEFORE = 3.0  # seconds of load before the change
AFTER = 4.0  # seconds of load once writes succeed again
PHASE_CAP = 60.0  # every load loop stops by then, whatever happened
REQUEST_TIMEOUT = 20.0
START_TIMEOUT = 60.0
DEBUG_HEADER = "X-Replicated-Node"
# Quick checks and short downtimes, as the HA section of the README recommends.
APP_CONFIG = {
    "REPLICATED_CONNECT_TIMEOUT": 1,
    "REPLICATED_REPLICA_DOWNTIME": 1,
    "REPLICATED_DEBUG_HEADER": DEBUG_HEADER,
    "SQLALCHEMY_ENGINE_OPTIONS": {"pool_pre_ping": True},
}


@pytest.fixture(scope="module")
def ha(ha_cluster_factory: Callable[..., Any]) -> Iterator[Any]:
    cluster = ha_cluster_factory(pgbouncer=True)
    _create_table(cluster)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def ha_sync(ha_cluster_factory: Callable[..., Any]) -> Iterator[Any]:
    cluster = ha_cluster_factory(synchronous_mode=True)
    _create_table(cluster)
    yield cluster
    cluster.stop()


def _create_table(cluster: Any) -> None:
    cluster.execute_on_leader(
        "CREATE TABLE server_items (id SERIAL PRIMARY KEY, token VARCHAR(64) NOT NULL UNIQUE)"
    )
    [(seed,)] = cluster.execute_on_leader(
        "INSERT INTO server_items (token) VALUES ('seed') RETURNING id"
    )
    cluster.seed_id = seed
    cluster.wait_for_replicas(len(cluster.nodes) - 1)


# -- the server -----------------------------------------------------------------------


def _commands(adapter: str, bind: str) -> list[str]:
    if adapter == "flask":
        return [
            *(sys.executable, "-m", "gunicorn", "--bind", bind, "--workers", "2"),
            *("--worker-class", "gthread", "--threads", "50", "--timeout", "30"),
            "flask_app:app",
        ]
    return [
        *(sys.executable, "-m", "hypercorn", "--bind", bind, "--workers", "2"),
        *("--graceful-timeout", "5", "quart_app:app"),
    ]


@contextlib.contextmanager
def _server(
    cluster: Any,
    adapter: str,
    tmp_path: Path,
    urls: dict[str, str] | None = None,
    async_urls: dict[str, str] | None = None,
    **config: Any,
) -> Iterator[str]:
    """The test app (tests/server_apps) served on loopback by gunicorn (Flask) or
    hypercorn (Quart), 2 workers; its URL. Its primary is HAProxy's write port and its
    replicas the nodes (unless ``urls``/``async_urls`` say otherwise). Stopped with all
    its processes at the end."""
    nodes = {node.name: node for node in cluster.nodes}
    settings = {
        "urls": urls
        or {"primary": cluster.write_url("psycopg")}
        | {name: node.url("psycopg") for name, node in nodes.items()},
        "async_urls": async_urls
        or {"primary": cluster.write_url("asyncpg")}
        | {name: node.url("asyncpg") for name, node in nodes.items()},
        "replicas": list(nodes),
        "secret_key": secrets.token_hex(16),
        "query_at_import": False,
        "config": {**APP_CONFIG, **config},
    }
    env = {
        **os.environ,
        "SERVERS_TEST_SETTINGS": json.dumps(settings),
        "PYTHONPATH": os.pathsep.join([str(APPS), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHONUNBUFFERED": "1",
    }
    with listening_socket(HOST) as sock:
        server = ServerProcess.start(
            adapter,
            _commands(adapter, f"fd://{sock.fileno()}"),
            cwd=APPS,
            env=env,
            log_path=tmp_path / f"{adapter}.log",
            pass_fds=[sock.fileno()],
            redact=lambda text: text.replace(cluster.password, "********"),
        )
        url = f"http://{HOST}:{sock.getsockname()[1]}"
    try:
        server.wait_until_answering(f"{url}/health", START_TIMEOUT)
        yield url
    finally:
        server.stop(signal.SIGINT)
        _LOGS[adapter] = server.log()


_LOGS: dict[str, str] = {}


def _exceptions(log: str) -> list[str]:
    """The distinct exception lines of a server log, with the request each was in, and
    the router's word on each replica (down, overdue, not in recovery, back)."""
    found: list[str] = []
    for line in log.splitlines():
        if (
            "Exception on request" in line
            or re.match(r"^[\w.]+(Error|Exception):", line)
            or line.startswith("Replica '")
        ) and line[:160] not in found:
            found.append(line[:160])
    return found


# -- the load ---------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one request saw: when it ended (monotonic), its kind, and how it went."""

    at: float
    kind: str  # "read" or "write"
    ok: bool
    node: str | None = None  # the router's choice (the debug header)
    in_recovery: bool | None = None  # the answering server's own word
    token: str | None = None
    error: str = ""
    began: float = 0.0  # when it was sent


@dataclass
class Load:
    url: str
    seed_id: int
    stop: threading.Event = field(default_factory=threading.Event)
    outcomes: list[Outcome] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, index: int) -> None:
        deadline = time.monotonic() + PHASE_CAP
        writer = index < WRITERS
        with httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT) as client:
            while not self.stop.is_set() and time.monotonic() < deadline:
                began = time.monotonic()
                outcomes = self._write(client) if writer else [self._read(client)]
                for outcome in outcomes:
                    outcome.began = outcome.began or began
                with self._lock:
                    self.outcomes.extend(outcomes)
                if not all(outcome.ok for outcome in outcomes):
                    time.sleep(0.05)  # a client retries, not hammers

    def _read(self, client: httpx.Client) -> Outcome:
        try:
            response = client.get(f"/items/{self.seed_id}")
        except httpx.HTTPError as error:
            return Outcome(time.monotonic(), "read", False, error=repr(error))
        now = time.monotonic()
        if response.status_code != 200:
            return Outcome(now, "read", False, error=f"{response.status_code}")
        body = response.json()
        node = response.headers.get(DEBUG_HEADER)
        return Outcome(now, "read", True, node, body["in_recovery"])

    def _write(self, client: httpx.Client) -> list[Outcome]:
        # A POST, then (if it answered success) the writer's own GET of its row, with
        # the sticky cookie the POST set: read-your-writes across the change.
        token = uuid.uuid4().hex
        try:
            response = client.post("/items", data={"token": token})
        except httpx.HTTPError as error:
            # No answer: whether it committed is unknown (not counted as a success).
            return [Outcome(time.monotonic(), "write", False, token=token, error=repr(error))]
        now = time.monotonic()
        if response.status_code != 201:
            return [Outcome(now, "write", False, token=token, error=f"{response.status_code}")]
        written = Outcome(now, "write", True, token=token)
        began = time.monotonic()
        try:
            read = client.get(f"/items/{response.json()['id']}")
        except httpx.HTTPError as error:
            return [
                written,
                Outcome(
                    time.monotonic(), "sticky", False, token=token, error=repr(error), began=began
                ),
            ]
        sticky = Outcome(
            time.monotonic(), "sticky", read.status_code in (200, 404), token=token, began=began
        )
        if read.status_code == 200:
            sticky.node = read.headers.get(DEBUG_HEADER)
            sticky.in_recovery = read.json()["in_recovery"]
        elif read.status_code == 404:
            sticky.error = "stale"  # the row its own write made was not there
        else:
            sticky.error = f"{read.status_code}"
        return [written, sticky]


def _run_through(
    cluster: Any, url: str, change: Callable[[], Any]
) -> tuple[list[Outcome], float, float, str]:
    """The load before, during and after ``change()``; the outcomes, when the change
    started and ended (writes accepted on the new leader), and the new leader's name."""
    load = Load(url, cluster.seed_id)
    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(load.run, index) for index in range(CLIENTS)]
        try:
            time.sleep(BEFORE)
            started = time.monotonic()
            new_leader = change()
            ended = time.monotonic()
            _wait_for_successful_writes(load, ended)
            time.sleep(AFTER)
        finally:
            load.stop.set()
            for future in futures:
                future.result()
    return load.outcomes, started, ended, new_leader.name


def _wait_for_successful_writes(load: Load, since: float) -> None:
    deadline = time.monotonic() + PHASE_CAP / 2
    while time.monotonic() < deadline:
        with load._lock:
            if any(o.kind == "write" and o.ok and o.at > since for o in load.outcomes):
                return
        time.sleep(0.1)


def _rows(cluster: Any, tokens: list[str]) -> dict[str, int]:
    """How many rows the leader holds of each token."""
    if not tokens:
        return {}
    listed = ",".join(f"'{token}'" for token in tokens)
    rows = cluster.execute_on_leader(
        f"SELECT token, count(*) FROM server_items WHERE token IN ({listed}) GROUP BY token"
    )
    return {token: count for token, count in rows}


@dataclass
class Report:
    reads: int
    failed_reads: list[Outcome]
    writes_ok: int
    failed_writes: list[Outcome]
    window: float  # seconds from the first failed write to the last
    lost: list[str]  # tokens answered with success but not on the new leader
    doubled: list[str]
    sticky_reads: int  # writers' reads of their own rows
    stale: list[Outcome]  # ... that missed a row the new leader has
    failed_sticky: int

    def figures(self) -> dict[str, Any]:
        return {
            "reads": self.reads,
            "failed reads": len(self.failed_reads),
            "writes answered success": self.writes_ok,
            "failed writes": len(self.failed_writes),
            "within (s)": round(self.window, 1),
            "lost": len(self.lost),
            "doubled": len(self.doubled),
            "writers' reads": self.sticky_reads,
            "stale": len(self.stale),
            "writers' reads failed": self.failed_sticky,
        }


def _report(cluster: Any, outcomes: list[Outcome]) -> Report:
    reads = [o for o in outcomes if o.kind == "read"]
    writes = [o for o in outcomes if o.kind == "write"]
    failed_writes = [o for o in writes if not o.ok]
    window = (
        max(o.at for o in failed_writes) - min(o.at for o in failed_writes)
        if failed_writes
        else 0.0
    )
    succeeded = [o.token for o in writes if o.ok and o.token is not None]
    counts = _rows(cluster, succeeded)
    sticky = [o for o in outcomes if o.kind == "sticky"]
    return Report(
        reads=len(reads),
        failed_reads=[o for o in reads if not o.ok],
        writes_ok=len(succeeded),
        failed_writes=failed_writes,
        window=window,
        lost=[t for t in succeeded if counts.get(t, 0) == 0],
        doubled=[t for t in succeeded if counts.get(t, 0) > 1],
        sticky_reads=len(sticky),
        # A write PostgreSQL lost cannot be read back; any other miss is a stale read.
        stale=[o for o in sticky if o.error == "stale" and counts.get(o.token or "", 0) > 0],
        failed_sticky=len([o for o in sticky if not o.ok]),
    )


def _misrouted(outcomes: list[Outcome], after: float) -> list[Outcome]:
    """Reads sent after ``after`` that the router sent to a replica URL whose server
    answered that it is not in recovery: a promoted node still taking reads."""
    return [
        o
        for o in outcomes
        if o.kind == "read"
        and o.ok
        and o.began > after
        and o.node != "master"
        and o.in_recovery is False
    ]


# -- the scenarios ------------------------------------------------------------------------


def _switchover(cluster: Any) -> Callable[[], Any]:
    return lambda: cluster.switchover()


def _failover(cluster: Any) -> Callable[[], Any]:
    def change() -> Any:
        old = cluster.wait_for_leader()
        old.kill_postmaster()
        return cluster.wait_for_leader(other_than=old.name)

    return change


@pytest.mark.parametrize("adapter", ["flask", "quart"])
@pytest.mark.parametrize("event", ["switchover", "failover"])
def test_primary_changes_under_load(
    ha: Any, adapter: str, event: str, tmp_path: Path, reliability: Any
) -> None:
    """Reads by clients that are not sticky keep being served; writes fail only while
    there is no leader, and resume by themselves; no write that answered success is
    doubled, and (asynchronous replication) what was lost is reported; the promoted
    node stops taking reads, and the old leader takes reads again once it has rejoined
    as a replica."""
    old = ha.wait_for_leader()
    with _server(ha, adapter, tmp_path) as url:
        change = _switchover(ha) if event == "switchover" else _failover(ha)
        outcomes, started, ended, new = _run_through(ha, url, change)
        ha.wait_for_replicas(len(ha.nodes) - 1)
        rejoined = time.monotonic()
        # Reads once the old leader streams again: it takes its share.
        late = Load(url, ha.seed_id)
        with ThreadPoolExecutor(10) as pool:
            futures = [pool.submit(late.run, WRITERS + index) for index in range(10)]
            time.sleep(3.0)
            late.stop.set()
            for future in futures:
                future.result()
    report = _report(ha, outcomes)
    reliability(
        f"HA, {adapter}, {event} {old.name}->{new}",
        {**report.figures(), "the change took (s)": round(ended - started, 1)},
    )
    assert report.doubled == []
    assert report.stale == [], report.stale[:3]
    failed_reads = [(o.error, round(o.at - started, 2)) for o in report.failed_reads]
    assert failed_reads == [], (failed_reads[:10], _exceptions(_LOGS[adapter]))
    assert report.writes_ok > 0
    assert all(o.at >= started - 1 for o in report.failed_writes), "writes failed before"
    assert any(o.ok and o.at > ended for o in outcomes if o.kind == "write"), "no recovery"
    # The promoted node takes no reads a second after the change (checks every 0.1 s).
    misrouted = _misrouted(outcomes, ended + 1.0)
    assert misrouted == [], [(o.node, o.began - ended, o.at - ended) for o in misrouted]
    late_reads = [o for o in late.outcomes if o.ok]
    assert late_reads
    assert [o for o in late.outcomes if not o.ok] == []
    assert _misrouted(late.outcomes, rejoined) == []
    assert old.name in {o.node for o in late_reads}, "the old leader took no reads"


COOKIE = "replicated_sticky"


@pytest.mark.parametrize("adapter", ["flask", "quart"])
def test_a_token_of_the_old_timeline_is_not_trusted_to_the_new_one(
    ha: Any, adapter: str, tmp_path: Path
) -> None:
    """A token carries its write's timeline: after a switchover the replicas follow the
    new leader's timeline, whose WAL bytes reuse the old one's, so they are not trusted
    with a token of the old one (its client reads on the primary for the sticky time),
    while a token written after the switchover is served by a caught-up replica.
    (Seen failing with the timeline left out of the comparison: the old token was
    served by a replica.)"""
    ha.wait_for_replicas(len(ha.nodes) - 1)
    with _server(ha, adapter, tmp_path) as url:

        def write_and_read(client: httpx.Client) -> tuple[str, str | None]:
            written = client.post("/items", data={"token": uuid.uuid4().hex})
            assert written.status_code == 201, written.text
            item = written.json()["id"]
            deadline = time.monotonic() + 10
            while True:  # until a replica serves it (the catch-up wait is 0.1 s)
                read = client.get(f"/items/{item}")
                assert read.status_code == 200
                if read.json()["in_recovery"] or time.monotonic() > deadline:
                    return client.cookies[COOKIE], read.headers.get(DEBUG_HEADER)

        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT) as client:
            old_cookie, node = write_and_read(client)
            assert node != "master", "a caught-up replica serves the writer before"
        ha.switchover()
        ha.wait_for_replicas(len(ha.nodes) - 1)
        time.sleep(1.0)  # every worker's checks see the replicas on the new timeline
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT) as client:
            client.cookies.set(COOKIE, old_cookie)
            reads = [client.get(f"/items/{ha.seed_id}") for _ in range(10)]
            assert {r.status_code for r in reads} == {200}
            assert {r.headers.get(DEBUG_HEADER) for r in reads} == {"master"}
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT) as client:
            _, node = write_and_read(client)
            assert node != "master", "a replica serves a token of the new timeline"


def test_no_write_is_lost_with_synchronous_mode(
    ha_sync: Any, tmp_path: Path, reliability: Any
) -> None:
    """Patroni's synchronous_mode on: a failover promotes the synchronous standby, so
    every write that answered success is on the new leader, exactly once."""
    with _server(ha_sync, "flask", tmp_path) as url:
        outcomes, _, ended, new = _run_through(ha_sync, url, _failover(ha_sync))
    report = _report(ha_sync, outcomes)
    reliability(f"HA, flask, failover with synchronous_mode ->{new}", report.figures())
    assert report.lost == []
    assert report.doubled == []
    assert report.stale == [], report.stale[:3]
    assert report.failed_reads == [], report.failed_reads[:5]
    assert any(o.ok and o.at > ended for o in outcomes if o.kind == "write"), "no recovery"
    ha_sync.wait_for_replicas(len(ha_sync.nodes) - 1)


# -- PgBouncer in transaction pooling mode --------------------------------------------


def _pgbouncer_urls(cluster: Any, driver: str) -> dict[str, str]:
    """The app's URLs through PgBouncer: the write port's database, and one database
    per node (a position check then speaks of the server that serves the reads).
    psycopg must not prepare statements server-side (``prepare_threshold`` in the
    engine's connect_args), asyncpg neither (no statement cache, and SQLAlchemy's own
    prepared statements uncached)."""
    query = {"prepared_statement_cache_size": "0"} if driver == "asyncpg" else {}
    urls = {"primary": cluster.pgbouncer_url("write", driver, **query)}
    for node in cluster.nodes:
        urls[node.name] = cluster.pgbouncer_url(node.name, driver, **query)
    return urls


PAIRS = 15
PAIR_CLIENTS = 10


@pytest.mark.parametrize("adapter", ["flask", "quart"])
def test_through_pgbouncer(ha: Any, adapter: str, tmp_path: Path, reliability: Any) -> None:
    """PgBouncer (transaction pooling) in front of the primary and each replica:
    reads on replicas and writes on the primary, a writer's next read sees its write
    (cookie and token header: positions and tokens hold), and a GET that writes is
    refused by the guard without a row written."""
    ha.wait_for_replicas(len(ha.nodes) - 1)
    options = (
        {"connect_args": {"prepare_threshold": None}}
        if adapter == "flask"
        else {"connect_args": {"statement_cache_size": 0}}
    )
    config = {"SQLALCHEMY_ENGINE_OPTIONS": {"pool_pre_ping": True, **options}}
    with _server(
        ha,
        adapter,
        tmp_path,
        urls=_pgbouncer_urls(ha, "psycopg"),
        async_urls=_pgbouncer_urls(ha, "asyncpg"),
        **config,
    ) as url:
        stale, replica_reads, total = 0, 0, 0
        deadline = time.monotonic() + PHASE_CAP

        def pairs(index: int) -> tuple[int, int, int]:
            seen_stale = on_replica = done = 0
            with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT) as client:
                for _ in range(PAIRS):
                    if time.monotonic() > deadline:
                        break
                    token = uuid.uuid4().hex
                    written = client.post("/items", data={"token": token})
                    assert written.status_code == 201, written.text
                    headers = {}
                    if index % 2:  # a header-only client: the token, no cookie
                        headers["Replicated-Token"] = written.headers["Replicated-Token"]
                        client.cookies.clear()
                    read = client.get(f"/items/{written.json()['id']}", headers=headers)
                    done += 1
                    if read.status_code == 404:
                        seen_stale += 1
                    elif read.json()["in_recovery"]:
                        on_replica += 1
            return seen_stale, on_replica, done

        with ThreadPoolExecutor(PAIR_CLIENTS) as pool:
            for s, r, d in pool.map(pairs, range(PAIR_CLIENTS)):
                stale, replica_reads, total = stale + s, replica_reads + r, total + d
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT) as reader:
            plain = [reader.get(f"/items/{ha.seed_id}") for _ in range(20)]
        assert {r.status_code for r in plain} == {200}
        assert all(r.json()["in_recovery"] for r in plain)
        if adapter == "flask":
            token = uuid.uuid4().hex
            refused = httpx.get(f"{url}/write-in-get", params={"token": token}, timeout=10)
            assert refused.status_code == 500
            assert _rows(ha, [token]) == {}
            status = _status(ha, urls=_pgbouncer_urls(ha, "psycopg"), config=config)
            leader = ha.wait_for_leader().name
            roles = {n["name"]: (n["role"], n["in_recovery"], n["usable"]) for n in status["nodes"]}
            assert roles["master"][:2] == ("primary", False)
            assert roles[leader] == ("replica", False, False)  # the promoted node: no reads
            assert all(
                roles[n.name] == ("replica", True, True) for n in ha.nodes if n.name != leader
            ), roles
            assert status["healthy"] is True
    reliability(
        f"HA, {adapter} through PgBouncer",
        {"POST/GET pairs": total, "stale": stale, "read on a replica": replica_reads},
    )
    assert total == PAIR_CLIENTS * PAIRS
    assert stale == 0
    if adapter == "flask":
        assert "ReplicaWriteError" in _LOGS[adapter]


def _status(cluster: Any, urls: dict[str, str], config: dict[str, Any]) -> Any:
    """``flask replicated status --json`` of the test app with ``urls``."""
    settings = {
        "urls": urls,
        "async_urls": {},
        "replicas": [n.name for n in cluster.nodes],
        "secret_key": secrets.token_hex(16),
        "query_at_import": False,
        "config": {**APP_CONFIG, **config},
    }
    env = {
        **os.environ,
        "SERVERS_TEST_SETTINGS": json.dumps(settings),
        "PYTHONPATH": os.pathsep.join([str(APPS), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    command = [sys.executable, "-m", "flask", "--app", "flask_app", "replicated", "status"]
    result = subprocess.run(
        [*command, "--json"], cwd=APPS, env=env, capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert cluster.password not in output
    assert result.returncode in (0, 1), output
    return json.loads(result.stdout)
