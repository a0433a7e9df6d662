"""The routing decision: per statement (get_bind to engine) and per request
(``router.requests.begin``/``end``).

No server is needed: the engines have PostgreSQL URLs but never connect, and the
replicas' positions are recorded by hand, as a probe would. Sticky mode "wal".
Each part runs in batches, all parts interleaved, and the median time per call is
reported. Target: at most 2 us (median) for the per-statement decision, measured
from the session's ``get_bind`` entry to the chosen engine, with a sticky cookie.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from replicated_core.backends import ReplicaProbe
from replicated_core.config import load_config
from replicated_core.nodes import Node, Role
from replicated_core.router import Router
from replicated_core.rules import RequestFacts, decide
from replicated_core.session import RoutingSession
from replicated_core.sticky import StickyCodec, StickyToken

from ._apps import SECRET_KEY, Item, flask_app
from ._common import banner, interleave, median, parse_args, table, verdict

if TYPE_CHECKING:
    from collections.abc import Callable

TARGET_SECONDS = 2e-6
REPLAYED = 5_000_000  # the replicas' replay position
WRITTEN = 4_000_000  # the client's write, which both replicas replayed
READ = RequestFacts(method="GET", view="read", readonly=True, forced_primary=False)


def pg_url(port: int) -> str:
    return f"postgresql+psycopg://bench:secret@127.0.0.1:{port}/app"


def make_router() -> Router:
    """A router over three never-connected PostgreSQL engines, replicas caught up."""
    config = load_config(
        {"REPLICATED_REPLICA_BINDS": ["r1", "r2"], "REPLICATED_STICKY_MODE": "wal"}
    )
    primary = Node("master", Role.PRIMARY, sa.create_engine(pg_url(1)))
    replicas = [
        Node(name, Role.REPLICA, sa.create_engine(pg_url(2 + i)))
        for i, name in enumerate(["r1", "r2"])
    ]
    router = Router(config, primary, replicas, StickyCodec(SECRET_KEY))
    record_positions(router)
    return router


def record_positions(router: Router) -> None:
    """What the router's first connections and probes would tell it: the cluster its
    tokens are bound to, and replicas that replayed up to REPLAYED."""
    assert router.codec is not None
    router.codec.cluster = "bench-00"
    for node in router.replicas:
        router.health.record(node, ReplicaProbe(True, REPLAYED, REPLAYED, 0.0))


def per_call(fn: Callable[[], Any], n: int) -> Callable[[], float]:
    """A batch of ``n`` calls of ``fn``; seconds per call."""

    def run() -> float:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n

    return run


def in_scope(
    router: Router, cookie: str | None, fn: Callable[[], Any], n: int
) -> Callable[[], float]:
    """A batch of ``n`` calls of ``fn`` inside one request scope opened with ``cookie``."""
    batch = per_call(fn, n)

    def run() -> float:
        router.requests.begin(READ, cookie)
        try:
            return batch()
        finally:
            router.requests.end()

    return run


def begins(router: Router, cookie: str | None, n: int) -> Callable[[], float]:
    """``n`` request scopes opened (timed), then closed (not timed)."""

    def run() -> float:
        begin = router.requests.begin
        start = time.perf_counter()
        for _ in range(n):
            begin(READ, cookie)
        elapsed = time.perf_counter() - start
        for _ in range(n):
            router.requests.end()
        return elapsed / n

    return run


def ends(router: Router, n: int) -> Callable[[], float]:
    """``n`` request scopes opened (not timed), then closed (timed)."""

    def run() -> float:
        for _ in range(n):
            router.requests.begin(READ, None)
        end = router.requests.end
        start = time.perf_counter()
        for _ in range(n):
            end()
        return (time.perf_counter() - start) / n

    return run


def flask_get_bind(routed: bool, cookie: str | None, n: int) -> Callable[[], float]:
    """Flask-SQLAlchemy's ``Session.get_bind`` for an ORM select, in an app context."""
    bench = flask_app(pg_url(1), {"r1": pg_url(2), "r2": pg_url(3)}, replicated=routed)
    app, db = bench.app, bench.db
    router: Router | None = app.extensions["replicated"].router(app) if routed else None
    if router is not None:
        record_positions(router)
    with app.app_context():
        model = next(m.class_ for m in db.Model.registry.mappers)
    mapper = sa.inspect(model)
    statement = sa.select(model.name).where(model.id == 1)

    def run() -> float:
        with app.app_context():
            session = db.session()
            get_bind = session.get_bind
            if router is not None:
                router.requests.begin(READ, cookie)
            try:
                return per_call(lambda: get_bind(mapper=mapper, clause=statement), n)()
            finally:
                if router is not None:
                    router.requests.end()

    return run


def main() -> None:
    args = parse_args(__doc__)
    quick = args.quick
    rounds, n = (5, 2_000) if quick else (31, 20_000)
    banner("decision: cost of the routing decision", quick)
    print(f"   {rounds} interleaved rounds of {n} calls per part; median time per call")
    router = make_router()
    codec = router.codec
    assert codec is not None
    wal_cookie = codec.dumps(StickyToken(WRITTEN))
    behind_cookie = codec.dumps(StickyToken(REPLAYED + 1))
    time_cookie = codec.dumps(StickyToken())
    session = RoutingSession(router=router)
    mapper = sa.inspect(Item)
    statement = sa.select(Item.name).where(Item.id == 1)
    views = router.health.views()

    def noop() -> None:
        return None

    def routing_get_bind() -> Any:
        return session.get_bind(mapper=mapper, clause=statement)

    per_statement: list[tuple[str, str, Callable[[], float]]] = [
        ("statement", "empty call (loop baseline)", per_call(noop, n)),
        ("statement", "router.node(), no cookie", in_scope(router, None, router.node, n)),
        (
            "statement",
            "router.node(), wal cookie, replicas caught up",
            in_scope(router, wal_cookie, router.node, n),
        ),
        (
            "statement",
            "router.node(), wal cookie, replicas behind",
            in_scope(router, behind_cookie, router.node, n),
        ),
        ("statement", "router.node(), time cookie", in_scope(router, time_cookie, router.node, n)),
        (
            "statement",
            "RoutingSession.get_bind (Quart), wal cookie",
            in_scope(router, wal_cookie, routing_get_bind, n),
        ),
        (
            "statement",
            "Flask-SQLAlchemy get_bind, routed, wal cookie",
            flask_get_bind(True, wal_cookie, n),
        ),
        (
            "statement",
            "Flask-SQLAlchemy get_bind, plain (reference)",
            flask_get_bind(False, None, n),
        ),
    ]
    per_request: list[tuple[str, str, Callable[[], float]]] = [
        ("request", "requests.begin, no cookie", begins(router, None, n)),
        ("request", "requests.begin, valid wal cookie", begins(router, wal_cookie, n)),
        ("request", "requests.begin, valid time cookie", begins(router, time_cookie, n)),
        ("request", "requests.begin, garbled cookie", begins(router, wal_cookie[:-3] + "xyz", n)),
        ("request", "requests.end", ends(router, n)),
        (
            "part of begin",
            "codec.loads (valid wal cookie)",
            per_call(lambda: router.requests.read_token(wal_cookie), n),
        ),
        ("part of begin", "health.views() (2 replicas)", per_call(router.health.views, n)),
        (
            "part of begin",
            "decide(), wal cookie",
            per_call(lambda: decide(READ, StickyToken(WRITTEN), router.primary, views), n),
        ),
        (
            "part of begin",
            "decide(), no cookie",
            per_call(lambda: decide(READ, None, router.primary, views), n),
        ),
        (
            "part of request",
            "codec.dumps (after a write)",
            per_call(lambda: codec.dumps(StickyToken(WRITTEN)), max(1, n // 10)),
        ),
    ]
    counters = getattr(router, "counters", None)
    if counters is not None:
        per_request.append(
            (
                "part of begin",
                "router.counters.add (3 names)",
                per_call(lambda: counters.add("a", "b", "c"), n),
            )
        )
    cases = [*per_statement, *per_request]
    samples = interleave([(label, run) for _, label, run in cases], rounds)
    base = median(samples["empty call (loop baseline)"])
    rows = []
    for kind, label, _ in cases:
        value = median(samples[label])
        target = ""
        if "get_bind" in label and "plain" not in label:
            target = f"<= 2 us: {verdict(value <= TARGET_SECONDS)}"
        rows.append([kind, label, f"{value * 1e9:.0f}", f"{(value - base) * 1e9:.0f}", target])
    table(["per", "part", "ns/call", "minus loop", "target"], rows)


if __name__ == "__main__":
    main()
