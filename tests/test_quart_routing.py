"""Quart adapter: which server answers, asked of the server itself."""

from __future__ import annotations

import asyncio
import time

import pytest
import sqlalchemy as sa
from quart import Quart, websocket
from support import text_of

from quart_replicated import (
    QuartReplicated,
    ReplicaWriteError,
    changes_database,
    use_primary,
    use_replica,
)
from replicated_core import ConfigError
from replicated_core.intent import current_override, current_scope

VIEW_MESSAGE = (
    "The view '{view}' wrote to the database during a GET request, which is routed to a "
    "replica. Decorate it with '@changes_database' or wrap the write in 'use_primary()'."
)


@pytest.mark.parametrize(
    ("method", "node"),
    [
        ("GET", "replica"),
        ("HEAD", "replica"),
        ("POST", "primary"),
        ("PUT", "primary"),
        ("DELETE", "primary"),
        ("PATCH", "primary"),
    ],
)
async def test_method_decides_the_node(quart_app, method, node):
    response = await quart_app.test_client().open("/who", method=method)
    assert response.headers["X-Who"] == node


async def test_changes_database_covers_hooks_and_the_view(quart_app):
    seen = []

    @quart_app.before_request
    async def load_user():
        seen.append(await quart_app.who())

    client = quart_app.test_client()
    assert await text_of(await client.get("/forced")) == "primary"
    assert await text_of(await client.get("/who")) == "replica"
    assert seen == ["primary", "replica"]


async def test_get_engine_and_engine(quart_app):
    rep, backend = quart_app.rep, quart_app.backend
    seen = {}

    async def who(engine):
        async with engine.connect() as conn:
            return backend.label((await conn.execute(sa.text(backend.who_sql))).scalar())

    @quart_app.route("/engines", methods=["GET", "POST"])
    async def engines():
        seen["get_engine"] = await who(rep.get_engine())
        seen["engine"] = await who(rep.engine)
        with use_replica():
            seen["use_replica"] = await who(rep.get_engine())
        return ""

    client = quart_app.test_client()
    await client.get("/engines")
    assert seen == {"get_engine": "replica", "engine": "primary", "use_replica": "replica"}
    await client.post("/engines")
    assert seen == {"get_engine": "primary", "engine": "primary", "use_replica": "replica"}


async def test_one_session_per_request_closed_at_teardown(quart_app):
    rep = quart_app.rep
    sessions = []

    @quart_app.get("/session")
    async def session_view():
        assert rep.session is rep.session
        sessions.append(rep.session)
        await rep.session.execute(sa.text("SELECT 1"))
        assert rep.session.in_transaction()
        return ""

    client = quart_app.test_client()
    await client.get("/session")
    await client.get("/session")
    assert sessions[0] is not sessions[1]
    assert not sessions[0].in_transaction()
    assert not sessions[1].in_transaction()


async def test_outside_a_request_and_in_app_context(quart_app):
    async with quart_app.app_context():
        assert await quart_app.who() == "primary"
        with use_replica():
            assert await quart_app.who() == "replica"
            with use_primary():
                assert await quart_app.who() == "primary"


async def test_use_primary_pins_the_rest_of_the_request(quart_app):
    seen = []

    @quart_app.get("/mixed")
    async def mixed():
        seen.append(await quart_app.who())
        with use_primary():
            seen.append(await quart_app.who())
        seen.append(await quart_app.who())
        return ""

    await quart_app.test_client().get("/mixed")
    assert seen == ["replica", "primary", "primary"]
    assert current_scope() is None
    assert current_override() is None


async def test_writes_in_a_get_are_refused_before_they_are_sent(quart_app):
    rep, Item = quart_app.rep, quart_app.Item

    @quart_app.get("/orm")
    async def orm():
        rep.session.add(Item(name="never-written"))
        await rep.session.flush()
        return ""

    @quart_app.get("/raw")
    async def raw():
        await rep.session.execute(sa.text("INSERT INTO items (name) VALUES ('never-written')"))
        return ""

    client = quart_app.test_client()
    for view in ("orm", "raw"):
        assert (await client.get(f"/{view}")).status_code == 500
        error = quart_app.errors.pop()
        assert isinstance(error, ReplicaWriteError)
        assert str(error) == VIEW_MESSAGE.format(view=view)
        assert error.__cause__ is None
    async with quart_app.app_context():
        names = (await quart_app.rep.session.scalars(sa.text("SELECT name FROM items"))).all()
    assert "never-written" not in names


async def test_a_decorated_view_may_write(quart_app):
    rep, Item = quart_app.rep, quart_app.Item

    @quart_app.get("/signup")
    @changes_database
    async def signup():
        rep.session.add(Item(name="quart-signup"))
        await rep.session.commit()
        return await quart_app.who()

    response = await quart_app.test_client().get("/signup")
    assert await text_of(response) == "primary"
    assert "replicated_sticky=" in response.headers["Set-Cookie"]


async def test_websockets_use_the_primary_by_default(quart_app_factory):
    for readonly, expected in ((False, "primary"), (True, "replica")):
        app = quart_app_factory(REPLICATED_WEBSOCKET_READONLY=readonly)

        @app.websocket("/ws")
        async def ws(app=app):
            await websocket.send(await app.who())

        async with app.test_client().websocket("/ws") as socket:
            assert await socket.receive() == expected


async def _served_by(client, name, seconds=5.0):
    """GET /who until ``name`` answers (at most ``seconds``); the last answer.

    A new app's first position check that meets bytes waiting (another test's write,
    500 ms from replay) cannot tell for how long, and after an idle spell of this
    cluster (tests on other clusters) it takes the server's figure, which counts the
    idle time: the replica gets no reads until a later check. These tests start
    once it has one, so that what they see comes from their own write.
    """
    deadline = time.monotonic() + seconds
    while True:
        answer = await text_of(await client.get("/who"))
        if answer == name or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.05)


async def test_the_sticky_cookie_sends_a_writer_to_the_primary(quart_app_factory):
    app = quart_app_factory(replica="lagging", REPLICATED_STICKY_MODE="time")
    writer, other = app.test_client(), app.test_client()
    assert await _served_by(other, "lagging") == "lagging"
    response = await writer.post("/items", form={"name": "quart-sticky"})
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    listing = await (await writer.get("/items")).get_json()
    assert listing["node"] == "primary"
    assert "quart-sticky" in listing["names"]
    assert await text_of(await other.get("/who")) == "lagging"


async def test_get_after_post_without_stickiness_is_stale(quart_app_factory):
    app = quart_app_factory(replica="lagging", REPLICATED_STICKY_MODE="off")
    client = app.test_client()
    assert await _served_by(client, "lagging") == "lagging"
    await client.post("/items", form={"name": "quart-stale"})
    listing = await (await client.get("/items")).get_json()
    assert listing["node"] == "lagging"
    assert "quart-stale" not in listing["names"]


async def test_serving_disposes_the_engines(quart_app):
    async with quart_app.test_app() as test_app:
        response = await test_app.test_client().get("/who")
        assert await text_of(response) == "replica"
        pool = quart_app.rep._apps[quart_app].by_node["slave"].sync_engine.pool
        assert pool.checkedin() == 1
    assert quart_app.rep._apps[quart_app].by_node["slave"].sync_engine.pool.checkedin() == 0


async def test_a_sync_driver_url_is_refused_at_start_up(tmp_path):
    app = Quart(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'p.sqlite3'}"
    with pytest.raises(ConfigError) as caught:
        QuartReplicated(app)
    assert str(caught.value) == (
        "'SQLALCHEMY_DATABASE_URI' cannot be used: InvalidRequestError. It needs an async "
        "driver, such as 'postgresql+asyncpg://' or 'sqlite+aiosqlite://'."
    )


async def test_a_missing_uri_is_named():
    with pytest.raises(ConfigError) as caught:
        QuartReplicated(Quart(__name__))
    assert str(caught.value) == (
        "'SQLALCHEMY_DATABASE_URI' is not set. Set it to the primary's URL, with an async "
        "driver such as 'postgresql+asyncpg://' or 'sqlite+aiosqlite://'."
    )


async def test_rep_session_in_a_cli_command(quart_app):
    """A Quart CLI command is sync: it runs its own event loop around an app context."""
    import asyncio

    import click

    app, rep = quart_app, quart_app.rep

    @app.cli.command("who")
    def who_command():
        async def main():
            async with app.app_context():
                primary = await app.who()
                with use_replica():
                    replica = await app.who()
                await rep.session.execute(sa.text("SELECT 1"))
            await rep.dispose(app)
            click.echo(f"{primary} {replica}")

        asyncio.run(main())

    runner = app.test_cli_runner()
    result = await asyncio.to_thread(runner.invoke, args=["who"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "primary replica"


async def test_a_task_started_by_a_request_routes_like_a_job_once_it_ended(quart_app):
    """The task holds a copy of the GET's context; after the request it must get the
    primary (jobs default), not the GET's replica, and may write."""
    import asyncio

    app, rep = quart_app, quart_app.rep
    finished, outcome = asyncio.Event(), {}

    async def job():
        await finished.wait()
        async with app.app_context():
            outcome["node"] = await app.who()
            await rep.session.execute(sa.text("INSERT INTO items (name) VALUES ('from-a-job')"))
            await rep.session.commit()

    @app.get("/start")
    async def start():
        outcome["task"] = asyncio.create_task(job())
        return await app.who()

    assert await text_of(await app.test_client().get("/start")) == "replica"
    finished.set()
    await outcome["task"]
    assert outcome["node"] == "primary"
