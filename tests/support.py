"""Test apps and server identities shared by the adapter tests (not fixtures)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

SCHEMA = "CREATE TABLE items (id {pk}, name VARCHAR(200) NOT NULL)"


@dataclass
class Backend:
    """A primary and its replicas, with a way to ask a connection who it is."""

    name: str
    urls: dict[str, str]  # label ("primary", "replica", "lagging") -> sync URL
    async_urls: dict[str, str]
    who_sql: str
    identities: dict[str, str] = field(default_factory=dict)  # server identity -> label

    def label(self, identity: object) -> str:
        return self.identities[str(identity)]

    def who(self, conn: sa.Connection | Any) -> str:
        """Which node answered on ``conn`` (a Connection or Session)."""
        return self.label(conn.execute(sa.text(self.who_sql)).scalar())

    def who_engine(self, engine: sa.Engine) -> str:
        """Which node answers on a fresh connection of ``engine``."""
        with engine.connect() as conn:
            return self.who(conn)

    def url(self, label: str, *, asynchronous: bool = False) -> str:
        return (self.async_urls if asynchronous else self.urls)[label]


def sqlite_backend(folder: Path) -> Backend:
    """Three SQLite files posing as a primary and two replicas, with the same schema."""
    urls, async_urls, identities = {}, {}, {}
    for label in ("primary", "replica", "lagging"):
        path = folder / f"{label}.sqlite3"
        engine = sa.create_engine(f"sqlite:///{path}")
        with engine.begin() as conn:
            conn.execute(sa.text(SCHEMA.format(pk="INTEGER PRIMARY KEY")))
        engine.dispose()
        urls[label] = f"sqlite:///{path}"
        async_urls[label] = f"sqlite+aiosqlite:///{path}"
        identities[str(path)] = label
    return Backend(
        "sqlite",
        urls,
        async_urls,
        "SELECT file FROM pragma_database_list WHERE name = 'main'",
        identities,
    )


def pg_backend(cluster: Any) -> Backend:
    """The session's PostgreSQL cluster: ports tell the nodes apart."""
    nodes = {"primary": cluster.primary, **{n.name: n for n in cluster.replicas}}
    return Backend(
        "postgresql",
        {label: node.url("psycopg") for label, node in nodes.items()},
        {label: node.url("asyncpg") for label, node in nodes.items()},
        "SELECT inet_server_port()",
        {str(node.port): label for label, node in nodes.items()},
    )


def create_pg_schema(cluster: Any) -> None:
    """(Re)create the items table on the primary and wait until replicas have it."""
    engine = sa.create_engine(cluster.primary.url("psycopg"))
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS items"))
        conn.execute(sa.text(SCHEMA.format(pk="SERIAL PRIMARY KEY")))
    engine.dispose()
    cluster.wait_for_replay(include_delayed=True)


def make_flask_app(
    backend: Backend, replica: str | list[str] = "replica", name: str = __name__, **config: Any
) -> Any:
    """A Flask app with FlaskReplicated whose views report which node answered.

    ``name`` is the app's import name (its ``app.name``).

    ``app.db``, ``app.Item`` and ``app.backend`` are attached for the tests. The
    default replica list holds one bind named "slave", as in flask_replicated 1.1.
    """
    from flask import Flask, request
    from flask_sqlalchemy import SQLAlchemy

    from flask_replicated import FlaskReplicated, changes_database

    replicas = [replica] if isinstance(replica, str) else replica
    binds = {"master": backend.url("primary")}
    if len(replicas) == 1:
        binds["slave"] = backend.url(replicas[0])
    else:
        binds.update({label: backend.url(label) for label in replicas})
        config.setdefault("REPLICATED_REPLICA_BINDS", replicas)
    app = Flask(name)
    app.config.update(
        SECRET_KEY="test-secret-key",
        TESTING=True,
        SQLALCHEMY_DATABASE_URI=backend.url("primary"),
        SQLALCHEMY_BINDS=binds,
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 10} if backend.name == "postgresql" else {},
    )
    app.config.update(config)
    db = SQLAlchemy(app)

    class Item(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "items"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(sa.String(200), nullable=False)

    FlaskReplicated(app)

    @app.route("/who", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    def who() -> Any:
        node = backend.who(db.session)
        return node, 200, {"X-Who": node}

    @app.route("/items", methods=["GET", "POST"])
    def items() -> Any:
        if request.method == "POST":
            db.session.add(Item(name=request.form["name"]))
            db.session.commit()
            return "", 303, {"Location": "/items"}
        names = db.session.scalars(sa.select(Item.name).order_by(Item.id)).all()
        return {"names": names, "node": backend.who(db.session)}

    @app.get("/forced")
    @changes_database
    def forced() -> Any:
        return backend.who(db.session)

    app.db = db  # type: ignore[attr-defined]
    app.Item = Item  # type: ignore[attr-defined]
    app.backend = backend  # type: ignore[attr-defined]
    return app


def dispose_flask_app(app: Any) -> None:
    """Stop the app's position prober and close every pooled connection of its
    engines, and of its replicas given by URL (REPLICATED_REPLICAS), which are not
    among Flask-SQLAlchemy's engines."""
    engines = list(app.db._app_engines[app].values())
    rep = app.extensions.get("replicated")
    if rep is not None:
        router = rep.router(app)
        router.close()
        engines += [node.engine for node in (router.primary, *router.replicas)]
    for engine in {id(e): e for e in engines}.values():
        engine.dispose()


def make_quart_app(
    backend: Backend, replica: str | list[str] = "replica", name: str = __name__, **config: Any
) -> Any:
    """A Quart app with QuartReplicated whose views report which node answered.

    ``name`` is the app's import name (its ``app.name``).

    ``app.rep``, ``app.Item`` and ``app.backend`` are attached for the tests.
    """
    from quart import Quart, request
    from quart.signals import got_request_exception
    from sqlalchemy.orm import DeclarativeBase

    from quart_replicated import QuartReplicated, changes_database

    replicas = [replica] if isinstance(replica, str) else replica
    binds = {"master": backend.url("primary", asynchronous=True)}
    if len(replicas) == 1:
        binds["slave"] = backend.url(replicas[0], asynchronous=True)
    else:
        binds.update({label: backend.url(label, asynchronous=True) for label in replicas})
        config.setdefault("REPLICATED_REPLICA_BINDS", replicas)
    app = Quart(name)
    app.config.update(
        SECRET_KEY="test-secret-key",
        TESTING=True,
        SQLALCHEMY_DATABASE_URI=backend.url("primary", asynchronous=True),
        SQLALCHEMY_BINDS=binds,
    )
    app.config.update(config)
    rep = QuartReplicated(app)

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = "items"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(sa.String(200), nullable=False)

    async def who() -> str:
        return backend.label((await rep.session.execute(sa.text(backend.who_sql))).scalar())

    @app.route("/who", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    async def who_view() -> Any:
        node = await who()
        return node, 200, {"X-Who": node}

    @app.route("/items", methods=["GET", "POST"])
    async def items() -> Any:
        if request.method == "POST":
            form = await request.form
            rep.session.add(Item(name=form["name"]))
            await rep.session.commit()
            return "", 303, {"Location": "/items"}
        names = (await rep.session.scalars(sa.select(Item.name).order_by(Item.id))).all()
        return {"names": list(names), "node": await who()}

    @app.get("/forced")
    @changes_database
    async def forced() -> Any:
        return await who()

    # Quart's test client answers 500 rather than raising: keep the exceptions.
    errors: list[BaseException] = []

    async def keep(sender: Any, exception: BaseException, **extra: Any) -> None:
        errors.append(exception)

    got_request_exception.connect(keep, app, weak=False)
    app.errors = errors  # type: ignore[attr-defined]
    app.rep = rep  # type: ignore[attr-defined]
    app.Item = Item  # type: ignore[attr-defined]
    app.backend = backend  # type: ignore[attr-defined]
    app.who = who  # type: ignore[attr-defined]
    return app


def terminate_backends(killer: sa.Engine, application_name: str) -> None:
    """End every backend named ``application_name`` on the server ``killer`` connects
    to, and wait (bounded) until they have exited: the app's pooled connections then
    fail at their next statement, as when a server restarts under them."""
    mine = "FROM pg_stat_activity WHERE application_name = :name AND pid <> pg_backend_pid()"
    named = {"name": application_name}
    with killer.begin() as conn:
        conn.execute(sa.text(f"SELECT pg_terminate_backend(pid) {mine}"), named)
    end = time.monotonic() + 5
    while time.monotonic() < end:
        with killer.connect() as conn:
            if conn.execute(sa.text(f"SELECT count(*) {mine}"), named).scalar() == 0:
                return
        time.sleep(0.01)


async def text_of(response: Any) -> str:
    data: str = await response.get_data(as_text=True)
    return data


# -- server processes ---------------------------------------------------------------


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    """A loopback socket on a free port, already listening: a server inherits it
    (gunicorn's ``--bind fd://N``), so no other process can take the port in between."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


def group_members(group: int) -> list[int]:
    """The live (not zombie) processes of the process group ``group``, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # Fields resume after the command name's last ")": state, ppid, pgrp, ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == group:
            members.append(int(entry))
    return members


def wait_for_group_exit(group: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while group_members(group):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@dataclass
class ServerProcess:
    """A server run in a process group of its own, its output in a log file.

    ``redact`` hides secrets (the cluster's password) in what the log shows.
    """

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    redact: Callable[[str], str] = lambda text: text

    @classmethod
    def start(
        cls,
        name: str,
        command: Sequence[str],
        *,
        cwd: Path,
        env: dict[str, str],
        log_path: Path,
        pass_fds: Sequence[int] = (),
        redact: Callable[[str], str] = lambda text: text,
    ) -> ServerProcess:
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=pass_fds,
            )
        return cls(name, process, log_path, redact)

    def log(self) -> str:
        return self.redact(self.log_path.read_text(errors="replace"))

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_until_answering(self, url: str, timeout: float = 60.0) -> None:
        """Until a GET of ``url`` answers 200 (the server is up), at most ``timeout``
        seconds; raise, with the log's tail, if the server exits or times out."""
        import httpx  # the servers' tests only

        deadline = time.monotonic() + timeout
        while True:
            self.check_running()
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"'{url}' did not answer in time; the log:\n{self.log_tail()}")
            time.sleep(0.1)

    def check_running(self) -> None:
        """Raise, with the log's tail, if the server has exited."""
        if self.process.poll() is not None:
            raise RuntimeError(
                f"The server '{self.name}' exited with status {self.process.returncode};"
                f" its log says:\n{self.log_tail()}"
            )

    def stop(self, signum: signal.Signals = signal.SIGTERM, grace: float = 10) -> None:
        """Stop the server with ``signum``, then SIGKILL its group after ``grace``
        seconds; raise if one of its processes is left."""
        group = self.process.pid
        if self.process.poll() is None:
            self.process.send_signal(signum)
        if not wait_for_group_exit(group, grace):
            with contextlib.suppress(ProcessLookupError):  # gone meanwhile
                os.killpg(group, signal.SIGKILL)
        self.process.wait(timeout=10)
        if not wait_for_group_exit(group, 10):
            raise RuntimeError(
                f"The processes {group_members(group)} of the server '{self.name}'"
                " are still running after SIGKILL; stop them by hand."
            )


class SlowCloseProxy:
    """A TCP proxy on loopback to ``upstream`` (host, port) that passes bytes both
    ways at once but, when a server ends a connection unasked (nothing from its
    client since the server last spoke), holds that end back from the client for
    ``hold`` seconds, or until the client speaks or ends its side: the server's last
    message (a FATAL error) reaches the client well before the socket's end does, as
    it may through a loaded proxy or on a loaded client. A close the client asked
    for (its Terminate message) passes at once. A context manager; its ``port`` is
    where clients connect."""

    def __init__(self, upstream: tuple[str, int], hold: float = 10.0) -> None:
        self.upstream = upstream
        self.hold = hold
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._holds: list[threading.Event] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> SlowCloseProxy:
        self._accepting.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._accepting.join(5)
        for held in self._holds:
            held.set()
        for thread in self._threads:
            thread.join(self.hold + 5)
        for sock in self._sockets:
            sock.close()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()  # as a refused connect: the client sees its end
                continue
            self._sockets += [client, server]
            # Set while the client spoke last (or has ended): the server's end then
            # answers it, and passes at once.
            client_last = threading.Event()
            self._holds.append(client_last)
            for source, target, is_client in ((client, server, True), (server, client, False)):
                thread = threading.Thread(
                    target=self._pump, args=(source, target, is_client, client_last), daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def _pump(
        self,
        source: socket.socket,
        target: socket.socket,
        is_client: bool,
        client_last: threading.Event,
    ) -> None:
        # Bytes from ``source`` to ``target``, then its end passed on (the server's
        # held back, as the class says). Bounded by the proxy's stop.
        source.settimeout(0.1)
        try:
            while not self._stop.is_set():
                try:
                    data = source.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                if is_client:
                    client_last.set()
                else:
                    client_last.clear()
                target.sendall(data)
            if not is_client:
                client_last.wait(self.hold)  # or the proxy's stop, which sets it
        except OSError:
            pass  # the other side went first
        finally:
            if is_client:
                client_last.set()
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)
