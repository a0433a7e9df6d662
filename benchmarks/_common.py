"""Shared helpers: command line, machine line, interleaved timing, tables, a cluster."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from replicated_core.testing.pgcluster import PgCluster, ReplicaSpec

ROOT = Path(__file__).resolve().parent.parent


def parse_args(doc: str | None) -> argparse.Namespace:
    """``--quick``: tiny sizes, a few seconds, for CI smoke runs."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI smoke runs")
    return parser.parse_args()


def banner(title: str, quick: bool) -> None:
    """Print the benchmark's title and the machine it runs on."""
    print(f"== {title}{' (--quick)' if quick else ''}")
    print(f"   {machine()}")


def machine() -> str:
    """CPUs, Python, date, git revision, and a hash of the library's sources as run.

    The hash tells runs of different library code apart when the tree has
    uncommitted changes.
    """
    packages = ["replicated_core", "flask_replicated", "quart_replicated"]
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", *packages],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        rev, dirty = "?", ""
    digest = hashlib.sha256()
    for path in sorted(p for package in packages for p in (ROOT / package).glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"nproc {os.cpu_count()}, Python {platform.python_version()}, {now}, "
        f"git {rev or '?'}{' + uncommitted library changes' if dirty else ''}, "
        f"library sources {digest.hexdigest()[:10]}"
    )


def interleave(
    cases: Sequence[tuple[str, Callable[[], float]]], rounds: int
) -> dict[str, list[float]]:
    """Run every case once per round, rotating the order (AB, BA, ...); collect results.

    Each case runs one batch and returns its time per request in seconds.
    """
    samples: dict[str, list[float]] = {name: [] for name, _ in cases}
    for number in range(rounds):
        shift = number % len(cases)
        for name, run in [*cases[shift:], *cases[:shift]]:
            samples[name].append(run())
    return samples


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ratios(values: Sequence[float], base: Sequence[float]) -> list[float]:
    """Per-round ratios of ``values`` to ``base`` (same round, so same machine state)."""
    return [v / b for v, b in zip(values, base, strict=True)]


def spread(values: Sequence[float]) -> str:
    """The interquartile range of ``values``, as 'q1..q3'."""
    if len(values) < 4:
        return "-"
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"{q1:.3f}..{q3:.3f}"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.2f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print an aligned plain-text table: text to the left, numbers to the right."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def numeric(text: str) -> bool:
        return bool(text) and text.lstrip("+-").replace(".", "", 1).replace("%", "").isdigit()

    for index, row in enumerate(cells):
        line = "  ".join(
            cell.rjust(w) if index and numeric(cell) else cell.ljust(w)
            for cell, w in zip(row, widths, strict=True)
        )
        print("  " + line.rstrip())
        if index == 0:
            print("  " + "  ".join("-" * w for w in widths))


def verdict(met: bool) -> str:
    return "MET" if met else "MISSED"


def rss_bytes() -> int:
    """The process's resident set size (Linux), 0 where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary folder, world-readable (PostgreSQL runs as 'postgres' under root)."""
    path = Path(tempfile.mkdtemp(prefix="replicated-bench-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def pg_cluster(replicas: Sequence[ReplicaSpec], seed_rows: int) -> Iterator[PgCluster]:
    """A primary and ``replicas``, with an ``items`` table of ``seed_rows`` rows everywhere.

    Exits with status 0 and a message when no PostgreSQL server binaries are installed.
    """
    from replicated_core.testing.pgcluster import PgCluster, find_bindir

    if find_bindir() is None:
        print("   skipped: PostgreSQL server binaries not found (pg_config --bindir).")
        sys.exit(0)
    with scratch_dir() as base:
        cluster = PgCluster.start(base / "cluster", replicas)
        try:
            engine = sa.create_engine(cluster.primary.url("psycopg"))
            with engine.begin() as conn:
                conn.execute(
                    sa.text(
                        "CREATE TABLE items (id SERIAL PRIMARY KEY, name VARCHAR(200) NOT NULL)"
                    )
                )
                conn.execute(
                    sa.text(
                        "INSERT INTO items (name) SELECT 'seed-' || n FROM generate_series(1, :n) n"
                    ),
                    {"n": seed_rows},
                )
            engine.dispose()
            cluster.wait_for_replay(include_delayed=True)
            yield cluster
        finally:
            cluster.stop()
