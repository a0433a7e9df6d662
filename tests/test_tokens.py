"""The consistency token in a header, for clients without cookies, and what binds a
token to its cluster and its app; on the real cluster, in both adapters. The only
replica is the one with an apply delay, so a client that is not sticky misses its
write there."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import (
    dispose_flask_app,
    make_flask_app,
    make_quart_app,
    terminate_backends,
    text_of,
)

from replicated_core import use_replica
from replicated_core.config import ConfigError, load_config
from replicated_core.sticky import StickyCodec, StickyToken, cluster_tag, token_salt

TOKEN = "Replicated-Token"
COOKIE = "replicated_sticky"
FAR = StickyToken(2**62)  # a position no replica has replayed
NEAR = StickyToken(1)  # one every replica has


@pytest.fixture
def flask_app(postgresql_backend):
    app = make_flask_app(postgresql_backend, replica="lagging")
    yield app
    dispose_flask_app(app)


@pytest.fixture
async def quart_app(postgresql_backend):
    app = make_quart_app(postgresql_backend, replica="lagging")
    yield app
    await app.rep.dispose(app)


def _router(app):
    return app.extensions["replicated"].router(app)


def _forged(app, token, cluster=None, cookie_name=COOKIE):
    """A token signed with the app's key, as another server of it would make one."""
    codec = StickyCodec(app.secret_key, salt=token_salt(cookie_name))
    codec.cluster = cluster or _router(app).codec.cluster
    return codec.dumps(token)


def _system_identifier(backend, label):
    engine = sa.create_engine(backend.url(label))
    try:
        with engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT system_identifier::text FROM pg_control_system()")
            ).scalar()
    finally:
        engine.dispose()


# -- Flask ---------------------------------------------------------------------


def test_flask_a_write_answers_with_the_token_in_a_header_and_the_cookie(flask_app):
    client = flask_app.test_client()
    response = client.post("/items", data={"name": f"header-{time.time()}"})
    assert response.headers[TOKEN] == client.get_cookie(COOKIE).value
    assert TOKEN not in client.get("/who").headers


def test_flask_a_client_without_cookies_reads_its_write_with_the_header(flask_app):
    client = flask_app.test_client(use_cookies=False)
    name = f"api-{time.time()}"
    token = client.post("/items", data={"name": name}).headers[TOKEN]
    with_token = client.get("/items", headers={TOKEN: token}).json
    without = client.get("/items").json
    assert (with_token["node"], name in with_token["names"]) == ("primary", True)
    # Not sticky: the delayed replica, which has not replayed the write yet.
    assert (without["node"], name in without["names"]) == ("lagging", False)


def test_flask_the_token_is_bound_to_the_cluster(flask_app, postgresql_backend):
    client = flask_app.test_client(use_cookies=False)
    assert client.get("/who").text == "lagging"  # connections made: the cluster is known
    identifier = _system_identifier(postgresql_backend, "primary")
    assert identifier == _system_identifier(postgresql_backend, "lagging")
    assert _router(flask_app).codec.cluster == cluster_tag(identifier)
    ours = _forged(flask_app, FAR)
    theirs = _forged(flask_app, FAR, cluster=cluster_tag("another cluster"))
    assert client.get("/who", headers={TOKEN: ours}).text == "primary"
    assert client.get("/who", headers={TOKEN: theirs}).text == "lagging"


def test_flask_the_token_is_bound_to_the_app(flask_app):
    client = flask_app.test_client(use_cookies=False)
    assert client.get("/who").text == "lagging"
    other_app = _forged(flask_app, FAR, cookie_name="another_app")
    assert client.get("/who", headers={TOKEN: other_app}).text == "lagging"
    assert client.get("/who", headers={TOKEN: _forged(flask_app, FAR)}).text == "primary"


@pytest.mark.parametrize(("cookie", "header"), [(NEAR, FAR), (FAR, NEAR), (NEAR, NEAR)])
def test_flask_with_a_cookie_and_a_header_the_later_position_wins(flask_app, cookie, header):
    client = flask_app.test_client()
    assert client.get("/who").text == "lagging"
    client.set_cookie(COOKIE, _forged(flask_app, cookie))
    expected = "primary" if FAR in (cookie, header) else "lagging"
    assert client.get("/who", headers={TOKEN: _forged(flask_app, header)}).text == expected


def test_flask_the_header_can_be_renamed_or_turned_off(postgresql_backend):
    renamed = make_flask_app(postgresql_backend, replica="lagging", REPLICATED_TOKEN_HEADER="X-Rw")
    off = make_flask_app(postgresql_backend, replica="lagging", REPLICATED_TOKEN_HEADER=None)
    try:
        response = renamed.test_client().post("/items", data={"name": "renamed"})
        assert "X-Rw" in response.headers
        assert TOKEN not in response.headers
        client = off.test_client(use_cookies=False)
        response = client.post("/items", data={"name": "off"})
        assert TOKEN not in response.headers
        assert "Set-Cookie" in response.headers
        token = _forged(off, FAR)
        assert client.get("/who", headers={TOKEN: token}).text == "lagging"
    finally:
        dispose_flask_app(renamed)
        dispose_flask_app(off)


header_values = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=300
) | st.sampled_from(["-.t.Z0X1YQ.YmFkc2lnbmF0dXJlYmFkc2lnbmF0dXJlYQ", "a.b.c.d", "...."])


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=header_values)
def test_flask_answers_every_token_header(flask_app, value):
    response = flask_app.test_client(use_cookies=False).get("/who", headers={TOKEN: value})
    assert (response.status_code, response.text) == (200, "lagging")


# -- Quart ---------------------------------------------------------------------


async def test_quart_a_client_without_cookies_reads_its_write_with_the_header(quart_app):
    name = f"quart-api-{time.time()}"
    async with quart_app.test_app():
        client = quart_app.test_client()
        posted = await client.post("/items", form={"name": name})
        token = posted.headers[TOKEN]
        (jar_value,) = [c.value for c in client.cookie_jar if c.name == COOKIE]
        bare = quart_app.test_client()  # another client: no cookie jar shared
        with_token = await (await bare.get("/items", headers={TOKEN: token})).get_json()
        without = await (await bare.get("/items")).get_json()
    assert token == jar_value
    assert (with_token["node"], name in with_token["names"]) == ("primary", True)
    assert (without["node"], name in without["names"]) == ("lagging", False)


async def test_quart_the_token_is_bound_to_the_cluster_and_the_app(quart_app):
    async with quart_app.test_app():
        client = quart_app.test_client()
        assert await text_of(await client.get("/who")) == "lagging"
        answers = [
            await text_of(await client.get("/who", headers={TOKEN: token}))
            for token in (
                _forged(quart_app, FAR),
                _forged(quart_app, FAR, cluster=cluster_tag("another cluster")),
                _forged(quart_app, FAR, cookie_name="another_app"),
                "garbage",
            )
        ]
    assert answers == ["primary", "lagging", "lagging", "lagging"]


async def test_quart_the_header_can_be_turned_off(postgresql_backend):
    app = make_quart_app(postgresql_backend, replica="lagging", REPLICATED_TOKEN_HEADER=None)
    try:
        async with app.test_app():
            client = app.test_client()
            response = await client.post("/items", form={"name": "quart-off"})
            other = app.test_client()
            answer = await text_of(await other.get("/who", headers={TOKEN: _forged(app, FAR)}))
        assert TOKEN not in response.headers
        assert "Set-Cookie" in response.headers
        assert answer == "lagging"
    finally:
        await app.rep.dispose(app)


# -- config --------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "Two Words", "Token:", 42])
def test_a_bad_token_header_name_fails_naming_the_key(value):
    with pytest.raises(ConfigError, match="'REPLICATED_TOKEN_HEADER'"):
        load_config({"REPLICATED_TOKEN_HEADER": value})


def test_the_token_header_and_the_debug_header_must_differ():
    with pytest.raises(
        ConfigError, match="'REPLICATED_DEBUG_HEADER' and 'REPLICATED_TOKEN_HEADER'"
    ):
        load_config({"REPLICATED_DEBUG_HEADER": "replicated-token"})


def test_the_token_header_defaults_to_replicated_token():
    assert load_config({}).token_header == TOKEN
    assert load_config({"REPLICATED_TOKEN_HEADER": None}).token_header is None


# -- jobs: rep.consistency_token() and use_replica(after=token) ---------------------


def _wait_until_replayed(app, who, deadline=10.0):
    """Poll until the delayed replica serves the latest write (bounded)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if who():
            return
        time.sleep(0.02)
    raise AssertionError("the delayed replica never caught up")


def test_flask_a_job_reads_what_its_request_wrote(flask_app):
    from flask_replicated import use_replica

    db, item, backend = flask_app.db, flask_app.Item, flask_app.backend
    rep = flask_app.extensions["replicated"]

    @flask_app.post("/order")
    def order():
        db.session.add(item(name=request_name()))
        db.session.commit()
        return rep.consistency_token()

    def request_name():
        from flask import request

        return request.form["name"]

    def job(token):
        with flask_app.app_context(), use_replica(after=token):
            names = db.session.scalars(sa.select(item.name)).all()
            return backend.who(db.session), names

    name = f"job-{time.time()}"
    token = flask_app.test_client().post("/order", data={"name": name}).text
    node, names = job(token)
    assert (node, name in names) == ("primary", True)
    with flask_app.app_context(), use_replica():
        assert name not in db.session.scalars(sa.select(item.name)).all()  # it lags
    _wait_until_replayed(flask_app, lambda: job(token)[0] == "lagging")
    node, names = job(token)
    assert (node, name in names) == ("lagging", True)
    assert job("not a token")[0] == "primary"
    assert job(_forged(flask_app, FAR, cluster=cluster_tag("another cluster")))[0] == "primary"


def test_flask_a_token_outside_a_request_covers_everything_committed(flask_app):
    from flask_replicated import use_replica

    db, item, backend = flask_app.db, flask_app.Item, flask_app.backend
    rep = flask_app.extensions["replicated"]
    name = f"outside-{time.time()}"
    with flask_app.app_context():
        db.session.add(item(name=name))
        db.session.commit()
        token = rep.consistency_token()
    with flask_app.app_context(), use_replica(after=token):
        assert backend.who(db.session) == "primary"
        assert name in db.session.scalars(sa.select(item.name)).all()


def test_use_replica_takes_a_token_as_a_str():
    from replicated_core import use_replica

    with pytest.raises(TypeError, match="after="):
        use_replica(after=b"bytes")


async def test_quart_a_job_reads_what_was_committed(quart_app):
    from quart_replicated import use_replica

    rep, item = quart_app.rep, quart_app.Item
    name = f"quart-job-{time.time()}"

    async def job(token):
        async with quart_app.app_context():
            with use_replica(after=token):
                names = (await rep.session.scalars(sa.select(item.name))).all()
                return await quart_app.who(), list(names)

    async with quart_app.test_app():
        async with quart_app.app_context():
            rep.session.add(item(name=name))
            await rep.session.commit()
            token = await rep.consistency_token()
        node, names = await job(token)
        assert (node, name in names) == ("primary", True)
        assert (await job("garbage"))[0] == "primary"
        end = time.monotonic() + 10  # once the delayed replica has replayed it: there
        while (await job(token))[0] != "lagging":
            assert time.monotonic() < end, "the delayed replica never served the job"
            await asyncio.sleep(0.02)
        node, names = await job(token)
    assert (node, name in names) == ("lagging", True)


async def _quart_job(app, token):
    """A job outside a request: which node served ``use_replica(after=token)``, and the
    names. ``async with``: the Quart form that waits (briefly) for a replica to replay
    the token when the cached positions have none that has (a plain ``with`` decides
    on the cached positions alone, which a job that is its process's first reader has
    not got yet)."""
    from quart_replicated import use_replica

    async with app.app_context(), use_replica(after=token):
        names = (await app.rep.session.scalars(sa.select(app.Item.name))).all()
        return await app.who(), list(names)


async def _quart_write(app, name):
    async with app.app_context():
        app.rep.session.add(app.Item(name=name))
        await app.rep.session.commit()
        return await app.rep.consistency_token()


async def test_quart_a_job_after_a_replayed_token_reads_the_caught_up_replica(
    postgresql_backend, pg_cluster
):
    app = make_quart_app(postgresql_backend, replica="replica")
    name = f"quart-caught-up-{time.time()}"
    try:
        async with app.test_app():
            token = await _quart_write(app, name)
            await asyncio.to_thread(pg_cluster.wait_for_replay)  # 'replica' has replayed it
            node, names = await _quart_job(app, token)
    finally:
        await app.rep.dispose(app)
    assert (node, name in names) == ("replica", True)


async def test_quart_a_job_after_a_token_the_delayed_replica_lacks_reads_the_primary(quart_app):
    name = f"quart-not-replayed-{time.time()}"
    async with quart_app.test_app():
        token = await _quart_write(quart_app, name)
        written = time.monotonic()
        node, names = await _quart_job(quart_app, token)
        # Within the 500 ms delay, 'lagging' lacks the write: the primary serves it. On
        # a machine so busy that the job ran later, 'lagging' may have replayed it.
        late = time.monotonic() - written > 0.4
        assert name in names
        assert node == "primary" or (late and node == "lagging"), node
        node, _ = await _quart_job(quart_app, _forged(quart_app, FAR))  # never replayed
    assert node == "primary"


def _garbled_tokens(count: int) -> list[str]:
    """Token-shaped and random header values, the same every run."""
    import random
    import string

    rng = random.Random(14)
    alphabet = string.ascii_letters + string.digits + "-_.~!*"
    values = ["", ".", "....", "a.b.c.d", "-.t.Z0X1YQ.YmFkc2ln", "x" * 300, "0" * 201]
    while len(values) < count:
        values.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120))))
    return values


async def test_quart_answers_every_token_header(quart_app):
    # As the Flask test above (hypothesis there), for Quart: never an error; a token
    # that does not check reads as no token (the replica serves the read).
    async with quart_app.test_app():
        client = quart_app.test_client()
        answers = set()
        for value in _garbled_tokens(60):
            response = await client.get("/who", headers={TOKEN: value})
            answers.add((response.status_code, await text_of(response)))
    assert quart_app.errors == []
    assert answers == {(200, "lagging")}


def test_flask_use_replica_after_a_garbled_token_reads_on_the_primary(flask_app):
    who = set()
    with flask_app.app_context():
        for value in _garbled_tokens(30):
            with use_replica(after=value):
                who.add(flask_app.backend.who(flask_app.db.session))
            flask_app.db.session.remove()
    assert who == {"primary"}


async def test_quart_use_replica_after_a_garbled_token_reads_on_the_primary(quart_app):
    who = set()
    for value in _garbled_tokens(30):
        async with quart_app.app_context(), use_replica(after=value):
            who.add(await quart_app.who())
    assert who == {"primary"}


# -- a job's replica fails: the retry keeps to the token --------------------------------

RETRY_APP = "token-retry-test"


def _retrying_app(backend: Any, make: Callable[..., Any], connect_args: dict[str, Any]) -> Any:
    # Checks every 20 ms and a short downtime: the prober may take a terminated
    # connection from the pool and mark 'replica' down; the next try finds it back.
    return make(
        backend,
        ["replica", "lagging"],
        REPLICATED_CHECK_INTERVAL=0.02,
        REPLICATED_REPLICA_DOWNTIME=0.3,
        # Its connections are found by name on the replica, to be terminated.
        SQLALCHEMY_ENGINE_OPTIONS={"connect_args": connect_args},
    )


@contextlib.contextmanager
def _replay_paused(cluster: Any, name: str) -> Iterator[None]:
    """``name`` replays nothing inside the block: it lacks every later write."""
    node = cluster.replica(name)
    cluster.execute(node, "SELECT pg_wal_replay_pause()")
    try:
        yield
    finally:
        cluster.execute(node, "SELECT pg_wal_replay_resume()")


def test_flask_a_job_retried_off_its_replica_stays_where_the_token_holds(
    postgresql_backend, pg_cluster
):
    """use_replica(after=token): the replica that had replayed the token loses its
    connection at a statement of the block. The read is retried on a node that has the
    token's position (the primary: 'lagging' is paused), never on one that lacks it."""
    from flask_replicated import use_replica

    app = _retrying_app(postgresql_backend, make_flask_app, {"application_name": RETRY_APP})
    db, item, backend = app.db, app.Item, app.backend
    rep = app.extensions["replicated"]
    router = rep.router(app)
    killer = sa.create_engine(postgresql_backend.url("replica"))
    name = f"retried-{time.time()}"
    seen: list[tuple[str, str, bool]] = []
    try:
        with _replay_paused(pg_cluster, "lagging"):
            with app.app_context():
                db.session.add(item(name=name))
                db.session.commit()
                token = rep.consistency_token()
            end = time.monotonic() + 10  # bounded: tries until one is retried
            while time.monotonic() < end and not (seen and seen[-1][0] == "replica"):
                with app.app_context(), use_replica(after=token):
                    first = backend.who(db.session)
                    db.session.commit()
                    if first == "replica":  # not yet in the cached positions: primary
                        before = router.metrics().get("retries", 0)
                        # The block's next transaction starts on a pooled connection
                        # that dies under it at its first statement.
                        terminate_backends(killer, RETRY_APP)
                        retried = backend.who(db.session)
                        found = name in db.session.scalars(sa.select(item.name)).all()
                        if router.metrics().get("retries", 0) > before:
                            seen.append((first, retried, found))
                        else:
                            seen.append(("not retried", retried, found))
                time.sleep(0.02)
    finally:
        killer.dispose()
        dispose_flask_app(app)
    assert seen, "no try was retried"
    assert seen[-1] == ("replica", "primary", True), seen


async def test_quart_a_job_retried_off_its_replica_stays_where_the_token_holds(
    postgresql_backend, pg_cluster
):
    from quart_replicated import use_replica

    app = _retrying_app(
        postgresql_backend,
        make_quart_app,
        {"server_settings": {"application_name": RETRY_APP}},
    )
    rep, item = app.rep, app.Item
    router = rep.router(app)
    killer = sa.create_engine(postgresql_backend.url("replica"))
    name = f"quart-retried-{time.time()}"
    seen: list[tuple[str, str, bool]] = []
    try:
        with _replay_paused(pg_cluster, "lagging"):
            async with app.test_app():
                token = await _quart_write(app, name)
                end = time.monotonic() + 10
                while time.monotonic() < end and not (seen and seen[-1][0] == "replica"):
                    async with app.app_context(), use_replica(after=token):
                        first = await app.who()
                        await rep.session.commit()
                        if first == "replica":
                            before = router.metrics().get("retries", 0)
                            await asyncio.to_thread(terminate_backends, killer, RETRY_APP)
                            retried = await app.who()
                            names = (await rep.session.scalars(sa.select(item.name))).all()
                            retried_here = router.metrics().get("retries", 0) > before
                            seen.append(
                                (first if retried_here else "not retried", retried, name in names)
                            )
                    await asyncio.sleep(0.02)
    finally:
        killer.dispose()
        await app.rep.dispose(app)
    assert seen, "no try was retried"
    assert seen[-1] == ("replica", "primary", True), seen
