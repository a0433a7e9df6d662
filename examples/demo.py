"""Run the demo: ``python -m examples.demo [flask|quart] [--port N] [--sqlite]``.

With PostgreSQL server binaries on the machine, the demo starts its own primary and
a streaming replica whose replay is delayed by ``--lag`` seconds, so replication lag
is real and visible: after you add an item you are served by the primary until the
replica has replayed your write, then by the replica again. Without them (or with
``--sqlite``), the "replica" is a second SQLite file that a thread copies from the
primary every ``--lag`` seconds.
"""

from __future__ import annotations

import argparse
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from replicated_core.pgcluster import PgCluster, ReplicaSpec, find_bindir

if TYPE_CHECKING:
    from collections.abc import Callable

SCHEMA = "CREATE TABLE IF NOT EXISTS items (id {pk}, name VARCHAR(200) NOT NULL)"


def copy_forever(primary: Path, replica: Path, every: float) -> None:
    """Stand-in for streaming replication: copy the primary into the replica file."""
    while True:
        time.sleep(every)
        with sqlite3.connect(primary) as source, sqlite3.connect(replica) as target:
            source.backup(target)


def sqlite_setup(folder: Path, lag: float) -> tuple[str, str, str]:
    """Two SQLite files and the copying thread; returns both paths and a note."""
    primary, replica = folder / "primary.sqlite3", folder / "replica.sqlite3"
    for path in (primary, replica):
        with sqlite3.connect(path) as conn:
            conn.execute(SCHEMA.format(pk="INTEGER PRIMARY KEY"))
    threading.Thread(target=copy_forever, args=(primary, replica, lag), daemon=True).start()
    note = f"SQLite demo: the replica file is refreshed from the primary every {lag:g} s."
    return str(primary), str(replica), note


def postgres_setup(folder: Path, lag: float) -> PgCluster:
    """A local primary and one replica with a replay delay of ``lag`` seconds."""
    folder.chmod(0o755)
    cluster = PgCluster.start(folder, [ReplicaSpec("replica", apply_delay_ms=int(lag * 1000))])
    engine = sa.create_engine(cluster.primary.url("psycopg"))
    with engine.begin() as conn:
        conn.execute(sa.text(SCHEMA.format(pk="SERIAL PRIMARY KEY")))
    engine.dispose()
    return cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("flavour", nargs="?", choices=["flask", "quart"], default="flask")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--lag", type=float, default=3.0, help="replication lag, seconds")
    parser.add_argument("--sqlite", action="store_true", help="use SQLite even with PostgreSQL")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="replicated-demo-"))
    cluster = None
    if not args.sqlite and find_bindir() is not None:
        cluster = postgres_setup(folder, args.lag)
        driver = "psycopg" if args.flavour == "flask" else "asyncpg"
        primary_url = cluster.primary.url(driver)
        replica_url = cluster.replica("replica").url(driver)
        note = (
            f"PostgreSQL demo: primary on port {cluster.primary.port}, streaming replica on "
            f"port {cluster.replica('replica').port} replaying {args.lag:g} s late."
        )
    else:
        primary, replica, note = sqlite_setup(folder, args.lag)
        scheme = "sqlite" if args.flavour == "flask" else "sqlite+aiosqlite"
        primary_url, replica_url = f"{scheme}:///{primary}", f"{scheme}:///{replica}"
    print(note)
    print(f"Open http://127.0.0.1:{args.port}/ (Ctrl-C stops the demo)")
    run: Callable[[], None]
    if args.flavour == "flask":
        from .flask_app import create_app

        flask_app = create_app(primary_url, replica_url, note)
        run = lambda: flask_app.run(port=args.port)  # noqa: E731
    else:
        from .quart_app import create_app as create_quart_app

        quart_app = create_quart_app(primary_url, replica_url, note)
        run = lambda: quart_app.run(port=args.port)  # noqa: E731
    # A plain kill (SIGTERM) must also stop the database servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        run()
    finally:
        if cluster is not None:
            cluster.stop()


if __name__ == "__main__":
    main()
