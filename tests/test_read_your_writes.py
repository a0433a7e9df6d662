"""Read-your-writes by WAL position, on the real cluster, in both adapters."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from support import dispose_flask_app, make_flask_app, make_quart_app, text_of

from replicated_core import Reason, StickyMode

HEADER = "X-Served-By"


@pytest.fixture
def flask_wal_app(postgresql_backend):
    app = make_flask_app(
        postgresql_backend, replica=["replica", "lagging"], REPLICATED_DEBUG_HEADER=HEADER
    )
    yield app
    dispose_flask_app(app)


def test_auto_mode_is_wal_on_postgresql(flask_wal_app):
    assert flask_wal_app.extensions["replicated"].router(flask_wal_app).sticky_mode is (
        StickyMode.WAL
    )


def test_a_writer_returns_to_the_replica_once_it_replayed_the_write(postgresql_backend):
    """Only the lagging replica (500 ms apply delay): right after the POST the client
    reads from the primary; once the replica has replayed the write, from the replica,
    and the cookie is dropped."""
    app = make_flask_app(postgresql_backend, replica="lagging", REPLICATED_DEBUG_HEADER=HEADER)
    try:
        client = app.test_client()
        name = f"wal-return-{time.time()}"
        posted = time.monotonic()
        client.post("/items", data={"name": name})
        first = client.get("/items")
        assert first.json["node"] == "primary"
        assert name in first.json["names"]
        decisions = []
        while True:
            response = client.get("/items")
            assert name in response.json["names"]
            decisions.append(response.json["node"])
            if response.json["node"] == "lagging":
                break
            assert time.monotonic() - posted < 10, "the replica never served the writer again"
            time.sleep(0.02)
        assert client.get_cookie("replicated_sticky") is None
        assert client.get("/who").text == "lagging"
    finally:
        dispose_flask_app(app)


def test_flask_read_your_writes_under_lag(flask_wal_app):
    """200 POST-then-GET pairs from 8 concurrent clients: no stale read; readers that
    never wrote never read from the primary."""
    app = flask_wal_app

    def writer(number):
        client = app.test_client()
        stale, nodes = 0, []
        for pair in range(25):
            name = f"flask-ryw-{number}-{pair}-{time.time()}"
            client.post("/items", data={"name": name})
            listing = client.get("/items").json
            stale += name not in listing["names"]
            nodes.append(listing["node"])
        return stale, nodes

    def reader(_):
        client = app.test_client()
        return [client.get("/who").headers[HEADER] for _ in range(50)]

    with ThreadPoolExecutor(max_workers=10) as pool:
        writers = [pool.submit(writer, n) for n in range(8)]
        readers = [pool.submit(reader, n) for n in range(2)]
        results = [w.result() for w in writers]
        read_nodes = [node for r in readers for node in r.result()]
    assert sum(stale for stale, _ in results) == 0
    assert len(read_nodes) == 100
    assert set(read_nodes) <= {"replica", "lagging"}


async def test_quart_read_your_writes_under_lag(postgresql_backend):
    app = make_quart_app(
        postgresql_backend, replica=["replica", "lagging"], REPLICATED_DEBUG_HEADER=HEADER
    )

    async def writer(number):
        client = app.test_client()
        stale = 0
        for pair in range(10):
            name = f"quart-ryw-{number}-{pair}-{time.time()}"
            await client.post("/items", form={"name": name})
            listing = await (await client.get("/items")).get_json()
            stale += name not in listing["names"]
        return stale

    async def reader():
        client = app.test_client()
        return [(await client.get("/who")).headers[HEADER] for _ in range(50)]

    async with app.test_app():
        results = await asyncio.gather(*(writer(n) for n in range(20)), reader(), reader())
    assert sum(results[:20]) == 0
    assert set(results[20] + results[21]) <= {"replica", "lagging"}


def test_one_replica_per_request_and_spread_over_replicas(flask_wal_app):
    app, backend = flask_wal_app, flask_wal_app.backend

    @app.get("/many")
    def many():
        return {"nodes": sorted({backend.who(app.db.session) for _ in range(5)})}

    client = app.test_client()
    seen = [tuple(client.get("/many").json["nodes"]) for _ in range(60)]
    assert all(len(nodes) == 1 for nodes in seen)
    assert {nodes[0] for nodes in seen} == {"replica", "lagging"}


def test_positions_are_checked_at_most_once_per_interval(flask_wal_app):
    """Many requests in a short time: the probe count follows the clock, not the load."""
    app = flask_wal_app
    health = app.extensions["replicated"].router(app).health
    client = app.test_client()
    before, started = health.refreshes, time.monotonic()
    requests = 0
    while time.monotonic() - started < 0.5:
        client.get("/who")
        requests += 1
    elapsed = time.monotonic() - started
    assert requests > 20
    assert health.refreshes - before <= elapsed / health.check_interval + 1


def test_a_replica_lagging_past_max_lag_is_skipped(fault_backend, fault_cluster):
    """Replay paused on r1 while the primary keeps writing: once r1 is more than
    REPLICATED_MAX_LAG behind, reads go to r2 only; after resuming, r1 serves again."""
    app = make_flask_app(
        fault_backend,
        replica=["r1", "r2"],
        REPLICATED_MAX_LAG=0.5,
        REPLICATED_STICKY_MODE="off",
        REPLICATED_DEBUG_HEADER=HEADER,
    )
    r1 = fault_cluster.replica("r1")
    writer = app.test_client()
    try:
        fault_cluster.execute(r1, "SELECT pg_wal_replay_pause()")
        deadline = time.monotonic() + 10
        while True:
            writer.post("/items", data={"name": "keep-the-wal-moving"})
            time.sleep(0.05)
            health = app.extensions["replicated"].router(app).health
            app.test_client().get("/who")
            if not health.usable("r1"):
                break
            assert time.monotonic() < deadline, "r1 never counted as lagging"
        nodes = {app.test_client().get("/who").headers[HEADER] for _ in range(40)}
        assert nodes == {"r2"}
    finally:
        fault_cluster.execute(r1, "SELECT pg_wal_replay_resume()")
    fault_cluster.wait_for_replay()
    deadline = time.monotonic() + 10
    while "r1" not in {app.test_client().get("/who").headers[HEADER] for _ in range(20)}:
        assert time.monotonic() < deadline, "r1 never served again after catching up"
        time.sleep(0.05)
    dispose_flask_app(app)


def test_flask_survives_a_replica_killed_mid_run(fault_backend, fault_cluster):
    app = make_flask_app(
        fault_backend,
        replica=["r1", "r2"],
        REPLICATED_REPLICA_DOWNTIME=1,
        REPLICATED_DEBUG_HEADER=HEADER,
    )
    r1 = fault_cluster.replica("r1")
    try:
        statuses, nodes = [], []
        with ThreadPoolExecutor(max_workers=4) as pool:

            def get(_):
                response = app.test_client().get("/items")
                return response.status_code, response.headers.get(HEADER)

            for batch in range(10):
                if batch == 3:
                    r1.stop("immediate")
                for status, node in pool.map(get, range(20)):
                    statuses.append(status)
                    nodes.append(node)
        assert statuses.count(200) == len(statuses) == 200
        assert "r1" in nodes[:60]
        assert "r1" not in nodes[100:]
    finally:
        if not r1.is_running():
            r1.start()
    deadline = time.monotonic() + 15
    while "r1" not in {app.test_client().get("/who").headers[HEADER] for _ in range(20)}:
        assert time.monotonic() < deadline, "r1 never served again after its restart"
        time.sleep(0.1)
    dispose_flask_app(app)


async def test_quart_survives_a_replica_killed_mid_run(fault_backend, fault_cluster):
    app = make_quart_app(
        fault_backend,
        replica=["r1", "r2"],
        REPLICATED_REPLICA_DOWNTIME=1,
        REPLICATED_DEBUG_HEADER=HEADER,
    )
    r1 = fault_cluster.replica("r1")
    statuses, nodes = [], []

    async def get():
        response = await app.test_client().get("/items")
        return response.status_code, response.headers.get(HEADER)

    async with app.test_app():
        try:
            for batch in range(10):
                if batch == 3:
                    r1.stop("immediate")
                for status, node in await asyncio.gather(*(get() for _ in range(20))):
                    statuses.append(status)
                    nodes.append(node)
            assert app.errors == []
            assert statuses.count(200) == len(statuses) == 200
            assert "r1" in nodes[:60]
            assert "r1" not in nodes[100:]
        finally:
            if not r1.is_running():
                r1.start()
        deadline = time.monotonic() + 15
        while True:
            served = {(await app.test_client().get("/who")).headers[HEADER] for _ in range(20)}
            if "r1" in served:
                break
            assert time.monotonic() < deadline, "r1 never served again after its restart"
            await asyncio.sleep(0.1)


def test_reads_survive_a_stopped_primary(fault_backend, fault_cluster):
    """Non-sticky reads keep working on the replicas; a write fails with the driver's
    own error, not a ReplicaWriteError."""
    import sqlalchemy as sa

    app = make_flask_app(fault_backend, replica=["r1", "r2"], REPLICATED_DEBUG_HEADER=HEADER)
    client = app.test_client()
    assert client.get("/who").status_code == 200
    fault_cluster.primary.stop("immediate")
    try:
        for _ in range(20):
            response = app.test_client().get("/items")
            assert response.status_code == 200
            assert response.headers[HEADER] in {"r1", "r2"}
        with pytest.raises(sa.exc.OperationalError):
            client.post("/items", data={"name": "while-primary-down"})
    finally:
        fault_cluster.primary.start()
    fault_cluster.wait_for_replay()
    dispose_flask_app(app)


@pytest.mark.parametrize("stop_mode", ["immediate", "fast"])
def test_a_failed_replica_read_is_retried_on_another_node(fault_backend, fault_cluster, stop_mode):
    """With an hour between position checks no probe notices that r2 died: the read
    itself fails, and is retried on r1 within the same request, transparently."""
    app = make_flask_app(
        fault_backend,
        replica=["r1", "r2"],
        REPLICATED_CHECK_INTERVAL=3600,
        REPLICATED_REPLICA_DOWNTIME=30,
    )
    router = app.extensions["replicated"].router(app)
    r2 = fault_cluster.replica("r2")
    outcomes = []

    @app.get("/reason")
    def reason():
        node = app.backend.who(app.db.session)
        outcomes.append((node, router.requests.current_decision().reason))
        return node

    client = app.test_client()
    while "r2" not in {client.get("/reason").text for _ in range(10)}:
        pass  # r2 has a pooled connection now
    outcomes.clear()
    r2.stop(stop_mode)
    try:
        served = [client.get("/reason").text for _ in range(30)]
    finally:
        r2.start()
    assert set(served) == {"r1"}
    assert ("r1", Reason.FAILOVER) in outcomes
    assert router.health.states["r2"].failures == 1
    assert not router.health.usable("r2")
    dispose_flask_app(app)


async def test_quart_retries_a_failed_replica_read(fault_backend, fault_cluster):
    app = make_quart_app(
        fault_backend,
        replica=["r1", "r2"],
        REPLICATED_CHECK_INTERVAL=3600,
        REPLICATED_REPLICA_DOWNTIME=30,
    )
    router = app.rep.router(app)
    r2 = fault_cluster.replica("r2")
    outcomes = []

    @app.get("/reason")
    async def reason():
        node = await app.who()
        outcomes.append((node, router.requests.current_decision().reason))
        return node

    async with app.test_app():
        client = app.test_client()
        while "r2" not in {await text_of(await client.get("/reason")) for _ in range(10)}:
            pass
        outcomes.clear()
        r2.stop("immediate")
        try:
            served = [await text_of(await client.get("/reason")) for _ in range(30)]
        finally:
            r2.start()
    assert app.errors == []
    assert set(served) == {"r1"}
    assert ("r1", Reason.FAILOVER) in outcomes
    assert not router.health.usable("r2")


def test_a_recovery_conflict_is_retried_once_on_another_node(fault_backend, fault_cluster):
    """A read on r1 is cancelled by replay (an ACCESS EXCLUSIVE lock taken on the
    primary, max_standby_streaming_delay at 10 ms): SQLSTATE 40001, retried elsewhere."""
    import sqlalchemy as sa

    r1 = fault_cluster.replica("r1")
    app = make_flask_app(fault_backend, replica="r1", REPLICATED_STICKY_MODE="off")

    @app.get("/slow")
    def slow():
        app.db.session.execute(sa.text("SELECT pg_sleep(1.5), count(*) FROM items"))
        return app.backend.who(app.db.session)

    fault_cluster.execute(r1, "ALTER SYSTEM SET max_standby_streaming_delay = '10ms'")
    fault_cluster.execute(r1, "SELECT pg_reload_conf()")
    try:

        def lock_on_primary():
            time.sleep(0.5)
            engine = sa.create_engine(fault_cluster.primary.url("psycopg"))
            with engine.begin() as conn:
                conn.execute(sa.text("LOCK TABLE items IN ACCESS EXCLUSIVE MODE"))
            engine.dispose()

        with ThreadPoolExecutor(max_workers=1) as pool:
            locker = pool.submit(lock_on_primary)
            response = app.test_client().get("/slow")
            locker.result()
    finally:
        fault_cluster.execute(r1, "ALTER SYSTEM RESET max_standby_streaming_delay")
        fault_cluster.execute(r1, "SELECT pg_reload_conf()")
    assert response.status_code == 200
    assert response.text == "primary"
    router = app.extensions["replicated"].router(app)
    assert router.health.usable("slave")  # a conflict is not a failure of the server
    assert router.health.states["slave"].failures == 0
    dispose_flask_app(app)


def test_a_paused_replica_is_marked_down_within_the_timeout(fault_backend, fault_cluster):
    """SIGSTOP on r1 with a warm pool: no connect happens, so only the position check's
    own deadline can notice. A request reading on r1 meanwhile waits at most about
    REPLICATED_CONNECT_TIMEOUT (then the router cuts its connection and it fails over
    to r2), and the next ones read from r2; the moment r1 runs again the late answer
    of its check counts and it is usable again."""
    app = make_flask_app(
        fault_backend,
        replica=["r1", "r2"],
        REPLICATED_CONNECT_TIMEOUT=1,
        REPLICATED_DEBUG_HEADER=HEADER,
    )
    router = app.extensions["replicated"].router(app)
    r1 = fault_cluster.replica("r1")
    client = app.test_client()
    while "r1" not in {client.get("/who").headers[HEADER] for _ in range(10)}:
        pass
    r1.pause()
    try:
        time.sleep(router.health.check_interval * 2)
        started = time.monotonic()
        first = client.get("/who")
        waited = time.monotonic() - started
        served = {client.get("/who").headers[HEADER] for _ in range(20)}
        usable_while_paused = router.health.usable("r1")
    finally:
        r1.resume()
    # The check still out answers once r1 runs again: give it the time to.
    deadline = time.monotonic() + 10
    while not router.health.usable("r1") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.headers[HEADER] == "r2"
    assert waited < 5  # a bound, not a benchmark: without the deadline it never returns
    assert served == {"r2"}
    assert usable_while_paused is False
    assert router.health.usable("r1")  # the late check answered once r1 ran again
    dispose_flask_app(app)


def test_use_replica_outside_a_request_checks_positions(postgresql_backend):
    app = make_flask_app(postgresql_backend)
    router = app.extensions["replicated"].router(app)
    with app.app_context():
        assert router.health.refreshes == 0
        from flask_replicated import use_replica

        with use_replica():
            assert app.backend.who(app.db.session) == "replica"
        assert router.health.refreshes == 1
    dispose_flask_app(app)
