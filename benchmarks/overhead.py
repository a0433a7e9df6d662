"""Per-request overhead of the router: the same app with and without it, on SQLite.

Flask: ``app.wsgi_app`` called with prebuilt werkzeug environs (no test-client
machinery in the timing). Quart: the app's test client. Each case alternates
batches of the plain app (A) and the routed app (B), ABAB..., and reports the
medians of the per-request times and the median of the per-round ratios B/A.
Target: a median slowdown of at most 5%.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from typing import TYPE_CHECKING, Any

from werkzeug.test import EnvironBuilder

from replicated_core.sticky import StickyCodec, StickyToken

from ._apps import SECRET_KEY, FlaskBench, QuartBench, flask_app, quart_app, sqlite_files
from ._common import (
    banner,
    interleave,
    median,
    parse_args,
    ratios,
    scratch_dir,
    spread,
    table,
    us,
    verdict,
)

if TYPE_CHECKING:
    from collections.abc import Callable

TARGET = 1.05
SEED_ROWS = 10_000
COOKIE = "replicated_sticky"
_names = itertools.count()


def sticky_cookie() -> str:
    """A fresh time-mode sticky cookie (valid 5 s): the client wrote just now."""
    return StickyCodec(SECRET_KEY).dumps(StickyToken())


def flask_batch(bench: FlaskBench, method: str, size: int, cookie: bool) -> Callable[[], float]:
    """One batch of ``size`` requests through ``app.wsgi_app``; seconds per request."""
    app = bench.app.wsgi_app

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        if not status.startswith(("200", "201")):
            raise RuntimeError(f"Unexpected status {status} in the benchmark app.")
        return None

    def run() -> float:
        headers = {"Cookie": f"{COOKIE}={sticky_cookie()}"} if cookie else {}
        if method == "GET":
            builders = [
                EnvironBuilder(path=f"/items/{random.randint(1, SEED_ROWS)}", headers=headers)
                for _ in range(size)
            ]
        else:
            builders = [
                EnvironBuilder(
                    path="/items", method="POST", data={"name": f"n{next(_names)}"}, headers=headers
                )
                for _ in range(size)
            ]
        environs = [b.get_environ() for b in builders]
        start = time.perf_counter()
        for environ in environs:
            body = app(environ, start_response)
            b"".join(body)
            close = getattr(body, "close", None)
            if close is not None:
                close()
        return (time.perf_counter() - start) / size

    return run


def quart_batch(
    bench: QuartBench, runner: asyncio.Runner, method: str, size: int
) -> Callable[[], float]:
    """One batch of ``size`` requests through the Quart test client; seconds per request."""
    client = bench.app.test_client(use_cookies=False)

    async def batch() -> float:
        paths = [f"/items/{random.randint(1, SEED_ROWS)}" for _ in range(size)]
        forms = [{"name": f"n{next(_names)}"} for _ in range(size)]
        start = time.perf_counter()
        if method == "GET":
            for path in paths:
                response = await client.get(path)
                if response.status_code != 200:
                    raise RuntimeError(f"Unexpected status {response.status_code}.")
        else:
            for form in forms:
                response = await client.post("/items", form=form)
                if response.status_code != 201:
                    raise RuntimeError(f"Unexpected status {response.status_code}.")
        return (time.perf_counter() - start) / size

    return lambda: runner.run(batch())


def main() -> None:
    args = parse_args(__doc__)
    quick = args.quick
    rounds, size = (6, 20) if quick else (41, 300)
    banner("overhead: per-request cost of the router (SQLite primary + replica files)", quick)
    print(f"   {rounds} rounds of A and B batches of {size} requests, interleaved; times in us")
    rows: list[list[object]] = []
    with scratch_dir() as folder:
        flask_files = sqlite_files(folder / "f", ["primary", "replica"], SEED_ROWS)
        quart_files = sqlite_files(folder / "q", ["primary", "replica"], SEED_ROWS)
        urls = {k: f"sqlite:///{v}" for k, v in flask_files.items()}
        aurls = {k: f"sqlite+aiosqlite:///{v}" for k, v in quart_files.items()}
        plain = flask_app(urls["primary"], {"slave": urls["replica"]}, replicated=False)
        routed = flask_app(urls["primary"], {"slave": urls["replica"]}, replicated=True)
        for label, method, cookie in [
            ("Flask GET", "GET", False),
            ("Flask GET, sticky cookie", "GET", True),
            ("Flask POST", "POST", False),
        ]:
            for bench in (plain, routed):  # warm up: connections, compiled caches
                flask_batch(bench, method, 50, cookie)()
            samples = interleave(
                [
                    ("A", flask_batch(plain, method, size, cookie)),
                    ("B", flask_batch(routed, method, size, cookie)),
                ],
                rounds,
            )
            rows.append(row(label, samples))
        plain.dispose()
        routed.dispose()

        qplain = quart_app(aurls["primary"], {"slave": aurls["replica"]}, replicated=False)
        qrouted = quart_app(aurls["primary"], {"slave": aurls["replica"]}, replicated=True)
        with asyncio.Runner() as runner:
            for label, method in [("Quart GET", "GET"), ("Quart POST", "POST")]:
                for qbench in (qplain, qrouted):
                    quart_batch(qbench, runner, method, 50)()
                samples = interleave(
                    [
                        ("A", quart_batch(qplain, runner, method, size)),
                        ("B", quart_batch(qrouted, runner, method, size)),
                    ],
                    rounds,
                )
                rows.append(row(label, samples))
            runner.run(qplain.dispose())
            runner.run(qrouted.dispose())
    table(
        [
            "case",
            "A plain",
            "B routed",
            "B-A",
            "median B/A",
            "B/A IQR",
            f"target <= {TARGET:.2f}",
        ],
        rows,
    )


def row(label: str, samples: dict[str, list[float]]) -> list[object]:
    a, b = median(samples["A"]), median(samples["B"])
    ratio_list = ratios(samples["B"], samples["A"])
    ratio = median(ratio_list)
    return [label, us(a), us(b), us(b - a), f"{ratio:.3f}", spread(ratio_list), verdict(ratio <= TARGET)]


if __name__ == "__main__":
    main()
