"""What the Flask adapter's WSGI middleware promises: the scope spans the whole
request, hooks included; the decision waits for the first use of the database; the
cookie is set as the response starts, after every after_request hook."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from flask import Response, request, stream_with_context

from replicated_core import use_replica

COOKIE = "replicated_sticky"


def test_a_write_in_an_after_request_hook_still_sets_the_cookie(flask_app_factory):
    app = flask_app_factory(REPLICATED_STICKY_MODE="time")

    @app.post("/quiet")
    def quiet():
        return "no write here"

    @app.after_request
    def audit(response):
        if request.endpoint == "quiet":
            app.db.session.add(app.Item(name="audit"))
            app.db.session.commit()
        return response

    client = app.test_client()
    client.post("/quiet")
    assert client.get_cookie(COOKIE) is not None
    assert client.get("/who").text == "primary"


def test_a_request_that_never_queries_is_counted_but_not_decided(flask_app_factory):
    app = flask_app_factory()
    router = app.extensions["replicated"].router(app)

    @app.get("/static-ish")
    def static_ish():
        return "no database"

    before = router.metrics()
    app.test_client().get("/static-ish")
    after = router.metrics()
    assert after.get("requests_total", 0) == before.get("requests_total", 0) + 1
    assert after.get("requests_to_replica", 0) == before.get("requests_to_replica", 0)


def test_the_decision_is_made_in_a_before_request_hook_when_it_queries_first(
    flask_app_factory,
):
    app = flask_app_factory(REPLICATED_DEBUG_HEADER="X-Served-By")
    seen = []

    @app.before_request
    def load_user():
        seen.append(app.backend.who(app.db.session))

    response = app.test_client().get("/who")
    assert seen == ["replica"]
    assert response.text == "replica"
    assert response.headers["X-Served-By"] == "slave"


def test_a_streamed_body_reads_from_the_primary_unless_told(flask_app_factory):
    """The scope closes when the view has returned; a body generated later (with
    stream_with_context) routes like code outside a request, and use_replica()
    brings it back to a replica."""
    app = flask_app_factory()

    @app.get("/stream")
    def stream():
        def rows():
            yield app.backend.who(app.db.session) + ","
            with use_replica():
                app.db.session.rollback()  # a new transaction, on the block's node
                yield app.backend.who(app.db.session)

        return Response(stream_with_context(rows()))

    assert app.test_client().get("/stream").text == "primary,replica"


def test_an_exception_in_the_view_closes_the_scope(flask_app_factory):
    app = flask_app_factory()
    app.config["PROPAGATE_EXCEPTIONS"] = True
    router = app.extensions["replicated"].router(app)

    @app.get("/boom")
    def boom():
        app.db.session.execute(sa.text("SELECT 1"))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        app.test_client().get("/boom")
    assert router.requests.scope() is None
    with app.app_context():
        assert app.backend.who(app.db.session) == "primary"


def test_a_query_before_the_url_is_matched_waits_for_the_view(flask_app_factory):
    """A URL converter (or a server-side session store) queries before Flask knows
    the view: that statement goes to the primary and the request is decided after
    the match, so a @changes_database view still gets the primary throughout."""
    from werkzeug.routing import BaseConverter

    from flask_replicated import changes_database

    app = flask_app_factory()
    seen = []

    class Checked(BaseConverter):
        def to_python(self, value):
            seen.append(("converter", app.backend.who(app.db.session)))
            app.db.session.rollback()
            return value

    app.url_map.converters["checked"] = Checked

    @app.get("/forced/<checked:name>")
    @changes_database
    def forced_view(name):
        return app.backend.who(app.db.session)

    @app.before_request
    def hook():
        if request.endpoint == "forced_view":
            seen.append(("hook", app.backend.who(app.db.session)))

    assert app.test_client().get("/forced/x").text == "primary"
    assert seen == [("converter", "primary"), ("hook", "primary")]


def test_a_query_in_an_inner_middleware_does_not_lose_the_cookie(flask_app_factory):
    """An inner WSGI middleware that queries before Flask made its request sends that
    statement to the primary without closing the scope: the POST's write still sets
    the cookie."""
    app = flask_app_factory(REPLICATED_STICKY_MODE="time")
    flask_wsgi = type(app).wsgi_app.__get__(app)
    seen = []

    def api_key_check(environ, start_response):
        with app.app_context():
            seen.append(app.backend.who(app.db.session))
        return flask_wsgi(environ, start_response)

    # As if api_key_check had wrapped app.wsgi_app before FlaskReplicated(app).
    serve = app.wsgi_app
    cell = serve.__code__.co_freevars.index("wsgi_app")
    serve.__closure__[cell].cell_contents = api_key_check
    client = app.test_client()
    client.post("/items", data={"name": "x"})
    assert seen == ["primary"]
    assert client.get_cookie(COOKIE) is not None


def test_threads_sharing_a_request_agree_on_its_replica(flask_app_factory, backend):
    """Threads started with a copy of the request's context may make its first
    statement at the same time: one decides, all use the same replica."""
    import contextvars
    import threading

    app = flask_app_factory(replica=["replica", "lagging"])
    router = app.extensions["replicated"].router(app)

    @app.get("/fan-out")
    def fan_out():
        barrier = threading.Barrier(8)
        nodes, errors = [], []

        def first_statement():
            barrier.wait()
            try:
                nodes.append(router.node().name)
            except Exception as error:
                errors.append(error)

        threads = [
            threading.Thread(target=contextvars.copy_context().run, args=(first_statement,))
            for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert len(set(nodes)) == 1
        assert nodes[0] == router.requests.current_decision().node.name
        return nodes[0]

    for _ in range(20):
        response = app.test_client().get("/fan-out")
        assert response.status_code == 200
        assert response.text in {"replica", "lagging"}
