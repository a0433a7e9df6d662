"""The Flask app gunicorn serves in tests/test_servers.py (``flask_app:app``).

``POST /items`` inserts a row with the client's token and answers its id;
``GET /items/<id>`` reads it back (404 when the row is not there: a stale read) and
says which server answered, asked of the connection that served the read.
With ``query_at_import`` the module queries the database while it is imported, as apps
that warm a cache or check their schema do: under ``gunicorn --preload`` that happens
in the master, before the workers are forked.
"""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa
from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from server_settings import WHO_SQL, ReadCounter, load, served_by

from flask_replicated import FlaskReplicated, use_replica

settings = load()
urls = settings["urls"]
app = Flask(__name__)
app.config.update(
    # The same key in every worker: each one must accept the others' sticky cookies.
    SECRET_KEY=settings["secret_key"],
    SQLALCHEMY_DATABASE_URI=urls["primary"],
    SQLALCHEMY_BINDS={"master": urls["primary"], **{r: urls[r] for r in settings["replicas"]}},
    REPLICATED_REPLICA_BINDS=settings["replicas"],
    **settings["config"],
)
db = SQLAlchemy(app)


class Item(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "server_items"
    id = sa.Column(sa.Integer, primary_key=True)
    token = sa.Column(sa.String(64), nullable=False)


FlaskReplicated(app)
reads = ReadCounter()

if settings["query_at_import"]:
    # Through the router: the primary (outside a request) and a replica, so that the
    # pools of both hold a connection when gunicorn forks.
    with app.app_context():
        ROWS_AT_IMPORT = db.session.scalar(sa.select(sa.func.count()).select_from(Item))
        with use_replica():
            db.session.scalar(sa.select(sa.func.count()).select_from(Item))


@app.get("/health")
def health() -> Any:
    # The worker's routing counters too, for benchmarks/after_write.py.
    return {"pid": os.getpid(), "counters": app.extensions["replicated"].counters(app)}


@app.post("/items")
def write() -> Any:
    item = Item(token=request.form["token"])
    db.session.add(item)
    db.session.flush()
    item_id = item.id
    db.session.commit()
    return {"id": item_id, "pid": os.getpid()}, 201


@app.get("/items/<int:item_id>")
def read(item_id: int) -> Any:
    token = db.session.scalar(sa.select(Item.token).where(Item.id == item_id))
    port, in_recovery = db.session.execute(sa.text(WHO_SQL)).one()
    body = {"id": item_id, "token": token, **served_by(port, in_recovery, reads.next())}
    return body, 200 if token is not None else 404


@app.get("/write-in-get")
def write_in_get() -> Any:
    # A GET that writes: routed to a replica, the guard refuses it (tests/test_ha.py).
    db.session.add(Item(token=request.args["token"]))
    db.session.commit()
    return {}, 201
