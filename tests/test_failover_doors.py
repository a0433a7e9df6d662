"""Every way the ORM reads fails over when the replica cannot be reached.

The replica is a SQLite file in a directory that does not exist, so every connect to
it fails for real; the first statement of each request must then be retried on the
primary, whichever session method ran it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import sqlalchemy as sa
from support import make_flask_app, make_quart_app, sqlite_backend

from replicated_core import use_primary, use_replica
from replicated_core.rules import Reason


@pytest.fixture
def broken(tmp_path):
    """A SQLite backend whose "replica" cannot be opened."""
    backend = sqlite_backend(tmp_path)
    gone = tmp_path / "no-such-dir" / "replica.sqlite3"
    return replace(
        backend,
        urls={**backend.urls, "replica": f"sqlite:///{gone}"},
        async_urls={**backend.async_urls, "replica": f"sqlite+aiosqlite:///{gone}"},
    )


FLASK_DOORS = {
    "execute": lambda db, Item: db.session.execute(sa.select(Item.name)).all(),
    "scalars": lambda db, Item: db.session.scalars(sa.select(Item.name)).all(),
    "scalar": lambda db, Item: db.session.scalar(sa.select(sa.func.count(Item.id))),
    "get": lambda db, Item: db.session.get(Item, 1),
    "query": lambda db, Item: Item.query.all(),
}


@pytest.mark.parametrize("door", sorted(FLASK_DOORS))
def test_flask_reads_fail_over_through_every_door(broken, door):
    app = make_flask_app(broken)
    router = app.extensions["replicated"].router(app)
    seen = []

    @app.get("/door")
    def read():
        FLASK_DOORS[door](app.db, app.Item)
        seen.append(router.requests.current_decision().reason)
        return broken.who(app.db.session)

    response = app.test_client().get("/door")
    assert response.status_code == 200
    assert response.text == "primary"
    assert seen == [Reason.FAILOVER]
    assert router.metrics()["retries"] == 1
    assert not router.health.usable("slave")


def test_flask_a_failure_after_the_first_statement_is_not_retried(broken):
    """Once a transaction has run a statement, rolling back would lose it: the error
    reaches the view."""
    app = make_flask_app(broken)
    router = app.extensions["replicated"].router(app)

    @app.post("/late")
    def late():
        with use_primary():
            app.db.session.execute(sa.text("SELECT 1"))
        with use_replica():
            try:
                app.db.session.execute(sa.text("SELECT 1"))
            except sa.exc.OperationalError:
                return "raised"
        return "no error"

    with app.test_client() as client:
        assert client.post("/late").text == "raised"
    assert router.metrics().get("retries", 0) == 0


QUART_DOORS = {
    "execute": lambda s, Item: s.execute(sa.select(Item.name)),
    "scalars": lambda s, Item: s.scalars(sa.select(Item.name)),
    "scalar": lambda s, Item: s.scalar(sa.select(sa.func.count(Item.id))),
    "get": lambda s, Item: s.get(Item, 1),
    "stream": lambda s, Item: s.stream(sa.select(Item.name)),
}


@pytest.mark.parametrize("door", sorted(QUART_DOORS))
async def test_quart_reads_fail_over_through_every_door(broken, door):
    app = make_quart_app(broken)
    router = app.rep.router(app)
    seen = []

    @app.get("/door")
    async def read():
        result = await QUART_DOORS[door](app.rep.session, app.Item)
        if door == "stream":
            await result.all()
        seen.append(router.requests.current_decision().reason)
        return broken.label((await app.rep.session.execute(sa.text(broken.who_sql))).scalar())

    async with app.test_app():
        response = await app.test_client().get("/door")
        text = await response.get_data(as_text=True)
    assert app.errors == []
    assert response.status_code == 200
    assert text == "primary"
    assert seen == [Reason.FAILOVER]
    assert router.metrics()["retries"] == 1
    assert not router.health.usable("slave")


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_no_retry_when_the_replica_was_chosen_by_the_view(broken, method):
    """A statement the view binds to a replica itself (``bind_arguments``) gets its
    error after one attempt, whether the request writes (POST) or reads from that
    same replica (GET): rerouting cannot move the statement, so a retry would only
    wait for the failing replica a second time."""
    app = make_flask_app(broken)
    router = app.extensions["replicated"].router(app)
    attempts = []
    with app.app_context():
        replica = app.db.engines["slave"]
    sa.event.listen(replica, "do_connect", lambda *args: attempts.append(1))

    @app.route("/pinned", methods=["GET", "POST"])
    def pinned():
        query = sa.select(app.Item.name)
        try:
            app.db.session.execute(query, bind_arguments={"bind": replica}).all()
        except sa.exc.OperationalError:
            return "raised"
        return "no error"

    assert app.test_client().open("/pinned", method=method).text == "raised"
    assert attempts == [1]
    assert router.metrics().get("retries", 0) == 0


def test_no_retry_after_an_object_is_added(broken):
    """``session.add`` begins the session's transaction: the read that follows is not
    its first statement, so a failing replica's error reaches the view and the new
    object is not silently dropped by a rollback."""
    app = make_flask_app(broken)
    router = app.extensions["replicated"].router(app)

    @app.get("/add")
    def add():
        app.db.session.add(app.Item(name="added"))
        with app.db.session.no_autoflush:
            try:
                app.db.session.execute(sa.select(app.Item.name)).all()
            except sa.exc.OperationalError:
                return f"raised, {len(app.db.session.new)} pending"
        return "no error"

    assert app.test_client().get("/add").text == "raised, 1 pending"
    assert router.metrics().get("retries", 0) == 0


def test_no_retry_when_a_change_is_pending(broken, tmp_path):
    """A change to an object (here on another bind) begins the session's transaction,
    so the next read is not the first statement: if the replica fails, rolling back
    would drop the change, and the error reaches the view instead of a retry."""
    other = tmp_path / "other.sqlite3"
    engine = sa.create_engine(f"sqlite:///{other}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"))
        conn.execute(sa.text("INSERT INTO notes (id, body) VALUES (1, 'before')"))
    app = make_flask_app(
        broken,
        SQLALCHEMY_BINDS={
            "master": broken.url("primary"),
            "slave": broken.url("replica"),
            "other": f"sqlite:///{other}",
        },
    )
    db = app.db

    class Note(db.Model):
        __bind_key__ = "other"
        __tablename__ = "notes"
        id = sa.Column(sa.Integer, primary_key=True)
        body = sa.Column(sa.Text)

    @app.get("/note")
    def note():
        row = db.session.get(Note, 1)
        db.session.commit()
        row.body = "after"  # loads the expired row: the transaction begins
        db.session.execute(sa.select(app.Item.name)).all()  # autoflush, then the replica
        db.session.commit()
        return "committed"

    app.config["PROPAGATE_EXCEPTIONS"] = True
    with pytest.raises(sa.exc.OperationalError):
        app.test_client().get("/note")
    router = app.extensions["replicated"].router(app)
    assert router.metrics().get("retries", 0) == 0
    with engine.connect() as conn:  # the flushed change was rolled back, visibly
        assert conn.execute(sa.text("SELECT body FROM notes")).scalar() == "before"
    engine.dispose()


def shape(function):
    """Name, kind and default of each parameter after ``self``, of ``function`` itself
    (not of what it wraps, which ``inspect.signature`` follows by default)."""
    import inspect

    parameters = inspect.signature(function, follow_wrapped=False).parameters
    return [(p.name, p.kind, p.default) for p in list(parameters.values())[1:]]


def test_execute_is_wrapped_with_its_own_parameters():
    """With the installed SQLAlchemy the retrying ``execute`` has Session.execute's
    own parameters (no ``**kwargs`` dict per statement); ``scalar`` and ``scalars``
    get the generic wrapper. Both still run statements."""
    from sqlalchemy.orm import Session

    from replicated_core.failover import with_failover

    routed = with_failover(Session, lambda session: None)
    assert routed.execute is not Session.execute
    assert shape(routed.execute) == shape(Session.execute)
    assert [kind.name for _, kind, _ in shape(routed.scalar)] == ["VAR_POSITIONAL", "VAR_KEYWORD"]
    with routed(sa.create_engine("sqlite://")) as session:
        assert session.execute(sa.text("SELECT 1")).scalar() == 1
        assert session.execute(sa.text("SELECT :x"), {"x": 2}).scalar() == 2
        assert session.scalar(sa.text("SELECT 3")) == 3


def test_an_execute_with_other_parameters_gets_the_generic_wrapper():
    """A session class whose ``execute`` differs from the one the fast wrapper spells
    out (here a default) is wrapped generically, so no argument is changed."""
    from sqlalchemy.orm import Session

    from replicated_core.failover import with_failover

    seen = []

    class Custom(Session):
        def execute(
            self,
            statement,
            params=None,
            *,
            execution_options=None,
            bind_arguments=None,
            _parent_execute_state=None,
            _add_event="mine",
        ):
            seen.append(_add_event)
            return super().execute(statement, params, execution_options=execution_options or {})

    routed = with_failover(Custom, lambda session: None)
    assert [kind.name for _, kind, _ in shape(routed.execute)] == ["VAR_POSITIONAL", "VAR_KEYWORD"]
    with routed(sa.create_engine("sqlite://")) as session:
        assert session.execute(sa.text("SELECT 1")).scalar() == 1
    assert seen == ["mine"]
