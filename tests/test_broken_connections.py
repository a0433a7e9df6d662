"""A pooled connection whose server has ended it while its socket still looks open.

A server that ends a session (``pg_terminate_backend``, a fast shutdown, the backends
of a killed postmaster in a failover) sends a FATAL error, then closes the socket.
asyncpg reads that error on an idle connection as soon as it arrives, and its
protocol is stuck from then on: the next operation raises ``InternalClientError``
("cannot switch to state 15; another operation (2) is in progress"). This was seen
in tests/test_ha.py's failovers through HAProxy. Here a proxy on loopback holds the
close back for ten seconds, so the window is wide enough to test.

SQLAlchemy 2.0.50 and later call that error a disconnect: the pool drops the
connection, pre-ping reconnects, and a read moves on. With 2.0.49 the three Quart
tests fail (the pool kept the connection, and the client got a 500), hence the
project's minimum. psycopg reads nothing while idle, so Flask never had the window.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import sqlalchemy as sa
from support import (
    Backend,
    SlowCloseProxy,
    dispose_flask_app,
    make_flask_app,
    make_quart_app,
    terminate_backends,
    text_of,
)

APP_NAME = "broken-connection-test"
SETTLE = 0.3  # seconds for the FATAL to reach the client (the close comes 10 s later)


@pytest.fixture
def proxied(postgresql_backend: Backend, pg_cluster: Any) -> Iterator[Backend]:
    """The cluster, with the primary and 'replica' reached through slow-close proxies."""
    urls, async_urls = dict(postgresql_backend.urls), dict(postgresql_backend.async_urls)
    nodes = {"primary": pg_cluster.primary, "replica": pg_cluster.replica("replica")}
    with (
        SlowCloseProxy(("127.0.0.1", nodes["primary"].port)) as to_primary,
        SlowCloseProxy(("127.0.0.1", nodes["replica"].port)) as to_replica,
    ):
        for label, proxy in (("primary", to_primary), ("replica", to_replica)):
            urls[label] = _port(urls[label], proxy.port)
            async_urls[label] = _port(async_urls[label], proxy.port)
        yield replace(postgresql_backend, urls=urls, async_urls=async_urls)


def _port(url: str, port: int) -> str:
    return sa.make_url(url).set(port=port).render_as_string(hide_password=False)


def _config(adapter: str, pre_ping: bool) -> dict[str, Any]:
    # Its connections are found by name on the servers, to be terminated.
    named = (
        {"application_name": APP_NAME}
        if adapter == "flask"
        else {"server_settings": {"application_name": APP_NAME}}
    )
    return {
        "SQLALCHEMY_ENGINE_OPTIONS": {"pool_pre_ping": pre_ping, "connect_args": named},
        # No check in the test's time: the prober's own connections are terminated too.
        "REPLICATED_CHECK_INTERVAL": 3600,
        "REPLICATED_STICKY_MODE": "time",
    }


def _terminate(postgresql_backend: Backend, label: str) -> None:
    killer = sa.create_engine(postgresql_backend.url(label))
    try:
        terminate_backends(killer, APP_NAME)
    finally:
        killer.dispose()


@pytest.mark.parametrize("pre_ping", [True, False], ids=["pre_ping", "no_pre_ping"])
async def test_quart_a_read_on_a_connection_its_replica_ended_is_served(
    proxied: Backend, postgresql_backend: Backend, pre_ping: bool
) -> None:
    app = make_quart_app(proxied, **_config("quart", pre_ping))
    async with app.test_app():
        client = app.test_client()
        first = await text_of(await client.get("/who"))
        await asyncio.to_thread(_terminate, postgresql_backend, "replica")
        await asyncio.sleep(SETTLE)
        response = await client.get("/who")
        second = await text_of(response)
    await app.rep.dispose(app)
    assert first == "replica"
    assert app.errors == []
    assert response.status_code == 200
    # Pre-ping reconnects to the replica; without it the read is retried on the primary.
    assert second == ("replica" if pre_ping else "primary")


async def test_quart_a_write_on_a_connection_its_primary_ended_succeeds_with_pre_ping(
    proxied: Backend, postgresql_backend: Backend
) -> None:
    app = make_quart_app(proxied, **_config("quart", True))
    name = f"after-the-end-{time.time()}"
    async with app.test_app():
        client = app.test_client()
        assert (await client.post("/who")).status_code == 200  # a pooled primary connection
        await asyncio.to_thread(_terminate, postgresql_backend, "primary")
        await asyncio.sleep(SETTLE)
        response = await client.post("/items", form={"name": name})
    await app.rep.dispose(app)
    assert app.errors == []
    assert response.status_code == 303
    engine = sa.create_engine(postgresql_backend.url("primary"))
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT count(*) FROM items WHERE name = :n"), {"n": name})
            assert rows.scalar() == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize("pre_ping", [True, False], ids=["pre_ping", "no_pre_ping"])
def test_flask_a_read_on_a_connection_its_replica_ended_is_served(
    proxied: Backend, postgresql_backend: Backend, pre_ping: bool
) -> None:
    app = make_flask_app(proxied, **_config("flask", pre_ping))
    try:
        client = app.test_client()
        assert client.get("/who").text == "replica"
        _terminate(postgresql_backend, "replica")
        time.sleep(SETTLE)
        response = client.get("/who")
    finally:
        dispose_flask_app(app)
    assert response.status_code == 200
    assert response.text == ("replica" if pre_ping else "primary")


@pytest.mark.parametrize("through", ["proxy", "direct"])
async def test_quart_a_token_read_on_a_connection_its_primary_ended_fails_once_only(
    request: pytest.FixtureRequest, postgresql_backend: Backend, through: str
) -> None:
    """consistency_token() outside a request reads the primary's position on a pooled
    connection, below SQLAlchemy's error handling. Without pre-ping the first call on a
    connection its server ended fails, as any first use does; the calls after it must
    not (that connection was left in the pool, and every later call failed on it)."""
    backend = request.getfixturevalue("proxied") if through == "proxy" else postgresql_backend
    app = make_quart_app(backend, **_config("quart", False))
    outcomes: list[str] = []
    async with app.test_app():
        async with app.app_context():
            await app.rep.consistency_token()  # a pooled primary connection
        await asyncio.to_thread(_terminate, postgresql_backend, "primary")
        await asyncio.sleep(SETTLE)
        for _ in range(3):
            try:
                async with app.app_context():
                    await app.rep.consistency_token()
                outcomes.append("token")
            except Exception as error:
                outcomes.append(type(error).__name__)
    await app.rep.dispose(app)
    assert outcomes[1:] == ["token", "token"], outcomes


class _EndOnce:
    """A pool ``reset`` listener, put before the router's own: the first time, the
    server ends the connection going back to the pool after its commit, and its FATAL
    is in the socket when the router reads the primary's position on it."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.ended = False

    def __call__(self, dbapi_connection: Any, record: Any, state: Any) -> None:
        if not self.ended:
            self.ended = True
            _terminate(self.backend, "primary")
            time.sleep(SETTLE)


async def test_quart_a_connection_that_dies_before_its_position_is_read_is_not_reused(
    proxied: Backend, postgresql_backend: Backend
) -> None:
    """After a request's commit, the primary's position is read on the same connection
    as it goes back to the pool. If its server ends it just then (a failover), that
    read fails; the connection must not be handed out again, or the next request's
    first statement fails on it (no pre-ping here)."""
    app = make_quart_app(proxied, **{**_config("quart", False), "REPLICATED_STICKY_MODE": "wal"})
    end_it = _EndOnce(postgresql_backend)
    async with app.test_app():
        client = app.test_client()
        primary = app.rep._apps[app].by_node["master"].sync_engine
        sa.event.listen(primary.pool, "reset", end_it, insert=True)
        statuses = []
        for name in ("before-the-end", "after-the-end"):
            try:
                statuses.append((await client.post("/items", form={"name": name})).status_code)
            except Exception as error:  # Quart's test client re-raises the view's error
                statuses.append(type(error).__name__)
    await app.rep.dispose(app)
    assert end_it.ended
    assert statuses == [303, 303], (statuses, app.errors)


def test_flask_a_connection_that_dies_before_its_position_is_read_is_not_reused(
    proxied: Backend, postgresql_backend: Backend
) -> None:
    app = make_flask_app(proxied, **{**_config("flask", False), "REPLICATED_STICKY_MODE": "wal"})
    end_it = _EndOnce(postgresql_backend)
    try:
        with app.app_context():
            sa.event.listen(app.db.engine.pool, "reset", end_it, insert=True)
        client = app.test_client()
        statuses = [
            client.post("/items", data={"name": name}).status_code
            for name in ("before-the-end", "after-the-end")
        ]
    finally:
        dispose_flask_app(app)
    assert end_it.ended
    assert statuses == [303, 303]
