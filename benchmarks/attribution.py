"""Where the per-request overhead goes: the routed app with parts switched off.

A diagnostic for ``overhead``, not a target. Builds the routed app several times,
each time with one of the router's SQLAlchemy hooks left out by patching it away
while the app is built (nothing is edited on disk), and times all of them against
plain Flask-SQLAlchemy (or a plain ``async_sessionmaker``), interleaved:

- "no sticky cookie": the response never sets the sticky cookie (no signing);
- "no write guards": no dialect-level execute listeners (the replica write guard,
  the primary's write detector, so no sticky cookie either);
- "no failover": the session's ``execute``/``scalar``/``scalars`` not wrapped for retry;
- "hooks only": neither, and no counters: what is left is opening and closing the
  request's scope (Flask's middleware, Quart's signals), the decision itself and
  the per-statement routing.

The parts switched off are private names of this version; if they are renamed,
the variants fail loudly rather than measure the wrong thing.
"""

from __future__ import annotations

import asyncio
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any
from unittest import mock

import flask_replicated.extension
import quart_replicated.extension
from replicated_core.router import Router

from ._apps import flask_app, quart_app, sqlite_urls
from ._common import banner, interleave, median, parse_args, ratios, scratch_dir, table, us
from .overhead import SEED_ROWS, flask_batch, quart_batch

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

VARIANTS = {
    "routed (all)": (),
    "no sticky cookie": ("cookie",),
    "no write guards": ("guards",),
    "no failover": ("failover",),
    "hooks only": ("guards", "failover", "counters"),
}


@contextmanager
def without(parts: tuple[str, ...]) -> Iterator[None]:
    """Build apps without ``parts`` of the router."""
    with ExitStack() as stack:
        if "guards" in parts:
            stack.enter_context(mock.patch.object(Router, "_install_guards", return_value=None))
        if "failover" in parts:
            for module in (flask_replicated.extension, quart_replicated.extension):
                stack.enter_context(mock.patch.object(module, "with_failover", _unchanged))
        yield


def switch_off(router: Router, parts: tuple[str, ...]) -> None:
    """Switch off the per-request ``parts`` of an app's router."""
    if "cookie" in parts:
        router.requests.cookie_update = lambda *args, **kwargs: None  # type: ignore[method-assign]
    if "counters" in parts:
        router.counters.add_event = lambda names: None  # type: ignore[method-assign]


def _unchanged(session_class: type[Any], router_of: Any) -> type[Any]:
    return session_class


def main() -> None:
    args = parse_args(__doc__)
    quick = args.quick
    rounds, size = (4, 20) if quick else (25, 300)
    banner("attribution: the routed app with parts switched off (diagnostic)", quick)
    print(f"   {rounds} rounds of batches of {size} requests, all variants interleaved; us")
    rows: list[list[object]] = []
    with scratch_dir() as folder:
        names = ["primary", "replica"]
        urls = sqlite_urls(folder, names, SEED_ROWS)
        flask_apps = {
            "plain": flask_app(urls["primary"], {"slave": urls["replica"]}, replicated=False)
        }
        for name, parts in VARIANTS.items():
            urls = sqlite_urls(folder, names, SEED_ROWS)
            with without(parts):
                bench = flask_app(urls["primary"], {"slave": urls["replica"]}, replicated=True)
            switch_off(bench.app.extensions["replicated"].router(bench.app), parts)
            flask_apps[name] = bench
        for method in ("GET", "POST"):
            cases = [(name, flask_batch(b, method, size, False)) for name, b in flask_apps.items()]
            for _, run in cases:
                run()
            rows += summarize(f"Flask {method}", interleave(cases, rounds))
        for bench in flask_apps.values():
            bench.dispose()

        qurls = sqlite_urls(folder, names, SEED_ROWS, "sqlite+aiosqlite")
        quart_apps = {
            "plain": quart_app(qurls["primary"], {"slave": qurls["replica"]}, replicated=False)
        }
        for name, parts in VARIANTS.items():
            qurls = sqlite_urls(folder, names, SEED_ROWS, "sqlite+aiosqlite")
            with without(parts):
                qbench = quart_app(qurls["primary"], {"slave": qurls["replica"]}, replicated=True)
            switch_off(qbench.app.extensions["replicated"].router(qbench.app), parts)
            quart_apps[name] = qbench
        with asyncio.Runner() as runner:
            for method in ("GET", "POST"):
                qcases: list[tuple[str, Callable[[], float]]] = [
                    (name, quart_batch(b, runner, method, size)) for name, b in quart_apps.items()
                ]
                for _, run in qcases:
                    run()
                rows += summarize(f"Quart {method}", interleave(qcases, rounds))
            for qbench in quart_apps.values():
                runner.run(qbench.dispose())
    table(["case", "variant", "us", "minus plain", "ratio to plain", "share of overhead"], rows)


def summarize(case: str, samples: dict[str, list[float]]) -> list[list[Any]]:
    base = samples["plain"]
    full = median([v - b for v, b in zip(samples["routed (all)"], base, strict=True)])
    rows: list[list[Any]] = []
    for name, values in samples.items():
        extra = median([v - b for v, b in zip(values, base, strict=True)])
        share = f"{100 * extra / full:.0f}%" if full > 0 and name != "plain" else ""
        rows.append(
            [
                case,
                name,
                us(median(values)),
                us(extra),
                f"{median(ratios(values, base)):.3f}",
                share,
            ]
        )
    return rows


if __name__ == "__main__":
    main()
