"""Replica weights (REPLICATED_REPLICA_WEIGHTS) and the least-lag preference
(REPLICATED_PREFER_LEAST_LAG) on the real cluster: in-process Flask and Quart, and
gunicorn with 4 forked sync workers.

The spread is checked against a bound from the binomial distribution: of ``n``
cookie-less reads, a replica with share ``p`` of the weights serves a share within
five standard deviations, ``5 * sqrt(p * (1 - p) / n)``, of ``p`` (for 2,000 reads
and p = 3/4: 4.8 percentage points), which a correct spread misses about once in
1.7 million runs, and an even spread (1/2) misses by 26 standard deviations.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from support import (
    ServerProcess,
    dispose_flask_app,
    listening_socket,
    make_flask_app,
    make_quart_app,
)

from flask_replicated import FlaskReplicated, use_replica
from replicated_core import ConfigError
from replicated_core.config import load_config

READS = 2_000
WEIGHTS = {"replica": 3, "lagging": 1}
SIGMAS = 5
LOOP_CAP = 60.0  # seconds: every load loop stops by then, whatever it has done
APPS = Path(__file__).parent / "server_apps"
HOST = "127.0.0.1"
WORKERS = 4
CLIENT_THREADS = 8
CLOSE = {"Connection": "close"}


def _bound(p: float, n: int) -> float:
    """How far a share of ``n`` draws may fall from ``p``: five standard deviations."""
    return SIGMAS * math.sqrt(p * (1 - p) / n)


def _spread(served: Counter[str], weights: dict[str, float]) -> dict[str, Any]:
    """The shares served, against the weights' shares and the bound: each replica's
    (share, expected share, bound), and what the primary served."""
    total = sum(served.values())
    whole = sum(weights.values())
    found: dict[str, Any] = {"reads": total, "primary": served["primary"]}
    for name, weight in weights.items():
        p = weight / whole
        found[name] = (round(served[name] / total, 4), p, round(_bound(p, total), 4))
    return found


def _off_by_more_than_the_bound(spread: dict[str, Any], weights: dict[str, float]) -> list[str]:
    return [name for name in weights if abs(spread[name][0] - spread[name][1]) > spread[name][2]]


# -- configuration ------------------------------------------------------------------


def _sqlite_app(tmp_path: Path, **config: Any) -> Flask:
    primary = f"sqlite:///{tmp_path / 'p.sqlite3'}"
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="k",
        SQLALCHEMY_DATABASE_URI=primary,
        SQLALCHEMY_BINDS={
            "master": primary,
            "r1": f"sqlite:///{tmp_path / 'r1.sqlite3'}",
            "r2": f"sqlite:///{tmp_path / 'r2.sqlite3'}",
        },
        REPLICATED_REPLICA_BINDS=["r1", "r2"],
        **config,
    )
    SQLAlchemy(app)
    return app


KEY = "REPLICATED_REPLICA_WEIGHTS"
BAD_WEIGHTS = [
    (
        [3, 1],
        f"'{KEY}' must be a dict of replica names to weights, such as "
        "{'replica1': 3, 'replica2': 1}, got [3, 1].",
    ),
    (
        {"r3": 1},
        f"'{KEY}' names 'r3', which is not a replica. The replicas are: 'r1', 'r2'.",
    ),
    (
        {"postgresql://app:s3cr3t@db.example/app": 1},
        f"'{KEY}' names 'postgresql://app:***@db.example/app', which is not a replica. "
        "The replicas are: 'r1', 'r2'.",
    ),
    ({"r1": -1}, f"'{KEY}['r1']' must be zero or a positive number, got -1."),
    ({"r1": float("nan")}, f"'{KEY}['r1']' must be zero or a positive number, got nan."),
    ({"r1": float("inf")}, f"'{KEY}['r1']' must be zero or a positive number, got inf."),
    ({"r1": True}, f"'{KEY}['r1']' must be zero or a positive number, got True."),
    ({"r1": "3"}, f"'{KEY}['r1']' must be zero or a positive number, got '3'."),
    ({"r1": None}, f"'{KEY}['r1']' must be zero or a positive number, got None."),
    (
        {"r1": 0, "r2": 0.0},
        f"'{KEY}' gives every replica the weight 0, so no replica would serve reads. Give "
        "at least one a positive weight (0 keeps a replica out of rotation).",
    ),
]


@pytest.mark.parametrize(("weights", "message"), BAD_WEIGHTS)
def test_bad_weights_fail_in_init_app(tmp_path, weights, message):
    with pytest.raises(ConfigError) as caught:
        FlaskReplicated(_sqlite_app(tmp_path, REPLICATED_REPLICA_WEIGHTS=weights))
    assert str(caught.value) == message
    assert "s3cr3t" not in message


def test_a_weight_too_big_for_a_float_fails_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"REPLICATED_REPLICA_WEIGHTS\['r1'\]"):
        FlaskReplicated(_sqlite_app(tmp_path, REPLICATED_REPLICA_WEIGHTS={"r1": 10**400}))


def test_weights_name_replicas_given_by_url(tmp_path):
    """With REPLICATED_REPLICAS the names are its keys; a bind name is not one."""
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'p.sqlite3'}",
        REPLICATED_REPLICAS={"east": f"sqlite:///{tmp_path / 'east.sqlite3'}"},
        REPLICATED_REPLICA_WEIGHTS={"slave": 1},
    )
    SQLAlchemy(app)
    with pytest.raises(ConfigError) as caught:
        FlaskReplicated(app)
    assert str(caught.value) == (
        f"'{KEY}' names 'slave', which is not a replica. The replicas are: 'east'."
    )


def test_prefer_least_lag_must_be_a_bool(tmp_path):
    with pytest.raises(ConfigError) as caught:
        FlaskReplicated(_sqlite_app(tmp_path, REPLICATED_PREFER_LEAST_LAG="yes"))
    assert str(caught.value) == "'REPLICATED_PREFER_LEAST_LAG' must be True or False, got 'yes'."


def test_a_replica_not_named_weighs_one_and_zero_is_accepted(tmp_path):
    app = _sqlite_app(tmp_path, REPLICATED_REPLICA_WEIGHTS={"r1": 0})
    router = FlaskReplicated(app).router(app)
    assert [router.spread.weight(n) for n in router.replicas] == [0.0, 1.0]


DISCOVERY = {"url": "postgresql+psycopg://app@replicas.test/app"}


def test_weights_of_another_database_with_discovery_only_are_accepted():
    """Discovery alone gives the default database no fixed replica, which is not "every
    replica at weight 0"; a weight for another database's replica is read as given."""
    config = load_config(
        {
            "REPLICATED_REPLICA_DISCOVERY": DISCOVERY,
            "REPLICATED_BIND_REPLICAS": {
                "users": {"u1": "postgresql://app@h1/users", "u2": "postgresql://app@h2/users"}
            },
            "REPLICATED_REPLICA_WEIGHTS": {"u1": 3},
        }
    )
    assert config.replica_weights == {"u1": 3.0}


def test_a_fixed_replica_at_weight_0_beside_discovered_ones_is_accepted():
    """Discovered replicas weigh 1, so a fixed one at 0 still leaves replicas to read."""
    config = load_config(
        {
            "REPLICATED_REPLICA_DISCOVERY": DISCOVERY,
            "REPLICATED_REPLICAS": {"reporting": "postgresql://app@reporting/app"},
            "REPLICATED_REPLICA_WEIGHTS": {"reporting": 0},
        }
    )
    assert config.replica_weights == {"reporting": 0.0}


def test_every_replica_of_another_database_at_weight_0_is_refused_with_discovery():
    with pytest.raises(ConfigError) as caught:
        load_config(
            {
                "REPLICATED_REPLICA_DISCOVERY": DISCOVERY,
                "REPLICATED_BIND_REPLICAS": {"users": {"u1": "postgresql://app@h1/users"}},
                "REPLICATED_REPLICA_WEIGHTS": {"u1": 0},
            }
        )
    assert str(caught.value) == (
        f"'{KEY}' gives every replica of the database 'users' the weight 0, so no replica "
        "would serve reads. Give at least one a positive weight (0 keeps a replica out of "
        "rotation)."
    )


# -- in-process Flask on the cluster --------------------------------------------------


def _flask_reads(app: Any, count: int) -> Counter[str]:
    """Who served ``count`` cookie-less GETs (each from a client of its own)."""
    served: Counter[str] = Counter()
    deadline = time.monotonic() + LOOP_CAP
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        response = app.test_client().get("/who")
        assert response.status_code == 200
        served[response.headers["X-Who"]] += 1
    return served


def test_flask_reads_follow_the_weights(postgresql_backend):
    """3:1 over 2,000 cookie-less GETs: each share within 5 sigma of 3/4 and 1/4, none
    on the primary. Seen failing with the weights ignored (an even pick): 0.5 and 0.5."""
    app = make_flask_app(
        postgresql_backend, replica=["replica", "lagging"], REPLICATED_REPLICA_WEIGHTS=WEIGHTS
    )
    try:
        served = _flask_reads(app, READS)
    finally:
        dispose_flask_app(app)
    spread = _spread(served, WEIGHTS)
    print("flask in-process:", spread)
    assert (spread["reads"], spread["primary"]) == (READS, 0), spread
    assert _off_by_more_than_the_bound(spread, WEIGHTS) == [], spread


def test_flask_weight_zero_keeps_a_replica_out_of_rotation(postgresql_backend):
    """'lagging' weighs 0: no cookie-less GET and no use_replica() block reads from it.
    Seen failing with weight-0 replicas kept in rotation: about half went there."""
    app = make_flask_app(
        postgresql_backend,
        replica=["replica", "lagging"],
        REPLICATED_REPLICA_WEIGHTS={"replica": 1, "lagging": 0},
    )
    db = app.db

    @app.post("/block")
    def block() -> Any:
        with use_replica():
            return postgresql_backend.who(db.session)

    try:
        served = _flask_reads(app, 500)
        blocks = Counter(app.test_client().post("/block").text for _ in range(200))
    finally:
        dispose_flask_app(app)
    assert (dict(served), dict(blocks)) == ({"replica": 500}, {"replica": 200})


def test_flask_sticky_read_with_only_the_weight_zero_replica_caught_up_reads_the_primary(
    postgresql_backend,
):
    """After a write, 'replica' (weight 0) has replayed it within milliseconds and
    'lagging' not for 500 ms: the read goes to the primary, not to the replica out of
    rotation. Seen failing with weight-0 replicas kept in rotation: 'replica'."""
    app = make_flask_app(
        postgresql_backend,
        replica=["replica", "lagging"],
        REPLICATED_REPLICA_WEIGHTS={"replica": 0, "lagging": 1},
        REPLICATED_CATCH_UP_TIMEOUT=0.05,
    )
    try:
        client = app.test_client()
        client.get("/who")  # the prober's first round: positions are known
        deadline = time.monotonic() + 5
        health = app.extensions["replicated"].router(app).health
        while any(v.replay_lsn is None for v in health.views()):
            assert time.monotonic() < deadline, health.views()
            time.sleep(0.02)
        served = []
        for number in range(5):
            assert client.post("/items", data={"name": f"w{number}"}).status_code == 303
            # Until 'replica' has surely replayed it, as its next check will see.
            time.sleep(0.15)
            served.append(client.get("/who").text)
    finally:
        dispose_flask_app(app)
    assert served == ["primary"] * 5


# -- the least-lag preference ---------------------------------------------------------


def _flush_lsn(cluster: Any) -> str:
    [(lsn,)] = cluster.execute(cluster.primary, "SELECT pg_current_wal_flush_lsn()::text")
    return str(lsn)


def test_flask_prefer_least_lag_reads_from_the_replica_that_is_not_behind(
    postgresql_backend, pg_cluster
):
    """'lagging' replays nothing (paused) after a write it received, so its lag grows,
    while 'replica' is caught up: with REPLICATED_PREFER_LEAST_LAG every GET reads
    'replica', though 'lagging' is still usable (under REPLICATED_MAX_LAG). Seen
    failing with the preference ignored: 'lagging' served about half."""
    app = make_flask_app(
        postgresql_backend, replica=["replica", "lagging"], REPLICATED_PREFER_LEAST_LAG=True
    )
    router = app.extensions["replicated"].router(app)
    lagging = pg_cluster.replica("lagging")
    tolerance = router.config.check_interval
    try:
        client = app.test_client()
        client.get("/who")
        # The first checks see both caught up, so lagging's lag is timed from when the
        # write arrives (not the server's figure, which counts the idle time before).
        deadline = time.monotonic() + 10
        while [v.lag_seconds for v in router.health.views()] != [0.0, 0.0] or any(
            v.replay_lsn is None for v in router.health.views()
        ):
            assert time.monotonic() < deadline, router.health.views()
            time.sleep(0.02)
        pg_cluster.execute(lagging, "SELECT pg_wal_replay_pause()")
        pg_cluster.execute(pg_cluster.primary, "INSERT INTO items (name) VALUES ('behind')")
        lsn = _flush_lsn(pg_cluster)
        while pg_cluster.execute(
            lagging, f"SELECT pg_last_wal_receive_lsn() >= '{lsn}'::pg_lsn"
        ) != [(True,)]:
            assert time.monotonic() < deadline, "'lagging' did not receive the write"
            time.sleep(0.02)
        while True:  # until the checks have timed the lag past the tolerance
            views = {v.node.name: v for v in router.health.views()}
            if views["lagging"].lag_seconds > 3 * tolerance and views["replica"].lag_seconds == 0:
                break
            assert time.monotonic() < deadline, views
            time.sleep(0.05)
        assert views["lagging"].usable, views
        served = _flask_reads(app, 300)
        views = {v.node.name: v for v in router.health.views()}
        assert views["lagging"].usable, views  # still usable: the preference decided
    finally:
        pg_cluster.execute(lagging, "SELECT pg_wal_replay_resume()")
        dispose_flask_app(app)
        pg_cluster.wait_for_replay(include_delayed=True)
    assert dict(served) == {"replica": 300}


# -- Quart in-process -----------------------------------------------------------------


async def test_quart_reads_follow_the_weights(postgresql_backend):
    """As the Flask test: 3:1 over 2,000 cookie-less GETs, within 5 sigma. Seen failing
    with the weights ignored: 0.5 and 0.5."""
    app = make_quart_app(
        postgresql_backend, replica=["replica", "lagging"], REPLICATED_REPLICA_WEIGHTS=WEIGHTS
    )
    served: Counter[str] = Counter()
    try:
        deadline = time.monotonic() + LOOP_CAP
        for _ in range(READS):
            if time.monotonic() > deadline:
                break
            response = await app.test_client().get("/who")
            assert response.status_code == 200
            served[response.headers["X-Who"]] += 1
    finally:
        await app.rep.dispose(app)
    spread = _spread(served, WEIGHTS)
    print("quart in-process:", spread)
    assert (spread["reads"], spread["primary"]) == (READS, 0), spread
    assert _off_by_more_than_the_bound(spread, WEIGHTS) == [], spread


async def test_quart_weight_zero_keeps_a_replica_out_of_rotation(postgresql_backend):
    """'lagging' weighs 0: none of 300 cookie-less GETs reads from it. Seen failing with
    weight-0 replicas kept in rotation: about half went there."""
    app = make_quart_app(
        postgresql_backend,
        replica=["replica", "lagging"],
        REPLICATED_REPLICA_WEIGHTS={"replica": 1, "lagging": 0},
    )
    served: Counter[str] = Counter()
    try:
        for _ in range(300):
            response = await app.test_client().get("/who")
            served[response.headers["X-Who"]] += 1
    finally:
        await app.rep.dispose(app)
    assert dict(served) == {"replica": 300}


# -- gunicorn, 4 forked sync workers --------------------------------------------------


@pytest.fixture
def seed_row(pg_cluster: Any) -> int:
    """A row of tests/server_apps/flask_app.py's table that every node has."""
    engine = sa.create_engine(pg_cluster.primary.url("psycopg"))
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "CREATE TABLE IF NOT EXISTS server_items "
                    "(id SERIAL PRIMARY KEY, token VARCHAR(64) NOT NULL)"
                )
            )
            seed_id = conn.execute(
                sa.text("INSERT INTO server_items (token) VALUES ('seed') RETURNING id")
            ).scalar_one()
    finally:
        engine.dispose()
    pg_cluster.wait_for_replay(include_delayed=True)
    return int(seed_id)


@pytest.mark.slow
def test_gunicorn_workers_follow_the_weights(pg_cluster, seed_row, tmp_path):
    """gunicorn, 4 sync workers (forked), 2,000 cookie-less GETs on new connections:
    the whole spread within 5 sigma of 3:1, and each worker's too (its own bound).
    Seen failing with the weights ignored: 0.5 and 0.5."""
    replicas = ["replica", "lagging"]
    nodes = {"primary": pg_cluster.primary, **{r: pg_cluster.replica(r) for r in replicas}}
    settings = {
        "urls": {name: node.url("psycopg") for name, node in nodes.items()},
        "async_urls": {name: node.url("asyncpg") for name, node in nodes.items()},
        "replicas": replicas,
        "secret_key": secrets.token_hex(16),
        "query_at_import": False,
        "config": {"REPLICATED_REPLICA_WEIGHTS": WEIGHTS},
    }
    env = {
        **os.environ,
        "SERVERS_TEST_SETTINGS": json.dumps(settings),
        "PYTHONPATH": os.pathsep.join([str(APPS), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHONUNBUFFERED": "1",
    }
    names = {node.port: name for name, node in nodes.items()}
    with listening_socket(HOST) as sock:
        command = [
            *(sys.executable, "-m", "gunicorn", "--bind", f"fd://{sock.fileno()}"),
            *("--workers", str(WORKERS), "--worker-class", "sync", "--timeout", "10"),
            "flask_app:app",
        ]
        server = ServerProcess.start(
            "gunicorn sync",
            command,
            cwd=APPS,
            env=env,
            log_path=tmp_path / "gunicorn.log",
            pass_fds=[sock.fileno()],
            redact=lambda text: text.replace(pg_cluster.password, "********"),
        )
        port = sock.getsockname()[1]
    try:
        by_worker = _gunicorn_reads(server, f"http://{HOST}:{port}", seed_row, names)
    finally:
        server.stop(grace=10)
    served = sum(by_worker.values(), Counter())
    spread = _spread(served, WEIGHTS)
    workers = {pid: _spread(counts, WEIGHTS) for pid, counts in by_worker.items()}
    print("gunicorn sync, 4 workers:", spread, workers)
    assert (spread["reads"], spread["primary"], len(workers)) == (READS, 0, WORKERS), (
        spread,
        workers,
    )
    assert _off_by_more_than_the_bound(spread, WEIGHTS) == [], spread
    assert {pid: _off_by_more_than_the_bound(w, WEIGHTS) for pid, w in workers.items()} == {
        pid: [] for pid in workers
    }, workers


def _gunicorn_reads(
    server: ServerProcess, url: str, item_id: int, names: dict[int, str]
) -> dict[int, Counter[str]]:
    """Who served each of READS GETs, by worker pid, once every worker answers."""
    deadline = time.monotonic() + LOOP_CAP
    with httpx.Client(base_url=url, timeout=15) as client:
        pids: set[int] = set()
        while len(pids) < WORKERS:
            server.check_running()
            assert time.monotonic() < deadline, server.log_tail()
            try:
                pids.add(int(client.get("/health", headers=CLOSE).json()["pid"]))
            except httpx.HTTPError:
                time.sleep(0.05)
        path = f"/items/{item_id}"

        def read(_: int) -> tuple[int, str] | None:
            if time.monotonic() > deadline:
                return None
            body = client.get(path, headers=CLOSE).json()
            return body["pid"], names[body["port"]]

        with ThreadPoolExecutor(max_workers=CLIENT_THREADS) as pool:
            answers = [a for a in pool.map(read, range(READS)) if a is not None]
    by_worker: dict[int, Counter[str]] = {}
    for pid, name in answers:
        by_worker.setdefault(pid, Counter())[name] += 1
    return by_worker


# -- the status command ---------------------------------------------------------------


def test_status_shows_the_weights(postgresql_backend):
    """A weight column and a JSON field (None for the primary); one replica out of
    rotation and the other usable: still healthy."""
    app = make_flask_app(
        postgresql_backend,
        replica=["replica", "lagging"],
        REPLICATED_REPLICA_WEIGHTS={"replica": 2.5, "lagging": 0},
    )
    try:
        runner = app.test_cli_runner()
        table = runner.invoke(args=["replicated", "status"])
        report = json.loads(runner.invoke(args=["replicated", "status", "--json"]).output)
    finally:
        dispose_flask_app(app)
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split()[-1] == "weight"
    assert {line.split()[0]: line.split()[-1] for line in lines[1:4]} == {
        "master": "-",
        "replica": "2.5",
        "lagging": "0",
    }
    assert report["healthy"] is True
    assert {n["name"]: n["weight"] for n in report["nodes"]} == {
        "master": None,
        "replica": 2.5,
        "lagging": 0.0,
    }


# -- the spread itself ----------------------------------------------------------------


def test_least_lag_keeps_the_replicas_within_the_tolerance_and_weighs_them():
    """Lags 0, 0.05 and 0.5 s with a tolerance of 0.1 s: the first two share the read
    by weight (3 and 1: cumulative 3, 4); all weights 0 leave nothing (the primary).
    Seen failing with the tolerance left out: only 'a' was kept."""
    from replicated_core.nodes import Node, Role
    from replicated_core.rules import ReplicaView
    from replicated_core.weights import Spread

    engine = sa.create_engine("sqlite://")
    a, b, c = (Node(name, Role.REPLICA, engine) for name in "abc")
    views = [
        ReplicaView(a, True, 1, 0.0),
        ReplicaView(b, True, 1, 0.05),
        ReplicaView(c, True, 1, 0.5),
    ]
    spread = Spread([a, b, c], {"a": 3, "b": 1, "c": 5}, least_lag=True, tolerance=0.1)
    assert spread.narrow([a, b, c], lambda n: n, views) == ([a, b], (3.0, 4.0))
    even = Spread([a, b, c], {}, least_lag=True, tolerance=0.1)
    assert even.narrow([c, b, a], lambda n: n, views) == ([b, a], None)
    out = Spread([a, b, c], {"a": 0, "b": 0})
    assert out.narrow([a, b], lambda n: n, views) == ([], None)
    assert out.narrow([a], lambda n: n, views) == ((), None)
    assert [v.node for v in out.in_rotation(views)] == [c]
    engine.dispose()
