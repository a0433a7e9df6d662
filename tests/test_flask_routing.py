"""Flask adapter: which server answers, asked of the server itself."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_replicated import FlaskReplicated, ReplicaWriteError, use_primary, use_replica
from replicated_core.intent import current_override, current_scope


@pytest.mark.parametrize(
    ("method", "node"),
    [
        ("GET", "replica"),
        ("HEAD", "replica"),
        ("POST", "primary"),
        ("PUT", "primary"),
        ("PATCH", "primary"),
        ("DELETE", "primary"),
        ("OPTIONS", "primary"),
    ],
)
def test_method_decides_the_node(flask_app, method, node):
    response = flask_app.test_client().open("/who", method=method)
    assert response.headers["X-Who"] == node


def test_readonly_methods_are_configurable(flask_app_factory):
    app = flask_app_factory(REPLICATED_READONLY_METHODS=["GET", "OPTIONS"])
    client = app.test_client()
    assert client.options("/who").headers["X-Who"] == "replica"
    assert client.head("/who").headers["X-Who"] == "primary"


def test_changes_database_sends_a_get_to_the_primary(flask_app):
    assert flask_app.test_client().get("/forced").text == "primary"


def test_changes_database_covers_hooks_that_run_before_the_view(flask_app_factory):
    app = flask_app_factory()
    seen = []

    @app.before_request
    def load_user():
        seen.append(app.backend.who(app.db.session))

    client = app.test_client()
    client.get("/forced")
    client.get("/who")
    assert seen == ["primary", "replica"]


def test_changes_database_on_an_async_view(flask_app_factory):
    from flask_replicated import changes_database

    app = flask_app_factory()

    @app.get("/async-forced")
    @changes_database
    async def async_forced():
        return app.backend.who(app.db.session)

    @app.get("/async-read")
    async def async_read():
        return app.backend.who(app.db.session)

    client = app.test_client()
    assert client.get("/async-forced").text == "primary"
    assert client.get("/async-read").text == "replica"


def test_every_default_engine_path_follows_the_intent(flask_app_factory):
    app = flask_app_factory()
    db, Item, backend = app.db, app.Item, app.backend
    results = {}

    @app.route("/paths", methods=["GET", "POST"])
    def paths():
        with db.session.no_autoflush:
            results["execute"] = backend.who(db.session)
            results["connection"] = backend.who(db.session.connection())
            results["engine"] = backend.who_engine(db.engine)
            with pytest.warns(DeprecationWarning, match="get_engine"):
                engine = db.get_engine()
            results["get_engine"] = backend.who_engine(engine)
            results["query"] = Item.query.filter(sa.literal(False)).all() == []
            results["get"] = db.session.get(Item, -1) is None
        return ""

    client = app.test_client()
    client.get("/paths")
    assert results == {
        "execute": "replica",
        "connection": "replica",
        "engine": "replica",
        "get_engine": "replica",
        "query": True,
        "get": True,
    }
    results.clear()
    client.post("/paths")
    assert {k: v for k, v in results.items() if isinstance(v, str)} == {
        "execute": "primary",
        "connection": "primary",
        "engine": "primary",
        "get_engine": "primary",
    }


def test_model_query_and_get_read_from_the_replica(flask_app_factory):
    """A fresh row is on the primary but not yet on the lagging replica (500 ms apply
    delay on PostgreSQL; a separate file on SQLite): Model.query and session.get in a
    GET do not see it, because they read from the replica."""
    app = flask_app_factory(replica="lagging", REPLICATED_STICKY_MODE="off")
    Item = app.Item

    @app.get("/lookup/<name>")
    def lookup(name):
        return {"query": Item.query.filter_by(name=name).count()}

    @app.get("/get/<int:item_id>")
    def get(item_id):
        return {"get": app.db.session.get(Item, item_id) is not None}

    client = app.test_client()
    # A first read makes the first replica check while nothing waits for replay: a
    # replica found behind at its very first check is trusted only on the server's
    # own lag figure, which an idle spell before this test would inflate.
    client.get("/who")
    name = f"fresh-{id(app)}"
    client.post("/items", data={"name": name})
    with app.app_context():
        new_id = app.db.session.scalar(sa.select(Item.id).where(Item.name == name))
    assert new_id is not None
    assert client.get(f"/lookup/{name}").json == {"query": 0}
    assert client.get(f"/get/{new_id}").json == {"get": False}


def test_outside_a_request_everything_goes_to_the_primary(flask_app):
    with flask_app.app_context():
        db, backend = flask_app.db, flask_app.backend
        assert backend.who(db.session) == "primary"
        assert backend.who_engine(db.engine) == "primary"
        with use_replica():
            assert backend.who(db.session) == "replica"
            with use_primary():
                assert backend.who(db.session) == "primary"
            assert backend.who(db.session) == "replica"
        assert backend.who(db.session) == "primary"


def test_use_primary_and_use_replica_inside_a_request(flask_app):
    db, backend = flask_app.db, flask_app.backend
    seen = []

    @flask_app.get("/mixed")
    def mixed():
        seen.append(backend.who_engine(db.engine))
        with use_replica():
            seen.append(backend.who_engine(db.engine))
        with use_primary():
            seen.append(backend.who_engine(db.engine))
            with use_replica():
                seen.append(backend.who_engine(db.engine))
            seen.append(backend.who_engine(db.engine))
        # The request used the primary: later reads stay there, to see its own writes.
        seen.append(backend.who_engine(db.engine))
        return ""

    flask_app.test_client().get("/mixed")
    assert seen == ["replica", "replica", "primary", "replica", "primary", "primary"]


def test_use_primary_as_a_decorator(flask_app):
    db, backend = flask_app.db, flask_app.backend

    @use_primary()
    def helper():
        return backend.who(db.session)

    @flask_app.get("/helper")
    def view():
        return helper()

    assert flask_app.test_client().get("/helper").text == "primary"


def test_models_with_another_bind_key_keep_their_engine(backend, tmp_path):
    other = f"sqlite:///{tmp_path / 'other.sqlite3'}"
    app = Flask(__name__)
    app.config.update(
        TESTING=True,
        SECRET_KEY="k",
        SQLALCHEMY_DATABASE_URI=backend.url("primary"),
        SQLALCHEMY_BINDS={
            "master": backend.url("primary"),
            "slave": backend.url("replica"),
            "other": other,
        },
    )
    db = SQLAlchemy(app)

    class Note(db.Model):
        __bind_key__ = "other"
        id = sa.Column(sa.Integer, primary_key=True)

    FlaskReplicated(app)
    with app.app_context():
        db.create_all(bind_key="other")
    seen = {}

    @app.route("/note", methods=["GET", "POST"])
    def note():
        seen[app.name] = str(db.session.get_bind(mapper=Note).url)
        return str(db.session.query(Note).count())

    client = app.test_client()
    for method in ("GET", "POST"):
        assert client.open("/note", method=method).text == "0"
        assert seen[app.name] == other
    with app.app_context():
        for engine in db.engines.values():
            engine.dispose()


def test_no_intent_is_left_set_after_a_request(flask_app):
    """Flask's test client serves every request on this thread: a leak would show here."""

    @flask_app.get("/fails")
    def fails():
        with use_replica():
            flask_app.db.session.execute(sa.text("DELETE FROM items WHERE id = -1"))
        return ""

    client = flask_app.test_client()
    for path in ("/who", "/forced", "/fails"):
        if path == "/fails":
            with pytest.raises(ReplicaWriteError):
                client.get(path)
        else:
            client.get(path)
        assert current_scope() is None
        assert current_override() is None
