"""Bad configuration fails at start-up with a sentence naming the key."""

from __future__ import annotations

import sqlite3

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_replicated import FlaskReplicated
from replicated_core import ConfigError, StickyMode
from replicated_core.config import load_config


def _app(tmp_path, binds=None, uri=None, **config):
    primary = f"sqlite:///{tmp_path / 'p.sqlite3'}"
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="k",
        SQLALCHEMY_DATABASE_URI=uri or primary,
        SQLALCHEMY_BINDS=binds
        if binds is not None
        else {"master": primary, "slave": f"sqlite:///{tmp_path / 'r.sqlite3'}"},
        **config,
    )
    SQLAlchemy(app)
    return app


BAD_VALUES = [
    (
        {"REPLICATED_REPLICA_BINDS": []},
        "'REPLICATED_REPLICA_BINDS' is empty. Name at least one replica bind from "
        "SQLALCHEMY_BINDS.",
    ),
    (
        {"REPLICATED_REPLICA_BINDS": "slave"},
        "'REPLICATED_REPLICA_BINDS' must be a list of bind names from SQLALCHEMY_BINDS, "
        "got 'slave'.",
    ),
    (
        {"REPLICATED_REPLICA_BINDS": ["slave", "slave"]},
        "'REPLICATED_REPLICA_BINDS' names a bind twice: ['slave', 'slave'].",
    ),
    (
        {"REPLICATED_REPLICA_BINDS": [3]},
        "'REPLICATED_REPLICA_BINDS' must be the name of a bind in SQLALCHEMY_BINDS, got 3.",
    ),
    (
        {"REPLICATED_PRIMARY_BIND": ""},
        "'REPLICATED_PRIMARY_BIND' must be the name of a bind in SQLALCHEMY_BINDS, got ''.",
    ),
    (
        {"REPLICATED_READONLY_METHODS": "GET"},
        "'REPLICATED_READONLY_METHODS' must be a list of HTTP methods such as ['GET', 'HEAD'].",
    ),
    (
        {"REPLICATED_READONLY_METHODS": ["GET", "not a method"]},
        "'REPLICATED_READONLY_METHODS' must hold HTTP method names, got 'not a method'.",
    ),
    (
        {"REPLICATED_STICKY_MODE": "sometimes"},
        "'REPLICATED_STICKY_MODE' must be one of 'auto', 'wal', 'time', 'off', got 'sometimes'.",
    ),
    (
        {"REPLICATED_STICKY_SECONDS": "5"},
        "'REPLICATED_STICKY_SECONDS' must be a number of seconds, got '5'.",
    ),
    (
        {"REPLICATED_STICKY_SECONDS": True},
        "'REPLICATED_STICKY_SECONDS' must be a number of seconds, got True.",
    ),
    (
        {"REPLICATED_STICKY_SECONDS": -1},
        "'REPLICATED_STICKY_SECONDS' must be a positive number of seconds, got -1.",
    ),
    (
        {"REPLICATED_CHECK_INTERVAL": float("nan")},
        "'REPLICATED_CHECK_INTERVAL' must be a positive number of seconds, got nan.",
    ),
    (
        {"REPLICATED_MAX_LAG": 0},
        "'REPLICATED_MAX_LAG' must be a positive number of seconds, got 0.",
    ),
    (
        {"REPLICATED_REPLICA_DOWNTIME": None},
        "'REPLICATED_REPLICA_DOWNTIME' must be a number of seconds, got None.",
    ),
    (
        {"REPLICATED_CONNECT_TIMEOUT": "2s"},
        "'REPLICATED_CONNECT_TIMEOUT' must be a number of seconds, got '2s'.",
    ),
    (
        {"REPLICATED_COOKIE_NAME": "has space"},
        "'REPLICATED_COOKIE_NAME' must be a non-empty name of letters, digits and '-_.', "
        "got 'has space'.",
    ),
    (
        {"REPLICATED_WEBSOCKET_READONLY": "yes"},
        "'REPLICATED_WEBSOCKET_READONLY' must be True or False, got 'yes'.",
    ),
    (
        {"REPLICATED_DEBUG_HEADER": ""},
        "'REPLICATED_DEBUG_HEADER' must be a non-empty name of letters, digits and '-_.', got ''.",
    ),
]


@pytest.mark.parametrize(("config", "message"), BAD_VALUES)
def test_bad_values_fail_in_init_app(tmp_path, config, message):
    with pytest.raises(ConfigError) as caught:
        FlaskReplicated(_app(tmp_path, **config))
    assert str(caught.value) == message


def test_an_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^Unknown setting 'REPLICATED_STICKY_SECOND'\. "):
        FlaskReplicated(_app(tmp_path, REPLICATED_STICKY_SECOND=5))


def test_an_unknown_option_is_named():
    with pytest.raises(ConfigError, match=r"^Unknown option 'stiky_mode'\. The known options"):
        FlaskReplicated(stiky_mode="wal")


def test_an_unknown_replica_bind_is_named(tmp_path):
    with pytest.raises(ConfigError) as caught:
        FlaskReplicated(_app(tmp_path, REPLICATED_REPLICA_BINDS=["replica1"]))
    assert str(caught.value) == (
        "'REPLICATED_REPLICA_BINDS' names the bind 'replica1', which is not in "
        "SQLALCHEMY_BINDS. Add it there, or fix the name."
    )


def test_an_unknown_primary_bind_is_named(tmp_path):
    with pytest.raises(ConfigError) as caught:
        FlaskReplicated(_app(tmp_path, REPLICATED_PRIMARY_BIND="writer"))
    assert str(caught.value) == (
        "'REPLICATED_PRIMARY_BIND' names the bind 'writer', which is not in "
        "SQLALCHEMY_BINDS. Add it there, or fix the name."
    )


def test_a_replica_url_equal_to_the_primarys_is_refused(tmp_path):
    primary = f"sqlite:///{tmp_path / 'p.sqlite3'}"
    app = _app(tmp_path, binds={"master": primary, "slave": primary})
    with pytest.raises(ConfigError) as caught:
        FlaskReplicated(app)
    assert str(caught.value) == (
        "'REPLICATED_REPLICA_BINDS' names the bind 'slave', whose URL is the primary's. "
        "Point it at a replica server, or remove it."
    )


def test_a_primary_bind_that_is_not_the_default_uri_is_refused(tmp_path):
    app = _app(tmp_path, uri=f"sqlite:///{tmp_path / 'elsewhere.sqlite3'}")
    with pytest.raises(ConfigError) as caught:
        FlaskReplicated(app)
    assert str(caught.value) == (
        "'REPLICATED_PRIMARY_BIND' names the bind 'master', whose URL differs from "
        "SQLALCHEMY_DATABASE_URI. Models without a bind key are routed between the primary "
        "and the replicas, so set SQLALCHEMY_DATABASE_URI to the primary's URL."
    )


def test_without_a_master_bind_the_default_uri_is_the_primary(tmp_path):
    replica = f"sqlite:///{tmp_path / 'r.sqlite3'}"
    app = _app(tmp_path, binds={"slave": replica})
    rep = FlaskReplicated(app)
    assert rep.router(app).primary.name == "(default)"
    assert str(rep.router(app).primary.engine.url).endswith("p.sqlite3")


def test_flask_sqlalchemy_must_come_first():
    with pytest.raises(RuntimeError) as caught:
        FlaskReplicated(Flask(__name__))
    assert str(caught.value) == (
        "FlaskReplicated needs Flask-SQLAlchemy on the app first: call 'db.init_app(app)' "
        "(or 'SQLAlchemy(app)') before 'FlaskReplicated(app)'."
    )


def test_init_app_later_and_options_as_defaults(tmp_path):
    rep = FlaskReplicated(sticky_mode="off", cookie_name="mine")
    app = _app(tmp_path, REPLICATED_COOKIE_NAME="theirs")
    rep.init_app(app)
    assert app.extensions["replicated"] is rep
    router = rep.router(app)
    assert router.sticky_mode is StickyMode.OFF
    assert router.config.cookie_name == "theirs"


def test_cookie_settings_are_fixed_once_the_router_is_made(tmp_path):
    """The request path works out what it needs of them once: changing one later
    would leave the router half on the old value, so it is refused."""
    app = _app(tmp_path)
    router = FlaskReplicated(app).router(app)
    for name, value in [("sticky_mode", StickyMode.OFF), ("sticky_ttl", 1.0), ("codec", None)]:
        with pytest.raises(AttributeError):
            setattr(router, name, value)
    with pytest.raises(AttributeError):
        router.health.probing = True  # type: ignore[misc]


def test_defaults():
    config = load_config({})
    assert config.primary_bind == "master"
    assert config.replica_binds == ("slave",)
    assert config.readonly_methods == frozenset({"GET", "HEAD"})
    assert config.sticky_ttl(StickyMode.TIME) == 5
    assert config.sticky_ttl(StickyMode.WAL) == 30
    assert config.check_interval == 0.1
    assert config.max_lag == 30
    assert config.replica_downtime == 30
    assert StickyMode.AUTO.resolve(primary_is_postgresql=True) is StickyMode.WAL
    assert StickyMode.AUTO.resolve(primary_is_postgresql=False) is StickyMode.TIME


def test_a_second_router_on_the_same_app_is_refused(tmp_path):
    """Two routers would both hook every request: the second set-up fails instead,
    whether it is the same extension object or another one."""
    app = _app(tmp_path)
    rep = FlaskReplicated(app)
    for again in (lambda: rep.init_app(app), lambda: FlaskReplicated(app)):
        with pytest.raises(RuntimeError, match="already set up on this app"):
            again()


def test_a_second_quart_router_on_the_same_app_is_refused(tmp_path):
    from quart import Quart

    from quart_replicated import QuartReplicated

    app = Quart(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite+aiosqlite:///{tmp_path / 'p.sqlite3'}",
        SQLALCHEMY_BINDS={
            "master": f"sqlite+aiosqlite:///{tmp_path / 'p.sqlite3'}",
            "slave": f"sqlite+aiosqlite:///{tmp_path / 'r.sqlite3'}",
        },
    )
    rep = QuartReplicated(app)
    for again in (lambda: rep.init_app(app), lambda: QuartReplicated(app)):
        with pytest.raises(RuntimeError, match="already set up on this app"):
            again()
    assert app.extensions["replicated"] is rep


# -- replicas by URL (REPLICATED_REPLICAS) and secrets in messages ---------------------

SECRET_URL = "postgresql://app:s3cr3t@db.example/app"

BAD_REPLICAS = [
    (
        {"REPLICATED_REPLICAS": SECRET_URL},
        "'REPLICATED_REPLICAS' must be a dict of replica names to URLs, such as "
        "{'replica1': 'postgresql://app@replica1/app'}, got a str.",
    ),
    (
        {"REPLICATED_REPLICAS": {}},
        "'REPLICATED_REPLICAS' is empty. Give at least one replica, or leave the key out.",
    ),
    (
        {"REPLICATED_REPLICAS": {"": SECRET_URL}},
        "'REPLICATED_REPLICAS' must have replica names as keys, got ''.",
    ),
    (
        {"REPLICATED_REPLICAS": {SECRET_URL: SECRET_URL}},
        "'REPLICATED_REPLICAS' must have replica names as keys, "
        "got 'postgresql://app:***@db.example/app'.",
    ),
    (
        {"REPLICATED_REPLICAS": {"(default)": SECRET_URL}},
        "'REPLICATED_REPLICAS' names a replica '(default)', the primary's name. "
        "Choose another name.",
    ),
    (
        {"REPLICATED_REPLICAS": {"r1": 5}},
        "'REPLICATED_REPLICAS['r1']' must be a database URL, or a dict with a 'url' "
        "key and engine options.",
    ),
    (
        {"REPLICATED_REPLICAS": {"r1": {"pool_size": 5}}},
        "'REPLICATED_REPLICAS['r1']' must be a database URL, or a dict with a 'url' "
        "key and engine options.",
    ),
    (
        {"REPLICATED_REPLICAS": {"r1": "app:s3cr3t@db.example/app"}},
        "'REPLICATED_REPLICAS['r1']' is not a database URL (ArgumentError). Write it "
        "as SQLALCHEMY_DATABASE_URI is written, such as 'postgresql://app@replica1/app'.",
    ),
    (
        {"REPLICATED_REPLICAS": {"r1": {"url": SECRET_URL, 3: True}}},
        "'REPLICATED_REPLICAS['r1']' has an engine option that is not a name: 3.",
    ),
    (
        {"REPLICATED_REPLICAS": {"r1": SECRET_URL}, "REPLICATED_REPLICA_BINDS": ["slave"]},
        "'REPLICATED_REPLICAS' and 'REPLICATED_REPLICA_BINDS' are both set. Give the "
        "replicas one way: by URL in 'REPLICATED_REPLICAS' (the primary is then "
        "SQLALCHEMY_DATABASE_URI), or as binds named in 'REPLICATED_REPLICA_BINDS'.",
    ),
    (
        {"REPLICATED_REPLICAS": {"r1": SECRET_URL}, "REPLICATED_PRIMARY_BIND": "master"},
        "'REPLICATED_REPLICAS' and 'REPLICATED_PRIMARY_BIND' are both set. Give the "
        "replicas one way: by URL in 'REPLICATED_REPLICAS' (the primary is then "
        "SQLALCHEMY_DATABASE_URI), or as binds named in 'REPLICATED_REPLICA_BINDS'.",
    ),
]


@pytest.mark.parametrize(("config", "message"), BAD_REPLICAS)
def test_bad_replicas_by_url_fail_in_init_app(tmp_path, config, message):
    with pytest.raises(ConfigError) as caught:
        FlaskReplicated(_app(tmp_path, binds={}, **config))
    assert str(caught.value) == message
    assert "s3cr3t" not in message


SECRET_VALUES = [
    (
        {"REPLICATED_REPLICA_BINDS": SECRET_URL},
        "'REPLICATED_REPLICA_BINDS' must be a list of bind names from SQLALCHEMY_BINDS, "
        "got 'postgresql://app:***@db.example/app'. To give replicas by URL, use "
        "'REPLICATED_REPLICAS'.",
    ),
    (
        {"REPLICATED_REPLICA_BINDS": [SECRET_URL, SECRET_URL]},
        "'REPLICATED_REPLICA_BINDS' must be the name of a bind in SQLALCHEMY_BINDS, got "
        "'postgresql://app:***@db.example/app'. To give replicas by URL, use "
        "'REPLICATED_REPLICAS'.",
    ),
    (
        {"REPLICATED_PRIMARY_BIND": SECRET_URL},
        "'REPLICATED_PRIMARY_BIND' must be the name of a bind in SQLALCHEMY_BINDS, got "
        "'postgresql://app:***@db.example/app'.",
    ),
    (
        {"REPLICATED_PRIMARY_BIND": 5},
        "'REPLICATED_PRIMARY_BIND' must be the name of a bind in SQLALCHEMY_BINDS, got 5.",
    ),
    (
        {"REPLICATED_STICKY_SECONDS": SECRET_URL},
        "'REPLICATED_STICKY_SECONDS' must be a number of seconds, "
        "got 'postgresql://app:***@db.example/app'.",
    ),
    (
        {"REPLICATED_STICKY_MODE": "host=db password=s3cr3t"},
        "'REPLICATED_STICKY_MODE' must be one of 'auto', 'wal', 'time', 'off', "
        "got a value not shown (it may hold a password).",
    ),
    (
        {"REPLICATED_COOKIE_NAME": "postgresql://app:s3cr3t@db:bad:port/app"},
        "'REPLICATED_COOKIE_NAME' must be a non-empty name of letters, digits and '-_.', "
        "got a value not shown (it may hold a password).",
    ),
    (
        {"REPLICATED_READONLY_METHODS": ["GET", SECRET_URL]},
        "'REPLICATED_READONLY_METHODS' must hold HTTP method names, "
        "got 'postgresql://app:***@db.example/app'.",
    ),
]


@pytest.mark.parametrize(("config", "message"), SECRET_VALUES)
def test_a_password_in_a_bad_value_is_never_echoed(tmp_path, config, message):
    with pytest.raises(ConfigError) as caught:
        FlaskReplicated(_app(tmp_path, **config))
    assert str(caught.value) == message
    assert "s3cr3t" not in message


def test_a_replica_by_url_that_is_the_primary_is_refused(tmp_path):
    primary = f"sqlite:///{tmp_path / 'p.sqlite3'}"
    app = _app(tmp_path, binds={}, REPLICATED_REPLICAS={"r1": primary})
    with pytest.raises(ConfigError) as caught:
        FlaskReplicated(app)
    assert str(caught.value) == (
        "'REPLICATED_REPLICAS' names the replica 'r1', whose URL is the primary's. "
        "Point it at a replica server, or remove it."
    )


def test_replicas_by_url_need_a_default_uri(tmp_path):
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_BINDS={"other": f"sqlite:///{tmp_path / 'o.sqlite3'}"},
        REPLICATED_REPLICAS={"r1": f"sqlite:///{tmp_path / 'r.sqlite3'}"},
    )
    SQLAlchemy(app)
    with pytest.raises(ConfigError) as caught:
        FlaskReplicated(app)
    assert str(caught.value) == (
        "'REPLICATED_REPLICAS' gives replicas of SQLALCHEMY_DATABASE_URI, which is not "
        "set. Set it to the primary's URL."
    )


def test_a_master_bind_on_the_primary_with_another_url_is_refused(tmp_path):
    """One engine serves the primary: the 'master' bind and SQLALCHEMY_DATABASE_URI
    must then say the same URL, not the same database another way."""
    primary = tmp_path / "p.sqlite3"
    app = _app(
        tmp_path,
        binds={"master": f"sqlite+pysqlite:///{primary}", "slave": f"sqlite:///{tmp_path}/r"},
    )
    with pytest.raises(ConfigError) as caught:
        FlaskReplicated(app)
    assert str(caught.value) == (
        "'REPLICATED_PRIMARY_BIND' names the bind 'master', which is the database of "
        "SQLALCHEMY_DATABASE_URI by another URL (driver, user, password or options). "
        "One engine serves the primary: give both the same URL."
    )


def test_quart_replicas_by_url_are_checked_too(tmp_path):
    from quart import Quart

    from quart_replicated import QuartReplicated

    app = Quart(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite+aiosqlite:///{tmp_path / 'p.sqlite3'}",
        REPLICATED_REPLICAS={"r1": "sqlite:///r.sqlite3"},
    )
    with pytest.raises(ConfigError) as caught:
        QuartReplicated(app)
    assert str(caught.value) == (
        "'REPLICATED_REPLICAS['r1']' cannot be used: InvalidRequestError. It needs an "
        "async driver, such as 'postgresql+asyncpg://' or 'sqlite+aiosqlite://'."
    )


def test_a_replica_that_is_the_primarys_file_by_an_sqlite_uri_is_refused(tmp_path):
    """SQLite's URI filenames ('file:...?uri=true') name the same file as a path."""
    path = tmp_path / "p.sqlite3"
    app = _app(tmp_path, binds={}, REPLICATED_REPLICAS={"r1": f"sqlite:///file:{path}?uri=true"})
    with pytest.raises(ConfigError) as caught:
        FlaskReplicated(app)
    assert str(caught.value) == (
        "'REPLICATED_REPLICAS' names the replica 'r1', whose URL is the primary's. "
        "Point it at a replica server, or remove it."
    )


@pytest.mark.parametrize("primary_form", ["path", "uri"])
def test_the_primarys_sqlite_file_opened_read_only_is_a_replica(tmp_path, primary_form):
    """'mode=ro' opens the primary's file read-only: a replica that sees every write
    at once and refuses its own."""
    import sqlalchemy as sa

    path = tmp_path / "p.sqlite3"
    uri = f"sqlite:///{path}" if primary_form == "path" else f"sqlite:///file:{path}?uri=true"
    app = _app(
        tmp_path,
        uri=uri,
        binds={},
        REPLICATED_REPLICAS={"ro": f"sqlite:///file:{path}?mode=ro&uri=true"},
    )
    rep = FlaskReplicated(app)
    with app.app_context():
        app.extensions["sqlalchemy"].session.execute(sa.text("CREATE TABLE t (x INTEGER)"))
        app.extensions["sqlalchemy"].session.commit()
    (replica,) = rep.router(app).replicas
    with replica.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM t")).scalar() == 0
    # Past the router's own guard (a ReplicaWriteError), SQLite itself refuses.
    raw = replica.engine.raw_connection()
    try:
        with pytest.raises(sqlite3.OperationalError, match="attempt to write a readonly database"):
            raw.cursor().execute("INSERT INTO t VALUES (1)")
    finally:
        raw.close()
    replica.engine.dispose()
