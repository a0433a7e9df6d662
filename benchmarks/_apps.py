"""The apps under test: the same views with and without the router, Flask and Quart.

Views: ``GET /items/<id>`` runs one SELECT by primary key (404 when absent, which is
how a client notices a stale read of its own write); ``POST /items`` runs one INSERT
and a commit and answers the new id.
"""

from __future__ import annotations

import itertools
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from flask import Flask
    from quart import Quart
    from sqlalchemy.engine import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

SECRET_KEY = "benchmark-secret-key"
DEBUG_HEADER = "X-Served-By"
_folders = itertools.count()


class Base(DeclarativeBase):
    pass


class Item(Base):
    """The Quart apps' model (the Flask apps declare theirs on ``db.Model``)."""

    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))


def sqlite_files(folder: Path, names: Sequence[str], rows: int) -> dict[str, Path]:
    """SQLite files with the same ``items`` rows: the first is the primary.

    WAL journal (kept in the file) and, per connection, ``synchronous=OFF`` (see
    ``fast_sqlite``): neither commits nor checkpoints wait for the disk, so the
    router's own cost is not hidden behind disk noise.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.sqlite3" for name in names}
    first = paths[names[0]]
    engine = sa.create_engine(f"sqlite:///{first}")
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        conn.exec_driver_sql(
            "CREATE TABLE items (id INTEGER PRIMARY KEY, name VARCHAR(200) NOT NULL)"
        )
        conn.execute(
            sa.text("INSERT INTO items (name) VALUES (:name)"),
            [{"name": f"seed-{n}"} for n in range(rows)],
        )
    engine.dispose()
    for name in names[1:]:
        shutil.copyfile(first, paths[name])
    return paths


def sqlite_urls(
    folder: Path, names: Sequence[str], rows: int, driver: str = "sqlite"
) -> dict[str, str]:
    """``sqlite_files`` in a new subfolder of ``folder`` (one per app: apps never
    share a file), as URLs for ``driver`` ("sqlite" or "sqlite+aiosqlite")."""
    paths = sqlite_files(folder / f"app{next(_folders)}", names, rows)
    return {name: f"{driver}:///{path}" for name, path in paths.items()}


def fast_sqlite(engines: Sequence[Engine]) -> None:
    """``PRAGMA synchronous=OFF`` on every new connection of SQLite ``engines``."""

    def pragmas(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA synchronous=OFF")
        cursor.close()

    for engine in engines:
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", pragmas)


# -- Flask ---------------------------------------------------------------------------


@dataclass
class FlaskBench:
    app: Flask
    engines: list[Engine]
    db: Any

    def dispose(self) -> None:
        replicated = self.app.extensions.get("replicated")
        if replicated is not None:
            replicated.router(self.app).close()  # its prober: no checks in the next run
        for engine in self.engines:
            engine.dispose()


def flask_app(
    primary_url: str,
    replica_urls: dict[str, str],
    *,
    replicated: bool,
    engine_options: dict[str, Any] | None = None,
    **config: Any,
) -> FlaskBench:
    """The Flask app, with ``FlaskReplicated`` or on plain Flask-SQLAlchemy.

    Both get the same binds (primary and replicas); without the router everything
    runs on ``SQLALCHEMY_DATABASE_URI``, the primary.
    """
    from flask import Flask, request
    from flask_sqlalchemy import SQLAlchemy

    from flask_replicated import FlaskReplicated

    app = Flask("bench")
    app.config.update(
        SECRET_KEY=SECRET_KEY,
        SQLALCHEMY_DATABASE_URI=primary_url,
        SQLALCHEMY_BINDS={"master": primary_url, **replica_urls},
        SQLALCHEMY_ENGINE_OPTIONS=engine_options or {},
    )
    db = SQLAlchemy(app)

    class FlaskItem(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "items"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(sa.String(200), nullable=False)

    if replicated:
        app.config["REPLICATED_REPLICA_BINDS"] = list(replica_urls)
        app.config.update(config)
        FlaskReplicated(app)

    @app.get("/items/<int:item_id>")
    def read(item_id: int) -> Any:
        query: Any = sa.select(FlaskItem.name).where(FlaskItem.id == item_id)
        name = db.session.execute(query).scalar_one_or_none()
        return ("missing", 404) if name is None else name

    @app.post("/items")
    def write() -> Any:
        item = FlaskItem(name=request.form["name"])
        db.session.add(item)
        db.session.flush()
        item_id = item.id
        db.session.commit()
        return str(item_id), 201

    with app.app_context():
        engines: list[Engine] = list(db.engines.values())
    fast_sqlite(engines)
    return FlaskBench(app, engines, db)


# -- Quart ---------------------------------------------------------------------------


@dataclass
class QuartBench:
    app: Quart
    engines: list[AsyncEngine] = field(default_factory=list)

    async def dispose(self) -> None:
        replicated = self.app.extensions.get("replicated")
        if replicated is not None:
            await replicated.dispose(self.app)  # stops its prober, then the engines
        for engine in self.engines:
            await engine.dispose()


def quart_app(
    primary_url: str,
    replica_urls: dict[str, str],
    *,
    replicated: bool,
    engine_options: dict[str, Any] | None = None,
    **config: Any,
) -> QuartBench:
    """The Quart app, with ``QuartReplicated`` or a plain ``async_sessionmaker``.

    The plain one keeps one AsyncSession per app context, closed at teardown, the
    way ``QuartReplicated.session`` does, on the primary engine.
    """
    from quart import Quart, g, request
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from quart_replicated import QuartReplicated

    app = Quart("bench")
    app.config.update(SECRET_KEY=SECRET_KEY)
    bench = QuartBench(app)
    session: Callable[[], AsyncSession]
    if replicated:
        app.config.update(
            SQLALCHEMY_DATABASE_URI=primary_url,
            SQLALCHEMY_BINDS={"master": primary_url, **replica_urls},
            REPLICATED_REPLICA_BINDS=list(replica_urls),
            SQLALCHEMY_ENGINE_OPTIONS=engine_options or {},
        )
        app.config.update(config)
        rep = QuartReplicated(app)
        bench.engines = list(rep._state(app).engines.values())

        def session() -> AsyncSession:
            return rep.session
    else:
        engine = create_async_engine(primary_url, **(engine_options or {}))
        bench.engines = [engine]
        sessions = async_sessionmaker(engine, expire_on_commit=False)

        def session() -> AsyncSession:
            current: AsyncSession | None = g.get("_bench_session")
            if current is None:
                current = sessions()
                g._bench_session = current
            return current

        async def close(exc: BaseException | None) -> None:
            current: AsyncSession | None = g.pop("_bench_session", None)
            if current is not None:
                await current.close()

        app.teardown_appcontext(close)

    fast_sqlite([e.sync_engine for e in bench.engines])

    @app.get("/items/<int:item_id>")
    async def read(item_id: int) -> Any:
        query = sa.select(Item.name).where(Item.id == item_id)
        name = (await session().execute(query)).scalar_one_or_none()
        return ("missing", 404) if name is None else name

    @app.post("/items")
    async def write() -> Any:
        form = await request.form
        item = Item(name=form["name"])
        session().add(item)
        await session().flush()
        item_id = item.id
        await session().commit()
        return str(item_id), 201

    return bench
