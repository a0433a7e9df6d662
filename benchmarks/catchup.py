"""How long a writer stays on the primary in "wal" mode, for the README.

A real cluster: a primary and one replica with a 500 ms apply delay, the only one
configured. Each trial: a fresh client POSTs, then GETs its row every 5 ms until
the replica serves it (``REPLICATED_DEBUG_HEADER``). Reported: the time from the
POST's response to the first GET the replica served, against "apply delay + one
check interval", in two settings:

- idle server: only the writer sends requests, so its own first GET starts the
  position checks and their phase follows its write (a best case);
- background readers: another client reads every 0 to 10 ms, so the checks run
  at a phase unrelated to the write, as on a busy server.
"""

from __future__ import annotations

import itertools
import random
import statistics
import threading
import time
from typing import TYPE_CHECKING

from replicated_core.testing.pgcluster import ReplicaSpec

from ._apps import DEBUG_HEADER, flask_app
from ._common import banner, parse_args, pg_cluster, table

if TYPE_CHECKING:
    from ._apps import FlaskBench

DELAY_MS = 500
POLL = 0.005
SEED_ROWS = 100
_names = itertools.count()


def trial(bench: FlaskBench) -> tuple[float, int, int]:
    """Seconds until the replica serves the writer, GETs on the primary, stale GETs."""
    client = bench.app.test_client()
    response = client.post("/items", data={"name": f"c{next(_names)}"})
    posted = time.monotonic()
    path = f"/items/{response.get_data(as_text=True)}"
    on_primary = stale = 0
    while True:
        response = client.get(path)
        stale += response.status_code == 404
        if response.headers.get(DEBUG_HEADER) == "slave":
            return time.monotonic() - posted, on_primary, stale
        on_primary += 1
        if time.monotonic() - posted > 10:
            raise RuntimeError("The replica never served the writer again within 10 s.")
        time.sleep(POLL)


def background_reader(bench: FlaskBench, stop: threading.Event) -> None:
    client = bench.app.test_client()
    rng = random.Random()
    while not stop.is_set():
        client.get(f"/items/{rng.randint(1, SEED_ROWS)}")
        time.sleep(rng.uniform(0, 0.01))


def main() -> None:
    args = parse_args(__doc__)
    quick = args.quick
    trials = 2 if quick else 21
    banner("catchup: time until a writer's reads go back to the replica (wal mode)", quick)
    print(f"   {trials} trials per setting; replica apply delay {DELAY_MS} ms; polling every 5 ms")
    rows = []
    with pg_cluster([ReplicaSpec("lagging", apply_delay_ms=DELAY_MS)], SEED_ROWS) as cluster:
        bench = flask_app(
            cluster.primary.url("psycopg"),
            {"slave": cluster.replica("lagging").url("psycopg")},
            replicated=True,
            REPLICATED_STICKY_MODE="wal",
            REPLICATED_DEBUG_HEADER=DEBUG_HEADER,
        )
        interval = bench.app.config["REPLICATED_CHECK_INTERVAL"]
        expected = DELAY_MS / 1000 + interval
        for setting in ("idle server", "background readers"):
            stop = threading.Event()
            reader = threading.Thread(target=background_reader, args=(bench, stop))
            if setting == "background readers":
                reader.start()
            results = []
            for _ in range(trials):
                time.sleep(random.uniform(0.2, 0.2 + interval))
                results.append(trial(bench))
            stop.set()
            if reader.is_alive():
                reader.join()
            waits = [r[0] for r in results]
            rows.append(
                [
                    setting,
                    trials,
                    f"{min(waits):.3f}",
                    f"{statistics.median(waits):.3f}",
                    f"{max(waits):.3f}",
                    f"{expected:.3f}",
                    f"{statistics.median(r[1] for r in results):.0f}",
                    sum(r[2] for r in results),
                ]
            )
        bench.dispose()
    table(
        [
            "setting",
            "trials",
            "min s",
            "median s",
            "max s",
            "delay + interval s",
            "GETs on primary (median)",
            "stale",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
