"""Run the demo: ``python -m examples.demo [flask|quart] [--port N]``.

On SQLite (the default) the "replica" is a second file that a background thread
copies from the primary every few seconds, so replication lag is visible: after you
add an item you are served by the primary (the sticky cookie), while a new visitor
sees the item only once the copy has run.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

SCHEMA = "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name VARCHAR(200) NOT NULL)"


def copy_forever(primary: Path, replica: Path, every: float) -> None:
    """Stand-in for streaming replication: copy the primary into the replica file."""
    while True:
        time.sleep(every)
        with sqlite3.connect(primary) as source, sqlite3.connect(replica) as target:
            source.backup(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("flavour", nargs="?", choices=["flask", "quart"], default="flask")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--lag", type=float, default=5.0, help="seconds between copies")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="replicated-demo-"))
    primary, replica = folder / "primary.sqlite3", folder / "replica.sqlite3"
    for path in (primary, replica):
        with sqlite3.connect(path) as conn:
            conn.execute(SCHEMA)
    threading.Thread(target=copy_forever, args=(primary, replica, args.lag), daemon=True).start()
    note = f"SQLite demo: the replica file is refreshed from the primary every {args.lag:g} s."
    print(f"Demo data in {folder}; open http://127.0.0.1:{args.port}/")
    if args.flavour == "flask":
        from .flask_app import create_app

        create_app(f"sqlite:///{primary}", f"sqlite:///{replica}", note).run(port=args.port)
    else:
        from .quart_app import create_app as create_quart_app

        app = create_quart_app(
            f"sqlite+aiosqlite:///{primary}", f"sqlite+aiosqlite:///{replica}", note
        )
        app.run(port=args.port)


if __name__ == "__main__":
    main()
