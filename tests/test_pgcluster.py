from __future__ import annotations

import os
import subprocess
import time

import psycopg
import pytest

from replicated_core.testing.pgcluster import PgClusterError, ReplicaSpec


def test_only_the_primary_is_out_of_recovery(pg_cluster):
    assert pg_cluster.execute(pg_cluster.primary, "SELECT pg_is_in_recovery()") == [(False,)]
    for name in ("replica", "lagging"):
        replica = pg_cluster.replica(name)
        assert pg_cluster.execute(replica, "SELECT pg_is_in_recovery()") == [(True,)]


def test_each_node_answers_on_its_own_port(pg_cluster):
    nodes = [pg_cluster.primary, *pg_cluster.replicas]
    assert len({node.port for node in nodes}) == 3
    for node in nodes:
        assert pg_cluster.execute(node, "SELECT inet_server_port()") == [(node.port,)]


def test_replicas_are_listed_in_spec_order(pg_cluster):
    assert [(node.name, node.role, node.apply_delay_ms) for node in pg_cluster.replicas] == [
        ("replica", "replica", 0),
        ("lagging", "replica", 500),
    ]
    assert (pg_cluster.primary.name, pg_cluster.primary.role) == ("primary", "primary")


def test_urls_name_driver_password_port_and_database(pg_cluster):
    node = pg_cluster.replica("replica")
    credentials = f"postgres:{pg_cluster.password}@127.0.0.1:{node.port}"
    assert node.url() == f"postgresql+psycopg://{credentials}/app"
    assert node.url("asyncpg") == f"postgresql+asyncpg://{credentials}/app"
    assert node.url("", database="postgres") == f"postgresql://{credentials}/postgres"


def test_unknown_replica_name_is_an_error(pg_cluster):
    with pytest.raises(LookupError) as excinfo:
        pg_cluster.replica("nope")
    assert str(excinfo.value) == (
        "The cluster has no replica named 'nope'; its replicas: 'replica', 'lagging'."
    )


def test_replica_name_must_be_usable_as_a_directory_and_setting():
    with pytest.raises(ValueError, match="The replica name 'primary' cannot be used") as excinfo:
        ReplicaSpec("primary")
    assert str(excinfo.value) == (
        "The replica name 'primary' cannot be used. Use lowercase letters, digits and"
        " underscores, starting with a letter, and not 'primary'."
    )


def test_row_written_on_primary_is_read_on_replica_after_wait_for_replay(pg_cluster):
    primary, replica = pg_cluster.primary, pg_cluster.replica("replica")
    pg_cluster.execute(primary, "CREATE TABLE replayed (id int)")
    pg_cluster.execute(primary, "INSERT INTO replayed VALUES (1)")
    pg_cluster.wait_for_replay()
    assert pg_cluster.execute(replica, "SELECT id FROM replayed") == [(1,)]


def test_lagging_replica_applies_a_commit_after_its_delay(pg_cluster):
    """The 500 ms apply delay hides a commit right after it, not for long."""
    primary, lagging = pg_cluster.primary, pg_cluster.replica("lagging")
    pg_cluster.execute(primary, "CREATE TABLE delayed (id int)")
    pg_cluster.wait_for_replay(include_delayed=True)

    committed = time.monotonic()
    pg_cluster.execute(primary, "INSERT INTO delayed VALUES (1)")
    assert pg_cluster.execute(lagging, "SELECT id FROM delayed") == []

    while not pg_cluster.execute(lagging, "SELECT id FROM delayed"):
        assert time.monotonic() - committed < 3.0, "the lagging replica never applied the row"
        time.sleep(0.02)
    assert time.monotonic() - committed >= 0.45


def test_wait_for_replay_can_include_the_delayed_replica(pg_cluster):
    primary, lagging = pg_cluster.primary, pg_cluster.replica("lagging")
    pg_cluster.execute(primary, "CREATE TABLE waited (id int)")
    pg_cluster.execute(primary, "INSERT INTO waited VALUES (7)")
    pg_cluster.wait_for_replay(include_delayed=True)
    assert pg_cluster.execute(lagging, "SELECT id FROM waited") == [(7,)]


@pytest.mark.parametrize("password", ["wrong", None])
def test_tcp_connections_need_the_password(pg_cluster, password):
    node = pg_cluster.primary
    expected = (
        'password authentication failed for user "postgres"'
        if password
        else "fe_sendauth: no password supplied"
    )
    with pytest.raises(psycopg.OperationalError, match=expected):
        psycopg.connect(
            host="127.0.0.1", port=node.port, user="postgres", password=password, dbname="app"
        )


def test_password_is_not_in_reprs(pg_cluster):
    assert len(pg_cluster.password) >= 16
    assert pg_cluster.password in pg_cluster.primary.url()
    assert pg_cluster.password not in repr(pg_cluster)
    for node in [pg_cluster.primary, *pg_cluster.replicas]:
        assert pg_cluster.password not in repr(node)
        assert pg_cluster.password not in str(node)


def test_start_failure_shows_the_log_without_the_password(pg_cluster_factory):
    """The log tail in the error is redacted even when the log itself holds the password."""
    cluster = pg_cluster_factory([])
    primary = cluster.primary
    primary.stop()
    with (primary.datadir / "postgresql.conf").open("a") as conf:
        conf.write(f"work_mem = '{cluster.password}'\n")

    with pytest.raises(PgClusterError) as excinfo:
        primary.start()

    assert cluster.password in primary.log_path.read_text()
    message = str(excinfo.value)
    assert message.splitlines()[0] == (
        "The PostgreSQL node 'primary' exited with status 1 while starting; the end of its log"
        f" '{primary.log_path}' says why:"
    )
    assert 'invalid value for parameter "work_mem": "********"' in message
    assert cluster.password not in message
    assert not primary.is_running()


def test_replica_stopped_immediately_refuses_connections_and_starts_again(pg_cluster_factory):
    cluster = pg_cluster_factory([ReplicaSpec("replica")])
    primary, replica = cluster.primary, cluster.replica("replica")

    replica.stop("immediate")
    assert not replica.is_running()
    with pytest.raises(psycopg.OperationalError, match="Connection refused"):
        psycopg.connect(replica.url(""), connect_timeout=2)

    cluster.execute(primary, "CREATE TABLE while_down AS SELECT 42 AS answer")
    replica.start()
    assert replica.is_running()
    cluster.wait_for_replay()
    assert cluster.execute(replica, "SELECT pg_is_in_recovery(), answer FROM while_down") == [
        (True, 42)
    ]


def test_paused_replica_makes_connects_time_out_until_resumed(pg_cluster_factory):
    cluster = pg_cluster_factory([ReplicaSpec("replica")])
    replica = cluster.replica("replica")

    replica.pause()
    try:
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="timeout expired"):
            psycopg.connect(replica.url(""), connect_timeout=1)
        assert time.monotonic() - started < 5.0
    finally:
        replica.resume()

    assert cluster.execute(replica, "SELECT pg_is_in_recovery()") == [(True,)]


def test_cluster_stop_is_idempotent_and_resumes_paused_nodes(pg_cluster_factory):
    with pg_cluster_factory([ReplicaSpec("replica")]) as cluster:
        cluster.replica("replica").pause()
        cluster.stop()
        assert not any(node.is_running() for node in [cluster.primary, *cluster.replicas])
    cluster.stop()


def test_child_pids_lists_a_process_started_here():
    from replicated_core.testing.pgcluster import _child_pids

    child = subprocess.Popen(["sleep", "30"])
    try:
        assert child.pid in _child_pids(os.getpid())
    finally:
        child.kill()
        child.wait()
