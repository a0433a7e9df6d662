"""Replica offload and stale reads for each sticky mode, on a real cluster.

Primary, r1, r2 (300 ms apply delay). Clients are threads, each with its own Flask
test client (so its cookies persist); each waits a random think time, then does a
GET (90%) or a POST followed at once by a GET of the row it wrote (10%). A GET reads
the client's own latest row when it has one, else a seed row. The response header
``REPLICATED_DEBUG_HEADER`` says who served. A stale read is a 404 for the client's
own row. Target for "wal": no stale read, and a replica share of reads at least 10
points above "time". "wal, no wait" is "wal" with REPLICATED_CATCH_UP_TIMEOUT=0: a
sticky read the cached positions cannot place goes to the primary at once.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from dataclasses import dataclass

from replicated_core.testing.pgcluster import ReplicaSpec

from ._apps import DEBUG_HEADER, flask_app
from ._common import banner, parse_args, pg_cluster, table, verdict

SEED_ROWS = 1000
POOL = {"pool_size": 20, "max_overflow": 20}
# (row label, REPLICATED_STICKY_MODE, REPLICATED_CATCH_UP_TIMEOUT): "wal" waits up to
# the default 0.1 s for a replica to replay a sticky client's write; "wal, no wait"
# goes to the primary whenever the cached positions (a check interval old) lack it.
MODES = [
    ("off", "off", 0.0),
    ("time", "time", 0.0),
    ("wal, no wait", "wal", 0.0),
    ("wal", "wal", 0.1),
]
_names = itertools.count()


@dataclass
class Tally:
    reads: int = 0
    replica_reads: int = 0
    primary_reads: int = 0
    posts: int = 0
    stale_after_post: int = 0
    own_reads: int = 0
    stale_later: int = 0

    def add(self, other: Tally) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def run_mode(
    primary_url: str,
    replica_urls: dict[str, str],
    mode: str,
    catch_up_timeout: float,
    clients: int,
    seconds: float,
    think: float,
) -> Tally:
    bench = flask_app(
        primary_url,
        replica_urls,
        replicated=True,
        engine_options=POOL,
        REPLICATED_STICKY_MODE=mode,
        REPLICATED_CATCH_UP_TIMEOUT=catch_up_timeout,
        REPLICATED_DEBUG_HEADER=DEBUG_HEADER,
    )
    replicas = set(replica_urls)
    total = Tally()
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client() -> None:
        test_client = bench.app.test_client()
        rng = random.Random()
        tally = Tally()
        own: str | None = None

        def read(path: str, mine: bool) -> bool:
            response = test_client.get(path)
            tally.reads += 1
            served = response.headers.get(DEBUG_HEADER)
            if served in replicas:
                tally.replica_reads += 1
            else:
                tally.primary_reads += 1
            if response.status_code not in (200, 404) or (response.status_code == 404 and not mine):
                raise RuntimeError(f"Unexpected answer {response.status_code} to GET {path}.")
            return response.status_code == 404

        start.wait()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0, 2 * think))
            if rng.random() < 0.1:
                response = test_client.post("/items", data={"name": f"o{next(_names)}"})
                if response.status_code != 201:
                    raise RuntimeError(f"Unexpected answer {response.status_code} to POST.")
                tally.posts += 1
                own = f"/items/{response.get_data(as_text=True)}"
                tally.stale_after_post += read(own, mine=True)
            elif own is not None:
                tally.own_reads += 1
                tally.stale_later += read(own, mine=True)
            else:
                read(f"/items/{rng.randint(1, SEED_ROWS)}", mine=False)
        with lock:
            total.add(tally)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    bench.dispose()
    return total


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def main() -> None:
    args = parse_args(__doc__)
    quick = args.quick
    clients, seconds, think = (20, 1.0, 0.1) if quick else (40, 10.0, 0.2)
    banner("offload: replica share and stale reads per sticky mode", quick)
    print(
        f"   {clients} clients, think time uniform 0..{2 * think:g} s, 90% GET / 10% POST+GET, "
        f"{seconds:g} s per mode; cluster: primary, r1, r2 (300 ms apply delay)"
    )
    rows = []
    shares: dict[str, float] = {}
    stale: dict[str, int] = {}
    with pg_cluster(
        [ReplicaSpec("r1"), ReplicaSpec("r2", apply_delay_ms=300)], SEED_ROWS
    ) as cluster:
        primary = cluster.primary.url("psycopg")
        replicas = {n.name: n.url("psycopg") for n in cluster.replicas}
        for label, mode, wait in MODES:
            tally = run_mode(primary, replicas, mode, wait, clients, seconds, think)
            shares[label] = 100 * tally.replica_reads / max(1, tally.reads)
            stale[label] = tally.stale_after_post + tally.stale_later
            rows.append(
                [
                    label,
                    tally.reads,
                    percent(tally.replica_reads, tally.reads),
                    percent(tally.primary_reads, tally.reads),
                    tally.posts,
                    tally.stale_after_post,
                    percent(tally.stale_after_post, tally.posts),
                    tally.own_reads,
                    tally.stale_later,
                ]
            )
    table(
        [
            "mode",
            "reads",
            "by replicas",
            "by primary",
            "posts",
            "stale right after POST",
            "stale %",
            "later reads of own row",
            "stale later",
        ],
        rows,
    )
    gain = shares["wal"] - shares["time"]
    for label in ("wal, no wait", "wal"):
        print(f"   {label}: {stale[label]} stale reads (target 0): {verdict(stale[label] == 0)}")
    print(
        f"   wal leaves {100 - shares['wal']:.1f}% of reads on the primary "
        f"({100 - shares['wal, no wait']:.1f}% without the wait)"
    )
    print(
        f"   wal replica share minus time's: {gain:+.1f} points (target >= +10): "
        f"{verdict(gain >= 10)}"
    )


if __name__ == "__main__":
    main()
