"""Does the router's cost grow with replicas configured, or with clients?

1. Per-request time of a Flask GET (SQLite, test client) on plain Flask-SQLAlchemy
   and with 1, 2, 4 and 8 replicas configured, all interleaved; the ratios to plain
   should stay flat.
2. 10,000 distinct clients (300 with --quick), each sending its own valid sticky
   cookie: the process's traced memory (tracemalloc) and RSS before and after, after
   a garbage collection. The router keeps no per-client state, so both should stay
   flat. The cookies carry distinct WAL positions so that no two are alike.
"""

from __future__ import annotations

import gc
import random
import time
import tracemalloc
from typing import TYPE_CHECKING

from replicated_core.sticky import StickyToken

from ._apps import FlaskBench, flask_app, sqlite_files
from ._common import (
    banner,
    interleave,
    median,
    parse_args,
    ratios,
    rss_bytes,
    scratch_dir,
    spread,
    table,
    us,
)

if TYPE_CHECKING:
    from collections.abc import Callable

SEED_ROWS = 10_000
COUNTS = [1, 2, 4, 8]
COOKIE = "replicated_sticky"


def get_batch(bench: FlaskBench, size: int) -> Callable[[], float]:
    client = bench.app.test_client(use_cookies=False)

    def run() -> float:
        paths = [f"/items/{random.randint(1, SEED_ROWS)}" for _ in range(size)]
        start = time.perf_counter()
        for path in paths:
            if client.get(path).status_code != 200:
                raise RuntimeError("The benchmark app did not answer 200.")
        return (time.perf_counter() - start) / size

    return run


def clients_memory(bench: FlaskBench, clients: int) -> list[list[object]]:
    """Memory before and after ``clients`` requests, each from a new sticky client."""
    codec = bench.app.extensions["replicated"].router(bench.app).codec
    assert codec is not None
    # SQLite names no cluster: give the tokens one, so that each client's carries its
    # own position (a distinct value, as WAL-mode clients send).
    codec.cluster = "bench-00"
    client = bench.app.test_client(use_cookies=False)

    def serve(first_lsn: int, count: int, cookie: bool) -> None:
        for lsn in range(first_lsn, first_lsn + count):
            headers = {"Cookie": f"{COOKIE}={codec.dumps(StickyToken(lsn))}"} if cookie else {}
            path = f"/items/{random.randint(1, SEED_ROWS)}"
            if client.get(path, headers=headers).status_code != 200:
                raise RuntimeError("The benchmark app did not answer 200.")

    rows: list[list[object]] = []
    tracemalloc.start()
    serve(1, min(clients, 1000), True)  # warm up: caches, pools, interned strings
    for label, cookie, first in [
        (f"{clients} requests, no cookie", False, 10**6),
        (f"{clients} requests, {clients} distinct sticky cookies", True, 10**7),
    ]:
        gc.collect()
        traced, rss = tracemalloc.get_traced_memory()[0], rss_bytes()
        serve(first, clients, cookie)
        gc.collect()
        traced_after, rss_after = tracemalloc.get_traced_memory()[0], rss_bytes()
        rows.append(
            [
                label,
                f"{traced / 1024:.0f}",
                f"{traced_after / 1024:.0f}",
                f"{(traced_after - traced) / 1024:+.1f}",
                f"{rss / 2**20:.1f}",
                f"{rss_after / 2**20:.1f}",
                f"{(rss_after - rss) / 2**20:+.1f}",
            ]
        )
    tracemalloc.stop()
    return rows


def main() -> None:
    args = parse_args(__doc__)
    quick = args.quick
    rounds, size, clients = (5, 20, 300) if quick else (31, 300, 10_000)
    banner("scaling: replicas configured and distinct clients", quick)
    print(f"   {rounds} rounds of batches of {size} GETs, all apps interleaved; times in us")
    with scratch_dir() as folder:
        names = ["primary", *[f"r{i}" for i in range(1, max(COUNTS) + 1)]]
        files = sqlite_files(folder, names, SEED_ROWS)
        urls = {name: f"sqlite:///{path}" for name, path in files.items()}
        benches = {"plain": flask_app(urls["primary"], {"r1": urls["r1"]}, replicated=False)}
        for count in COUNTS:
            replicas = {f"r{i}": urls[f"r{i}"] for i in range(1, count + 1)}
            benches[f"{count} replica(s)"] = flask_app(urls["primary"], replicas, replicated=True)
        for bench in benches.values():
            get_batch(bench, 50)()
        samples = interleave([(name, get_batch(b, size)) for name, b in benches.items()], rounds)
        base = samples["plain"]
        rows = []
        for name, values in samples.items():
            ratio_list = ratios(values, base)
            rows.append([name, us(median(values)), f"{median(ratio_list):.3f}", spread(ratio_list)])
        table(["app", "GET us", "median ratio to plain", "ratio IQR"], rows)
        print()
        print(f"   memory: one app (1 replica, sticky mode 'time'), {clients} clients; KiB and MiB")
        table(
            [
                "requests",
                "traced KiB before",
                "after",
                "delta KiB",
                "RSS MiB before",
                "after",
                "delta MiB",
            ],
            clients_memory(benches["1 replica(s)"], clients),
        )
        for bench in benches.values():
            bench.dispose()


if __name__ == "__main__":
    main()
