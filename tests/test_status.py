"""The status command says what one check can know, and reports each node once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from support import dispose_flask_app, make_flask_app

CLOSED_PORT_URL = "{scheme}://postgres:{password}@127.0.0.1:9/app"


def _status(app, *args):
    return app.test_cli_runner().invoke(args=["replicated", "status", *args])


def _rows(table):
    """The table's rows by bind name, each cell a string."""
    lines = table.splitlines()
    header = lines[0].replace("lag s", "lag_s").replace("lag bytes", "lag_bytes").split()
    rows = {}
    for line in lines[1:]:
        if line.startswith("sticky mode:"):
            break
        cells = line.split()
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def _flush_lsn(cluster):
    [(lsn,)] = cluster.execute(cluster.primary, "SELECT pg_current_wal_flush_lsn()::text")
    return lsn


def _wait_until_received(cluster, node, lsn):
    """Until ``node`` has received (not necessarily replayed) the WAL up to ``lsn``."""
    deadline = time.monotonic() + 30
    sql = f"SELECT pg_last_wal_receive_lsn() >= '{lsn}'::pg_lsn"
    while cluster.execute(node, sql) != [(True,)]:
        assert time.monotonic() < deadline, f"replica '{node.name}' did not receive {lsn}"
        time.sleep(0.05)


@pytest.fixture
def paused_replica(pg_cluster):
    """The session cluster's replica 'replica' with its replay paused; resumed after."""
    node = pg_cluster.replica("replica")
    pg_cluster.execute(node, "SELECT pg_wal_replay_pause()")
    try:
        yield node
    finally:
        pg_cluster.execute(node, "SELECT pg_wal_replay_resume()")
        pg_cluster.wait_for_replay(include_delayed=True)


def test_one_check_cannot_tell_how_long_bytes_have_waited(
    postgresql_backend, pg_cluster, paused_replica
):
    """Replay paused, a write received but not replayed: bytes known, time unknown (null)."""
    app = make_flask_app(postgresql_backend, replica="replica")
    try:
        pg_cluster.execute(pg_cluster.primary, "INSERT INTO items (name) VALUES ('waiting')")
        _wait_until_received(pg_cluster, paused_replica, _flush_lsn(pg_cluster))
        result = _status(app, "--json")
        assert result.exit_code == 0, result.output
        slave = json.loads(result.output)["nodes"][1]
        assert slave["name"] == "slave"
        assert slave["lag_bytes"] > 0
        assert slave["lag_seconds"] is None
        row = _rows(_status(app).output)["slave"]
        assert row["lag_s"] == "unknown"
        assert int(row["lag_bytes"]) > 0
    finally:
        dispose_flask_app(app)


def test_bytes_after_an_idle_spell_longer_than_max_lag_are_not_a_failure(
    postgresql_backend, pg_cluster, paused_replica
):
    """The primary idle for longer than REPLICATED_MAX_LAG, then one write, not replayed
    yet: the server's figure counts the idle time, so one check cannot say the replica
    is too far behind. The status says unknown and healthy, not unusable."""
    app = make_flask_app(postgresql_backend, replica="replica", REPLICATED_MAX_LAG=0.5)
    try:
        time.sleep(1.0)  # no commit replayed for longer than the maximum lag
        pg_cluster.execute(pg_cluster.primary, "INSERT INTO items (name) VALUES ('after idle')")
        _wait_until_received(pg_cluster, paused_replica, _flush_lsn(pg_cluster))
        result = _status(app, "--json")
        assert result.exit_code == 0, result.output
        slave = json.loads(result.output)["nodes"][1]
        assert (slave["lag_seconds"], slave["usable"]) == (None, True)
        assert slave["lag_bytes"] > 0
    finally:
        dispose_flask_app(app)


def test_the_lag_is_timed_once_a_check_saw_the_bytes_arrive(
    postgresql_backend, pg_cluster, paused_replica
):
    """In one process: caught up, then bytes first seen (not timed yet), then timed."""
    pg_cluster.execute(paused_replica, "SELECT pg_wal_replay_resume()")
    pg_cluster.wait_for_replay()
    app = make_flask_app(postgresql_backend, replica="replica")
    status = app.extensions["replicated"].status
    try:
        with app.app_context():
            for _ in range(20):  # WAL the server writes by itself may be on its way
                [_, first] = status().nodes
                if first.lag_bytes == 0:
                    break
                time.sleep(0.1)
            assert (first.lag_bytes, first.lag_seconds) == (0, 0.0)
            pg_cluster.execute(paused_replica, "SELECT pg_wal_replay_pause()")
            pg_cluster.execute(pg_cluster.primary, "INSERT INTO items (name) VALUES ('late')")
            _wait_until_received(pg_cluster, paused_replica, _flush_lsn(pg_cluster))
            [_, second] = status().nodes
            assert second.lag_bytes > 0
            assert second.lag_seconds is None
            [_, third] = status().nodes
            assert third.lag_bytes > 0
            assert third.lag_seconds is not None
            assert third.lag_seconds > 0
    finally:
        dispose_flask_app(app)


def test_a_caught_up_replica_has_no_lag_at_a_wal_segment_boundary(postgresql_backend, pg_cluster):
    """After a WAL switch the primary's insert position is past the new segment's header,
    which no replica replays: an idle, caught-up replica must still show 0 bytes."""
    pg_cluster.execute(pg_cluster.primary, "SELECT pg_switch_wal()")
    pg_cluster.wait_for_replay(include_delayed=True)
    app = make_flask_app(postgresql_backend, replica=["replica", "lagging"])
    expected = [("master", None, None), ("replica", 0, 0.0), ("lagging", 0, 0.0)]
    try:
        for _ in range(20):  # WAL the server writes by itself may be on its way
            report = json.loads(_status(app, "--json").output)
            lags = [(n["name"], n["lag_bytes"], n["lag_seconds"]) for n in report["nodes"]]
            if lags == expected:
                break
            time.sleep(0.1)
        assert lags == expected
    finally:
        dispose_flask_app(app)


FLASK_APP = """
import os
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from flask_replicated import FlaskReplicated

app = Flask(__name__)
app.config["SECRET_KEY"] = "status-test"
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["PRIMARY_URL"]
app.config["SQLALCHEMY_BINDS"] = {
    "master": os.environ["PRIMARY_URL"],
    "replica": os.environ["REPLICA_URL"],
    "closed": os.environ["CLOSED_URL"],
}
app.config["REPLICATED_REPLICA_BINDS"] = ["replica", "closed"]
SQLAlchemy(app)
FlaskReplicated(app)
"""

QUART_APP = """
import os
from quart import Quart
from quart_replicated import QuartReplicated

app = Quart(__name__)
app.config["SECRET_KEY"] = "status-test"
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["PRIMARY_URL"]
app.config["SQLALCHEMY_BINDS"] = {
    "master": os.environ["PRIMARY_URL"],
    "replica": os.environ["REPLICA_URL"],
    "closed": os.environ["CLOSED_URL"],
}
app.config["REPLICATED_REPLICA_BINDS"] = ["replica", "closed"]
QuartReplicated(app)
"""


@pytest.mark.parametrize(
    ("framework", "source", "driver"),
    [("flask", FLASK_APP, "psycopg"), ("quart", QUART_APP, "asyncpg")],
)
def test_an_unreachable_replica_is_reported_once(pg_cluster, tmp_path, framework, source, driver):
    """The real command in its own process, where log lines reach the terminal too."""
    (tmp_path / "statusapp.py").write_text(textwrap.dedent(source))
    env = {
        **os.environ,
        "PRIMARY_URL": pg_cluster.primary.url(driver),
        "REPLICA_URL": pg_cluster.replica("replica").url(driver),
        "CLOSED_URL": CLOSED_PORT_URL.format(
            scheme=f"postgresql+{driver}", password=pg_cluster.password
        ),
    }
    result = subprocess.run(
        [sys.executable, "-m", framework, "--app", "statusapp", "replicated", "status"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    rows = _rows(result.stdout)
    assert (rows["closed"]["reachable"], rows["closed"]["usable"]) == ("no", "no")
    errors = [line for line in result.stdout.splitlines() if line.startswith("closed: ")]
    assert len(errors) == 1, result.stdout
    assert "closed" not in result.stdout.split("sticky mode:")[1].replace(errors[0], "")
    assert pg_cluster.password not in result.stdout
