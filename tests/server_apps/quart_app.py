"""The Quart app hypercorn serves in tests/test_servers.py (``quart_app:app``): the
same views as flask_app.py."""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa
from quart import Quart, request
from server_settings import WHO_SQL, ReadCounter, load, served_by
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from quart_replicated import QuartReplicated

settings = load()
urls = settings["async_urls"]
app = Quart(__name__)
app.config.update(
    # The same key in every worker: each one must accept the others' sticky cookies.
    SECRET_KEY=settings["secret_key"],
    SQLALCHEMY_DATABASE_URI=urls["primary"],
    SQLALCHEMY_BINDS={"master": urls["primary"], **{r: urls[r] for r in settings["replicas"]}},
    REPLICATED_REPLICA_BINDS=settings["replicas"],
    **settings["config"],
)
rep = QuartReplicated(app)
reads = ReadCounter()


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "server_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    token: Mapped[str] = mapped_column(sa.String(64))


@app.get("/health")
async def health() -> Any:
    # The worker's routing counters too, for benchmarks/after_write.py.
    return {"pid": os.getpid(), "counters": rep.counters()}


@app.post("/items")
async def write() -> Any:
    form = await request.form
    item = Item(token=form["token"])
    rep.session.add(item)
    await rep.session.flush()
    item_id = item.id
    await rep.session.commit()
    return {"id": item_id, "pid": os.getpid()}, 201


@app.get("/items/<int:item_id>")
async def read(item_id: int) -> Any:
    token = await rep.session.scalar(sa.select(Item.token).where(Item.id == item_id))
    port, in_recovery = (await rep.session.execute(sa.text(WHO_SQL))).one()
    body = {"id": item_id, "token": token, **served_by(port, in_recovery, reads.next())}
    return body, 200 if token is not None else 404
