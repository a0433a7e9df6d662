"""SQLALCHEMY_ENGINE_OPTIONS reach the engines that serve requests, one engine serves
the primary, and replicas can be given by URL (REPLICATED_REPLICAS)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import sqlalchemy as sa
from support import make_flask_app, text_of

from replicated_core.testing.pgcluster import StopMode

APP_NAME = "engine-options-test"


def _routed_engines(app):
    router = app.extensions["replicated"].router(app)
    return router.primary.engine, [node.engine for node in router.replicas]


def _replicas_by_url(backend, *labels, asynchronous=False, **config):
    """Config of the replicas-by-URL style: no binds, the replicas in REPLICATED_REPLICAS."""
    return {
        "SQLALCHEMY_BINDS": {},
        "REPLICATED_REPLICAS": {
            label: backend.url(label, asynchronous=asynchronous) for label in labels
        },
        **config,
    }


def _add_settings_view(app):
    """GET /settings: who answered, and the session settings that server saw."""
    db = app.db

    @app.route("/settings", methods=["GET", "POST"])
    def settings():
        row = db.session.execute(
            sa.text(
                "SELECT inet_server_port(), current_setting('application_name'), "
                "current_setting('transaction_isolation')"
            )
        ).one()
        return {"node": app.backend.label(row[0]), "name": row[1], "isolation": row[2]}


# -- Flask, binds style ---------------------------------------------------------------


def test_flask_engine_options_reach_the_primary_and_every_replica(flask_app_factory, backend):
    """The seed's style (master and slave binds): the primary and the replicas get the
    shared options, as the default engine does in Flask-SQLAlchemy."""
    app = flask_app_factory(
        replica=["replica", "lagging"],
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 3, "max_overflow": 1, "echo": True},
    )
    primary, replicas = _routed_engines(app)
    assert len(replicas) == 2
    for engine in (primary, *replicas):
        assert engine.pool.size() == 3
        assert engine.pool._max_overflow == 1
        assert engine.echo is True
    with app.app_context():
        assert app.db.engine is primary


def test_flask_connect_args_and_isolation_are_seen_by_every_server(postgresql_backend):
    """Asked on the real servers: the primary (POST) and the replica (GET) were both
    connected with the shared connect_args and isolation_level."""
    app = make_flask_app(
        postgresql_backend,
        SQLALCHEMY_ENGINE_OPTIONS={
            "connect_args": {"application_name": APP_NAME},
            "isolation_level": "REPEATABLE READ",
        },
    )
    _add_settings_view(app)
    client = app.test_client()
    try:
        expected = {"name": APP_NAME, "isolation": "repeatable read"}
        assert client.get("/settings").json == {"node": "replica", **expected}
        assert client.post("/settings").json == {"node": "primary", **expected}
    finally:
        for engine in app.db._app_engines[app].values():
            engine.dispose()


def test_flask_per_bind_options_win_over_the_shared_ones(flask_app_factory):
    app = flask_app_factory(SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 3, "echo": True})
    binds = dict(app.config["SQLALCHEMY_BINDS"])
    app2 = flask_app_factory(
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 3, "echo": True},
        SQLALCHEMY_BINDS={
            "master": {"url": binds["master"], "pool_size": 5},
            "slave": {"url": binds["slave"], "pool_size": 7},
        },
    )
    assert [e.pool.size() for e in (_routed_engines(app)[0], *_routed_engines(app)[1])] == [3, 3]
    primary, (replica,) = _routed_engines(app2)
    assert (primary.pool.size(), primary.echo) == (5, True)
    assert (replica.pool.size(), replica.echo) == (7, True)


def test_flask_one_engine_serves_the_primary(flask_app_factory):
    """The 'master' bind names SQLALCHEMY_DATABASE_URI's database: one engine (one
    pool) serves it, whether code asks for db.engine or db.engines['master']."""
    app = flask_app_factory(SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 4})
    primary, (replica,) = _routed_engines(app)
    with app.app_context():
        assert app.db.engines["master"] is primary
        assert app.db.engine is primary
        assert app.db.engines["slave"] is replica
        distinct = {id(engine) for engine in dict.values(app.db._app_engines[app])}
    assert len(distinct) == 2


def test_flask_the_master_binds_own_options_shape_the_one_primary_engine(flask_app_factory):
    app = flask_app_factory(SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 3, "echo": True})
    url = app.config["SQLALCHEMY_BINDS"]["master"]
    app = flask_app_factory(
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 3, "echo": True},
        SQLALCHEMY_BINDS={**app.config["SQLALCHEMY_BINDS"], "master": {"url": url, "pool_size": 6}},
    )
    primary, _ = _routed_engines(app)
    assert (primary.pool.size(), primary.echo) == (6, True)
    with app.app_context():
        assert app.db.engine is primary
        assert app.db.engines["master"] is primary


def test_flask_pool_pre_ping_survives_a_restarted_replica(fault_flask_factory, fault_cluster):
    """The replica's pooled connection dies with its server: with pool_pre_ping the
    next GET is still answered by that replica, on a fresh connection, and the
    router never saw an error."""
    app = fault_flask_factory(
        replica="r1",
        REPLICATED_STICKY_MODE="off",
        SQLALCHEMY_ENGINE_OPTIONS={"pool_pre_ping": True},
    )
    client = app.test_client()
    assert client.get("/who").text == "r1"
    router = app.extensions["replicated"].router(app)
    # The prober would rightly meet the replica while it restarts and mark it down:
    # stopped meanwhile, so only the pooled connection's death is under test. The next
    # read starts it again.
    router.close()
    r1 = fault_cluster.replica("r1")
    r1.stop(StopMode.FAST)
    r1.start()
    assert client.get("/who").text == "r1"
    health = router.health
    assert (health.marked_down, health.states["slave"].failures) == (0, 0)


# -- Flask, replicas by URL ------------------------------------------------------------


def test_flask_replicas_by_url_route_reads_and_stay_out_of_the_binds(flask_app_factory, backend):
    app = flask_app_factory(
        **_replicas_by_url(
            backend, "replica", SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 3, "echo": True}
        )
    )
    client = app.test_client()
    assert client.get("/who").text == "replica"
    assert client.post("/who").text == "primary"
    primary, (replica,) = _routed_engines(app)
    assert (replica.pool.size(), replica.echo) == (3, True)
    assert (primary.pool.size(), primary.echo) == (3, True)
    router = app.extensions["replicated"].router(app)
    assert [node.name for node in router.replicas] == ["replica"]
    with app.app_context():
        assert list(app.db.metadatas) == [None]
        assert list(app.db.engines) == [None]
        assert app.db.engine is primary
        # create_all() meets the primary only: on PostgreSQL a replica would refuse it.
        app.db.create_all()


def test_flask_a_replica_given_by_url_takes_its_own_options(flask_app_factory, backend):
    app = flask_app_factory(
        SQLALCHEMY_BINDS={},
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 3, "echo": True},
        REPLICATED_REPLICAS={
            "r-a": {"url": backend.url("replica"), "pool_size": 8},
            "r-b": backend.url("lagging"),
        },
    )
    _, replicas = _routed_engines(app)
    assert [(e.pool.size(), e.echo) for e in replicas] == [(8, True), (3, True)]
    status = app.extensions["replicated"].status(app)
    assert [node.name for node in status.nodes] == ["(default)", "r-a", "r-b"]


MIGRATE_APP = """
import sqlalchemy as sa
from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy

from flask_replicated import FlaskReplicated

app = Flask(__name__)
app.config.update(SQLALCHEMY_DATABASE_URI={primary!r}, REPLICATED_REPLICAS={replicas!r})
db = SQLAlchemy(app)


class Note(db.Model):
    __tablename__ = "migrated_notes"
    id = sa.Column(sa.Integer, primary_key=True)


FlaskReplicated(app)
Migrate(app, db)
"""


@pytest.mark.parametrize("multidb", [False, True], ids=["single", "multidb"])
def test_flask_migrate_upgrade_sees_one_database(pg_cluster, tmp_path, multidb):
    """Replicas by URL: 'flask db init' (and '--multidb'), 'migrate' and 'upgrade'
    migrate the primary only, and the replica replays it. A database of its own:
    autogenerate would drop the other tests' tables."""
    name = f"migrate_{'multi' if multidb else 'single'}"
    admin = sa.create_engine(pg_cluster.primary.url("psycopg"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    primary_url = pg_cluster.primary.url("psycopg", database=name)
    replica_url = pg_cluster.replica("replica").url("psycopg", database=name)
    (tmp_path / "notes_app.py").write_text(
        MIGRATE_APP.format(primary=primary_url, replicas={"replica": replica_url})
    )
    primary = sa.create_engine(primary_url)
    replica = sa.create_engine(replica_url)

    def flask(*args):
        done = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "notes_app", "db", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr

    try:
        flask("init", *(["--multidb"] if multidb else []))
        flask("migrate", "-m", "notes")
        flask("upgrade")
        with primary.connect() as conn:
            version = conn.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar()
            notes = conn.execute(sa.text("SELECT count(*) FROM migrated_notes")).scalar()
        assert (version, notes) == (1, 0)
        pg_cluster.wait_for_replay()
        with replica.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM migrated_notes")).scalar() == 0
    finally:
        primary.dispose()
        replica.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


# -- Quart -------------------------------------------------------------------------------


async def test_quart_one_engine_serves_the_primary_and_bind_options_win(quart_app_factory):
    app = quart_app_factory(SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 3})
    rep = app.rep
    async with app.app_context():
        assert rep.engines["master"] is rep.engines[None]
        assert rep.engine is rep.engines[None]
    urls = app.config["SQLALCHEMY_BINDS"]
    app = quart_app_factory(
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 3},
        SQLALCHEMY_BINDS={
            "master": {"url": urls["master"], "pool_size": 5},
            "slave": {"url": urls["slave"], "pool_size": 7},
        },
    )
    async with app.app_context():
        assert app.rep.engine.sync_engine.pool.size() == 5
        assert app.rep.engines["master"] is app.rep.engines[None]
        assert app.rep.engines["slave"].sync_engine.pool.size() == 7


async def test_quart_replicas_by_url(quart_app_factory, backend):
    app = quart_app_factory(
        **_replicas_by_url(
            backend, "replica", asynchronous=True, SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 3}
        )
    )
    client = app.test_client()
    assert await text_of(await client.get("/who")) == "replica"
    assert await text_of(await client.post("/who")) == "primary"
    router = app.rep.router(app)
    assert [node.name for node in router.replicas] == ["replica"]
    assert router.replicas[0].engine.pool.size() == 3
    async with app.app_context():
        assert list(app.rep.engines) == [None]


# -- the project's own tests and benchmarks ----------------------------------------------


def test_the_pools_the_fault_tests_and_benchmarks_size_are_those_sizes(flask_app_factory, backend):
    """They set pool sizes with SQLALCHEMY_ENGINE_OPTIONS, and ran on default pools."""
    from test_faults import FAULT_CONFIG

    from benchmarks._apps import flask_app

    app = flask_app_factory(replica=["replica", "lagging"], **FAULT_CONFIG)
    primary, replicas = _routed_engines(app)
    assert [(e.pool.size(), e.pool._max_overflow) for e in (primary, *replicas)] == [(20, 20)] * 3
    bench = flask_app(
        backend.url("primary"),
        {"r1": backend.url("replica")},
        replicated=True,
        engine_options={"pool_size": 20, "max_overflow": 20},
    )
    try:
        primary, replicas = _routed_engines(bench.app)
        assert [(e.pool.size(), e.pool._max_overflow) for e in (primary, *replicas)] == [
            (20, 20)
        ] * 2
    finally:
        bench.dispose()
