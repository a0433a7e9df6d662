"""Fork safety: an app that queried at import, then forked into workers (gunicorn
--preload, uWSGI without lazy-apps, multiprocessing's fork start method), on the
real cluster. Each child asks the server who answered, on which backend, with a
marker of its own: answers that cross between processes show up as wrong markers,
protocol errors or hangs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa
from support import dispose_flask_app, make_flask_app, make_quart_app

HEADER = "X-Served-By"
CHILDREN = 4
THREADS = 4  # per child, each its own test client
REQUESTS = 40  # per thread: GETs, and a POST every fifth
PICKS = 24  # sequential reads per child whose replica is recorded
CHILD_LIMIT = 60.0  # seconds; a child still running then is killed and counted as hung
FORK_SQL = "SELECT inet_server_port(), pg_backend_pid(), CAST(:marker AS text)"

# os.fork() in a process with threads (the prober, pytest's own) warns on 3.12+;
# forking such a process is what the servers under test do.
pytestmark = pytest.mark.filterwarnings("ignore:This process .* fork:DeprecationWarning")


def run_children(child_main: Any) -> list[dict[str, Any]]:
    """Fork CHILDREN processes that run ``child_main(index)`` and report its dict."""
    children = []
    for index in range(CHILDREN):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            os.close(read_end)
            try:
                report = child_main(index)
            except BaseException as error:
                report = {"crashed": repr(error)[:500]}
            with os.fdopen(write_end, "w") as out:
                json.dump(report, out)
            os._exit(0)
        os.close(write_end)
        children.append((pid, read_end))
    reports = []
    deadline = time.monotonic() + CHILD_LIMIT
    for pid, read_end in children:
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                reports.append({"hung": True})
                break
            time.sleep(0.05)
        else:
            with os.fdopen(read_end, "r") as report:
                text = report.read()
            reports.append(json.loads(text) if text else {"crashed": "no report"})
            continue
        os.close(read_end)
    return reports


def summary(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """What the assertions compare: problems per child, and the replica sequences."""
    return {
        "hung": sum(bool(r.get("hung")) for r in reports),
        "crashed": [r["crashed"] for r in reports if "crashed" in r],
        "errors": [e for r in reports for e in r.get("errors", [])][:5],
        "error count": sum(len(r.get("errors", [])) for r in reports),
        "answers": sum(r.get("answers", 0) for r in reports),
    }


def add_fork_view(app: Any, db_session: Any) -> None:
    @app.get("/fork")
    def fork_view() -> Any:
        from flask import request

        port, pid, marker = (
            db_session().execute(sa.text(FORK_SQL), {"marker": request.args["marker"]}).one()
        )
        return {"port": port, "pid": pid, "marker": marker}


def flask_child(app: Any) -> Any:
    def child_main(index: int) -> dict[str, Any]:
        picks_client = app.test_client()
        picks = [picks_client.get("/who").headers[HEADER] for _ in range(PICKS)]
        errors: list[str] = []
        answers = 0
        lock = threading.Lock()

        def load(thread: int) -> None:
            nonlocal answers
            client = app.test_client()
            for number in range(REQUESTS):
                marker = f"child-{index}-{os.getpid()}-{thread}-{number}"
                try:
                    if number % 5 == 4:
                        response = client.post("/items", data={"name": marker})
                        problem = None if response.status_code == 303 else response.status_code
                    else:
                        response = client.get(f"/fork?marker={marker}")
                        found = response.get_json(silent=True) or {}
                        problem = None if found.get("marker") == marker else found
                except Exception as error:
                    problem = repr(error)[:300]
                with lock:
                    if problem is None:
                        answers += 1
                    else:
                        errors.append(f"{marker}: {problem}")

        threads = [threading.Thread(target=load, args=(n,)) for n in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return {"picks": picks, "errors": errors, "answers": answers}

    return child_main


def test_flask_app_that_queried_before_forking(fault_backend):
    """The parent reads and writes through the router (pools to the primary and both
    replicas, a running prober), then forks: every child gets right answers and picks
    its own sequence of replicas."""
    app = make_flask_app(fault_backend, replica=["r1", "r2"], REPLICATED_DEBUG_HEADER=HEADER)
    add_fork_view(app, app.db.session)
    try:
        with app.app_context():  # at import: no request, so the primary
            app.db.session.execute(sa.text("SELECT 1"))
            app.db.session.remove()
        client = app.test_client()
        assert client.post("/items", data={"name": "before-fork"}).status_code == 303
        parent_nodes = {app.test_client().get("/who").headers[HEADER] for _ in range(20)}
        assert parent_nodes == {"r1", "r2"}
        reports = run_children(flask_child(app))
    finally:
        dispose_flask_app(app)
    found = summary(reports)
    assert found == {
        "hung": 0,
        "crashed": [],
        "errors": [],
        "error count": 0,
        "answers": CHILDREN * THREADS * REQUESTS,
    }
    sequences = {tuple(r["picks"]) for r in reports}
    assert len(sequences) == CHILDREN  # each child draws its own replicas
    assert {node for r in reports for node in r["picks"]} == {"r1", "r2"}


def quart_child(app: Any) -> Any:
    def child_main(index: int) -> dict[str, Any]:
        return asyncio.run(quart_child_load(app, index))

    return child_main


async def quart_child_load(app: Any, index: int) -> dict[str, Any]:
    picks_client = app.test_client()
    picks = [(await picks_client.get("/who")).headers[HEADER] for _ in range(PICKS)]
    errors: list[str] = []
    answers = 0

    async def load(task: int) -> None:
        nonlocal answers
        client = app.test_client()
        for number in range(REQUESTS):
            marker = f"child-{index}-{os.getpid()}-{task}-{number}"
            try:
                if number % 5 == 4:
                    response = await client.post("/items", form={"name": marker})
                    problem = None if response.status_code == 303 else response.status_code
                else:
                    response = await client.get(f"/fork?marker={marker}")
                    found = await response.get_json() if response.status_code == 200 else {}
                    problem = None if found.get("marker") == marker else response.status_code
            except Exception as error:
                problem = repr(error)[:300]
            if problem is None:
                answers += 1
            else:
                errors.append(f"{marker}: {problem}")

    await asyncio.gather(*(load(n) for n in range(THREADS)))
    errors.extend(repr(e)[:300] for e in app.errors)
    await app.rep.dispose(app)
    return {"picks": picks, "errors": errors, "answers": answers}


def test_quart_app_that_queried_before_forking(fault_backend):
    """The same for Quart: the parent's event loop stays open (its pooled connections
    belong to it); each child runs its own loop, where the prober starts again."""
    app = make_quart_app(fault_backend, replica=["r1", "r2"], REPLICATED_DEBUG_HEADER=HEADER)

    @app.get("/fork")
    async def fork_view() -> Any:
        from quart import request

        result = await app.rep.session.execute(
            sa.text(FORK_SQL), {"marker": request.args["marker"]}
        )
        port, pid, marker = result.one()
        return {"port": port, "pid": pid, "marker": marker}

    async def before_fork() -> set[str]:
        async with app.app_context():
            await app.rep.session.execute(sa.text("SELECT 1"))
        client = app.test_client()
        assert (await client.post("/items", form={"name": "before-fork"})).status_code == 303
        return {(await app.test_client().get("/who")).headers[HEADER] for _ in range(20)}

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(before_fork()) == {"r1", "r2"}
        reports = run_children(quart_child(app))
        loop.run_until_complete(app.rep.dispose(app))
    finally:
        loop.close()
    found = summary(reports)
    assert found == {
        "hung": 0,
        "crashed": [],
        "errors": [],
        "error count": 0,
        "answers": CHILDREN * THREADS * REQUESTS,
    }
    sequences = {tuple(r["picks"]) for r in reports}
    assert len(sequences) == CHILDREN
    assert {node for r in reports for node in r["picks"]} == {"r1", "r2"}
