"""Several databases, each with its primary and replicas (REPLICATED_BIND_REPLICAS).

The second database is ``second`` on the session's cluster (streaming replication
carries every database, so its replicas have it too): the default database "app" and
"second" each have their own primary URL and replica URLs. The servers say who
answered (``inet_server_port()``, ``pg_is_in_recovery()``).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from support import ServerProcess, listening_socket

from replicated_core import ConfigError, use_primary, use_replica
from replicated_core.prometheus import ReplicatedCollector
from replicated_core.sticky import StickyCodec, StickyToken, token_salt

SECOND = "second"
WHO_SQL = "SELECT inet_server_port(), pg_is_in_recovery()"
REPLICAS = ("replica", "lagging")
APPS = Path(__file__).parent / "server_apps"
HOST = "127.0.0.1"


@pytest.fixture(scope="session")
def cluster(pg_cluster: Any) -> Any:
    """The session's cluster with the database 'second' and an items table in both."""
    if not pg_cluster.execute(
        pg_cluster.primary, f"SELECT 1 FROM pg_database WHERE datname = '{SECOND}'"
    ):
        pg_cluster.execute(pg_cluster.primary, f"CREATE DATABASE {SECOND}")
    for database in ("app", SECOND):
        engine = sa.create_engine(pg_cluster.primary.url("psycopg", database=database))
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "CREATE TABLE IF NOT EXISTS multi_items "
                    "(id SERIAL PRIMARY KEY, name VARCHAR(64) NOT NULL)"
                )
            )
        engine.dispose()
    pg_cluster.wait_for_replay(include_delayed=True)
    return pg_cluster


def _urls(cluster: Any, driver: str = "psycopg") -> dict[str, dict[str, str]]:
    nodes = {"primary": cluster.primary, **{r: cluster.replica(r) for r in REPLICAS}}
    return {
        database: {label: node.url(driver, database=database) for label, node in nodes.items()}
        for database in ("app", SECOND)
    }


def _labels(cluster: Any) -> dict[int, str]:
    nodes = {"primary": cluster.primary, **{r: cluster.replica(r) for r in REPLICAS}}
    return {node.port: label for label, node in nodes.items()}


def _config(cluster: Any, driver: str = "psycopg", **config: Any) -> dict[str, Any]:
    urls = _urls(cluster, driver)
    return {
        "SECRET_KEY": "test-secret-key",
        "TESTING": True,
        "SQLALCHEMY_DATABASE_URI": urls["app"]["primary"],
        "SQLALCHEMY_BINDS": {SECOND: urls[SECOND]["primary"]},
        "REPLICATED_REPLICAS": {f"a_{r}": urls["app"][r] for r in REPLICAS},
        "REPLICATED_BIND_REPLICAS": {SECOND: {f"b_{r}": urls[SECOND][r] for r in REPLICAS}},
        **config,
    }


# -- the Flask app ---------------------------------------------------------------------


def flask_app(cluster: Any, **config: Any) -> Any:
    """A Flask app routing 'app' (models without a bind key) and 'second'
    (``__bind_key__ = "second"``); ``/who`` says who answered on each."""
    from flask import Flask, request
    from flask_sqlalchemy import SQLAlchemy

    from flask_replicated import FlaskReplicated, changes_database

    labels = _labels(cluster)
    app = Flask(__name__)
    app.config.update(_config(cluster, **config))
    db = SQLAlchemy(app)

    class A(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "multi_items"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(sa.String(64), nullable=False)

    class B(db.Model):  # type: ignore[name-defined,misc]
        __bind_key__ = SECOND
        __tablename__ = "multi_items"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(sa.String(64), nullable=False)

    rep = FlaskReplicated(app)
    models = {"a": A, "b": B}

    def who(model: Any) -> str:
        port, in_recovery = db.session.execute(
            sa.text(WHO_SQL), bind_arguments={"mapper": model}
        ).one()
        label = labels[port]
        assert in_recovery is (label != "primary"), (label, in_recovery)
        return label

    def both() -> dict[str, str]:
        return {"a": who(A), "b": who(B)}

    def names(model: Any) -> list[str]:
        return list(db.session.scalars(sa.select(model.name)))

    @app.route("/who", methods=["GET", "POST"])
    def who_view() -> Any:
        return both()

    @app.post("/write/<which>")
    def write(which: str) -> Any:
        name = request.form["name"]
        for key in which:
            db.session.add(models[key](name=name))
        db.session.commit()
        return {**both(), "token": rep.consistency_token()}

    @app.get("/read")
    def read() -> Any:
        return {**both(), "a_names": names(A), "b_names": names(B)}

    @app.get("/forced")
    @changes_database
    def forced() -> Any:
        return both()

    @app.get("/primary-block")
    def primary_block() -> Any:
        with use_primary():
            return both()

    @app.post("/replica-block")
    def replica_block() -> Any:
        with use_replica():
            return both()

    @app.get("/write-on-get")
    def write_on_get() -> Any:
        db.session.add(B(name="on a GET"))
        db.session.flush()
        return "written"

    app.who = both  # type: ignore[attr-defined]
    app.names = names  # type: ignore[attr-defined]
    app.models = models  # type: ignore[attr-defined]
    app.db = db  # type: ignore[attr-defined]
    return app


def dispose(app: Any) -> None:
    rep = app.extensions["replicated"]
    engines = list(app.db._app_engines[app].values())
    for router in rep.databases(app):
        router.close()
        engines += [node.engine for node in (router.primary, *router.replicas)]
    for engine in {id(e): e for e in engines}.values():
        engine.dispose()


@pytest.fixture
def app(cluster: Any) -> Any:
    built = flask_app(cluster)
    yield built
    dispose(built)


def _wait_for_positions(app: Any) -> None:
    # The first request starts each prober; a read then has every replica's position.
    app.test_client().get("/who")
    deadline = time.monotonic() + 5
    for router in app.extensions["replicated"].databases(app):
        while any(v.replay_lsn is None for v in router.health.views()):
            assert time.monotonic() < deadline, router.health.views()
            time.sleep(0.02)


REPLICA_LABELS = set(REPLICAS)


def test_flask_get_reads_every_database_from_its_replicas(app):
    client = app.test_client()
    served = [client.get("/who").json for _ in range(20)]
    assert {s["a"] for s in served} <= REPLICA_LABELS
    assert {s["b"] for s in served} <= REPLICA_LABELS


def test_flask_post_and_forced_views_use_every_primary(app):
    client = app.test_client()
    assert client.post("/who").json == {"a": "primary", "b": "primary"}
    assert client.get("/forced").json == {"a": "primary", "b": "primary"}
    assert client.get("/primary-block").json == {"a": "primary", "b": "primary"}
    served = client.post("/replica-block").json
    assert served["a"] in REPLICA_LABELS
    assert served["b"] in REPLICA_LABELS


def test_flask_bind_engine_of_the_second_database_is_routed(app):
    """db.engines['second'] asks its router: a replica inside use_replica(), its primary
    outside a request."""
    db = app.db
    with app.app_context():
        with use_replica(), db.engines[SECOND].connect() as conn:
            in_block = conn.execute(sa.text(WHO_SQL)).one()
        with db.engines[SECOND].connect() as conn:
            outside = conn.execute(sa.text(WHO_SQL)).one()
            database = conn.execute(sa.text("SELECT current_database()")).scalar()
    assert (in_block[1], outside[1], database) == (True, False, SECOND)


def test_flask_a_write_to_the_second_database_on_a_get_names_the_view(app):
    """Seen failing with the message of a write outside any request: the refusal looked
    at the default database's scope only."""
    from replicated_core import ReplicaWriteError

    app.config["TESTING"] = False
    app.testing = False
    errors: list[BaseException] = []
    from flask import got_request_exception

    got_request_exception.connect(
        lambda sender, exception, **extra: errors.append(exception), app, weak=False
    )
    assert app.test_client().get("/write-on-get").status_code == 500
    assert [type(e) for e in errors] == [ReplicaWriteError]
    assert str(errors[0]) == (
        "The view 'write_on_get' wrote to the database during a GET request, which is "
        "routed to a replica. Decorate it with '@changes_database' or wrap the write in "
        "'use_primary()'."
    )


@pytest.mark.parametrize("transport", ["cookie", "header"])
def test_flask_write_to_one_database_pins_only_its_reads(cluster, transport):
    """After a write to 'a', the next reads of 'a' see it (a caught-up replica or the
    primary), while 'b' still reads from its replicas; then the same for 'b'."""
    app = flask_app(cluster, REPLICATED_CATCH_UP_TIMEOUT=0.05)
    try:
        _wait_for_positions(app)
        client = app.test_client(use_cookies=transport == "cookie")
        for round_ in range(5):
            for written, other in (("a", "b"), ("b", "a")):
                name = f"{transport}-{written}-{round_}-{secrets.token_hex(4)}"
                response = client.post(f"/write/{written}", data={"name": name})
                assert response.status_code == 200
                assert response.json[written] == "primary"
                headers = {}
                if transport == "header":
                    headers = {"Replicated-Token": response.headers["Replicated-Token"]}
                seen = client.get("/read", headers=headers).json
                assert name in seen[f"{written}_names"], (written, seen[written])
                assert seen[other] in REPLICA_LABELS, seen
    finally:
        dispose(app)


def test_flask_token_keeps_both_databases_written(cluster):
    """A write to 'a' then one to 'b': the cookie keeps a's entry as it adds b's."""
    app = flask_app(cluster, REPLICATED_CATCH_UP_TIMEOUT=0.05)
    try:
        _wait_for_positions(app)
        client = app.test_client()
        name_a, name_b = f"keep-a-{secrets.token_hex(4)}", f"keep-b-{secrets.token_hex(4)}"
        assert client.post("/write/a", data={"name": name_a}).status_code == 200
        assert client.post("/write/b", data={"name": name_b}).status_code == 200
        seen = client.get("/read").json
        assert (name_a in seen["a_names"], name_b in seen["b_names"]) == (True, True), seen
        rep = app.extensions["replicated"]
        hits = {
            key: r.metrics().get("sticky_hits", 0) for key, r in rep.databases(app).routers.items()
        }
        assert hits == {None: 1, SECOND: 1}  # the GET's, on each: both entries came
    finally:
        dispose(app)


@pytest.mark.parametrize(("written", "other"), [("a", "b"), ("b", "a")])
def test_flask_job_token_pins_only_the_written_database(cluster, written, other):
    """The token of a request that wrote one database: a job reading with it sees the
    write there, and reads the other database from its replicas (the token has no
    entry for it, which is not a token that fails to check)."""
    app = flask_app(cluster, REPLICATED_CATCH_UP_TIMEOUT=0.05)
    try:
        _wait_for_positions(app)
        for round_ in range(5):
            name = f"job-{written}-{round_}-{secrets.token_hex(4)}"
            response = app.test_client().post(f"/write/{written}", data={"name": name})
            token = response.json["token"]
            with app.app_context(), use_replica(after=token):
                assert name in app.names(app.models[written])
                served = app.who()
            assert served[other] in REPLICA_LABELS, served
    finally:
        dispose(app)


class _PositionNotRead:
    """A backend whose primary position cannot be read (the rest is the real one's)."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def read_primary_position(self, dbapi_connection: Any) -> Any:
        raise RuntimeError("position not read")


def test_flask_job_token_covers_a_written_database_whose_position_was_not_read(cluster):
    """A request writes both databases, and the default primary's position cannot be
    read after its commit (logged: its client stays on the primary for the sticky
    time). The job token has a time entry for it, as the cookie has. Seen failing
    before: the token left the default database out, so a job read it from any
    replica."""
    app = flask_app(cluster)
    router = app.extensions["replicated"].router(app)
    real = router.backend
    try:
        router.backend = _PositionNotRead(real)
        response = app.test_client().post("/write/ab", data={"name": "no-position"})
        router.backend = real
        token = response.json["token"]
        assert router.codec.loads(response.headers["Replicated-Token"], 30) == StickyToken()
        assert router.codec.loads(token, 30) == StickyToken()
        held = app.extensions["replicated"].router(app, bind_key=SECOND).codec.loads(token, 30)
        assert held is not None
        assert held.lsn is not None  # its position was read
        with app.app_context(), use_replica(after=token):
            assert app.who()["a"] == "primary"
    finally:
        router.backend = real
        dispose(app)


def test_flask_old_single_database_token_is_the_default_databases(cluster):
    """A token of the one-database shape (made before 'second' was routed) pins the
    default database's reads and no other's; a garbled one is ignored."""
    app = flask_app(cluster, REPLICATED_CATCH_UP_TIMEOUT=0.05)
    try:
        _wait_for_positions(app)
        rep = app.extensions["replicated"]
        default = rep.router(app)
        old = StickyCodec("test-secret-key", salt=token_salt("replicated_sticky"))
        old.cluster = default.codec.cluster
        [(position,)] = cluster.execute(
            cluster.primary, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"
        )
        value = old.dumps(StickyToken(int(position)))
        assert "~" not in value
        client = app.test_client(use_cookies=False)
        served = client.get("/who", headers={"Cookie": f"replicated_sticky={value}"}).json
        assert served["b"] in REPLICA_LABELS
        assert default.metrics().get("sticky_hits", 0) == 1
        assert rep.router(app, bind_key=SECOND).metrics().get("sticky_hits", 0) == 0
        garbled = client.get("/who", headers={"Cookie": "replicated_sticky=~x.y.z.garbage"})
        assert garbled.status_code == 200
        assert set(garbled.json.values()) <= REPLICA_LABELS
    finally:
        dispose(app)


def test_flask_status_command_shows_every_database(app):
    runner = app.test_cli_runner()
    result = runner.invoke(args=["replicated", "status", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["healthy"] is True
    assert {
        name: [n["name"] for n in status["nodes"]] for name, status in report["databases"].items()
    } == {
        "(default)": ["(default)", "a_replica", "a_lagging"],
        SECOND: [SECOND, "b_replica", "b_lagging"],
    }
    table = runner.invoke(args=["replicated", "status"]).output
    assert "database: (default)\n" in table
    assert f"\n\ndatabase: {SECOND}\n" in table
    assert "b_lagging" in table


def test_prometheus_shows_every_database_under_the_apps_label(app):
    """Seen failing before the app label was counted per database: 'second' came out
    under the app label 'test_databases-2' (the app's second router)."""
    routers = list(app.extensions["replicated"].databases(app))
    collector = ReplicatedCollector(lambda: routers)
    # The weight: the gauge every replica has, checked or not (up is only while checked).
    [weight] = [m for m in collector.collect() if m.name == "replicated_replica_weight"]
    assert sorted(
        (s.labels["app"], s.labels["database"], s.labels["node"]) for s in weight.samples
    ) == sorted(
        (app.name, database, node)
        for database, nodes in (
            ("(default)", ["a_replica", "a_lagging"]),
            (SECOND, ["b_replica", "b_lagging"]),
        )
        for node in nodes
    )


def test_flask_debug_header_with_two_databases_names_a_node_for_each(cluster):
    """README: REPLICATED_DEBUG_HEADER names each database's node, and in Flask makes
    every request decide. Seen failing before: '-' for a database the request did not
    use ('(default)=-, second=-' for a view that queries neither)."""
    app = flask_app(cluster, REPLICATED_DEBUG_HEADER="X-Served-By")
    app.add_url_rule("/none", "none", lambda: "no query")
    app.add_url_rule(
        "/only-a", "only_a", lambda: str(app.db.session.query(app.models["a"]).count())
    )
    replicas = {
        "(default)": {f"a_{r}" for r in REPLICAS},
        SECOND: {f"b_{r}" for r in REPLICAS},
    }
    try:
        client = app.test_client()
        for path in ("/none", "/only-a", "/who"):
            served = client.get(path).headers["X-Served-By"]
            names = dict(part.split("=") for part in served.split(", "))
            assert names.keys() == replicas.keys(), served
            assert all(names[db] in replicas[db] for db in names), (path, served)
        served = client.post("/who").headers["X-Served-By"]
        assert served == f"(default)=(default), {SECOND}={SECOND}"
    finally:
        dispose(app)


def test_counters_are_the_default_databases_and_each_counts_every_request(app):
    """What the README says of counters with several databases: ``rep.counters()`` is
    the default database's, ``rep.router(bind_key=...).metrics()`` another's, and each
    database counts every request (a request using one database counts in both)."""
    rep = app.extensions["replicated"]
    app.add_url_rule("/only-b", "only_b", lambda: str(app.names(app.models["b"])))
    client = app.test_client()
    client.get("/who")
    client.get("/only-b")
    second = rep.router(app, bind_key=SECOND).metrics()
    assert rep.counters(app) == rep.router(app).metrics()
    assert (rep.counters(app)["requests_total"], second["requests_total"]) == (2, 2)
    assert (rep.counters(app)["requests_to_replica"], second["requests_to_replica"]) == (1, 2)


# -- config errors ---------------------------------------------------------------------


def test_flask_a_balanced_replica_of_the_second_database_is_checked_on_its_connection(
    cluster, haproxy_factory
):
    """The second database's one replica is HAProxy over 'replica' and 'lagging' (500 ms
    late), named in REPLICATED_BALANCED_REPLICAS: its writer reads its rows back there,
    checked on the read's own connection by that database's router."""
    balancer = haproxy_factory([cluster.replica("replica"), cluster.replica("lagging")])
    reader = balancer.url_for(_urls(cluster)[SECOND]["replica"])
    app = flask_app(
        cluster,
        REPLICATED_BIND_REPLICAS={SECOND: {"b_reader": reader}},
        REPLICATED_BALANCED_REPLICAS=["b_reader"],
    )
    try:
        client = app.test_client()
        client.get("/who")
        stale, served = 0, Counter()
        for _ in range(40):
            name = uuid.uuid4().hex
            assert client.post("/write/b", data={"name": name}).status_code == 200
            body = client.get("/read").get_json()
            stale += name not in body["b_names"]
            served[body["b"]] += 1
        second = next(
            r for r in app.extensions["replicated"].databases(app) if r.balanced is not None
        )
        counts = second.metrics()
    finally:
        dispose(app)
    assert stale == 0, served
    assert served["primary"] == counts.get("balanced_behind", 0), (served, counts)
    assert counts.get("balanced_checks", 0) > 0, counts


def _config_error(cluster: Any, **config: Any) -> str:
    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy

    from flask_replicated import FlaskReplicated

    app = Flask(__name__)
    app.config.update(_config(cluster, **config))
    db = SQLAlchemy(app)
    try:
        with pytest.raises(ConfigError) as caught:
            FlaskReplicated(app)
    finally:
        for engine in db._app_engines[app].values():
            engine.dispose()
    return str(caught.value)


def test_config_errors_name_the_key(cluster):
    urls = _urls(cluster)
    key = "REPLICATED_BIND_REPLICAS"
    cases = [
        (
            {key: {"nope": {"x": urls[SECOND]["replica"]}}},
            f"'{key}' gives replicas to the bind 'nope', which is not in SQLALCHEMY_BINDS. "
            "Add it there (its URL is that database's primary), or fix the name.",
        ),
        (
            {key: {SECOND: {"b1": urls[SECOND]["primary"]}}},
            f"'{key}['{SECOND}']' names the replica 'b1', whose URL is the primary's. Point "
            "it at a replica server, or remove it.",
        ),
        (
            {key: {SECOND: {"a_replica": urls[SECOND]["replica"]}}},
            f"'{key}['{SECOND}']' names a replica 'a_replica', a name the default database "
            "already has. Give every replica of the app its own name.",
        ),
        (
            {
                "SQLALCHEMY_BINDS": {
                    SECOND: urls[SECOND]["primary"],
                    "third": urls["app"]["primary"],
                },
                key: {
                    SECOND: {"b1": urls[SECOND]["replica"]},
                    "third": {"c1": urls[SECOND]["lagging"]},
                },
            },
            f"'{key}' gives replicas to the bind 'third', whose URL is the default database's "
            "primary. Each routed database needs a primary of its own: fix its URL in "
            "SQLALCHEMY_BINDS, or give its replicas once.",
        ),
        (
            {key: {SECOND: {}}},
            f"'{key}['{SECOND}']' is empty. Give at least one replica, or leave the key out.",
        ),
        (
            {key: ["second"]},
            f"'{key}' must be a dict of bind keys (of SQLALCHEMY_BINDS) to their replicas, "
            "such as {'users': {'users_replica1': 'postgresql://app@replica1/users'}}, got "
            "['second'].",
        ),
        (
            {"REPLICATED_REPLICA_WEIGHTS": {"b_replica": 0, "b_lagging": 0}},
            "'REPLICATED_REPLICA_WEIGHTS' gives every replica of the database 'second' the "
            "weight 0, so no replica would serve reads. Give at least one a positive weight "
            "(0 keeps a replica out of rotation).",
        ),
    ]
    assert [_config_error(cluster, **config) for config, _ in cases] == [m for _, m in cases]


@pytest.mark.parametrize(
    "default", [{"REPLICATED_REPLICAS": {"r1": "postgresql://app@r1/app"}}, {}]
)
def test_a_bind_key_named_like_the_default_database_is_refused(default):
    """'(default)' names the default database in the status command and the debug
    header: a bind of that name would make two databases of one name. Seen failing
    before beside REPLICATED_REPLICAS (accepted)."""
    from replicated_core.config import load_config

    with pytest.raises(ConfigError) as caught:
        load_config(
            {
                **default,
                "REPLICATED_BIND_REPLICAS": {"(default)": {"u1": "postgresql://app@h1/users"}},
            }
        )
    assert str(caught.value) == (
        "'REPLICATED_BIND_REPLICAS' gives replicas to the bind '(default)', the name of the "
        "default database in the status command and the debug header. Rename that bind."
    )


def _quart_config_error(cluster: Any, **config: Any) -> str:
    from quart import Quart

    from quart_replicated import QuartReplicated

    app = Quart(__name__)
    app.config.update(_config(cluster, "asyncpg", **config))
    with pytest.raises(ConfigError) as caught:
        QuartReplicated(app)
    return str(caught.value)


@pytest.mark.parametrize("adapter", ["flask", "quart"])
@pytest.mark.parametrize("key", ["REPLICATED_REPLICAS", "REPLICATED_BIND_REPLICAS"])
def test_a_bad_engine_option_of_a_replica_names_the_key(cluster, adapter, key):
    """Seen failing before in Flask: SQLAlchemy's own TypeError came out of init_app;
    in Quart the sentence said the URL needed an async driver."""
    flask = adapter == "flask"
    driver, error = ("psycopg", _config_error) if flask else ("asyncpg", _quart_config_error)
    urls = _urls(cluster, driver)
    if key == "REPLICATED_REPLICAS":
        where = f"{key}['a_replica']"
        config = {key: {"a_replica": {"url": urls["app"]["replica"], "pool_sise": 5}}}
    else:
        where = f"{key}['{SECOND}']['b_replica']"
        config = {key: {SECOND: {"b_replica": {"url": urls[SECOND]["replica"], "pool_sise": 5}}}}
    message = error(cluster, **config)
    assert message == (
        f"'{where}' cannot make an engine (TypeError): the engine takes no option "
        "'pool_sise'. Fix or remove it."
    )
    assert cluster.password not in message


# -- Quart -----------------------------------------------------------------------------


def quart_app(cluster: Any, **config: Any) -> Any:
    from quart import Quart, request
    from sqlalchemy.orm import DeclarativeBase

    from quart_replicated import QuartReplicated, changes_database

    labels = _labels(cluster)
    app = Quart(__name__)
    app.config.update(_config(cluster, "asyncpg", **config))
    rep = QuartReplicated(app)

    class BaseA(DeclarativeBase):
        pass

    class BaseB(DeclarativeBase):
        metadata = sa.MetaData(info={"bind_key": SECOND})

    class A(BaseA):
        __tablename__ = "multi_items"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(sa.String(64), nullable=False)

    class B(BaseB):
        __tablename__ = "multi_items"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(sa.String(64), nullable=False)

    models = {"a": A, "b": B}

    async def who(model: Any) -> str:
        result = await rep.session.execute(
            sa.text(WHO_SQL), bind_arguments={"mapper": sa.inspect(model)}
        )
        port, in_recovery = result.one()
        label = labels[port]
        assert in_recovery is (label != "primary"), (label, in_recovery)
        return label

    async def both() -> dict[str, str]:
        return {"a": await who(A), "b": await who(B)}

    async def names(model: Any) -> list[str]:
        return list(await rep.session.scalars(sa.select(model.name)))

    @app.route("/who", methods=["GET", "POST"])
    async def who_view() -> Any:
        return await both()

    @app.post("/write/<which>")
    async def write(which: str) -> Any:
        name = (await request.form)["name"]
        for key in which:
            rep.session.add(models[key](name=name))
        await rep.session.commit()
        return {**(await both()), "token": await rep.consistency_token()}

    @app.get("/read")
    async def read() -> Any:
        return {**(await both()), "a_names": await names(A), "b_names": await names(B)}

    @app.get("/forced")
    @changes_database
    async def forced() -> Any:
        return await both()

    @app.get("/primary-block")
    async def primary_block() -> Any:
        with use_primary():
            return await both()

    app.who = both  # type: ignore[attr-defined]
    app.names = names  # type: ignore[attr-defined]
    app.models = models  # type: ignore[attr-defined]
    return app


async def _quart_positions(app: Any) -> None:
    await app.test_client().get("/who")
    deadline = time.monotonic() + 5
    for router in app.extensions["replicated"].databases(app):
        while any(v.replay_lsn is None for v in router.health.views()):
            assert time.monotonic() < deadline, router.health.views()
            import asyncio

            await asyncio.sleep(0.02)


async def test_quart_routes_every_database(cluster):
    app = quart_app(cluster)
    try:
        client = app.test_client()
        for _ in range(10):
            served = await (await client.get("/who")).get_json()
            assert set(served.values()) <= REPLICA_LABELS, served
        for path, method in (("/who", "post"), ("/forced", "get"), ("/primary-block", "get")):
            response = await getattr(client, method)(path)
            assert await response.get_json() == {"a": "primary", "b": "primary"}, path
    finally:
        await app.extensions["replicated"].dispose(app)


@pytest.mark.parametrize("transport", ["cookie", "header"])
async def test_quart_write_to_one_database_pins_only_its_reads(cluster, transport):
    app = quart_app(cluster, REPLICATED_CATCH_UP_TIMEOUT=0.05)
    try:
        await _quart_positions(app)
        client = app.test_client()
        for round_ in range(5):
            for written, other in (("a", "b"), ("b", "a")):
                name = f"q-{transport}-{written}-{round_}-{secrets.token_hex(4)}"
                response = await client.post(f"/write/{written}", form={"name": name})
                body = await response.get_json()
                assert body[written] == "primary"
                headers = {}
                if transport == "header":
                    headers = {"Replicated-Token": response.headers["Replicated-Token"]}
                    client.cookie_jar.clear()
                seen = await (await client.get("/read", headers=headers)).get_json()
                assert name in seen[f"{written}_names"], (written, seen[written])
                assert seen[other] in REPLICA_LABELS, seen
    finally:
        await app.extensions["replicated"].dispose(app)


async def test_quart_job_token_pins_only_the_written_database(cluster):
    app = quart_app(cluster, REPLICATED_CATCH_UP_TIMEOUT=0.05)
    try:
        await _quart_positions(app)
        for round_ in range(5):
            name = f"qjob-{round_}-{secrets.token_hex(4)}"
            response = await app.test_client().post("/write/a", form={"name": name})
            token = (await response.get_json())["token"]
            async with app.app_context(), use_replica(after=token):
                assert name in await app.names(app.models["a"])
                served = await app.who()
            assert served["b"] in REPLICA_LABELS, served
    finally:
        await app.extensions["replicated"].dispose(app)


async def test_quart_job_token_covers_a_written_database_whose_position_was_not_read(
    cluster,
):
    """As in Flask: seen failing before, the token left the default database out."""
    app = quart_app(cluster)
    rep = app.extensions["replicated"]
    router = rep.router(app)
    real = router.backend
    try:
        router.backend = _PositionNotRead(real)
        response = await app.test_client().post("/write/ab", form={"name": "no-position"})
        router.backend = real
        token = (await response.get_json())["token"]
        assert router.codec.loads(response.headers["Replicated-Token"], 30) == StickyToken()
        assert router.codec.loads(token, 30) == StickyToken()
        held = rep.router(app, bind_key=SECOND).codec.loads(token, 30)
        assert held is not None
        assert held.lsn is not None  # its position was read
        async with app.app_context(), use_replica(after=token):
            assert (await app.who())["a"] == "primary"
    finally:
        router.backend = real
        await rep.dispose(app)


async def test_quart_debug_header_with_two_databases_names_a_node_for_each(cluster):
    app = quart_app(cluster, REPLICATED_DEBUG_HEADER="X-Served-By")

    @app.get("/none")
    async def none() -> str:
        return "no query"

    try:
        served = (await app.test_client().get("/none")).headers["X-Served-By"]
        names = dict(part.split("=") for part in served.split(", "))
        assert names.keys() == {"(default)", SECOND}, served
        assert names["(default)"] in {f"a_{r}" for r in REPLICAS}, served
        assert names[SECOND] in {f"b_{r}" for r in REPLICAS}, served
    finally:
        await app.extensions["replicated"].dispose(app)


async def test_quart_status_shows_every_database(cluster):
    app = quart_app(cluster)
    rep = app.extensions["replicated"]
    try:
        async with app.app_context():
            second = await rep.status(bind_key=SECOND)
    finally:
        await rep.dispose(app)
    assert [n.name for n in second.nodes] == [SECOND, "b_replica", "b_lagging"]
    assert second.healthy


def test_quart_status_command_shows_every_database(cluster):
    app = quart_app(cluster)
    result = app.test_cli_runner().invoke(args=["replicated", "status"])
    assert result.exit_code == 0, result.output
    sections = [block.splitlines()[0] for block in result.output.split("\n\n")]
    assert sections == ["database: (default)", f"database: {SECOND}"]
    assert "b_replica" in result.output


# -- gunicorn, several workers ---------------------------------------------------------

WORKERS = 4
PAIRS = 200
LOOP_CAP = 120.0


@pytest.mark.slow
def test_gunicorn_write_then_read_on_two_databases_is_never_stale(cluster, tmp_path):
    """gunicorn, 4 sync workers: 4 clients of 50 POST/GET pairs each, two writing
    'a' and two 'b', each with its cookie, then reading both: every read sees its
    pair's write, and the database the client never writes reads from its replicas."""
    urls = _urls(cluster)
    settings = {
        "config": _config(cluster),
        "labels": {str(k): v for k, v in _labels(cluster).items()},
    }
    settings["config"]["SECRET_KEY"] = secrets.token_hex(16)
    settings["config"]["REPLICATED_CATCH_UP_TIMEOUT"] = 0.05
    del urls
    env = {
        **os.environ,
        "MULTIDB_SETTINGS": json.dumps(settings),
        "PYTHONPATH": os.pathsep.join([str(APPS), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHONUNBUFFERED": "1",
    }
    with listening_socket(HOST) as sock:
        command = [
            *(sys.executable, "-m", "gunicorn", "--bind", f"fd://{sock.fileno()}"),
            *("--workers", str(WORKERS), "--worker-class", "sync", "--timeout", "10"),
            "multidb_app:app",
        ]
        server = ServerProcess.start(
            "gunicorn multidb",
            command,
            cwd=APPS,
            env=env,
            log_path=tmp_path / "gunicorn.log",
            pass_fds=[sock.fileno()],
            redact=lambda text: text.replace(cluster.password, "********"),
        )
        port = sock.getsockname()[1]
    try:
        results = _pairs(server, f"http://{HOST}:{port}")
    finally:
        server.stop(grace=10)
    stale = [r for r in results if not r["seen"]]
    pinned_other = [r for r in results if r["other"] not in REPLICA_LABELS]
    pids = {r["pid"] for r in results}
    print("gunicorn multidb:", len(results), "pairs,", len(pids), "workers")
    assert (len(results), stale, pinned_other) == (PAIRS, [], [])
    assert len(pids) > 1


def _pairs(server: ServerProcess, url: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + LOOP_CAP
    with httpx.Client(base_url=url, timeout=15) as probe:
        while True:
            server.check_running()
            assert time.monotonic() < deadline, server.log_tail()
            try:
                probe.get("/health")
                break
            except httpx.HTTPError:
                time.sleep(0.05)

    def client_run(number: int) -> list[dict[str, Any]]:
        # Each client its own cookie jar; new connections, so workers take turns.
        results = []
        with httpx.Client(base_url=url, timeout=15, headers={"Connection": "close"}) as client:
            # Two clients write 'a' only, two 'b' only: the other database never has a
            # write of theirs to wait for.
            written, other = ("a", "b") if number % 2 == 0 else ("b", "a")
            for pair in range(PAIRS // 4):
                if time.monotonic() > deadline:
                    break
                name = f"g{number}-{pair}-{secrets.token_hex(4)}"
                posted = client.post(f"/write/{written}", data={"name": name})
                assert posted.status_code == 200, server.log_tail()
                body = client.get(f"/read/{written}/{name}").json()
                results.append({"seen": body["seen"], "other": body[other], "pid": body["pid"]})
        return results

    with ThreadPoolExecutor(max_workers=4) as pool:
        return [r for batch in pool.map(client_run, range(4)) for r in batch]


# -- the token of several databases ----------------------------------------------------


def _codecs(*keys: str | None) -> list[StickyCodec]:
    from replicated_core.sticky import database_tag

    codecs = []
    for number, key in enumerate(keys):
        codec = StickyCodec("k", salt=token_salt("replicated_sticky"))
        codec.database = None if key is None else database_tag(key)
        codec.cluster = f"cluster{number}"[:8].ljust(8, "x")
        codecs.append(codec)
    return codecs


def test_a_token_of_the_default_database_alone_keeps_the_one_database_shape():
    """Byte for byte what a one-database app writes, so either reads the other's."""
    default, _ = _codecs(None, SECOND)
    single = StickyCodec("k", salt=token_salt("replicated_sticky"))
    single.cluster = default.cluster
    token = StickyToken(0x16B3F28)
    assert default.dumps_many([(default, token)], now=1_700_000_000) == single.dumps(
        token, now=1_700_000_000
    )


def test_each_database_reads_its_own_entry_bound_to_its_own_cluster():
    default, second, third = _codecs(None, SECOND, "third")
    now = int(time.time())
    value = default.dumps_many([(default, StickyToken(5)), (second, StickyToken(7))], now)
    assert value.startswith("~")
    assert len(value) < 120
    assert [c.loads(value, 30) for c in (default, second, third)] == [
        StickyToken(5),
        StickyToken(7),
        None,
    ]
    assert [c.no_entry(value) for c in (default, second, third)] == [False, False, True]
    second.cluster = "another1"  # the entry was made on another cluster: not honoured
    second._check.cache_clear()
    assert (second.loads(value, 30), second.no_entry(value)) == (None, False)
    time_only = default.dumps_many([(second, StickyToken())], now)
    assert [c.loads(time_only, 30) for c in (default, second)] == [None, StickyToken()]


def test_a_token_of_ten_databases_fits_and_a_forged_one_is_ignored():
    codecs = _codecs(None, *(f"bind{n}" for n in range(9)))
    value = codecs[0].dumps_many([(c, StickyToken(2**62)) for c in codecs])
    assert [c.loads(value, 30) for c in codecs] == [StickyToken(2**62)] * 10
    body, _, signature = value.rpartition(".")
    forged = body.replace("4000000000000000", "1", 1) + "." + signature
    assert [c.loads(forged, 30) for c in codecs] == [None] * 10
    assert [c.no_entry(forged) for c in codecs] == [False] * 10


def test_a_token_of_every_database_written_is_read_back(caplog):
    """Seen failing before with 14 databases: the token was over MAX_COOKIE_LENGTH
    (400), so every codec read it as no token, with no log line. Forty databases with
    the longest PostgreSQL positions (a 64-bit byte and a 32-bit timeline) fit now."""
    from replicated_core.backends.postgresql import WalPosition
    from replicated_core.sticky import MAX_COOKIE_LENGTH

    codecs = _codecs(None, *(f"bind{n}" for n in range(39)))
    longest = StickyToken(WalPosition(2**64 - 1, 2**32 - 1))
    with caplog.at_level("WARNING", logger="replicated"):
        value = codecs[0].dumps_many([(c, longest) for c in codecs])
    assert len(value) <= MAX_COOKIE_LENGTH <= 4096 - 100  # a browser's cookie, and its name
    assert [c.loads(value, 30) for c in codecs] == [longest] * 40
    assert caplog.records == []


def test_a_token_too_long_to_be_read_back_is_logged_once(caplog):
    from replicated_core.sticky import MAX_COOKIE_LENGTH

    codecs = _codecs(None, *(f"bind{n}" for n in range(99)))
    token = StickyToken(2**62)
    with caplog.at_level("WARNING", logger="replicated"):
        values = [codecs[0].dumps_many([(c, token) for c in codecs]) for _ in range(3)]
    assert len(values[0]) > MAX_COOKIE_LENGTH
    assert [r.getMessage() for r in caplog.records] == [
        f"A consistency token of 100 databases is {len(values[0])} characters long, over "
        f"the {MAX_COOKIE_LENGTH} a token may have, so it will be read as no token: the "
        "clients that wrote that many databases at once may read from replicas that have "
        "not caught up with their writes. (Logged once.)"
    ]


def test_a_token_of_another_key_is_logged_once_with_several_databases(app, caplog):
    """KEY_MISMATCH_WARNING says "(Logged once.)": seen failing before, each database's
    codec logged it (twice here)."""
    from replicated_core.sticky import KEY_MISMATCH_WARNING

    _wait_for_positions(app)
    rep = app.extensions["replicated"]
    own = [router.codec for router in rep.databases(app)]
    other = StickyCodec("another-key", salt=token_salt("replicated_sticky"))
    value = other.dumps_many([(codec, StickyToken(0x30000148)) for codec in own])
    client = app.test_client(use_cookies=False)
    with caplog.at_level("WARNING", logger="replicated"):
        for _ in range(2):
            served = client.get("/who", headers={"Cookie": f"replicated_sticky={value}"}).json
            assert set(served.values()) <= REPLICA_LABELS, served
    assert [r.getMessage() for r in caplog.records] == [KEY_MISMATCH_WARNING]


# -- failover ----------------------------------------------------------------------------


async def test_quart_a_replica_of_the_second_database_that_refuses_fails_over(cluster):
    """Its own router retries the read on the second database's primary and marks the
    replica down. Seen failing before failover looked for the replica's own router: the
    default database's router did not know the replica, and the error reached the view."""
    import socket as socket_module

    urls = _urls(cluster, "asyncpg")
    app = quart_app(
        cluster,
        REPLICATED_CHECK_INTERVAL=3600,
        REPLICATED_STICKY_MODE="time",
        REPLICATED_BIND_REPLICAS={SECOND: {"b_replica": urls[SECOND]["replica"]}},
    )
    errors: list[BaseException] = []
    from quart.signals import got_request_exception

    async def keep(sender: Any, exception: BaseException, **extra: Any) -> None:
        errors.append(exception)

    got_request_exception.connect(keep, app, weak=False)
    rep = app.extensions["replicated"]
    second = rep.router(app, bind_key=SECOND)
    async with app.test_app():
        client = app.test_client()
        first = await (await client.get("/who")).get_json()
        engine = rep._apps[app].by_node["b_replica"]
        await engine.dispose()
        with socket_module.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            refusing = sock.getsockname()[1]

        @sa.event.listens_for(engine.sync_engine, "do_connect")
        def elsewhere(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
            cparams["port"] = refusing

        response = await client.get("/who")
        then = await response.get_json() if response.status_code == 200 else errors
    assert errors == []
    assert (first["b"], then["b"]) == ("replica", "primary")
    assert (second.metrics()["retries"], second.health.usable("b_replica")) == (1, False)
