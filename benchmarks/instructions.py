"""What the router adds to a Flask request, counted: function calls and instructions.

A diagnostic for ``overhead``, not a target. Timings on a shared 2-core machine
cannot tell a 1 µs change apart (runs differ by about ±0.01 in the ratio); two counts
can, and they tracked the overhead while it was cut:

- function calls per request, Python's and C's, counted with ``sys.setprofile``;
- machine instructions per request, counted by valgrind's callgrind, which counts
  the same total for the same code whatever else the machine runs. Skipped, with a
  message, when valgrind is not installed (Debian: ``apt-get install valgrind``).

For instructions the script runs itself under callgrind as ``--child``: it warms
both apps up, moves every object made so far out of the garbage collector's sight
(``gc.freeze()``: the collections that still run walk only what the batches make),
and calls ``os.getppid()`` before each batch, so that ``--dump-before=getppid``
writes each batch to a dump of its own.

The routed POST sets a time-mode sticky cookie, signed at most once a second: a
batch that runs slowly under valgrind signs a few; the rest reuse it.

Two runs of the same code count within about 2,000 instructions of each other (a
GET's added count, on 2026-12-02: 32,300, then 30,700). The batch size moves the
figures more (25,600 with batches of 100 instead of 300, the default), so compare
versions with the same command.
"""

from __future__ import annotations

import functools
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ._apps import flask_app, sqlite_urls
from ._common import ROOT, banner, parse_args, scratch_dir, table

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._apps import FlaskBench

SEED_ROWS = 1_000
CASES = [("GET", False), ("GET", True), ("POST", False), ("POST", True)]


def requests(bench: FlaskBench, method: str, size: int) -> Callable[[], None]:
    """``size`` requests through the test client, the same paths on every app."""
    client = bench.app.test_client(use_cookies=False)
    paths = [f"/items/{n * 7919 % SEED_ROWS + 1}" for n in range(size)]

    def run() -> None:
        for path in paths:
            if method == "GET":
                status = client.get(path).status_code
            else:
                status = client.post("/items", data={"name": "x"}).status_code
            if status not in (200, 201):
                raise RuntimeError(f"{method} answered {status}")

    return run


def batches(folder: Path, size: int) -> tuple[list[Callable[[], None]], list[Callable[[], None]]]:
    """One batch per case of ``CASES``, on two apps (plain, routed) warmed up; and
    the warm-up, to run again."""
    apps = {}
    for routed in (False, True):
        urls = sqlite_urls(folder, ["primary", "replica"], SEED_ROWS)
        apps[routed] = flask_app(urls["primary"], {"replica": urls["replica"]}, replicated=routed)
    runs = [requests(apps[routed], method, size) for method, routed in CASES]
    warm_up = [*runs, *(functools.partial(checkpoint, bench) for bench in apps.values())]
    for run in warm_up:
        run()
    return runs, warm_up


def checkpoint(bench: FlaskBench) -> None:
    """Move the rows the warm-up wrote from the write-ahead log into the file.

    Otherwise the plain app reads a primary whose log grows with every POST, and
    the routed app a replica file that is never written to, which SQLite reads with
    fewer instructions: the difference would hide part of the router's cost.
    """
    for engine in bench.engines:
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


def count_calls(folder: Path, size: int) -> list[float]:
    """Function calls (Python and C) per request, for each case of ``CASES``."""
    calls = 0

    def profile(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    results = []
    for run in batches(folder, size)[0]:
        calls = 0
        sys.setprofile(profile)
        run()
        sys.setprofile(None)
        results.append(calls / size)
    return results


def child(size: int) -> None:
    """Under callgrind: warm up, then one ``os.getppid()`` before each batch."""
    with scratch_dir() as folder:
        runs, warm_up = batches(folder, size)
        gc.collect()
        gc.freeze()
        for run in warm_up:  # once more after the freeze: the first batch after it
            run()  # would otherwise count some 100,000 instructions more
        for run in runs:
            os.getppid()
            run()
        os.getppid()


def count_instructions(size: int) -> list[float] | None:
    """Instructions per request, for each case of ``CASES``; None without valgrind."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return None
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "callgrind.out"
        command = [
            valgrind,
            "--tool=callgrind",
            "--dump-before=getppid",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-m",
            "benchmarks.instructions",
            "--child",
            str(size),
        ]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"valgrind failed ({done.returncode}):\n{done.stderr[-3000:]}")
        # A dump before each getppid() call: out.1 is start-up and warm-up, out.2 to
        # out.5 the batches; what follows the last call goes to the unnumbered dump.
        # Another getppid() call on the way would shift them, so count them.
        dumps = sorted(p.name for p in Path(folder).glob(f"{out.name}.*"))
        if len(dumps) != 1 + len(CASES):
            raise RuntimeError(f"expected {1 + len(CASES)} numbered dumps, got {dumps}")
        totals = [dump_total(Path(f"{out}.{n}")) for n in range(2, 2 + len(CASES))]
    return [total / size for total in totals]


def dump_total(path: Path) -> int:
    """The instruction total of one callgrind dump."""
    match = re.search(r"^(?:summary|totals): (\d+)", path.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no total in {path.name}")
    return int(match.group(1))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(int(sys.argv[2]))
        return
    args = parse_args(__doc__)
    size = 5 if args.quick else 300
    banner("Flask: function calls and instructions per request, routed vs plain", args.quick)
    with scratch_dir() as folder:
        calls = count_calls(folder, size)
    instructions = count_instructions(size)
    rows = []
    for index, method in enumerate(["GET", "POST"]):
        plain, routed = 2 * index, 2 * index + 1
        row: list[object] = [method, f"{calls[plain]:.0f}", f"{calls[routed] - calls[plain]:+.0f}"]
        if instructions is not None:
            extra = instructions[routed] - instructions[plain]
            row += [
                f"{instructions[plain]:.0f}",
                f"{extra:+.0f}",
                f"{extra / instructions[plain]:+.1%}",
            ]
        rows.append(row)
    headers = ["request", "calls, plain", "calls added"]
    if instructions is not None:
        headers += ["instructions, plain", "instructions added", "added"]
    table(headers, rows)
    if instructions is None:
        print("   instructions: valgrind not found (Debian: apt-get install valgrind)")


if __name__ == "__main__":
    main()
