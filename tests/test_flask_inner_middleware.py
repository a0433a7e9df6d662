"""A WSGI middleware the app installs before ``FlaskReplicated`` runs inside ours; one
that hands Flask a copy of the environ must not turn routing off."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy

from flask_replicated import FlaskReplicated
from replicated_core import ReplicaWriteError

COOKIE = "replicated_sticky"


class CopyingMiddleware:
    """Passes a copy of the environ on, as some tracing and header-rewriting
    middlewares do."""

    def __init__(self, wsgi_app):
        self.wsgi_app = wsgi_app
        self.calls = 0

    def __call__(self, environ, start_response):
        self.calls += 1
        return self.wsgi_app(dict(environ), start_response)


@pytest.fixture
def app(backend):
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="test-secret-key",
        TESTING=True,
        SQLALCHEMY_DATABASE_URI=backend.url("primary"),
        SQLALCHEMY_BINDS={"master": backend.url("primary"), "slave": backend.url("replica")},
        REPLICATED_STICKY_MODE="time",
    )
    db = SQLAlchemy(app)
    app.wsgi_app = middleware = CopyingMiddleware(app.wsgi_app)
    FlaskReplicated(app)

    @app.route("/who", methods=["GET", "POST"])
    def who():
        if request.method == "POST":
            db.session.execute(sa.text("INSERT INTO items (name) VALUES ('inner')"))
            db.session.commit()
        return backend.who(db.session)

    @app.get("/write")
    def write():
        db.session.execute(sa.text("INSERT INTO items (name) VALUES ('from a GET')"))
        return "wrote"

    yield app
    assert middleware.calls > 0
    for engine in db._app_engines[app].values():
        engine.dispose()


def test_reads_go_to_the_replica(app):
    router = app.extensions["replicated"].router(app)
    assert app.test_client().get("/who").text == "replica"
    assert router.metrics().get("requests_to_replica") == 1


def test_a_write_in_a_get_is_refused(app):
    with pytest.raises(ReplicaWriteError) as raised:
        app.test_client().get("/write")
    assert str(raised.value) == (
        "The view 'write' wrote to the database during a GET request, which is routed to "
        "a replica. Decorate it with '@changes_database' or wrap the write in 'use_primary()'."
    )


def test_the_writer_reads_its_write_from_the_primary(app):
    writer, other = app.test_client(), app.test_client()
    assert writer.post("/who").text == "primary"
    assert writer.get_cookie(COOKIE) is not None
    assert writer.get("/who").text == "primary"
    assert other.get("/who").text == "replica"
