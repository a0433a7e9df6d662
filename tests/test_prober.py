"""The prober: position checks in the background, one round trip each, a hung replica
holding up only its own checks, and no thread or task left behind."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from support import dispose_flask_app, make_flask_app, make_quart_app

from flask_replicated.extension import probe_replica
from replicated_core.backends import ReplicaProbe
from replicated_core.backends.postgresql import REPLICA_PROBE_SQL
from replicated_core.health import Health
from replicated_core.nodes import Node, Role

HEADER = "X-Served-By"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_hung_check_makes_its_replica_overdue_and_is_not_repeated():
    """Pure state: a check out past the probe timeout makes the replica overdue; while
    it is out the replica gets no other check, until a downtime has passed since it
    started (one stuck check per downtime); the other replica is checked every time."""
    r1 = Node("r1", Role.REPLICA, sa.create_engine("sqlite://"))
    r2 = Node("r2", Role.REPLICA, sa.create_engine("sqlite://"))
    clock = Clock()
    h = Health(
        [r1, r2],
        probing=True,
        check_interval=0.1,
        max_lag=30,
        downtime=5,
        probe_timeout=1,
        clock=clock,
    )
    fine = ReplicaProbe(True, 100, 100, 0.0)
    hung, first_r2 = h.plan().checks
    h.finish(first_r2, fine)
    asked = {"r1": 1, "r2": 1}
    overdue_at = None
    for _ in range(70):  # 7 s of ticks, r1's first check never answering
        clock.now += 0.1
        plan = h.plan()
        if plan.overdue:
            assert [n.name for n in plan.overdue] == ["r1"]
            overdue_at = clock.now
        for check in plan.checks:
            asked[check.node.name] += 1
            if check.node is r2:
                h.finish(check, fine)
    assert overdue_at is not None
    assert round(overdue_at - 1000.0, 1) == 1.0
    assert not h.usable("r1")
    assert h.usable("r2")
    assert asked == {"r1": 2, "r2": 71}  # r1 asked again once, 5 s after its first check
    h.finish(hung, fine)  # the hung check answers at last: r1 counts at once
    assert h.usable("r1")


def log_lines(node: Any, start: int, pid: int) -> list[str]:
    """The lines of ``node``'s server log since byte ``start`` written by backend ``pid``."""
    with node.log_path.open("rb") as log:
        log.seek(start)
        text = log.read().decode(errors="replace")
    return [line for line in text.splitlines() if f"[{pid}]" in line]


def statements(lines: list[str]) -> list[str]:
    """What the server ran: simple-protocol lines ("statement: ...") and extended-
    protocol executions ("execute <name>: ..."); parse and bind steps are not logged."""
    found = []
    for line in lines:
        if "LOG:  statement: " in line:
            found.append(line.split("LOG:  statement: ", 1)[1])
        elif "LOG:  execute " in line:
            found.append(line.split("LOG:  execute ", 1)[1].split(": ", 1)[1])
    return found


def backend_pid(cluster: Any, node: Any, application_name: str) -> int:
    """The pid of the one backend of ``node`` that has ``application_name``, asked on
    another connection, so that the watched one runs nothing but the checks."""
    rows = cluster.execute(
        node, f"SELECT pid FROM pg_stat_activity WHERE application_name = '{application_name}'"
    )
    assert len(rows) == 1
    return int(rows[0][0])


def test_a_flask_position_check_is_one_statement_in_autocommit(fault_cluster):
    """The server logs every statement of the check's connection (log_statement=all on
    that connection only): each check is the probe query alone, no BEGIN, no ROLLBACK."""
    r1 = fault_cluster.replica("r1")
    engine = sa.create_engine(
        r1.url("psycopg"),
        pool_size=1,
        max_overflow=0,
        connect_args={"options": "-c log_statement=all", "application_name": "check-flask"},
    )
    try:
        node = Node("r1", Role.REPLICA, engine)
        probe_replica(node)  # connects (the driver's own setup is not what is counted)
        pid = backend_pid(fault_cluster, r1, "check-flask")
        start = r1.log_path.stat().st_size
        probes = [probe_replica(node) for _ in range(5)]
        assert backend_pid(fault_cluster, r1, "check-flask") == pid  # one pooled connection
    finally:
        engine.dispose()
    assert all(p.in_recovery for p in probes)
    first_line = REPLICA_PROBE_SQL.splitlines()[0]
    assert statements(log_lines(r1, start, pid)) == [first_line] * 5


async def test_a_quart_position_check_is_one_statement_in_autocommit(fault_backend, fault_cluster):
    r1 = fault_cluster.replica("r1")
    app = make_quart_app(
        fault_backend,
        replica=["r1", "r2"],
        SQLALCHEMY_ENGINE_OPTIONS={
            "pool_size": 1,
            "max_overflow": 0,
            "connect_args": {
                "server_settings": {"log_statement": "all", "application_name": "check-quart"}
            },
        },
    )
    state = app.rep._apps[app]
    node = state.router.node_named("r1")
    try:
        await state.probe_replica(node)  # connects and prepares the statement
        pid = backend_pid(fault_cluster, r1, "check-quart")
        start = r1.log_path.stat().st_size
        probes = [await state.probe_replica(node) for _ in range(5)]
        assert backend_pid(fault_cluster, r1, "check-quart") == pid
    finally:
        await app.rep.dispose(app)
    assert all(p.in_recovery for p in probes)
    first_line = REPLICA_PROBE_SQL.splitlines()[0]
    assert statements(log_lines(r1, start, pid)) == [first_line] * 5


def count_checks(router: Any) -> dict[str, list[float]]:
    """When each replica's position checks ran, from an engine listener."""
    times: dict[str, list[float]] = {n.name: [] for n in router.replicas}
    for node in router.replicas:

        def on_execute(conn, cursor, statement, *args, name=node.name):
            if statement == REPLICA_PROBE_SQL:
                times[name].append(time.monotonic())

        event.listen(node.engine, "before_cursor_execute", on_execute)
    return times


def test_a_paused_replica_holds_up_only_its_own_checks(fault_backend, fault_cluster):
    """SIGSTOP on r1: r2 keeps being checked every interval; r1 is asked once (the
    check that hangs), not once per interval; requests are served from r2."""
    app = make_flask_app(
        fault_backend,
        replica=["r1", "r2"],
        REPLICATED_CONNECT_TIMEOUT=1,
        REPLICATED_DEBUG_HEADER=HEADER,
    )
    router = app.extensions["replicated"].router(app)
    r1 = fault_cluster.replica("r1")
    client = app.test_client()
    client.get("/who")  # starts the prober
    times = count_checks(router)
    r1.pause()
    paused_at = time.monotonic()
    try:
        deadline = paused_at + 10
        while len([t for t in times["r2"] if t > paused_at]) < 20:
            assert time.monotonic() < deadline, "r2 was not checked while r1 hung"
            time.sleep(0.05)
        while router.health.usable("r1"):
            assert time.monotonic() < deadline, "r1 never became overdue"
            time.sleep(0.05)
        served = {client.get("/who").headers[HEADER] for _ in range(20)}
        r1_checks = len([t for t in times["r1"] if t > paused_at])
    finally:
        r1.resume()
    deadline = time.monotonic() + 10
    while not router.health.usable("r1") and time.monotonic() < deadline:
        time.sleep(0.01)
    usable_after = router.health.usable("r1")
    dispose_flask_app(app)
    assert served == {"r2"}
    assert r1_checks <= 1
    assert usable_after


def prober_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("replicated-prober")]


def test_the_prober_threads_end_with_close_and_when_idle(postgresql_backend):
    """Router.close() ends the threads at once; an app nobody reads from any more
    stops its prober by itself after its idle time; a read starts it again."""
    others = set(prober_threads())  # of apps other tests left behind

    def mine() -> set[threading.Thread]:
        return set(prober_threads()) - others

    app = make_flask_app(postgresql_backend)
    router = app.extensions["replicated"].router(app)
    try:
        app.test_client().get("/who")
        assert len(mine()) == 2  # the ticker and the replica's worker
        router.close()
        assert mine() == set()
        router.prober.idle_stop = 0.3
        app.test_client().get("/who")  # the next read starts it again
        assert len(mine()) == 2
        deadline = time.monotonic() + 10
        while mine() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mine() == set()
        assert router.prober.running is False
        checks = router.health.refreshes
        app.test_client().get("/who")
        assert router.prober.running is True
        assert router.health.refreshes > checks
    finally:
        dispose_flask_app(app)
    assert mine() == set()


def test_disposing_of_the_engines_stops_the_prober(postgresql_backend):
    """Apps and fixtures that shut down with engine.dispose() (not Router.close()):
    a prober left running would open connections in the new pools that nobody
    closes (a ResourceWarning when collected)."""
    others = set(prober_threads())
    app = make_flask_app(postgresql_backend)
    router = app.extensions["replicated"].router(app)
    app.test_client().get("/who")
    assert router.prober.running is True
    for engine in app.db._app_engines[app].values():
        engine.dispose()
    deadline = time.monotonic() + 5  # the prober sees it at its next tick (0.1 s)
    while set(prober_threads()) - others and time.monotonic() < deadline:
        time.sleep(0.05)
    assert router.prober.running is False
    assert set(prober_threads()) - others == set()


def test_the_quart_prober_follows_the_event_loop(postgresql_backend):
    """Two event loops in turn (asyncio.run twice, as CLI commands and some test setups
    do): the prober starts again in the second and keeps the positions fresh there.
    No pooling: a pooled asyncpg connection belongs to the loop that opened it."""
    from sqlalchemy.pool import NullPool

    app = make_quart_app(postgresql_backend, SQLALCHEMY_ENGINE_OPTIONS={"poolclass": NullPool})
    router = app.rep.router(app)

    async def reads() -> tuple[int, int]:
        client = app.test_client()
        assert (await client.get("/who")).status_code == 200
        before = router.health.refreshes
        await asyncio.sleep(router.health.check_interval * 5)
        return before, router.health.refreshes

    first = asyncio.run(reads())
    second = asyncio.run(reads())
    assert first[1] > first[0]
    assert second[1] > second[0]

    async def dispose() -> None:
        await app.rep.dispose(app)

    asyncio.run(dispose())
    assert app.errors == []


def test_a_check_in_flight_when_the_engines_are_disposed_leaves_no_connection_open(
    postgresql_backend,
):
    """A check still out when the app disposes of its engines (stop() waits for it only
    briefly) hands its connection back after the pool was replaced: it must be closed,
    not left in a pool nobody closes (the replica keeps the session; psycopg warns when
    it is collected). Asked on the replica itself: no backend of the app is left."""
    name = "prober-dispose"
    app = make_flask_app(
        postgresql_backend,
        SQLALCHEMY_ENGINE_OPTIONS={"connect_args": {"application_name": name}},
    )
    router = app.extensions["replicated"].router(app)
    replica = router.replicas[0].engine
    app.test_client().get("/who")  # starts the prober
    held, release = threading.Event(), threading.Event()

    @event.listens_for(replica, "before_cursor_execute")
    def hold(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement == REPLICA_PROBE_SQL and threading.current_thread().name.startswith(
            "replicated-prober"
        ):
            held.set()
            release.wait(10)

    assert held.wait(5)
    router.prober.stop(timeout=0.2)  # gives up on the held check, as a hung one
    dispose_flask_app(app)
    release.set()
    watcher = sa.create_engine(postgresql_backend.url("replica"), poolclass=sa.pool.NullPool)
    query = sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n")
    deadline = time.monotonic() + 5
    with watcher.connect() as conn:
        while (left := conn.execute(query, {"n": name}).scalar()) and time.monotonic() < deadline:
            time.sleep(0.05)
    watcher.dispose()
    assert left == 0


def test_a_check_its_prober_never_ran_is_dropped_and_asked_again():
    """A check handed to a worker just as its prober stopped is dropped unrun: the
    replica is not left overdue, and the next round asks it again at once."""
    r1 = Node("r1", Role.REPLICA, sa.create_engine("sqlite://"))
    clock = Clock()
    h = Health(
        [r1], probing=True, check_interval=0.1, max_lag=30, downtime=5, probe_timeout=1, clock=clock
    )
    (check,) = h.plan().checks
    clock.now += 2
    assert h.plan().overdue == [r1]
    assert h.usable("r1") is False
    h.drop(check)
    assert h.usable("r1") is True  # no longer overdue: as before its first check
    (again,) = h.plan().checks
    h.finish(again, ReplicaProbe(True, 100, 100, 0.0))
    assert h.usable("r1") is True


def test_a_late_prober_does_not_blame_its_replica():
    """An event loop busy with requests wakes the prober late, and answers every
    check late by as much: that lateness (the slack) is not the replica's."""
    r1 = Node("r1", Role.REPLICA, sa.create_engine("sqlite://"))
    clock = Clock()
    h = Health(
        [r1], probing=True, check_interval=0.1, max_lag=30, downtime=5, probe_timeout=1, clock=clock
    )
    h.plan()
    clock.now += 1.5
    assert h.plan(slack=1.4).overdue == []
    clock.now += 0.5
    assert h.plan(slack=0.2).overdue == [r1]


def _hang_between_two_reads(fault_backend, fault_cluster, **config: Any) -> Any:
    """GET /two-reads on an app whose only replica, r1, freezes after the request's
    first read and before its second; the response, or the error the view raised."""
    app = make_flask_app(fault_backend, replica="r1", REPLICATED_CONNECT_TIMEOUT=1, **config)
    db = app.db
    router = app.extensions["replicated"].router(app)
    r1 = fault_cluster.replica("r1")

    @app.get("/two-reads")
    def two_reads() -> Any:
        first = fault_backend.who(db.session)
        r1.pause()
        return {"first": first, "second": fault_backend.who(db.session)}

    client = app.test_client()
    try:
        client.get("/who")  # starts the prober
        deadline = time.monotonic() + 10
        while not router.health.usable("slave"):
            assert time.monotonic() < deadline, "r1 never served reads"
            time.sleep(0.05)
        try:
            return client.get("/two-reads")
        except sa.exc.OperationalError as error:
            return error
    finally:
        r1.resume()
        dispose_flask_app(app)


def test_a_replica_that_hangs_between_two_reads_of_a_request_is_left_for_the_primary(
    fault_backend, fault_cluster
):
    """r1 freezes between two reads of a request: the second, cut off once r1 is
    overdue, is answered by the primary (which has everything r1 had, so the request
    never sees time go backwards), not raised to the client. Its transaction only
    read, on r1, at READ COMMITTED: rolling it back loses nothing."""
    response = _hang_between_two_reads(fault_backend, fault_cluster)
    assert not isinstance(response, Exception), response
    assert (response.status_code, response.json) == (200, {"first": "r1", "second": "primary"})


def test_a_repeatable_read_transaction_cut_off_between_two_reads_is_not_retried(
    fault_backend, fault_cluster
):
    """At REPEATABLE READ the view relies on one snapshot for both reads: the lost
    connection is the view's error, as without the router."""
    options = {"pool_size": 10, "isolation_level": "REPEATABLE READ"}
    error = _hang_between_two_reads(fault_backend, fault_cluster, SQLALCHEMY_ENGINE_OPTIONS=options)
    assert isinstance(error, sa.exc.OperationalError)
    assert "SELECT inet_server_port()" in str(error)


def test_the_first_start_waits_for_the_first_round_of_checks():
    """A fresh process's first read must find the replicas' positions known: its
    ensure_started() returns once the first round answered (within the probe
    timeout), so a sticky reader is not sent to the primary for want of them."""
    from replicated_core.prober import ThreadProber

    r1 = Node("r1", Role.REPLICA, sa.create_engine("sqlite://"))
    health = Health([r1], probing=True, check_interval=5, max_lag=30, downtime=5, probe_timeout=5)
    answered = threading.Event()

    def slow_probe(node: Node) -> ReplicaProbe:
        time.sleep(0.2)
        answered.set()
        return ReplicaProbe(True, 100, 100, 0.0)

    prober = ThreadProber(health, slow_probe)
    try:
        prober.ensure_started()
        assert health.states["r1"].probe is not None
        assert answered.is_set()
    finally:
        prober.stop()


def test_a_read_that_comes_while_the_first_round_is_out_waits_for_it_too():
    # gunicorn gthread: a worker's first requests arrive together; the second one
    # found the prober running and read before any position was known.
    from replicated_core.prober import ThreadProber

    r1 = Node("r1", Role.REPLICA, sa.create_engine("sqlite://"))
    health = Health([r1], probing=True, check_interval=5, max_lag=30, downtime=5, probe_timeout=5)
    started = threading.Event()

    def slow_probe(node: Node) -> ReplicaProbe:
        started.set()
        time.sleep(0.3)
        return ReplicaProbe(True, 100, 100, 0.0)

    prober = ThreadProber(health, slow_probe)
    first = threading.Thread(target=prober.ensure_started)
    try:
        first.start()
        assert started.wait(5)
        assert prober.running
        assert not prober.ready
        prober.ensure_started()
        assert health.states["r1"].probe is not None
        assert prober.ready
    finally:
        first.join(5)
        prober.stop()
