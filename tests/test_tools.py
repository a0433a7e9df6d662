"""Status command, logging, counters: what operators see, and no password in any of it."""

from __future__ import annotations

import json
import logging

import pytest
import sqlalchemy as sa
from support import dispose_flask_app, make_flask_app, make_quart_app

from flask_replicated import ReplicaWriteError

CLOSED_PORT_URL = "postgresql+psycopg://postgres:{password}@127.0.0.1:9/app"


def _flask_status(app, *args):
    return app.test_cli_runner().invoke(args=["replicated", "status", *args])


def test_flask_status_on_a_healthy_cluster(postgresql_backend, pg_cluster):
    app = make_flask_app(postgresql_backend, replica=["replica", "lagging"])
    try:
        result = _flask_status(app)
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert lines[0].split() == [
            "bind",
            "role",
            "address",
            "reachable",
            "recovery",
            "lag",
            "s",
            "lag",
            "bytes",
            "down",
            "usable",
            "weight",
        ]
        rows = {line.split()[0]: line.split() for line in lines[1:4]}
        assert rows["master"][1:5] == [
            "primary",
            f"127.0.0.1:{pg_cluster.primary.port}/app",
            "yes",
            "no",
        ]
        assert rows["replica"][1:5] == [
            "replica",
            f"127.0.0.1:{pg_cluster.replica('replica').port}/app",
            "yes",
            "yes",
        ]
        assert rows["lagging"][-3:] == ["no", "yes", "1"]
        assert "sticky mode: wal" in result.output
        report = json.loads(_flask_status(app, "--json").output)
        assert report["healthy"] is True
        assert [n["name"] for n in report["nodes"]] == ["master", "replica", "lagging"]
        assert pg_cluster.password not in result.output + json.dumps(report)
    finally:
        dispose_flask_app(app)


def test_flask_status_fails_when_no_replica_is_usable(postgresql_backend, pg_cluster):
    url = CLOSED_PORT_URL.format(password=pg_cluster.password)
    postgresql_backend.urls["closed"] = url
    try:
        app = make_flask_app(postgresql_backend, replica="closed")
        result = _flask_status(app, "--json")
    finally:
        del postgresql_backend.urls["closed"]
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["healthy"] is False
    slave = report["nodes"][1]
    assert (slave["reachable"], slave["usable"], slave["marked_down"]) == (False, False, True)
    assert "Connection refused" in slave["error"] or "connect" in slave["error"]
    assert pg_cluster.password not in result.output
    dispose_flask_app(app)


def test_a_replica_that_is_a_primary_is_reported_and_logged_once(
    postgresql_backend, pg_cluster, caplog
):
    """The replica bind points at another database of the primary server. The requests
    log it; the status command, which reports it in its table, does not log it again."""
    postgresql_backend.urls["not-a-standby"] = pg_cluster.primary.url("psycopg", "postgres")
    try:
        app = make_flask_app(postgresql_backend, replica="not-a-standby")
    finally:
        del postgresql_backend.urls["not-a-standby"]
    with caplog.at_level(logging.WARNING, logger="replicated"):
        client = app.test_client()
        served = {client.get("/who").text for _ in range(3)}
        result = _flask_status(app)
    assert result.exit_code == 1
    assert "slave: not in recovery: this is a primary, not a replica" in result.output
    warnings = [r.getMessage() for r in caplog.records if "not in recovery" in r.getMessage()]
    assert warnings == [
        "Replica 'slave' is not in recovery: it is a primary, not a standby. It gets no "
        "reads until it is a standby again; check its URL in SQLALCHEMY_BINDS."
    ]
    assert served == {"primary"}
    dispose_flask_app(app)


async def test_quart_status(postgresql_backend, pg_cluster):
    app = make_quart_app(postgresql_backend, replica=["replica", "lagging"])
    runner = app.test_cli_runner()
    result = await _in_thread(lambda: runner.invoke(args=["replicated", "status", "--json"]))
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [(n["name"], n["reachable"]) for n in report["nodes"]] == [
        ("master", True),
        ("replica", True),
        ("lagging", True),
    ]
    assert pg_cluster.password not in result.output


async def _in_thread(func):
    """The Quart CLI runs its own event loop (asyncio.run), so not inside this one."""
    import asyncio

    return await asyncio.to_thread(func)


def test_counters(flask_app_factory):
    """On the lagging replica, so the sticky read cannot find its write replayed yet."""
    flask_app = flask_app_factory(replica="lagging")
    client = flask_app.test_client()
    client.get("/who")
    client.get("/forced")
    client.post("/items", data={"name": "counted"})
    client.get("/who")  # sticky now: the write is not on the replica yet
    counters = flask_app.extensions["replicated"].counters(flask_app)
    assert counters["requests_total"] == 4
    assert counters["requests_to_replica"] == 1
    assert counters["requests_to_primary.decorator"] == 1
    assert counters["requests_to_primary.write_method"] == 1
    assert counters["writes"] == 1
    assert counters["sticky_hits"] == 1
    reason = "sticky" if flask_app.backend.name == "sqlite" else "sticky_replicas_behind"
    assert counters[f"requests_to_primary.{reason}"] == 1


def test_one_debug_line_per_request(flask_app, caplog):
    client = flask_app.test_client()
    with caplog.at_level(logging.DEBUG, logger="replicated"):
        client.get("/who")
        client.post("/who")
        client.get("/forced")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert lines == [
        "GET who: replica 'slave' because read-only request",
        "POST who: primary 'master' because the method may write",
        "GET forced: primary 'master' because @changes_database",
    ]


def test_no_password_in_logs_errors_or_output(postgresql_backend, pg_cluster, caplog):
    """Failures on purpose (a closed replica port, a refused write, a dead primary URL)
    with every log line captured: the cluster's password appears nowhere."""
    password = pg_cluster.password
    postgresql_backend.urls["closed"] = CLOSED_PORT_URL.format(password=password)
    try:
        app = make_flask_app(postgresql_backend, replica=["replica", "closed"])
    finally:
        del postgresql_backend.urls["closed"]
    texts = []

    @app.get("/bad")
    def bad():
        app.db.session.execute(sa.text("DELETE FROM items WHERE id = -1"))

    with caplog.at_level(logging.DEBUG):
        client = app.test_client()
        for _ in range(10):
            texts.append(client.get("/who").text)
        with pytest.raises(ReplicaWriteError) as caught:
            client.get("/bad")
        texts.append(str(caught.value))
        texts.append(_flask_status(app).output)
        texts.append(_flask_status(app, "--json").output)
    texts += [r.getMessage() for r in caplog.records]
    texts += [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
    assert any("Replica 'closed' is down" in t for t in texts)
    assert all(password not in t for t in texts)
    dispose_flask_app(app)


def test_a_primary_bind_that_is_a_standby_is_reported(postgresql_backend):
    """Both URIs point at a standby by mistake: the status names it and exits 1."""
    standby = postgresql_backend.url("replica")
    app = make_flask_app(
        postgresql_backend,
        replica="lagging",
        SQLALCHEMY_DATABASE_URI=standby,
        SQLALCHEMY_BINDS={"master": standby, "slave": postgresql_backend.url("lagging")},
    )
    result = _flask_status(app)
    assert result.exit_code == 1
    assert "master: in recovery: this is a standby, not the primary" in result.output
    dispose_flask_app(app)
