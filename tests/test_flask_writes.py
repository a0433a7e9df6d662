"""Writes routed to a replica fail with ReplicaWriteError before reaching the server."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from flask_replicated import ReplicaWriteError, use_primary, use_replica

VIEW_MESSAGE = (
    "The view 'write' wrote to the database during a GET request, which is routed to a "
    "replica. Decorate it with '@changes_database' or wrap the write in 'use_primary()'."
)


def _on_engine(engine, sql):
    with engine.connect() as conn:
        conn.execute(sa.text(sql))


def _writes(app):
    db, Item = app.db, app.Item
    items = Item.__table__
    return {
        "orm flush": lambda: (db.session.add(Item(name="never-written")), db.session.flush()),
        "core insert": lambda: db.session.execute(sa.insert(items).values(name="never-written")),
        "core update": lambda: db.session.execute(sa.update(items).values(name="never-written")),
        "core delete": lambda: db.session.execute(sa.delete(items).where(items.c.id == -1)),
        "bulk query update": lambda: Item.query.filter_by(id=-1).update({"name": "y"}),
        "bulk query delete": lambda: Item.query.filter_by(id=-1).delete(),
        "text insert": lambda: db.session.execute(
            sa.text("INSERT INTO items (name) VALUES ('never-written')")
        ),
        "text update": lambda: db.session.execute(
            sa.text("UPDATE items SET name = 'never-written'")
        ),
        "text delete": lambda: db.session.execute(sa.text("DELETE FROM items")),
        "create": lambda: db.session.execute(sa.text("CREATE TABLE never (id int)")),
        "alter": lambda: db.session.execute(sa.text("ALTER TABLE items ADD COLUMN never int")),
        "drop": lambda: db.session.execute(sa.text("DROP TABLE items")),
        "engine insert": lambda: _on_engine(
            db.engine, "INSERT INTO items (name) VALUES ('never-written')"
        ),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "orm flush",
        "core insert",
        "core update",
        "core delete",
        "bulk query update",
        "bulk query delete",
        "text insert",
        "text update",
        "text delete",
        "create",
        "alter",
        "drop",
        "engine insert",
    ],
)
def test_a_write_in_a_get_is_refused_before_it_is_sent(flask_app, kind):
    """No server error is chained: the guard raised before the statement left."""
    do_write = _writes(flask_app)[kind]

    @flask_app.get("/write")
    def write():
        do_write()
        return ""

    with pytest.raises(ReplicaWriteError) as caught:
        flask_app.test_client().get("/write")
    assert str(caught.value) == VIEW_MESSAGE
    assert caught.value.__cause__ is None
    with flask_app.app_context():
        names = flask_app.db.session.scalars(sa.text("SELECT name FROM items")).all()
    assert "never-written" not in names


def test_select_for_update_is_a_write(pg_flask_app):
    app = pg_flask_app

    @app.get("/lock")
    def lock():
        app.db.session.execute(sa.select(app.Item).with_for_update())
        return ""

    with pytest.raises(ReplicaWriteError) as caught:
        app.test_client().get("/lock")
    assert str(caught.value) == VIEW_MESSAGE.replace("'write'", "'lock'")
    assert caught.value.__cause__ is None


def test_the_standbys_own_refusal_becomes_the_same_error(pg_flask_app):
    """nextval() reads like a SELECT but writes; the standby refuses it with 25006."""
    app = pg_flask_app

    @app.get("/nextval")
    def nextval():
        app.db.session.execute(sa.text("SELECT nextval('items_id_seq')"))
        return ""

    with pytest.raises(ReplicaWriteError) as caught:
        app.test_client().get("/nextval")
    assert str(caught.value) == VIEW_MESSAGE.replace("'write'", "'nextval'")
    assert getattr(caught.value.__cause__, "sqlstate", None) == "25006"


def test_write_inside_use_replica_names_the_block(flask_app):
    with flask_app.app_context(), use_replica(), pytest.raises(ReplicaWriteError) as caught:
        flask_app.db.session.execute(sa.text("DELETE FROM items WHERE id = -1"))
    assert str(caught.value) == (
        "A write was sent to the replica 'slave' inside 'use_replica()'. Move the write "
        "out of the 'use_replica()' block or wrap it in 'use_primary()'."
    )


def test_use_primary_lets_a_get_write_and_then_read_its_write(flask_app):
    db, Item, backend = flask_app.db, flask_app.Item, flask_app.backend

    @flask_app.get("/signup")
    def signup():
        with use_primary():
            db.session.add(Item(name="signed-up"))
            db.session.commit()
        found = db.session.scalar(sa.select(sa.func.count()).where(Item.name == "signed-up"))
        return {"found": found >= 1, "node": backend.who(db.session)}

    response = flask_app.test_client().get("/signup")
    assert response.json == {"found": True, "node": "primary"}
    assert "replicated_sticky=" in response.headers["Set-Cookie"]
