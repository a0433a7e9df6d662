""" "This request wrote" from what the primary did, and its WAL position read on the
connection that committed: on the real cluster, in both adapters.

The replica in these tests is 'lagging' (500 ms apply delay): a write the router
did not see is read back stale.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from support import dispose_flask_app, make_flask_app, make_quart_app

from replicated_core import StickyMode

HEADER = "X-Served-By"
COOKIE = "replicated_sticky"
FUNCTION = """\
CREATE OR REPLACE FUNCTION add_item(item_name text) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO items (name) VALUES (item_name);
    RETURN 1;
END $$"""


@pytest.fixture(scope="module")
def writing_function(pg_cluster: Any, postgresql_backend: Any) -> None:
    """A plpgsql function that inserts, on the primary and replayed by every replica."""
    engine = sa.create_engine(pg_cluster.primary.url("psycopg"))
    with engine.begin() as conn:
        conn.execute(sa.text(FUNCTION))
    engine.dispose()
    pg_cluster.wait_for_replay(include_delayed=True)


def _token(app: Any, cookie: str | None) -> Any:
    router = app.extensions["replicated"].router(app)
    assert router.sticky_mode is StickyMode.WAL
    return router.codec.loads(cookie, max_age=router.sticky_ttl)


def _name(kind: str) -> str:
    # Only letters, digits and dashes: it goes into a DO block's text as it is.
    return f"{kind}-{time.time_ns()}"


def _write_through(session: Any, kind: str, name: str) -> None:
    if kind == "function":
        session.execute(sa.text("SELECT add_item(:name)"), {"name": name})
    else:
        session.execute(sa.text(f"DO $$ BEGIN INSERT INTO items (name) VALUES ('{name}'); END $$"))


def _read_back_until_replica(get: Any, name: str) -> list[str]:
    """GET /items until the lagging replica serves it; every answer has the write."""
    nodes = []
    deadline = time.monotonic() + 10
    while not nodes or nodes[-1] != "lagging":
        listing = get()
        assert name in listing["names"], f"stale read from {listing['node']}"
        nodes.append(listing["node"])
        assert time.monotonic() < deadline, "the replica never served the writer again"
        time.sleep(0.02)
    return nodes


@pytest.mark.parametrize("kind", ["function", "do"])
def test_flask_a_write_the_text_does_not_show_sets_the_cookie(
    postgresql_backend: Any, writing_function: None, kind: str
) -> None:
    """The next GET reads the write: on the primary until the replica replayed the
    position in the cookie, then on the replica, which then has the row."""
    app = make_flask_app(postgresql_backend, replica="lagging", REPLICATED_DEBUG_HEADER=HEADER)
    db = app.db

    @app.post("/hidden")
    def hidden() -> Any:
        _write_through(db.session, kind, app.config["NAME"])
        db.session.commit()
        return "", 204

    try:
        client = app.test_client()
        name = app.config["NAME"] = _name(kind)
        response = client.post("/hidden")
        assert response.status_code == 204
        token = _token(app, _flask_cookie(client))
        assert token is not None
        assert token.lsn is not None
        nodes = _read_back_until_replica(lambda: client.get("/items").json, name)
        assert nodes[0] == "primary"
    finally:
        dispose_flask_app(app)


@pytest.mark.parametrize("kind", ["function", "do"])
async def test_quart_a_write_the_text_does_not_show_sets_the_cookie(
    postgresql_backend: Any, writing_function: None, kind: str
) -> None:
    app = make_quart_app(postgresql_backend, replica="lagging", REPLICATED_DEBUG_HEADER=HEADER)
    rep = app.rep

    @app.post("/hidden")
    async def hidden() -> Any:
        name = app.config["NAME"]
        await rep.session.run_sync(lambda session: _write_through(session, kind, name))
        await rep.session.commit()
        return "", 204

    async with app.test_app():
        client = app.test_client()
        name = app.config["NAME"] = _name(kind)
        response = await client.post("/hidden")
        assert response.status_code == 204, app.errors
        token = _token(app, _quart_cookie(response))
        assert token is not None
        assert token.lsn is not None
        nodes = []
        deadline = time.monotonic() + 10
        while not nodes or nodes[-1] != "lagging":
            listing = await (await client.get("/items")).get_json()
            assert name in listing["names"], f"stale read from {listing['node']}"
            nodes.append(listing["node"])
            assert time.monotonic() < deadline, "the replica never served the writer again"
            await asyncio.sleep(0.02)
        assert nodes[0] == "primary"
        await rep.dispose(app)


def _flask_cookie(client: Any) -> str | None:
    cookie = client.get_cookie(COOKIE)
    return cookie.value if cookie is not None else None


def _quart_cookie(response: Any) -> str | None:
    for header in response.headers.getlist("Set-Cookie"):
        name, _, rest = header.partition("=")
        if name == COOKIE:
            return rest.split(";", 1)[0]
    return None


# -- the position without a second checkout --------------------------------------


def _pooled_binds(backend: Any, asynchronous: bool, **pool: Any) -> dict[str, Any]:
    return {
        "master": {"url": backend.url("primary", asynchronous=asynchronous), **pool},
        "slave": backend.url("lagging", asynchronous=asynchronous),
    }


def _flask_writer_app(backend: Any, barrier: threading.Barrier | None = None, **pool: Any) -> Any:
    """POST /add writes, commits and reads its row back (the session holds a
    connection again when the response starts), as views usually do."""
    app = make_flask_app(
        backend,
        replica="lagging",
        SQLALCHEMY_BINDS=_pooled_binds(backend, False, pool_timeout=2, **pool),
    )
    db, Item = app.db, app.Item

    @app.post("/add")
    def add() -> Any:
        item = Item(name=_name("pooled"))
        db.session.add(item)
        db.session.commit()
        found = db.session.get(Item, item.id)  # expired by the commit: read again
        if barrier is not None:
            barrier.wait(timeout=20)  # every writer holds its connection now
        return {"id": found.id}

    return app


IDLE_IN_TRANSACTION = (
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE datname = 'app' AND state LIKE 'idle in transaction%'"
)


def test_flask_one_connection_pool_answers_with_a_wal_cookie(
    postgresql_backend: Any, pg_cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """pool_size=1, max_overflow=0: the position is read on the request's own
    connection, so the POST neither waits for the pool nor falls back to time mode;
    and reading it leaves no transaction open on the pooled connection."""
    app = _flask_writer_app(postgresql_backend, pool_size=1, max_overflow=0)
    try:
        client = app.test_client()
        with caplog.at_level(logging.WARNING, logger="replicated"):
            response = client.post("/add")
        assert response.status_code == 200
        token = _token(app, _flask_cookie(client))
        assert token is not None
        assert token.lsn is not None
        assert caplog.messages == []
        assert pg_cluster.execute(pg_cluster.primary, IDLE_IN_TRANSACTION) == [(0,)]
    finally:
        dispose_flask_app(app)


def test_flask_fifteen_concurrent_writers_all_get_wal_cookies(postgresql_backend: Any) -> None:
    """SQLAlchemy's default pool sizes (5 + 10 overflow), spelled out so that the
    app-wide engine options do not change them: 15 writers hold all 15 connections
    at once."""
    writers = 15
    barrier = threading.Barrier(writers)
    app = _flask_writer_app(postgresql_backend, barrier, pool_size=5, max_overflow=10)

    def post(_: int) -> str:
        client = app.test_client()
        response = client.post("/add")
        if response.status_code != 200:
            return f"status {response.status_code}"
        token = _token(app, _flask_cookie(client))
        return "wal" if token is not None and token.lsn is not None else "time"

    try:
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=writers) as pool:
            outcomes = list(pool.map(post, range(writers)))
        print(f"15 concurrent Flask writers: {time.monotonic() - started:.2f} s")
        assert outcomes.count("wal") == writers, outcomes
    finally:
        dispose_flask_app(app)


def _quart_writer_app(backend: Any, barrier: asyncio.Barrier | None = None, **pool: Any) -> Any:
    app = make_quart_app(
        backend,
        replica="lagging",
        SQLALCHEMY_BINDS=_pooled_binds(backend, True, pool_timeout=2, **pool),
    )
    rep, Item = app.rep, app.Item

    @app.post("/add")
    async def add() -> Any:
        item = Item(name=_name("pooled"))
        rep.session.add(item)
        await rep.session.commit()
        found = await rep.session.scalar(sa.select(Item.id).where(Item.id == item.id))
        if barrier is not None:
            await asyncio.wait_for(barrier.wait(), timeout=20)
        return {"id": found}

    return app


async def test_quart_one_connection_pool_answers_with_a_wal_cookie(
    postgresql_backend: Any, pg_cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = _quart_writer_app(postgresql_backend, pool_size=1, max_overflow=0)
    async with app.test_app():
        with caplog.at_level(logging.WARNING, logger="replicated"):
            response = await app.test_client().post("/add")
        assert response.status_code == 200, app.errors
        token = _token(app, _quart_cookie(response))
        assert token is not None
        assert token.lsn is not None
        assert caplog.messages == []
        assert pg_cluster.execute(pg_cluster.primary, IDLE_IN_TRANSACTION) == [(0,)]
        await app.rep.dispose(app)


async def test_quart_fifteen_concurrent_writers_all_get_wal_cookies(
    postgresql_backend: Any,
) -> None:
    writers = 15
    barrier = asyncio.Barrier(writers)
    app = _quart_writer_app(postgresql_backend, barrier, pool_size=5, max_overflow=10)

    async def post() -> str:
        response = await app.test_client().post("/add")
        if response.status_code != 200:
            return f"status {response.status_code}"
        token = _token(app, _quart_cookie(response))
        return "wal" if token is not None and token.lsn is not None else "time"

    async with app.test_app():
        started = time.monotonic()
        outcomes = await asyncio.gather(*(post() for _ in range(writers)))
        print(f"15 concurrent Quart writers: {time.monotonic() - started:.2f} s")
        assert outcomes.count("wal") == writers, (outcomes, app.errors)
        await app.rep.dispose(app)


# -- a commit after the response started -----------------------------------------

LATE_COMMIT = (
    "The view 'late' (POST) committed a write after its response had started (in a "
    "'teardown_request' function or later), too late to set the sticky cookie: the "
    "client's next requests may read from a replica that has not replayed the write "
    "yet. Commit in the view or in an 'after_request' function. This is logged once."
)


@pytest.mark.parametrize("flush_in_view", [False, True])
def test_flask_a_commit_in_teardown_request_is_warned_about_once(
    postgresql_backend: Any, caplog: pytest.LogCaptureFixture, flush_in_view: bool
) -> None:
    app = make_flask_app(postgresql_backend, replica="lagging")
    db, Item = app.db, app.Item

    @app.post("/late")
    def late() -> Any:
        db.session.add(Item(name=_name("late")))
        if flush_in_view:
            db.session.flush()
        return "", 204

    @app.teardown_request
    def commit(exc: BaseException | None) -> None:
        db.session.commit()

    try:
        client = app.test_client()
        with caplog.at_level(logging.WARNING, logger="replicated"):
            for _ in range(3):
                assert client.post("/late").status_code == 204
            assert client.get("/items").status_code == 200
        assert caplog.messages == [LATE_COMMIT]
    finally:
        dispose_flask_app(app)
