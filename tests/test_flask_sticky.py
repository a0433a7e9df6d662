"""GET after POST: the signed sticky cookie keeps a writer on the primary, time mode."""

from __future__ import annotations

import logging
import time

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from itsdangerous import TimestampSigner

from flask_replicated import FlaskReplicated

COOKIE = "replicated_sticky"


@pytest.fixture
def app(flask_app_factory):
    return flask_app_factory(REPLICATED_STICKY_MODE="time")


def _sticky_cookie(response):
    headers = [h for h in response.headers.getlist("Set-Cookie") if h.startswith(COOKIE + "=")]
    assert len(headers) == 1
    return headers[0]


def test_a_writer_reads_from_the_primary_and_others_from_the_replica(app):
    writer, other = app.test_client(), app.test_client()
    response = writer.post("/items", data={"name": "sticky-1"})
    assert response.status_code == 303
    cookie = _sticky_cookie(response)
    assert "; HttpOnly" in cookie
    assert "; SameSite=Lax" in cookie
    assert "; Path=/" in cookie
    assert "; Max-Age=5" in cookie
    assert "Secure" not in cookie
    assert writer.get("/who").text == "primary"
    assert other.get("/who").text == "replica"


def test_the_cookie_is_secure_over_https_and_scoped_to_the_app_root(flask_app_factory):
    app = flask_app_factory(REPLICATED_STICKY_MODE="time", APPLICATION_ROOT="/shop")
    client = app.test_client()
    cookie = _sticky_cookie(client.post("/items", data={"name": "x"}, base_url="https://h/"))
    assert "; Secure" in cookie
    assert "; Path=/shop" in cookie


def test_a_request_that_did_not_write_sets_no_cookie(app):
    client = app.test_client()
    assert client.post("/who").text == "primary"
    assert client.get_cookie(COOKIE) is None
    assert client.get("/who").text == "replica"


def test_the_cookie_expires_after_the_sticky_seconds(flask_app_factory):
    app = flask_app_factory(REPLICATED_STICKY_MODE="time", REPLICATED_STICKY_SECONDS=1)
    client = app.test_client()
    client.post("/items", data={"name": "x"})
    value = client.get_cookie(COOKIE).value
    assert client.get("/who").text == "primary"
    time.sleep(2.05)  # a 1-second cookie lasts at least 1 s and less than 2 s
    # Sent again by hand: the server, not the browser's jar, enforces the age.
    client.set_cookie(COOKIE, value)
    assert client.get("/who").text == "replica"


def _signed(payload, secret="test-secret-key"):
    return TimestampSigner(secret, salt="replicated.sticky").sign(payload).decode()


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        "a" * 4000,
        "W251bGxd.invalid.signature",
        _signed("t", "another-apps-secret"),
        _signed('{"not": "a position"}'),
        _signed("-1"),
        _signed("0/16B3748"),
        _signed(format(2**80, "x")),
    ],
)
def test_a_bad_cookie_is_ignored(app, value):
    client = app.test_client()
    client.set_cookie(COOKIE, value)
    response = client.get("/who")
    assert response.status_code == 200
    assert response.text == "replica"


def test_a_cookie_stamped_in_the_future_is_ignored(app):
    class FutureSigner(TimestampSigner):
        def get_timestamp(self):
            return int(time.time()) + 60

    future = FutureSigner("test-secret-key", salt="replicated.sticky")
    client = app.test_client()
    client.set_cookie(COOKIE, future.sign("t").decode())
    assert client.get("/who").text == "replica"


def test_sticky_mode_off_sets_no_cookie(flask_app_factory):
    app = flask_app_factory(REPLICATED_STICKY_MODE="off")
    client = app.test_client()
    client.post("/items", data={"name": "x"})
    assert client.get_cookie(COOKIE) is None
    assert client.get("/who").text == "replica"


def test_without_a_secret_key_stickiness_is_off_and_said_once(backend, caplog):
    app = Flask(__name__)
    app.config.update(
        TESTING=True,
        SQLALCHEMY_DATABASE_URI=backend.url("primary"),
        SQLALCHEMY_BINDS={"master": backend.url("primary"), "slave": backend.url("replica")},
        REPLICATED_STICKY_MODE="time",
    )
    db = SQLAlchemy(app)
    with caplog.at_level(logging.WARNING, logger="replicated"):
        FlaskReplicated(app)

    @app.post("/write")
    def write():
        db.session.execute(db.text("INSERT INTO items (name) VALUES ('nokey')"))
        db.session.commit()
        return ""

    client = app.test_client()
    client.post("/write")
    client.post("/write")
    assert client.get_cookie(COOKIE) is None
    assert [r.getMessage() for r in caplog.records] == [
        "SECRET_KEY is not set, so the sticky cookie cannot be signed and is not used: "
        "after a write, a client's next requests read from replicas at once and may miss "
        "that write until the replicas catch up. Set SECRET_KEY to keep clients on the "
        "primary after their writes."
    ]
    with app.app_context():
        for engine in db.engines.values():
            engine.dispose()


def test_get_after_post_sees_the_write_despite_replica_lag(flask_app_factory):
    """The seed's open promise. With the lagging replica (500 ms apply delay on
    PostgreSQL, a file that never receives the row on SQLite), the redirected GET
    sees the new item only because the cookie sends it to the primary."""
    sticky = flask_app_factory(replica="lagging", REPLICATED_STICKY_MODE="time")
    plain = flask_app_factory(replica="lagging", REPLICATED_STICKY_MODE="off")
    for app, expected in ((sticky, True), (plain, False)):
        client = app.test_client()
        name = f"post-then-get-{expected}"
        response = client.post("/items", data={"name": name}, follow_redirects=True)
        assert (name in response.json["names"]) is expected
        assert response.json["node"] == ("primary" if expected else "lagging")
