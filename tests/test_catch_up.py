"""The short wait for a replica instead of the primary (issue 14, requirement 4): a
sticky read that finds no replica caught up in the cached positions asks a replica
live, waits up to REPLICATED_CATCH_UP_TIMEOUT for it to replay the client's write,
and uses the primary only if it does not. On the real cluster: 'replica' replays at
once, 'lagging' 500 ms late."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from support import create_pg_schema, dispose_flask_app, make_flask_app, make_quart_app

from replicated_core import use_replica
from replicated_core.config import ConfigError, load_config

PAIRS = 100
# The target for a writer's next read, with a replica that replays at once.
TARGET_SHARE = 0.98


@pytest.fixture
def schema(pg_cluster: Any) -> None:
    create_pg_schema(pg_cluster)


@pytest.fixture
def flask_factory(postgresql_backend: Any, schema: None) -> Iterator[Any]:
    apps: list[Any] = []

    def build(replica: str | list[str] = "replica", **config: Any) -> Any:
        app = make_flask_app(postgresql_backend, replica, **config)
        apps.append(app)
        return app

    yield build
    for app in apps:
        dispose_flask_app(app)


@pytest.fixture
async def quart_factory(postgresql_backend: Any, schema: None) -> Any:
    apps: list[Any] = []

    def build(replica: str | list[str] = "replica", **config: Any) -> Any:
        app = make_quart_app(postgresql_backend, replica, **config)
        apps.append(app)
        return app

    yield build
    for app in apps:
        await app.rep.dispose(app)


def _flask_pairs(app: Any, pairs: int) -> tuple[Counter[str], int]:
    """POST a row, then GET the list at once, ``pairs`` times with one client's cookies:
    who served each GET, and how many missed their own row."""
    served: Counter[str] = Counter()
    stale = 0
    with app.test_client() as client:
        client.get("/items")  # the prober's first round
        for _ in range(pairs):
            name = uuid.uuid4().hex
            assert client.post("/items", data={"name": name}).status_code == 303
            body = client.get("/items").get_json()
            served[body["node"]] += 1
            stale += name not in body["names"]
    return served, stale


def test_flask_a_writers_next_read_is_served_by_the_replica(flask_factory: Any) -> None:
    app = flask_factory(["replica", "lagging"])
    served, stale = _flask_pairs(app, PAIRS)
    assert stale == 0, served
    assert served["replica"] >= TARGET_SHARE * PAIRS, served
    assert served["lagging"] == 0, served  # it never has the row in time


async def test_quart_a_writers_next_read_is_served_by_the_replica(quart_factory: Any) -> None:
    app = quart_factory(["replica", "lagging"])
    served: Counter[str] = Counter()
    stale = 0
    client = app.test_client()
    await client.get("/items")
    for _ in range(PAIRS):
        name = uuid.uuid4().hex
        assert (await client.post("/items", form={"name": name})).status_code == 303
        body = await (await client.get("/items")).get_json()
        served[body["node"]] += 1
        stale += name not in body["names"]
    assert app.errors == []
    assert stale == 0, served
    assert served["replica"] >= TARGET_SHARE * PAIRS, served


def test_flask_with_the_wait_off_a_writers_next_read_is_on_the_primary(
    flask_factory: Any,
) -> None:
    # What requirement 4 changes: without the wait, the cached positions (up to a
    # check interval old) never have the write yet.
    app = flask_factory(["replica", "lagging"], REPLICATED_CATCH_UP_TIMEOUT=0)
    served, stale = _flask_pairs(app, 20)
    assert stale == 0
    assert served["primary"] >= 18, served
    assert app.extensions["replicated"].counters(app).get("catch_up_checks", 0) == 0


def test_flask_a_replica_that_does_not_replay_in_time_leaves_the_read_to_the_primary(
    flask_factory: Any,
) -> None:
    # 'lagging' replays 500 ms late: a 50 ms wait ends on the primary, and the next
    # sticky reads do not wait on it again until its next check.
    app = flask_factory("lagging", REPLICATED_CATCH_UP_TIMEOUT=0.05, REPLICATED_CHECK_INTERVAL=5)
    served, stale = _flask_pairs(app, 5)
    assert stale == 0
    assert served == {"primary": 5}
    counts = app.extensions["replicated"].counters(app)
    assert counts["catch_up_timeouts"] >= 1
    assert counts["catch_up_checks"] == counts["catch_up_timeouts"] < 5


def test_flask_a_long_enough_wait_reads_from_the_lagging_replica(flask_factory: Any) -> None:
    app = flask_factory("lagging", REPLICATED_CATCH_UP_TIMEOUT=3)
    served, stale = _flask_pairs(app, 3)
    assert stale == 0
    assert served == {"lagging": 3}


def test_flask_concurrent_readers_of_one_write_share_one_check(flask_factory: Any) -> None:
    app = flask_factory("lagging", REPLICATED_CATCH_UP_TIMEOUT=3, REPLICATED_CHECK_INTERVAL=30)
    rep = app.extensions["replicated"]
    with app.test_client() as client:
        client.get("/items")
        name = uuid.uuid4().hex
        client.post("/items", data={"name": name})
        cookie = client.get_cookie("replicated_sticky")
        assert cookie is not None
    before = rep.counters(app).get("catch_up_checks", 0)
    results: list[tuple[str, bool]] = []
    barrier = threading.Barrier(8)

    def reader() -> None:
        with app.test_client() as own:
            own.set_cookie("replicated_sticky", cookie.value)
            barrier.wait(10)
            body = own.get("/items").get_json()
            results.append((body["node"], name in body["names"]))

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert sorted(results) == [("lagging", True)] * 8
    assert rep.counters(app)["catch_up_checks"] - before == 1


async def test_quart_concurrent_readers_of_one_write_share_one_check(quart_factory: Any) -> None:
    app = quart_factory("lagging", REPLICATED_CATCH_UP_TIMEOUT=3, REPLICATED_CHECK_INTERVAL=30)
    client = app.test_client()
    await client.get("/items")
    name = uuid.uuid4().hex
    posted = await client.post("/items", form={"name": name})
    token = posted.headers["Replicated-Token"]
    before = app.rep.counters(app).get("catch_up_checks", 0)

    async def reader() -> tuple[str, bool]:
        # Each its own client, with the token in the header: no cookies shared.
        body = await (
            await app.test_client().get("/items", headers={"Replicated-Token": token})
        ).get_json()
        return body["node"], name in body["names"]

    results = await asyncio.gather(*(reader() for _ in range(8)))
    assert app.errors == []
    assert sorted(results) == [("lagging", True)] * 8
    assert app.rep.counters(app)["catch_up_checks"] - before == 1


def test_flask_a_job_token_waits_for_the_replica(flask_factory: Any) -> None:
    app = flask_factory("lagging", REPLICATED_CATCH_UP_TIMEOUT=3)
    rep = app.extensions["replicated"]
    with app.test_client() as client:
        client.get("/items")
    with app.app_context():
        app.db.session.add(app.Item(name="job"))
        app.db.session.commit()
        token = rep.consistency_token()
        app.db.session.remove()
        with use_replica(after=token):
            names = app.db.session.scalars(sa.select(app.Item.name)).all()
            who = app.backend.who(app.db.session)
        app.db.session.remove()
    assert (who, "job" in names) == ("lagging", True)


async def test_quart_a_job_token_is_awaited_in_an_async_block(quart_factory: Any) -> None:
    app = quart_factory("lagging", REPLICATED_CATCH_UP_TIMEOUT=3)
    client = app.test_client()
    await client.get("/items")
    async with app.app_context():
        app.rep.session.add(app.Item(name="async job"))
        await app.rep.session.commit()
        token = await app.rep.consistency_token()
    beats = 0
    done = asyncio.Event()

    async def heartbeat() -> None:
        nonlocal beats
        while not done.is_set():
            beats += 1
            await asyncio.sleep(0.01)

    beating = asyncio.create_task(heartbeat())
    async with app.app_context(), use_replica(after=token):
        names = (await app.rep.session.scalars(sa.select(app.Item.name))).all()
        who = await app.who()
    done.set()
    await beating
    assert (who, "async job" in names) == ("lagging", True)
    # The 500 ms wait was awaited: the loop kept running meanwhile.
    assert beats >= 10


@pytest.mark.parametrize("bad", [-1, "0.1", True, float("nan"), float("inf")])
def test_a_bad_catch_up_timeout_fails_naming_the_key(bad: object) -> None:
    with pytest.raises(ConfigError, match="REPLICATED_CATCH_UP_TIMEOUT"):
        load_config({"REPLICATED_CATCH_UP_TIMEOUT": bad})


def test_zero_turns_the_wait_off() -> None:
    assert load_config({"REPLICATED_CATCH_UP_TIMEOUT": 0}).catch_up_timeout == 0.0
