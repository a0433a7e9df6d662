"""Test harness, not library code: put ``FlaskReplicated`` on every Flask-SQLAlchemy
app another project's test suite creates (tests/test_other_suites.py).

On ``PYTHONPATH`` only for the run "with the router"; Python imports it at start-up
in the pytest process and in every subprocess the suite starts (Flask-Migrate's
tests run ``flask db ...``). Monkeypatching is the point here: the suites under
test must not be edited.

Each app gets one replica given by URL (``REPLICATED_REPLICAS``), so its binds,
metadata and migrations stay what the suite expects, and that replica sees the
primary's data:

- a SQLite file: the same file opened read-only (``mode=ro``), a real read-only
  replica (a write routed to it fails);
- in-memory SQLite (``sqlite://``): such a database exists only inside its one
  connection, so the replica is a second engine (its own pool and events) on that
  same connection; it sees every write at once and cannot refuse one (the router's
  own guard still refuses writes during a read request);
- any other URL: the same server with the database name plus ``_replica``. The
  suites only build such engines (with ``_make_engine`` mocked), never connect.

An app without ``SQLALCHEMY_DATABASE_URI`` has nothing to route; it is left as it
is and logged as skipped. The SQLite replicas' URLs are the primary's file after
Flask-SQLAlchemy's own path rules (the instance folder).
"""

from __future__ import annotations

import os


def _log(line: str) -> None:
    path = os.environ.get("REPLICATED_SHIM_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as file:
            file.write(line + "\n")


def _replica_for(db, app):
    import sqlalchemy as sa

    uri = app.config.get("SQLALCHEMY_DATABASE_URI")
    if uri is None:
        return None
    url = sa.engine.make_url(uri)
    if url.get_backend_name() != "sqlite":
        return url.set(database=f"{url.database}_replica").render_as_string(hide_password=False)
    if url.database in (None, "", ":memory:"):
        default = db._app_engines[app][None]

        def same_connection():
            return default.raw_connection().dbapi_connection

        # No rollback when the replica's pool takes the connection back: the
        # connection is the primary's too, and may be inside its transaction.
        return {"url": "sqlite://", "creator": same_connection, "pool_reset_on_return": None}
    engine = db._app_engines[app][None]
    path = engine.url.database if isinstance(engine, sa.Engine) else url.database
    if path.startswith("file:"):
        path = path[5:].split("?")[0]
    return f"sqlite:///file:{path}?mode=ro&uri=true"


def _install() -> None:
    from flask_sqlalchemy import SQLAlchemy

    from flask_replicated import FlaskReplicated

    plain_init_app = SQLAlchemy.init_app

    def init_app(self, app):
        plain_init_app(self, app)
        replica = _replica_for(self, app)
        if replica is None:
            _log(f"skipped {app.name}: no SQLALCHEMY_DATABASE_URI")
            return
        app.config["REPLICATED_REPLICAS"] = {"replica": replica}
        # A suite that registers a second SQLAlchemy on an app first deletes
        # app.extensions["sqlalchemy"]; the router made for the first one goes the
        # same way (the library refuses two routers on one app).
        app.extensions.pop("replicated", None)
        FlaskReplicated(app)
        _log(f"installed {app.name}")

    SQLAlchemy.init_app = init_app


if os.environ.get("REPLICATED_SHIM") == "1":
    _install()
