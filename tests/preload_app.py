"""A Flask app for real pre-forking servers: it reads through the router at import
(as apps that warm caches or check their schema do), then the server forks it.

Configured from the environment: PRELOAD_PRIMARY_URL, PRELOAD_R1_URL,
PRELOAD_R2_URL, and optionally PRELOAD_CONNECT_TIMEOUT (seconds).
"""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa
from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy

from flask_replicated import FlaskReplicated, use_replica

HEADER = "X-Served-By"

app = Flask(__name__)
app.config.update(
    SECRET_KEY="one-key-for-every-worker",
    SQLALCHEMY_DATABASE_URI=os.environ["PRELOAD_PRIMARY_URL"],
    SQLALCHEMY_BINDS={
        "master": os.environ["PRELOAD_PRIMARY_URL"],
        "r1": os.environ["PRELOAD_R1_URL"],
        "r2": os.environ["PRELOAD_R2_URL"],
    },
    REPLICATED_REPLICA_BINDS=["r1", "r2"],
    REPLICATED_DEBUG_HEADER=HEADER,
    REPLICATED_CONNECT_TIMEOUT=float(os.environ.get("PRELOAD_CONNECT_TIMEOUT", "2")),
)
db = SQLAlchemy(app)


class Item(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "items"
    id = sa.Column(sa.Integer, primary_key=True)
    name = sa.Column(sa.String(200), nullable=False)


FlaskReplicated(app)

# At import, before the fork: the primary's pool and both replicas' pools get a
# connection each, and the router's prober starts.
with app.app_context():
    db.session.execute(sa.text("SELECT count(*) FROM items")).scalar()
    for _ in range(4):
        with use_replica():
            db.session.execute(sa.text("SELECT 1")).scalar()
    db.session.remove()


@app.post("/items")
def create() -> Any:
    item = Item(name=request.form["name"])
    db.session.add(item)
    db.session.commit()
    return {"id": item.id}, 201, {"X-Worker": str(os.getpid())}


@app.get("/items/<int:item_id>")
def read(item_id: int) -> Any:
    item = db.session.get(Item, item_id)
    return {"name": item.name if item else None}, 200, {"X-Worker": str(os.getpid())}


@app.get("/who")
def who() -> Any:
    port = db.session.execute(sa.text("SELECT inet_server_port()")).scalar()
    return {"port": port}, 200, {"X-Worker": str(os.getpid())}
