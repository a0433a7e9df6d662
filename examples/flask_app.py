"""The demo app, Flask flavour: a list of items and a form that adds one."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from flask import Flask, redirect, request
from flask_sqlalchemy import SQLAlchemy

from flask_replicated import FlaskReplicated

from .page import render_page


def create_app(primary_url: str, replica_url: str, note: str = "") -> Flask:
    """A Flask app whose reads go to ``replica_url`` and writes to ``primary_url``."""
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="demo-only-secret",
        SQLALCHEMY_DATABASE_URI=primary_url,
        SQLALCHEMY_BINDS={"master": primary_url, "slave": replica_url},
    )
    db = SQLAlchemy(app)

    class Item(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "items"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(sa.String(200), nullable=False)

    rep = FlaskReplicated(app)

    @app.get("/")
    def index() -> Any:
        names = list(db.session.scalars(sa.select(Item.name).order_by(Item.id)))
        return render_page(rep.router(), names, note)

    @app.post("/items")
    def add() -> Any:
        db.session.add(Item(name=request.form["name"][:200]))
        db.session.commit()
        return redirect("/", code=303)

    return app
