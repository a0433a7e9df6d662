"""Zero misrouted statements under concurrency: each response names the node that
answered each statement, and must match what its method and decorators ask for."""

from __future__ import annotations

import asyncio
import http.client
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import waitress
from flask import request as flask_request
from support import text_of

from flask_replicated import changes_database, use_primary, use_replica
from replicated_core.intent import current_override, current_scope

# (method, path, expected answer) ; "mixed" runs three statements.
PLAN = [
    ("GET", "/c/read", "replica"),
    ("HEAD", "/c/read", "replica"),
    ("POST", "/c/write", "primary"),
    ("GET", "/c/forced", "primary"),
    ("GET", "/c/mixed", "replica,primary,primary"),
    ("POST", "/c/block", "replica,primary"),
    ("DELETE", "/c/write", "primary"),
]


def _requests(count, seed):
    rng = random.Random(seed)
    return [rng.choice(PLAN) for _ in range(count)]


def _add_flask_views(app, violations):
    db, backend = app.db, app.backend

    def who():
        return backend.who(db.session)

    @app.before_request
    def check_clean_start():
        scope = current_scope()
        if current_override() is not None or scope is None:
            violations.append("intent left over")
        elif scope.facts.method != flask_request.method:
            violations.append("scope of another request")

    @app.route("/c/read", methods=["GET", "HEAD"])
    def c_read():
        node = who()
        return node, 200, {"X-Answer": node}

    @app.route("/c/write", methods=["POST", "DELETE"])
    def c_write():
        return who()

    @app.get("/c/forced")
    @changes_database
    def c_forced():
        return who()

    @app.get("/c/mixed")
    def c_mixed():
        first = who()
        with use_primary():
            second = who()
        return f"{first},{second},{who()}"

    @app.post("/c/block")
    def c_block():
        with use_replica():
            first = who()
        return f"{first},{who()}"


def test_flask_under_a_threaded_wsgi_server_with_8_threads(flask_app_factory):
    app = flask_app_factory(REPLICATED_STICKY_MODE="off")
    app.config["TESTING"] = False
    violations = []
    _add_flask_views(app, violations)
    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=8)
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()

    def call(item):
        method, path, expected = item
        conn = http.client.HTTPConnection("127.0.0.1", server.effective_port, timeout=30)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            body = response.read().decode()
            return response.status, response.getheader("X-Answer") or body, expected
        finally:
            conn.close()

    try:
        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(call, _requests(500, seed=1)))
    finally:
        server.close()
        server.task_dispatcher.shutdown()
    misrouted = [r for r in results if r[0] != 200 or r[1] != r[2]]
    assert len(results) == 500
    assert misrouted == []
    assert violations == []


async def test_quart_500_concurrent_requests_in_one_event_loop(quart_app_factory):
    from quart import request as quart_request

    from quart_replicated import changes_database as q_changes_database

    app = quart_app_factory(REPLICATED_STICKY_MODE="off")
    violations = []

    @app.before_request
    async def check_clean_start():
        scope = current_scope()
        if current_override() is not None or scope is None:
            violations.append("intent left over")
        elif scope.facts.method != quart_request.method:
            violations.append("scope of another request")

    @app.route("/c/read", methods=["GET", "HEAD"])
    async def c_read():
        await asyncio.sleep(0)
        node = await app.who()
        return node, 200, {"X-Answer": node}

    @app.route("/c/write", methods=["POST", "DELETE"])
    async def c_write():
        await asyncio.sleep(0)
        return await app.who()

    @app.get("/c/forced")
    @q_changes_database
    async def c_forced():
        await asyncio.sleep(0)
        return await app.who()

    @app.get("/c/mixed")
    async def c_mixed():
        first = await app.who()
        with use_primary():
            await asyncio.sleep(0)
            second = await app.who()
        await asyncio.sleep(0)
        return f"{first},{second},{await app.who()}"

    @app.post("/c/block")
    async def c_block():
        with use_replica():
            await asyncio.sleep(0)
            first = await app.who()
        return f"{first},{await app.who()}"

    client = app.test_client()

    async def call(item):
        method, path, expected = item
        response = await client.open(path, method=method)
        answer = response.headers.get("X-Answer") or await text_of(response)
        return response.status_code, answer, expected

    async with app.test_app():
        results = await asyncio.gather(*(call(item) for item in _requests(500, seed=2)))
    misrouted = [r for r in results if r[0] != 200 or r[1] != r[2]]
    assert len(results) == 500
    assert misrouted == []
    assert violations == []
    assert app.errors == []
    assert current_scope() is None


@pytest.mark.parametrize("seed", [3])
def test_the_plan_mixes_every_kind(seed):
    """The random plan above really mixes reads, writes and decorators."""
    assert {item[1] for item in _requests(500, seed)} == {p[1] for p in PLAN}
