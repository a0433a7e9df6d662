"""10k requests with random intents, decorators and nested blocks, across threads and
tasks: every statement lands where a reference model of the rules says it must."""

from __future__ import annotations

import asyncio
import json
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from flask_replicated import changes_database, use_primary, use_replica
from replicated_core.intent import current_override, current_scope

pytestmark = pytest.mark.slow

REQUESTS = 10_000
BATCH = 50
BLOCKS = {"P": use_primary, "R": use_replica}
KINDS = [
    ("GET", "/iso", "replica", None),
    ("POST", "/iso", "primary", None),
    ("GET", "/iso-forced", "replica", "P"),
]


def random_program(rng, depth=0):
    """A list of steps: "." runs a statement, ["P" or "R", steps] opens a block."""
    steps = []
    for _ in range(rng.randint(1, 3)):
        if depth < 3 and rng.random() < 0.4:
            steps.append([rng.choice("PR"), random_program(rng, depth + 1)])
        else:
            steps.append(".")
    return steps


def expected_nodes(program, method_node, outer):
    """The rules, restated independently: a block decides; without one, the request's
    node, until a statement ran on the primary, after which the primary."""
    out, pinned = [], method_node == "primary"

    def run(steps, override):
        nonlocal pinned
        for step in steps:
            if step != ".":
                run(step[1], step[0])
            elif override == "P":
                pinned = True
                out.append("primary")
            elif override == "R":
                out.append("replica")
            else:
                out.append("primary" if pinned else "replica")

    run(program, outer)
    return out


def run_program(program, who):
    nodes = []
    for step in program:
        if step == ".":
            nodes.append(who())
        else:
            with BLOCKS[step[0]]():
                nodes.extend(run_program(step[1], who))
    return nodes


async def run_program_async(program, who):
    nodes = []
    for step in program:
        if step == ".":
            await asyncio.sleep(0)
            nodes.append(await who())
        else:
            with BLOCKS[step[0]]():
                nodes.extend(await run_program_async(step[1], who))
    return nodes


def plan(seed):
    rng = random.Random(seed)
    for _ in range(REQUESTS):
        method, path, method_node, outer = rng.choice(KINDS)
        program = random_program(rng)
        yield method, path, program, expected_nodes(program, method_node, outer)


def test_flask_10k_requests_across_threads(flask_app_factory):
    app = flask_app_factory(REPLICATED_STICKY_MODE="off")
    backend, db = app.backend, app.db

    def who():
        return backend.who(db.session)

    @app.route("/iso", methods=["GET", "POST"])
    def iso():
        from flask import request

        return {"nodes": run_program(json.loads(request.args["p"]), who)}

    @app.get("/iso-forced")
    @changes_database
    def iso_forced():
        from flask import request

        return {"nodes": run_program(json.loads(request.args["p"]), who)}

    items = list(plan(seed=11))

    def worker(chunk):
        client, wrong, leaks = app.test_client(), 0, 0
        for method, path, program, expected in chunk:
            response = client.open(path, method=method, query_string={"p": json.dumps(program)})
            wrong += response.status_code != 200 or response.json["nodes"] != expected
            leaks += current_scope() is not None or current_override() is not None
        return wrong, leaks

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(worker, [items[i::8] for i in range(8)]))
    assert sum(len(items[i::8]) for i in range(8)) == REQUESTS
    assert [r[0] for r in results] == [0] * 8
    assert [r[1] for r in results] == [0] * 8


async def test_quart_10k_requests_across_tasks(quart_app_factory):
    from quart import request

    from quart_replicated import changes_database as q_changes_database

    # A request may hold a replica connection while it waits for a primary one, and
    # another the reverse: pools smaller than the concurrency can deadlock.
    app = quart_app_factory(
        REPLICATED_STICKY_MODE="off",
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": BATCH, "max_overflow": 0},
    )

    @app.route("/iso", methods=["GET", "POST"])
    async def iso():
        return {"nodes": await run_program_async(json.loads(request.args["p"]), app.who)}

    @app.get("/iso-forced")
    @q_changes_database
    async def iso_forced():
        return {"nodes": await run_program_async(json.loads(request.args["p"]), app.who)}

    client = app.test_client()

    async def call(method, path, program, expected):
        response = await client.open(path, method=method, query_string={"p": json.dumps(program)})
        return response.status_code == 200 and (await response.get_json())["nodes"] == expected

    items = list(plan(seed=12))
    wrong = leaks = 0
    async with app.test_app():
        for start in range(0, REQUESTS, BATCH):
            batch = items[start : start + BATCH]
            outcomes = await asyncio.gather(*(call(*item) for item in batch))
            wrong += outcomes.count(False)
            leaks += current_scope() is not None or current_override() is not None
    assert wrong == 0
    assert leaks == 0
    assert app.errors == []


def test_the_model_is_not_trivial():
    """The plan exercises every case of the model, so it can catch a misroute."""
    nodes = [node for _, _, _, expected in plan(seed=11) for node in expected]
    assert {"primary", "replica"} == set(nodes)
    pinned = [
        e
        for m, p, prog, e in plan(seed=11)
        if p == "/iso" and m == "GET" and "primary" in e and e[-1] == "primary"
    ]
    assert len(pinned) > 100
