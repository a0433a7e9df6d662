"""Run the demo: ``python -m examples.demo [flask|quart] [--port N] [--sqlite]``.

With PostgreSQL server binaries on the machine, the demo starts its own primary and
a streaming replica whose replay is delayed by ``--lag`` seconds, so replication lag
is real and visible: after you add an item you are served by the primary until the
replica has replayed your write, then by the replica again. Without them (or with
``--sqlite``), the "replica" is a second SQLite file that a thread copies from the
primary every ``--lag`` seconds.

It prints "Open ..." once every page works (the server listens and the replica has
replayed the schema), and removes its temporary folder when it stops: Ctrl-C, SIGTERM
or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from replicated_core.testing.pgcluster import PgCluster, ReplicaSpec, find_bindir

if TYPE_CHECKING:
    from collections.abc import Callable

SCHEMA = "CREATE TABLE IF NOT EXISTS items (id {pk}, name VARCHAR(200) NOT NULL)"

HOST = "127.0.0.1"

# Beyond the replay delay, how long the replica may take to replay the schema before
# the demo gives up (a busy machine takes a second or two).
SCHEMA_REPLAY_MARGIN = 30.0


def copy_until(stop: threading.Event, primary: Path, replica: Path, every: float) -> None:
    """Stand-in for streaming replication: copy the primary into the replica file."""
    while not stop.wait(every):
        with sqlite3.connect(primary) as source, sqlite3.connect(replica) as target:
            source.backup(target)


def sqlite_setup(
    folder: Path, lag: float, stop: threading.Event
) -> tuple[str, str, str, threading.Thread]:
    """Two SQLite files and the copying thread (ends once ``stop`` is set)."""
    primary, replica = folder / "primary.sqlite3", folder / "replica.sqlite3"
    for path in (primary, replica):
        with sqlite3.connect(path) as conn:
            conn.execute(SCHEMA.format(pk="INTEGER PRIMARY KEY"))
    copier = threading.Thread(
        target=copy_until, args=(stop, primary, replica, lag), name="demo-copy", daemon=True
    )
    copier.start()
    note = f"SQLite demo: the replica file is refreshed from the primary every {lag:g} s."
    return str(primary), str(replica), note, copier


def postgres_setup(folder: Path, lag: float) -> PgCluster:
    """A local primary and one replica with a replay delay of ``lag`` seconds.

    Returns once the replica has replayed the schema, so that every page works; raises
    TimeoutError if it has not within the delay plus a margin.
    """
    folder.chmod(0o755)
    cluster = PgCluster.start(folder, [ReplicaSpec("replica", apply_delay_ms=int(lag * 1000))])
    try:
        engine = sa.create_engine(cluster.primary.url("psycopg"))
        with engine.begin() as conn:
            conn.execute(sa.text(SCHEMA.format(pk="SERIAL PRIMARY KEY")))
        engine.dispose()
        print(f"Waiting for the replica to replay the schema ({lag:g} s late)...", flush=True)
        cluster.wait_for_replay(timeout=lag + SCHEMA_REPLAY_MARGIN, include_delayed=True)
    except BaseException:
        cluster.stop()
        raise
    return cluster


class _Stopper:
    """Turns the first Ctrl-C (SIGINT) or plain kill (SIGTERM) into a clean stop.

    Before the server runs, and for the Flask server, it raises KeyboardInterrupt; for
    the Quart server it asks Hypercorn to shut down. Later signals are ignored, so that
    the cleanup (stopping the database servers, removing the folder) is not cut short.
    """

    def __init__(self) -> None:
        self.shutdown: Callable[[], None] | None = None

    def install(self) -> None:
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, self._handle)

    def _handle(self, number: int, frame: Any) -> None:
        for other in (signal.SIGINT, signal.SIGTERM):
            signal.signal(other, signal.SIG_IGN)
        if self.shutdown is None:
            raise KeyboardInterrupt
        self.shutdown()


def serve_flask(app: Any, port: int, url: str) -> None:
    """Serve a WSGI app with Werkzeug's development server until KeyboardInterrupt."""
    from werkzeug.serving import make_server

    server = make_server(HOST, port, app, threaded=True)  # listening from here on
    print(f"Open {url} (Ctrl-C stops the demo)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def serve_quart(app: Any, port: int, url: str, stopper: _Stopper) -> None:
    """Serve a Quart app with Hypercorn until the stopper is triggered."""
    listener = socket.create_server((HOST, port))  # connections wait in its backlog

    async def run() -> None:
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        stopper.shutdown = lambda: loop.call_soon_threadsafe(stopped.set)
        serving = app.run_task(host=f"fd://{listener.detach()}", shutdown_trigger=stopped.wait)
        print(f"Open {url} (Ctrl-C stops the demo)", flush=True)
        await serving

    try:
        asyncio.run(run())
    finally:
        stopper.shutdown = None


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("flavour", nargs="?", choices=["flask", "quart"], default="flask")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--lag", type=float, default=3.0, help="replication lag, seconds")
    parser.add_argument("--sqlite", action="store_true", help="use SQLite even with PostgreSQL")
    args = parser.parse_args()

    # Installed before anything is made, so that a stop during the set-up cleans up too.
    stopper = _Stopper()
    stopper.install()
    folder = Path(tempfile.mkdtemp(prefix="replicated-demo-"))
    stop_copying = threading.Event()
    copier = None
    cluster = None
    try:
        if not args.sqlite and find_bindir() is not None:
            cluster = postgres_setup(folder, args.lag)
            driver = "psycopg" if args.flavour == "flask" else "asyncpg"
            primary_url = cluster.primary.url(driver)
            replica_url = cluster.replica("replica").url(driver)
            note = (
                f"PostgreSQL demo: primary on port {cluster.primary.port}, streaming replica"
                f" on port {cluster.replica('replica').port} replaying {args.lag:g} s late."
            )
        else:
            primary, replica, note, copier = sqlite_setup(folder, args.lag, stop_copying)
            scheme = "sqlite" if args.flavour == "flask" else "sqlite+aiosqlite"
            primary_url, replica_url = f"{scheme}:///{primary}", f"{scheme}:///{replica}"
        print(note, flush=True)
        url = f"http://{HOST}:{args.port}/"
        if args.flavour == "flask":
            from .flask_app import create_app

            serve_flask(create_app(primary_url, replica_url, note), args.port, url)
        else:
            from .quart_app import create_app as create_quart_app

            serve_quart(create_quart_app(primary_url, replica_url, note), args.port, url, stopper)
    except KeyboardInterrupt:
        pass  # the way to stop the demo
    except TimeoutError as error:
        print(f"The demo cannot start: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_IGN)
        print(f"Stopping the demo and removing '{folder}'...", flush=True)
        stop_copying.set()
        if copier is not None:
            copier.join()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
