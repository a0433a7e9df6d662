"""What counts as a replica failure: only a lost or refused connection marks a replica
down and moves the read elsewhere. A bad query (a missing table, a syntax error) is
the view's error, raised from the replica, on every backend."""

from __future__ import annotations

import socket

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from support import make_flask_app, make_quart_app, sqlite_backend

BAD_QUERIES = {
    "missing table": "SELECT * FROM no_such_table",
    "syntax error": "SELECT FROM WHERE",
}


def _expected_error(backend, query):
    """The sync driver's own message for ``query``, asked of the replica directly."""
    engine = sa.create_engine(backend.url("replica"))
    try:
        with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError) as raised:
            conn.execute(sa.text(query))
    finally:
        engine.dispose()
    return str(raised.value.orig)


async def _expected_async_error(backend, query):
    """The async driver's own message for ``query``, asked of the replica directly."""
    engine = create_async_engine(backend.url("replica", asynchronous=True))
    try:
        async with engine.connect() as conn:
            with pytest.raises(sa.exc.DBAPIError) as raised:
                await conn.execute(sa.text(query))
    finally:
        await engine.dispose()
    return str(raised.value.orig)


def _assert_untouched(router):
    assert router.metrics().get("retries", 0) == 0
    assert router.health.marked_down == 0
    assert router.health.usable("slave")


@pytest.mark.parametrize("query", sorted(BAD_QUERIES))
def test_flask_a_bad_query_on_a_replica_is_the_views_error(flask_app_factory, backend, query):
    app = flask_app_factory()
    router = app.extensions["replicated"].router(app)

    @app.get("/bad")
    def bad():
        app.db.session.execute(sa.text(BAD_QUERIES[query]))
        return "no error"

    with pytest.raises(sa.exc.DBAPIError) as raised:
        app.test_client().get("/bad")
    assert str(raised.value.orig) == _expected_error(backend, BAD_QUERIES[query])
    _assert_untouched(router)
    assert app.test_client().get("/who").text == "replica"


@pytest.mark.parametrize("query", sorted(BAD_QUERIES))
async def test_quart_a_bad_query_on_a_replica_is_the_views_error(quart_app_factory, backend, query):
    app = quart_app_factory()
    router = app.rep.router(app)

    @app.get("/bad")
    async def bad():
        await app.rep.session.execute(sa.text(BAD_QUERIES[query]))
        return "no error"

    async with app.test_app():
        response = await app.test_client().get("/bad")
        who = await (await app.test_client().get("/who")).get_data(as_text=True)
    assert response.status_code == 500
    expected = await _expected_async_error(backend, BAD_QUERIES[query])
    assert [str(getattr(e, "orig", e)) for e in app.errors] == [expected]
    _assert_untouched(router)
    assert who == "replica"


def _table_only_on_the_primary(backend):
    engine = sa.create_engine(backend.url("primary"))
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE only_on_primary (id INTEGER)"))
    engine.dispose()


def test_flask_a_table_the_replica_lacks_is_not_read_from_the_primary(tmp_path):
    """SQLite files are separate databases: a table missing on the replica file is an
    error to see, not a reason to read the primary's table instead."""
    backend = sqlite_backend(tmp_path)
    _table_only_on_the_primary(backend)
    app = make_flask_app(backend)
    router = app.extensions["replicated"].router(app)

    @app.get("/count")
    def count():
        return str(app.db.session.execute(sa.text("SELECT count(*) FROM only_on_primary")).scalar())

    with pytest.raises(sa.exc.OperationalError) as raised:
        app.test_client().get("/count")
    assert str(raised.value.orig) == "no such table: only_on_primary"
    _assert_untouched(router)


async def test_quart_a_table_the_replica_lacks_is_not_read_from_the_primary(tmp_path):
    backend = sqlite_backend(tmp_path)
    _table_only_on_the_primary(backend)
    app = make_quart_app(backend)
    router = app.rep.router(app)

    @app.get("/count")
    async def count():
        result = await app.rep.session.execute(sa.text("SELECT count(*) FROM only_on_primary"))
        return str(result.scalar())

    async with app.test_app():
        response = await app.test_client().get("/count")
    assert response.status_code == 500
    assert [str(getattr(e, "orig", e)) for e in app.errors] == ["no such table: only_on_primary"]
    _assert_untouched(router)
    for engine in app.rep._apps[app].engines.values():
        await engine.dispose()


def _refusing_port():
    """A loopback port nobody listens on (bound, then closed: connects are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _refuse_new_connections(engine):
    """From now on, every new connection of ``engine`` goes to a port that refuses it,
    as if its server had gone away since its last position check."""
    engine.dispose()
    port = _refusing_port()

    @sa.event.listens_for(engine, "do_connect")
    def elsewhere(dialect, record, cargs, cparams):
        cparams["port"] = port


# A position check once, then none for the rest of the test.
CHECKED_ONCE = {"REPLICATED_CHECK_INTERVAL": 3600, "REPLICATED_STICKY_MODE": "time"}


def test_flask_a_refused_connection_marks_the_replica_down(postgresql_backend):
    """psycopg's connect error carries no SQLSTATE (the server never answered): it is
    a connection failure, and the read moves to the primary."""
    app = make_flask_app(postgresql_backend, **CHECKED_ONCE)
    router = app.extensions["replicated"].router(app)
    client = app.test_client()
    try:
        assert client.get("/who").text == "replica"
        _refuse_new_connections(router.node_named("slave").engine)
        assert client.get("/who").text == "primary"
        # Either the request met the refusal (and was retried on the primary) or the
        # prober, restarted by the dispose, met it first (and the request went to
        # the primary at once). Either way the replica is down for the refusal.
        metrics = router.metrics()
        assert metrics.get("retries", 0) <= 1
        assert metrics["replicas_marked_down"] >= 1
        assert not router.health.usable("slave")
    finally:
        for engine in app.db._app_engines[app].values():
            engine.dispose()


async def test_quart_a_refused_connection_marks_the_replica_down(postgresql_backend):
    """asyncpg's refused connect is an OSError, which no engine event sees."""
    app = make_quart_app(postgresql_backend, **CHECKED_ONCE)
    router = app.rep.router(app)
    async with app.test_app():
        client = app.test_client()
        first = await (await client.get("/who")).get_data(as_text=True)
        engine = app.rep._apps[app].by_node["slave"]
        await engine.dispose()
        _refuse_new_connections(engine.sync_engine)
        second = await (await client.get("/who")).get_data(as_text=True)
    assert app.errors == []
    assert (first, second) == ("replica", "primary")
    assert router.metrics()["retries"] == 1
    assert not router.health.usable("slave")


async def test_quart_a_read_fails_over_past_every_replica_that_refuses(postgresql_backend):
    """Both replicas gone since their last check: the read tries one, then the other,
    then the primary, each once, and the client sees the primary's answer."""
    app = make_quart_app(postgresql_backend, replica=["replica", "lagging"], **CHECKED_ONCE)
    router = app.rep.router(app)
    async with app.test_app():
        client = app.test_client()
        first = await (await client.get("/who")).get_data(as_text=True)
        for name in ("replica", "lagging"):
            engine = app.rep._apps[app].by_node[name]
            await engine.dispose()
            _refuse_new_connections(engine.sync_engine)
        second = await (await client.get("/who")).get_data(as_text=True)
    assert app.errors == []
    assert first in ("replica", "lagging")
    assert second == "primary"
    assert router.metrics()["retries"] == 2
    assert not router.health.usable("replica")
    assert not router.health.usable("lagging")
