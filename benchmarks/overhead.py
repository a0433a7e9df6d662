"""Per-request overhead of the router: the same app with and without it, on SQLite.

Flask and Quart: the app's test client (for Flask it measured less noisy than
calling ``app.wsgi_app`` with prebuilt werkzeug environs, which is shown as an
extra row: same absolute cost, larger ratio). Each case alternates
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

from ._apps import SECRET_KEY, FlaskBench, QuartBench, flask_app, quart_app, sqlite_urls
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
    """One batch of ``size`` requests through the Flask test client; seconds per request.

    The test client goes through ``app.wsgi_app``; it measured less noisy here than
    calling ``app.wsgi_app`` with prebuilt environs (see ``direct_batch``).
    """
    client = bench.app.test_client(use_cookies=False)

    def run() -> float:
        headers = {"Cookie": f"{COOKIE}={sticky_cookie()}"} if cookie else {}
        paths = [f"/items/{random.randint(1, SEED_ROWS)}" for _ in range(size)]
        forms = [{"name": f"n{next(_names)}"} for _ in range(size)]
        start = time.perf_counter()
        if method == "GET":
            for path in paths:
                check(client.get(path, headers=headers).status_code, 200)
        else:
            for form in forms:
                check(client.post("/items", data=form, headers=headers).status_code, 201)
        return (time.perf_counter() - start) / size

    return run


def direct_batch(bench: FlaskBench, size: int) -> Callable[[], float]:
    """GETs through ``app.wsgi_app`` with prebuilt environs; seconds per request."""
    app = bench.app.wsgi_app

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        check(int(status.split()[0]), 200)

    def run() -> float:
        paths = [f"/items/{random.randint(1, SEED_ROWS)}" for _ in range(size)]
        environs = [EnvironBuilder(path=path).get_environ() for path in paths]
        start = time.perf_counter()
        for environ in environs:
            body = app(environ, start_response)
            b"".join(body)
            close = getattr(body, "close", None)
            if close is not None:
                close()
        return (time.perf_counter() - start) / size

    return run


def check(status: int, expected: int) -> None:
    if status != expected:
        raise RuntimeError(f"The benchmark app answered {status}, not {expected}.")


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
                check((await client.get(path)).status_code, 200)
        else:
            for form in forms:
                check((await client.post("/items", form=form)).status_code, 201)
        return (time.perf_counter() - start) / size

    return lambda: runner.run(batch())


def main() -> None:
    args = parse_args(__doc__)
    quick = args.quick
    rounds, size = (6, 20) if quick else (41, 300)
    # Quart's requests wait for aiosqlite's thread and back: its batches vary several
    # times as much as Flask's here, so it gets twice the rounds.
    quart_rounds = 2 * rounds
    banner("overhead: per-request cost of the router (SQLite primary + replica files)", quick)
    print(
        f"   {rounds} rounds (Quart: {quart_rounds}) of A and B batches of {size} requests, "
        "interleaved; times in us"
    )
    rows: list[list[object]] = []
    with scratch_dir() as folder:
        names = ["primary", "replica"]
        urls = sqlite_urls(folder, names, SEED_ROWS)
        plain = flask_app(urls["primary"], {"slave": urls["replica"]}, replicated=False)
        urls = sqlite_urls(folder, names, SEED_ROWS)
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
        for bench in (plain, routed):
            direct_batch(bench, 50)()
        samples = interleave(
            [("A", direct_batch(plain, size)), ("B", direct_batch(routed, size))], rounds
        )
        rows.append(row("Flask GET, direct wsgi_app", samples))
        plain.dispose()
        routed.dispose()

        aurls = sqlite_urls(folder, names, SEED_ROWS, "sqlite+aiosqlite")
        qplain = quart_app(aurls["primary"], {"slave": aurls["replica"]}, replicated=False)
        aurls = sqlite_urls(folder, names, SEED_ROWS, "sqlite+aiosqlite")
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
                    quart_rounds,
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
    return [
        label,
        us(a),
        us(b),
        us(b - a),
        f"{ratio:.3f}",
        spread(ratio_list),
        verdict(ratio <= TARGET),
    ]


if __name__ == "__main__":
    main()
