"""Replica probes under load: how many the router sends, against its allowance.

A real cluster (primary, r1, r2 with 300 ms apply delay); 100 concurrent clients
(Flask: threads, each with its own test client; Quart: asyncio tasks, each with its
own test client), 90% GET of one row, 10% POST, for 10 s (2 s with --quick).
Probes are counted by a ``before_cursor_execute`` listener on the replica engines
that matches PostgreSQL's ``REPLICA_PROBE_SQL``. The allowance is one probe per replica per check
interval (0.1 s), plus one per on-demand refresh (``use_replica()`` outside a
request; this workload has none, and they pass the same interval gate).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import event

from replicated_core.backends.postgresql import REPLICA_PROBE_SQL
from replicated_core.testing.pgcluster import ReplicaSpec

from ._apps import flask_app, quart_app
from ._common import banner, parse_args, pg_cluster, table, verdict

if TYPE_CHECKING:
    from replicated_core.router import Router
    from replicated_core.testing.pgcluster import PgCluster

CLIENTS = 100
SEED_ROWS = 1000
POOL = {"pool_size": 20, "max_overflow": 20}
_names = itertools.count()


@dataclass
class ProbeLog:
    """Probe times per replica, and requests served, during the measured window."""

    probes: dict[str, list[float]] = field(default_factory=dict)
    served: int = 0
    refreshes: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def listen(self, router: Router) -> None:
        for node in router.replicas:
            times = self.probes.setdefault(node.name, [])

            def on_execute(
                conn: Any, cursor: Any, statement: str, *args: Any, times: list[float] = times
            ) -> None:
                if statement == REPLICA_PROBE_SQL:
                    times.append(time.monotonic())

            event.listen(node.engine, "before_cursor_execute", on_execute)

    def count(self, ok: bool) -> None:
        with self.lock:
            if ok:
                self.served += 1
            else:
                self.failed += 1


def flask_run(cluster: PgCluster, seconds: float) -> tuple[ProbeLog, float, Router]:
    urls = {n.name: n.url("psycopg") for n in cluster.replicas}
    bench = flask_app(cluster.primary.url("psycopg"), urls, replicated=True, engine_options=POOL)
    router: Router = bench.app.extensions["replicated"].router(bench.app)
    log = ProbeLog()
    warmed, started = threading.Barrier(CLIENTS + 1), threading.Barrier(CLIENTS + 1)
    deadline = 0.0

    def client() -> None:
        test_client = bench.app.test_client()
        rng = random.Random()
        test_client.get("/items/1")  # warm up: connections
        warmed.wait()
        started.wait()
        while time.monotonic() < deadline:
            if rng.random() < 0.1:
                response = test_client.post("/items", data={"name": f"p{next(_names)}"})
                log.count(response.status_code == 201)
            else:
                response = test_client.get(f"/items/{rng.randint(1, SEED_ROWS)}")
                log.count(response.status_code == 200)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    warmed.wait()
    log.listen(router)
    log.refreshes = -router.health.refreshes
    deadline = time.monotonic() + seconds
    started.wait()
    start = time.monotonic()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    log.refreshes += router.health.refreshes
    bench.dispose()
    return log, elapsed, router


def quart_run(cluster: PgCluster, seconds: float) -> tuple[ProbeLog, float, Router]:
    urls = {n.name: n.url("asyncpg") for n in cluster.replicas}
    bench = quart_app(cluster.primary.url("asyncpg"), urls, replicated=True, engine_options=POOL)
    router: Router = bench.app.extensions["replicated"].router(bench.app)
    log = ProbeLog()

    async def main() -> float:
        clients = [bench.app.test_client() for _ in range(CLIENTS)]
        await asyncio.gather(*(c.get("/items/1") for c in clients))  # warm up
        log.listen(router)
        log.refreshes = -router.health.refreshes
        deadline = time.monotonic() + seconds

        async def client(test_client: Any) -> None:
            rng = random.Random()
            while time.monotonic() < deadline:
                if rng.random() < 0.1:
                    form = {"name": f"p{next(_names)}"}
                    response = await test_client.post("/items", form=form)
                    log.count(response.status_code == 201)
                else:
                    response = await test_client.get(f"/items/{rng.randint(1, SEED_ROWS)}")
                    log.count(response.status_code == 200)

        start = time.monotonic()
        await asyncio.gather(*(client(c) for c in clients))
        elapsed = time.monotonic() - start
        log.refreshes += router.health.refreshes
        await bench.dispose()
        return elapsed

    elapsed = asyncio.run(main())
    return log, elapsed, router


def main() -> None:
    args = parse_args(__doc__)
    quick = args.quick
    seconds = 2.0 if quick else 10.0
    banner("probes: replica probes sent under load", quick)
    print(
        f"   {CLIENTS} concurrent clients, 90% GET / 10% POST, {seconds:g} s per adapter; "
        "cluster: primary, r1, r2 (300 ms apply delay)"
    )
    rows = []
    with pg_cluster(
        [ReplicaSpec("r1"), ReplicaSpec("r2", apply_delay_ms=300)], SEED_ROWS
    ) as cluster:
        for label, run in [("Flask, 100 threads", flask_run), ("Quart, 100 tasks", quart_run)]:
            log, elapsed, router = run(cluster, seconds)
            interval = router.config.check_interval
            replicas = len(router.replicas)
            probes = sum(len(t) for t in log.probes.values())
            allowance = replicas * (math.floor(elapsed / interval) + 1)
            gaps = [b - a for t in log.probes.values() for a, b in itertools.pairwise(sorted(t))]
            rows.append(
                [
                    label,
                    f"{elapsed:.2f}",
                    log.served,
                    log.failed,
                    f"{log.served / elapsed:.0f}",
                    probes,
                    allowance,
                    log.refreshes,
                    f"{min(gaps) * 1000:.1f}" if gaps else "-",
                    f"{statistics.median(gaps) * 1000:.1f}" if gaps else "-",
                    verdict(probes <= allowance),
                ]
            )
    table(
        [
            "adapter",
            "seconds",
            "served",
            "failed",
            "req/s",
            "probes",
            "allowance",
            "refreshes",
            "min gap ms",
            "median gap ms",
            "probes <= allowance",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
