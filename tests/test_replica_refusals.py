"""What replicas serve and refuse, on real servers: reads whose literals or comments
look like writes are served; advisory locks, session-level SET, SQLite PRAGMA
assignments and ATTACH are refused before they leave; the standby's own refusals of
lo_create and SET TRANSACTION READ WRITE become the same error."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
import sqlalchemy as sa
from support import dispose_flask_app, make_flask_app, sqlite_backend

from flask_replicated import ReplicaWriteError

LOOK_LIKE_WRITES = {
    "literal": "SELECT id FROM items WHERE name = 'ready for update'",
    "cte literal": "WITH words AS (SELECT 'insert' AS word) SELECT word FROM words",
    "comment": "SELECT id FROM items /* for share */",
    "sqlcommenter": (
        "WITH recent AS (SELECT id FROM items) SELECT id FROM recent "
        "/*controller='items',framework='flask%3A3.1',route='/items/update'*/"
    ),
}
LOCK_MESSAGE = (
    "The view 'run' took an advisory lock during a GET request, which is routed to a "
    "replica: a lock taken on a replica coordinates nothing with the primary. Decorate "
    "it with '@changes_database' or wrap the statement in 'use_primary()'."
)
SESSION_MESSAGE = (
    "The view 'run' changed its database session ('SET', 'RESET', 'ATTACH' or 'DETACH') "
    "during a GET request, which is routed to a replica: the change would outlive the "
    "request on a pooled replica connection ('SET LOCAL' would not). Decorate it with "
    "'@changes_database' or wrap the statement in 'use_primary()'."
)
WRITE_MESSAGE = (
    "The view 'run' wrote to the database during a GET request, which is routed to a "
    "replica. Decorate it with '@changes_database' or wrap the write in 'use_primary()'."
)


def _runner(app: Any) -> Any:
    """GET /run?sql=...: runs the statement in the request's session, says who answered."""
    from flask import request

    @app.get("/run")
    def run() -> Any:
        app.db.session.execute(sa.text(request.args["sql"]))
        return app.backend.who(app.db.session)

    return app.test_client()


@pytest.mark.parametrize("sql", list(LOOK_LIKE_WRITES.values()), ids=list(LOOK_LIKE_WRITES))
def test_reads_that_look_like_writes_are_served_by_the_replica(flask_app: Any, sql: str) -> None:
    client = _runner(flask_app)
    assert client.get("/run", query_string={"sql": sql}).text == "replica"


def _refused(client: Any, sql: str) -> ReplicaWriteError:
    with pytest.raises(ReplicaWriteError) as caught:
        client.get("/run", query_string={"sql": sql})
    return caught.value


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT pg_advisory_lock(4242)",
        "SELECT pg_advisory_xact_lock(4242)",
        "SELECT pg_try_advisory_lock(4242)",
        "SELECT pg_try_advisory_xact_lock_shared(4242)",
    ],
)
def test_an_advisory_lock_is_refused_on_a_replica(
    pg_flask_app: Any, pg_cluster: Any, sql: str
) -> None:
    """Never sent: the replica holds no advisory lock afterwards."""
    error = _refused(_runner(pg_flask_app), sql)
    assert str(error) == LOCK_MESSAGE
    assert error.__cause__ is None
    locks = pg_cluster.execute(
        pg_cluster.replica("replica"), "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
    )
    assert locks == [(0,)]


@pytest.mark.parametrize(
    "sql", ["SET search_path TO public", "SET SESSION statement_timeout = 0", "RESET ALL"]
)
def test_a_session_level_set_is_refused_on_a_replica(pg_flask_app: Any, sql: str) -> None:
    error = _refused(_runner(pg_flask_app), sql)
    assert str(error) == SESSION_MESSAGE
    assert error.__cause__ is None


@pytest.mark.parametrize(
    "sql",
    [
        "SET LOCAL statement_timeout = 5000",
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    ],
)
def test_transaction_scoped_set_is_served_by_the_replica(pg_flask_app: Any, sql: str) -> None:
    assert _runner(pg_flask_app).get("/run", query_string={"sql": sql}).text == "replica"


@pytest.mark.parametrize(
    ("sql", "sqlstate"),
    [("SELECT lo_create(0)", "XX000"), ("SET TRANSACTION READ WRITE", "0A000")],
)
def test_the_standbys_recovery_errors_become_the_same_error(
    pg_flask_app: Any, sql: str, sqlstate: str
) -> None:
    """lo_create: XX000 'cannot assign OIDs during recovery'; SET TRANSACTION READ
    WRITE: 0A000 'cannot set transaction read-write mode during recovery'."""
    error = _refused(_runner(pg_flask_app), sql)
    assert str(error) == WRITE_MESSAGE
    assert getattr(error.__cause__, "sqlstate", None) == sqlstate


@pytest.mark.parametrize(
    ("sql", "sqlstate"),
    [("SELECT lo_create(0)", "XX000"), ("SET TRANSACTION READ WRITE", "0A000")],
)
async def test_quart_the_standbys_recovery_errors_become_the_same_error(
    postgresql_backend: Any, sql: str, sqlstate: str
) -> None:
    """asyncpg's errors, through SQLAlchemy's adaptation, are translated too."""
    from quart import request
    from support import make_quart_app

    # The error carries the server's as its cause, which Quart's debug page for a
    # propagated exception cannot render outside the request: answer 500 instead.
    app = make_quart_app(postgresql_backend, PROPAGATE_EXCEPTIONS=False)

    @app.get("/run")
    async def run() -> Any:
        await app.rep.session.execute(sa.text(request.args["sql"]))
        return "served"

    try:
        response = await app.test_client().get("/run", query_string={"sql": sql})
        assert response.status_code == 500
        [error] = app.errors
        assert isinstance(error, ReplicaWriteError)
        assert str(error) == WRITE_MESSAGE
        assert getattr(error.__cause__, "sqlstate", None) == sqlstate
    finally:
        await app.rep.dispose(app)


# -- SQLite: the replica is a file the app must not change ------------------------


@pytest.fixture
def sqlite_app(tmp_path: Any) -> Any:
    app = make_flask_app(sqlite_backend(tmp_path))
    yield app
    dispose_flask_app(app)


def _replica_pragma(app: Any, name: str) -> object:
    path = app.backend.url("replica").removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]


@pytest.mark.parametrize(
    ("sql", "pragma", "unchanged"),
    [
        ("PRAGMA journal_mode = WAL", "journal_mode", "delete"),
        ("PRAGMA journal_mode(WAL)", "journal_mode", "delete"),
        ("PRAGMA main.user_version = 7", "user_version", 0),
    ],
)
def test_a_pragma_assignment_is_refused_on_a_sqlite_replica(
    sqlite_app: Any, sql: str, pragma: str, unchanged: object
) -> None:
    """Without the refusal the replica file itself changes (WAL mode, its header)."""
    error = _refused(_runner(sqlite_app), sql)
    assert str(error) == WRITE_MESSAGE
    assert error.__cause__ is None
    assert _replica_pragma(sqlite_app, pragma) == unchanged


@pytest.mark.parametrize("sql", ["PRAGMA table_info(items)", "PRAGMA journal_mode"])
def test_pragma_reads_are_served_by_a_sqlite_replica(sqlite_app: Any, sql: str) -> None:
    assert _runner(sqlite_app).get("/run", query_string={"sql": sql}).text == "replica"


def test_attach_is_refused_on_a_sqlite_replica(sqlite_app: Any, tmp_path: Any) -> None:
    """ATTACH would create the file and stay attached to the pooled connection."""
    extra = tmp_path / "extra.sqlite3"
    client = _runner(sqlite_app)
    error = _refused(client, f"ATTACH DATABASE '{extra}' AS extra")
    assert str(error) == SESSION_MESSAGE
    assert not extra.exists()
    assert str(_refused(client, "DETACH DATABASE extra")) == SESSION_MESSAGE
