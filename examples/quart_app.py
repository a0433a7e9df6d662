"""The demo app, Quart flavour: a list of items and a form that adds one."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from quart import Quart, redirect, request
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from quart_replicated import QuartReplicated

from .page import render_page


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))


def create_app(primary_url: str, replica_url: str, note: str = "") -> Quart:
    """A Quart app whose reads go to ``replica_url`` and writes to ``primary_url``."""
    app = Quart(__name__)
    app.config.update(
        SECRET_KEY="demo-only-secret",
        SQLALCHEMY_DATABASE_URI=primary_url,
        SQLALCHEMY_BINDS={"master": primary_url, "slave": replica_url},
    )
    rep = QuartReplicated(app)

    @app.get("/")
    async def index() -> Any:
        names = list(await rep.session.scalars(sa.select(Item.name).order_by(Item.id)))
        return render_page(rep.router(), names, note)

    @app.post("/items")
    async def add() -> Any:
        form = await request.form
        rep.session.add(Item(name=form["name"][:200]))
        await rep.session.commit()
        return redirect("/", code=303)

    return app
