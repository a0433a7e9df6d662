"""Bad configuration fails at start-up with a sentence naming the key."""

from __future__ import annotations

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
