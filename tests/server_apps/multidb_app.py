"""The Flask app gunicorn serves in tests/test_databases.py (``multidb_app:app``): two
routed databases, 'app' (no bind key) and 'second' (``__bind_key__``).

``POST /write/<a or b>`` inserts a row named by the client; ``GET /read/<a or b>/<name>``
says whether that database's read sees it, and who answered on each database, asked of
the connections that served the reads.
"""

from __future__ import annotations

import json
import os
from typing import Any

import sqlalchemy as sa
from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy

from flask_replicated import FlaskReplicated

WHO_SQL = "SELECT inet_server_port(), pg_is_in_recovery()"

settings: dict[str, Any] = json.loads(os.environ["MULTIDB_SETTINGS"])
labels: dict[str, str] = settings["labels"]
app = Flask(__name__)
app.config.update(settings["config"])
db = SQLAlchemy(app)


class A(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "multi_items"
    id = sa.Column(sa.Integer, primary_key=True)
    name = sa.Column(sa.String(64), nullable=False)


class B(db.Model):  # type: ignore[name-defined,misc]
    __bind_key__ = "second"
    __tablename__ = "multi_items"
    id = sa.Column(sa.Integer, primary_key=True)
    name = sa.Column(sa.String(64), nullable=False)


FlaskReplicated(app)
MODELS = {"a": A, "b": B}


def who(model: Any) -> str:
    port, in_recovery = db.session.execute(sa.text(WHO_SQL), bind_arguments={"mapper": model}).one()
    label = labels[str(port)]
    if in_recovery is not (label != "primary"):
        raise RuntimeError(f"{label} says in_recovery={in_recovery}")
    return label


@app.get("/health")
def health() -> Any:
    return {"pid": os.getpid()}


@app.post("/write/<which>")
def write(which: str) -> Any:
    db.session.add(MODELS[which](name=request.form["name"]))
    db.session.commit()
    return {"pid": os.getpid()}


@app.get("/read/<which>/<name>")
def read(which: str, name: str) -> Any:
    model = MODELS[which]
    seen = db.session.scalar(sa.select(sa.func.count()).where(model.name == name))
    return {"seen": bool(seen), "a": who(A), "b": who(B), "pid": os.getpid()}
