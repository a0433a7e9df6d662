"""A writer's next read: who serves it, what it costs, how many checks, per server model.

A real cluster: a primary, r1 and r2 (they replay at once) and lagging (500 ms apply
delay). Each client keeps its cookies, POSTs a row, then GETs it at once. Models: the
Flask and Quart test clients (in process, one client), and gunicorn sync, gunicorn
gthread and hypercorn serving the apps of tests/server_apps (4 workers, 20 clients,
over HTTP with httpx). Each model runs twice in one run: "no wait"
(REPLICATED_CATCH_UP_TIMEOUT=0: a read the cached positions cannot place goes to the
primary) and "wait" (the default 0.1 s). Printed: the share of GETs a replica served,
stale GETs (a 404 for the client's own row), the median and p95 GET latency, and the
checks: the prober's rounds and the catch-up waits' round trips (readers that waited,
and round trips; the difference shared one), summed over every worker.

Targets for "wait": a replica serves >= 98% of the GETs, 0 stale, the added latency
about one replica round trip plus its real catch-up (both measured here apart), and
at most one catch-up round trip per wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import sqlalchemy as sa

from replicated_core.backends import backend_for
from replicated_core.testing.pgcluster import ReplicaSpec

from ._apps import DEBUG_HEADER, flask_app, quart_app
from ._common import ROOT, banner, parse_args, pg_cluster, scratch_dir, table, verdict

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from replicated_core.testing.pgcluster import PgCluster

APPS = ROOT / "tests" / "server_apps"
HOST = "127.0.0.1"
REPLICAS = ["r1", "r2", "lagging"]
SETTINGS = {"no wait": 0.0, "wait": 0.1}
TARGET_SHARE = 0.98
PHASE_CAP = 60.0  # seconds: every load loop stops by then, whatever it has done
START_TIMEOUT = 60.0
_names = itertools.count()


@dataclass
class Pairs:
    """What the GETs right after each POST found."""

    served: Counter[str] = field(default_factory=Counter)
    stale: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    counters: Counter[str] = field(default_factory=Counter)

    def add(self, node: str, stale: bool, seconds: float) -> None:
        self.served[node] += 1
        self.stale += stale
        self.latencies.append(seconds)

    @property
    def gets(self) -> int:
        return sum(self.served.values())

    def replica_share(self) -> float:
        return sum(n for name, n in self.served.items() if name != "primary") / max(1, self.gets)


# -- in process: the test clients ------------------------------------------------------


def flask_test_client(cluster: PgCluster, wait: float, pairs: int) -> Pairs:
    bench = flask_app(*_urls(cluster, "psycopg"), replicated=True, **_config(wait))
    found = Pairs()
    try:
        client = bench.app.test_client()
        client.get("/items/1")  # the prober's first round
        for _ in range(pairs):
            posted = client.post("/items", data={"name": f"w{next(_names)}"})
            start = time.perf_counter()
            got = client.get(f"/items/{posted.get_data(as_text=True)}")
            found.add(_served(got.headers), got.status_code == 404, time.perf_counter() - start)
        found.counters.update(bench.app.extensions["replicated"].counters(bench.app))
    finally:
        bench.dispose()
    return found


def quart_test_client(cluster: PgCluster, wait: float, pairs: int) -> Pairs:
    async def run() -> Pairs:
        bench = quart_app(*_urls(cluster, "asyncpg"), replicated=True, **_config(wait))
        found = Pairs()
        try:
            client = bench.app.test_client()
            await client.get("/items/1")
            for _ in range(pairs):
                posted = await client.post("/items", form={"name": f"w{next(_names)}"})
                item_id = await posted.get_data(as_text=True)
                start = time.perf_counter()
                got = await client.get(f"/items/{item_id}")
                elapsed = time.perf_counter() - start
                found.add(_served(got.headers), got.status_code == 404, elapsed)
            found.counters.update(bench.app.extensions["replicated"].counters(bench.app))
        finally:
            await bench.dispose()
        return found

    return asyncio.run(run())


def _urls(cluster: PgCluster, driver: str) -> tuple[str, dict[str, str]]:
    return cluster.primary.url(driver), {n: cluster.replica(n).url(driver) for n in REPLICAS}


def _config(wait: float) -> dict[str, Any]:
    return {"REPLICATED_CATCH_UP_TIMEOUT": wait, "REPLICATED_DEBUG_HEADER": DEBUG_HEADER}


def _served(headers: Any) -> str:
    name = headers.get(DEBUG_HEADER)
    return "primary" if name in (None, "master") else str(name)


# -- real servers --------------------------------------------------------------------


def _gunicorn(*options: str) -> Callable[[str, int], list[str]]:
    def command(bind: str, workers: int) -> list[str]:
        return [
            *(sys.executable, "-m", "gunicorn", "--bind", bind, "--workers", str(workers)),
            *(*options, "flask_app:app"),
        ]

    return command


def _hypercorn(bind: str, workers: int) -> list[str]:
    return [
        *(sys.executable, "-m", "hypercorn", "--bind", bind),
        *("--workers", str(workers), "quart_app:app"),
    ]


SERVERS = {
    "gunicorn sync": _gunicorn("--worker-class", "sync"),
    "gunicorn gthread": _gunicorn("--worker-class", "gthread", "--threads", "4"),
    "hypercorn": _hypercorn,
}


@contextlib.contextmanager
def serving(
    cluster: PgCluster, command: Callable[[str, int], list[str]], workers: int, wait: float
) -> Iterator[str]:
    """The test apps served on a loopback port; yields the base URL."""
    nodes = {"primary": cluster.primary, **{n: cluster.replica(n) for n in REPLICAS}}
    settings = {
        "urls": {n: node.url("psycopg") for n, node in nodes.items()},
        "async_urls": {n: node.url("asyncpg") for n, node in nodes.items()},
        "replicas": REPLICAS,
        "secret_key": secrets.token_hex(16),
        "query_at_import": False,
        "config": {"REPLICATED_CATCH_UP_TIMEOUT": wait},
    }
    env = {
        **os.environ,
        "SERVERS_TEST_SETTINGS": json.dumps(settings),
        "PYTHONPATH": os.pathsep.join([str(APPS), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    with scratch_dir() as folder:
        log_path = folder / "server.log"
        sock = socket.socket()
        sock.bind((HOST, 0))
        sock.listen(128)
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command(f"fd://{sock.fileno()}", workers),
                cwd=APPS,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=[sock.fileno()],
            )
        url = f"http://{HOST}:{sock.getsockname()[1]}"
        sock.close()
        try:
            _wait_for_workers(url, workers, process, log_path, cluster)
            yield url
        finally:
            _stop(process)


def _wait_for_workers(
    url: str, workers: int, process: subprocess.Popen[bytes], log: Path, cluster: PgCluster
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while len(_worker_counters(url, workers, tries=16)) < workers:
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace").replace(cluster.password, "********")
            raise RuntimeError("The server did not start; its log says:\n" + tail[-3000:])
        time.sleep(0.1)


def _worker_counters(url: str, workers: int, tries: int = 200) -> dict[int, dict[str, int]]:
    """Each worker's counters (GET /health on new connections until each answered)."""
    found: dict[int, dict[str, int]] = {}
    with httpx.Client(base_url=url, timeout=5) as client:
        for _ in range(tries):
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                body = client.get("/health", headers={"Connection": "close"}).json()
                found[int(body["pid"])] = body["counters"]
            if len(found) >= workers:
                break
    return found


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def over_http(url: str, cluster: PgCluster, clients: int, pairs: int, workers: int) -> Pairs:
    names = {node.port: node.name for node in cluster.nodes}
    deadline = time.monotonic() + PHASE_CAP
    found = Pairs()
    lock = threading.Lock()

    def client_loop(number: int) -> None:
        with httpx.Client(base_url=url, timeout=15) as client:
            for sent in range(pairs):
                if time.monotonic() > deadline:
                    return
                posted = client.post("/items", data={"token": f"{number}-{sent}"})
                item_id = posted.json().get("id") if posted.status_code == 201 else None
                if item_id is None:
                    with lock:
                        found.errors += 1
                    continue
                start = time.perf_counter()
                got = client.get(f"/items/{item_id}")
                elapsed = time.perf_counter() - start
                body = got.json() if got.status_code in (200, 404) else {}
                with lock:
                    if "port" not in body:
                        found.errors += 1
                    else:
                        node = names.get(body["port"], "?")
                        found.add(
                            "primary" if node == "primary" else node,
                            got.status_code == 404,
                            elapsed,
                        )

    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client_loop, range(clients)))
    for counters in _worker_counters(url, workers).values():
        found.counters.update(counters)
    return found


# -- figures -------------------------------------------------------------------------


def replica_figures(cluster: PgCluster, rounds: int) -> tuple[float, float]:
    """Median seconds of a plain round trip to r1, and of its catch-up query right
    after a commit on the primary (its real catch-up plus a round trip)."""
    backend = backend_for("postgresql")
    primary = sa.create_engine(cluster.primary.url("psycopg"))
    replica = sa.create_engine(cluster.replica("r1").url("psycopg"))
    trips, catch_ups = [], []
    try:
        with primary.connect() as p, replica.connect() as r:
            p = p.execution_options(isolation_level="AUTOCOMMIT")
            r = r.execution_options(isolation_level="AUTOCOMMIT")
            for number in range(rounds):
                start = time.perf_counter()
                r.exec_driver_sql("SELECT 1").scalar()
                trips.append(time.perf_counter() - start)
                p.exec_driver_sql(f"INSERT INTO items (name) VALUES ('trip-{number}')")
                position = backend.read_primary_position(p.connection.dbapi_connection)
                start = time.perf_counter()
                r.exec_driver_sql(backend.catch_up_sql(position, 1.0)).first()
                catch_ups.append(time.perf_counter() - start)
    finally:
        primary.dispose()
        replica.dispose()
    return statistics.median(trips), statistics.median(catch_ups)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) >= 20 else max(values, default=0)


def main() -> None:
    args = parse_args(__doc__)
    quick = args.quick
    workers, clients, pairs, local_pairs = (2, 4, 10, 50) if quick else (4, 20, 25, 300)
    banner("after-write: a writer's next read, per server model", quick)
    print(
        f"   servers: {workers} workers, {clients} clients x {pairs} POST+GET pairs; test clients:"
        f" {local_pairs} pairs; cluster: primary, r1, r2, lagging (500 ms apply delay)"
    )
    models: list[tuple[str, Callable[[PgCluster, float], Pairs]]] = [
        ("Flask test client", lambda c, w: flask_test_client(c, w, local_pairs)),
        ("Quart test client", lambda c, w: quart_test_client(c, w, local_pairs)),
    ]
    for name, command in SERVERS.items():

        def run(c: PgCluster, w: float, command: Any = command) -> Pairs:
            with serving(c, command, workers, w) as url:
                return over_http(url, c, clients, pairs, workers)

        models.append((name, run))
    rows = []
    results: dict[tuple[str, str], Pairs] = {}
    with pg_cluster(
        [ReplicaSpec("r1"), ReplicaSpec("r2"), ReplicaSpec("lagging", apply_delay_ms=500)], 10
    ) as cluster:
        engine = sa.create_engine(cluster.primary.url("psycopg"))
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE server_items (id SERIAL PRIMARY KEY, token VARCHAR(64) NOT NULL)"
            )
        engine.dispose()
        cluster.wait_for_replay(include_delayed=True)
        trip, catch_up = replica_figures(cluster, 20 if quick else 200)
        for name, run in models:
            for setting, wait in SETTINGS.items():
                found = results[name, setting] = run(cluster, wait)
                counts = found.counters
                rows.append(
                    [
                        name,
                        setting,
                        found.gets,
                        f"{100 * found.replica_share():.1f}%",
                        found.stale,
                        found.errors,
                        ms(statistics.median(found.latencies)) if found.latencies else "-",
                        ms(p95(found.latencies)),
                        counts.get("position_checks", 0),
                        counts.get("catch_up_waits", 0),
                        counts.get("catch_up_checks", 0),
                        counts.get("catch_up_timeouts", 0),
                    ]
                )
    table(
        [
            "model",
            "setting",
            "GETs",
            "by replicas",
            "stale",
            "errors",
            "median ms",
            "p95 ms",
            "prober rounds",
            "waits",
            "wait checks",
            "timed out",
        ],
        rows,
    )
    print(
        f"   r1: a round trip {ms(trip)} ms, its catch-up query right after a commit"
        f" {ms(catch_up)} ms (medians)"
    )
    for name, _ in models:
        before, after = results[name, "no wait"], results[name, "wait"]
        added = statistics.median(after.latencies) - statistics.median(before.latencies)
        share = after.replica_share()
        met = share >= TARGET_SHARE and after.stale == 0 and before.stale == 0
        print(
            f"   {name}: replicas serve {100 * share:.1f}% of a writer's next reads"
            f" ({100 * before.replica_share():.1f}% without the wait), median GET"
            f" {added * 1000:+.2f} ms; target >= {TARGET_SHARE:.0%} at 0 stale: {verdict(met)}"
        )


if __name__ == "__main__":
    main()
