"""Each backend against its real database: PostgreSQL's cluster, SQLite files."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
import sqlalchemy as sa

from replicated_core.backends import (
    ErrorKind,
    ReplicaProbe,
    backend_for,
    classify_driver_error,
)
from replicated_core.backends.postgresql import PostgreSQL, WalPosition, format_lsn, parse_lsn
from replicated_core.backends.sqlite import NoPositions

PG = backend_for("postgresql")


def test_the_registry_picks_a_backend_per_dialect():
    """PostgreSQL has positions; SQLite and a dialect with no backend have none."""
    assert isinstance(PG, PostgreSQL)
    assert (PG.name, PG.has_positions) == ("PostgreSQL", True)
    sqlite = backend_for("sqlite")
    assert (sqlite.name, sqlite.has_positions, sqlite.postgresql_syntax) == ("SQLite", False, False)
    unknown = backend_for("mysql")
    assert isinstance(unknown, NoPositions)
    assert (unknown.name, unknown.has_positions) == ("no positions", False)


# -- PostgreSQL -------------------------------------------------------------------


def _server_lsn(cluster, node, function):
    [(text,)] = cluster.execute(node, f"SELECT {function}()::text")
    return text


def test_postgresql_reads_the_primary_position_after_a_commit(pg_cluster):
    """The position read on the committing connection is the server's insert
    position, and no transaction is left open."""
    with psycopg.connect(pg_cluster.primary.url(driver="")) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS backend_positions (n int)")
        conn.execute("INSERT INTO backend_positions VALUES (1)")
        conn.commit()
        position = PG.read_primary_position(conn)
        assert conn.info.transaction_status is psycopg.pq.TransactionStatus.IDLE
        assert conn.autocommit is False
    after = parse_lsn(_server_lsn(pg_cluster, pg_cluster.primary, "pg_current_wal_insert_lsn"))
    assert isinstance(position, WalPosition)
    assert after is not None
    assert after >= position.lsn > 0
    assert position.timeline == 1  # a cluster that never failed over


def test_postgresql_positions_round_trip_through_the_token_and_the_server(pg_cluster):
    text = _server_lsn(pg_cluster, pg_cluster.primary, "pg_current_wal_insert_lsn")
    position = parse_lsn(text)
    assert PG.format_position(position) == format_lsn(position) == text
    payload = PG.dump_position(position)
    assert payload == format(position, "x").encode("ascii")
    assert PG.load_position(payload) == position


def test_a_position_covers_another_only_on_its_timeline():
    """A replica's position covers a token's on the token's timeline, or when the token
    names none (made before timelines were written); one of unknown timeline covers
    no token of a known one. A failover's new timeline reuses the old one's bytes."""
    on_1, on_2 = WalPosition(100, 1), WalPosition(100, 2)
    assert WalPosition(150, 1) >= on_1
    assert not WalPosition(50, 1) >= on_1
    assert not WalPosition(150, 2) >= on_1  # a higher byte of another history
    assert not on_1 >= on_2
    assert WalPosition(150, 2) >= 100  # an old token: the bytes decide
    assert not WalPosition(150) >= on_1  # the replica's history is not known
    assert not on_1 <= 150  # the same, the int on the left
    assert PG.load_position(PG.dump_position(WalPosition(0x16B374D848, 3))) == WalPosition(
        0x16B374D848, 3
    )
    assert PG.dump_position(WalPosition(0x16B374D848, 3)) == b"16b374d848g3"
    assert PG.load_position(b"16b374d848") == 0x16B374D848  # a token of before
    assert PG.format_position(WalPosition(0x16B374D848, 3)) == "16/B374D848 (timeline 3)"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"t",
        b"1" * 17,
        b"ABC",
        b"-1",
        b"0x10",
        b"1.2",
        b"10g",
        b"g1",
        b"10g1g2",
        b"10g" + b"1" * 9,
    ],
)
def test_postgresql_refuses_what_is_not_a_token_position(payload):
    assert PG.load_position(payload) is None


def test_postgresql_probes_a_replica_that_has_replayed_the_primary(pg_cluster):
    """The probe runs on the replica and says what the server says: in recovery, at
    or past the primary's flushed position once it has replayed."""
    replica = pg_cluster.replica("replica")
    pg_cluster.execute(pg_cluster.primary, "CREATE TABLE IF NOT EXISTS backend_probe (n int)")
    pg_cluster.execute(pg_cluster.primary, "INSERT INTO backend_probe VALUES (1)")
    flushed = parse_lsn(_server_lsn(pg_cluster, pg_cluster.primary, "pg_current_wal_flush_lsn"))
    pg_cluster.wait_for_replay()
    engine = sa.create_engine(replica.url())
    try:
        with engine.connect() as conn:
            row = tuple(conn.execute(sa.text(PG.replica_probe_sql)).one())
            [(in_recovery,)] = conn.execute(sa.text("SELECT pg_is_in_recovery()")).all()
    finally:
        engine.dispose()
    probe = PG.replica_probe(row)
    assert isinstance(probe, ReplicaProbe)
    assert probe.in_recovery is in_recovery is True
    assert probe.replay_lsn >= flushed
    assert probe.receive_lsn >= probe.replay_lsn
    assert probe.replay_lsn.timeline == 1  # the timeline its WAL receiver streams
    received, replayed = probe.receive_lsn.lsn, probe.replay_lsn.lsn
    assert PG.distance(probe.receive_lsn, probe.replay_lsn) == received - replayed
    assert PG.distance(flushed, probe.replay_lsn) == 0


def test_postgresql_primary_status_tells_the_primary_from_a_standby(pg_cluster):
    [primary_row] = pg_cluster.execute(pg_cluster.primary, PG.primary_status_sql)
    [replica_row] = pg_cluster.execute(pg_cluster.replica("replica"), PG.primary_status_sql)
    in_recovery, position = PG.primary_status(primary_row)
    assert in_recovery is False
    assert position is not None
    assert position > 0
    assert PG.primary_status(replica_row) == (True, None)


def test_postgresql_asks_the_transaction_whether_it_wrote(pg_cluster):
    """The server, not the text: a function that writes is a write."""
    pg_cluster.execute(pg_cluster.primary, "CREATE TABLE IF NOT EXISTS backend_wrote (n int)")
    engine = sa.create_engine(pg_cluster.primary.url())
    try:
        with engine.connect() as conn:
            sql = PG.wrote_sql(conn.dialect.server_version_info)
            assert sql is not None
            conn.execute(sa.text("SELECT 1"))
            assert conn.exec_driver_sql(sql).scalar() is False
            conn.rollback()
            conn.execute(sa.text("SELECT count(*) FROM backend_wrote"))
            conn.execute(sa.text("INSERT INTO backend_wrote VALUES (1)"))
            assert conn.exec_driver_sql(sql).scalar() is True
            conn.rollback()
    finally:
        engine.dispose()
    assert "txid_current_if_assigned" in PG.wrote_sql((12, 9))


def _error_of(url, *statements):
    with psycopg.connect(url) as conn:
        for statement in statements[:-1]:
            conn.execute(statement)
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(statements[-1])
    return caught.value


@pytest.mark.parametrize(
    "statements",
    [
        ("CREATE TABLE backend_refused (n int)",),  # 25006
        ("SELECT lo_create(0)",),  # XX000 "cannot assign OIDs during recovery"
        ("BEGIN", "SET TRANSACTION READ WRITE"),  # 0A000 "... during recovery"
    ],
    ids=["create", "lo_create", "read-write"],
)
def test_postgresql_calls_a_standbys_refusals_read_only(pg_cluster, statements):
    error = _error_of(pg_cluster.replica("replica").url(driver=""), *statements)
    assert PG.classify_error(error) is ErrorKind.READ_ONLY
    assert classify_driver_error(error) is ErrorKind.READ_ONLY


def test_postgresql_calls_a_bad_query_nothing(pg_cluster):
    error = _error_of(pg_cluster.replica("replica").url(driver=""), "SELECT * FROM no_such_table")
    assert error.sqlstate == "42P01"
    assert PG.classify_error(error) is None


def test_postgresql_calls_a_terminated_connection_lost(pg_cluster):
    """A backend killed by the server (57P01, "terminating connection")."""
    url = pg_cluster.replica("replica").url(driver="")
    with psycopg.connect(url, autocommit=True) as conn:
        [(pid,)] = conn.execute("SELECT pg_backend_pid()").fetchall()
        pg_cluster.execute(pg_cluster.replica("replica"), f"SELECT pg_terminate_backend({pid})")
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("SELECT 1")
    assert caught.value.sqlstate == "57P01"
    assert PG.classify_error(caught.value) is ErrorKind.CONNECTION_LOST


@pytest.mark.parametrize(
    ("driver", "preset", "expected"),
    [
        ("psycopg", {}, {"connect_timeout": 2}),
        ("psycopg2", {}, {"connect_timeout": 2}),
        ("asyncpg", {}, {"timeout": 1.5}),
        ("psycopg", {"connect_timeout": 9}, {"connect_timeout": 9}),
        ("pg8000", {}, {}),
    ],
)
def test_postgresql_bounds_the_connect_of_each_driver(driver, preset, expected):
    params = dict(preset)
    PG.bound_connect(driver, params, 1.5)
    assert params == expected


# -- SQLite -----------------------------------------------------------------------


@pytest.fixture
def sqlite_engine(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'backend.sqlite3'}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE items (n int)"))
    yield engine
    engine.dispose()


def test_sqlite_has_no_positions(sqlite_engine):
    """Nothing to read: the text of the statements tells a write, the probe only that
    the file answers."""
    backend = backend_for(sqlite_engine.dialect.name)
    with sqlite_engine.connect() as conn:
        assert backend.wrote_sql(conn.dialect.server_version_info) is None
        conn.execute(sa.text("INSERT INTO items VALUES (1)"))
        conn.commit()
        assert backend.read_primary_position(conn.connection.dbapi_connection) is None
        row = tuple(conn.execute(sa.text(backend.replica_probe_sql)).one())
        status = tuple(conn.execute(sa.text(backend.primary_status_sql)).one())
    assert backend.replica_probe(row) == ReplicaProbe(True, None, None, 0.0)
    assert backend.primary_status(status) == (None, None)
    assert backend.distance(None, None) is None
    assert backend.load_position(b"16b3748") is None


def test_sqlite_errors_mean_nothing_to_the_router(tmp_path, sqlite_engine):
    """A read-only file's refusal and a bad query carry no code that tells a lost
    connection; the guards refuse writes before SQLite sees them."""
    backend = backend_for("sqlite")
    path = sqlite_engine.url.database
    readonly = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly") as refused:
            readonly.execute("INSERT INTO items VALUES (2)")
        with pytest.raises(sqlite3.OperationalError, match="no such table") as bad:
            readonly.execute("SELECT * FROM no_such_table")
    finally:
        readonly.close()
    assert backend.classify_error(refused.value) is None
    assert classify_driver_error(bad.value) is None
    params: dict[str, object] = {}
    backend.bound_connect("pysqlite", params, 1.0)
    assert params == {}


def test_the_catch_up_wait_ends_at_once_on_another_timeline(pg_cluster):
    """A replica that does not stream a token's timeline will never replay that
    history: the wait answers at once (here within the connection's 5 s statement
    timeout, for a 60 s wait) with its position, which does not cover the token."""
    replica = pg_cluster.replica("replica")
    with psycopg.connect(replica.url(driver=""), autocommit=True) as conn:
        conn.execute("SET statement_timeout = '5s'")
        far = WalPosition(0x7FFFFFFF00000000, 99)
        row = conn.execute(PG.catch_up_sql(far, 60.0)).fetchone()
    answer = PG.caught_up(row)
    assert isinstance(answer, WalPosition)
    assert answer.timeline == 1
    assert not answer >= far
