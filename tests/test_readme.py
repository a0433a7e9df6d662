"""Every ```python block of the README runs as written, on the real cluster.

Each block is saved as a module of its own, as a user pastes it into ``app.py``, and
imported with ``PRIMARY_URL`` and ``REPLICA_URL`` in the environment (the blocks read
them there), pointing at the session's primary and its lagging replica. Then the test
makes the requests the block's text promises. A block right after the line
``<!-- snippet: continues -->`` goes on from the block before it, in the same module.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

README = Path(__file__).resolve().parent.parent / "README.md"
CONTINUES = "<!-- snippet: continues -->"


@dataclass(frozen=True)
class Snippet:
    """One ```python block: the heading it sits under, its number there, its source."""

    heading: str
    number: int
    line: int
    source: str
    continues: bool

    @property
    def key(self) -> tuple[str, int]:
        return self.heading, self.number


def _snippets() -> list[Snippet]:
    snippets: list[Snippet] = []
    heading, counts = "", {}
    lines = README.read_text().splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.strip() == "```python":
            end = lines.index("```", index + 1)
            before = [text for text in lines[:index] if text.strip()]
            counts[heading] = counts.get(heading, 0) + 1
            snippets.append(
                Snippet(
                    heading,
                    counts[heading],
                    index + 1,
                    "\n".join(lines[index + 1 : end]) + "\n",
                    bool(before) and before[-1].strip() == CONTINUES,
                )
            )
            index = end
        index += 1
    return snippets


SNIPPETS = {snippet.key: snippet for snippet in _snippets()}
FLASK_QUICKSTART = ("Quickstart: Flask", 1)
QUART_QUICKSTART = ("Quickstart: Quart", 1)
QUART_CLI_COMMAND = ("Quickstart: Quart", 2)
CELERY_JOBS = ("Read-your-writes for API clients and jobs", 1)
# Served by gunicorn in test_prometheus.py: one worker, then three in multiprocess mode.
PROMETHEUS_EXAMPLE = ("Prometheus metrics", 1)
MULTIPROCESS_EXAMPLE = ("Prometheus metrics", 2)
MULTIPROCESS_GUNICORN_CONF = ("Prometheus metrics", 3)
DISCOVERY_CONFIG = ("Replicas discovered through DNS", 1)
SEVERAL_DATABASES = ("Several databases", 1)
BALANCED_EXAMPLE = ("Replicas behind one address", 1)
TESTED = {
    FLASK_QUICKSTART,
    QUART_QUICKSTART,
    QUART_CLI_COMMAND,
    CELERY_JOBS,
    PROMETHEUS_EXAMPLE,
    MULTIPROCESS_EXAMPLE,
    MULTIPROCESS_GUNICORN_CONF,
    DISCOVERY_CONFIG,
    SEVERAL_DATABASES,
    BALANCED_EXAMPLE,
}


def test_every_python_block_of_the_readme_has_a_test_here():
    untested = [
        f"README.md line {s.line} ('{s.heading}', block {s.number})"
        for s in SNIPPETS.values()
        if s.key not in TESTED
    ]
    assert untested == [], "Add a test to tests/test_readme.py for: " + ", ".join(untested)
    assert set(SNIPPETS) == TESTED


def _source(key: tuple[str, int]) -> str:
    """The block's source, after the blocks it continues."""
    snippet = SNIPPETS[key]
    if not snippet.continues:
        return snippet.source
    return _source((snippet.heading, snippet.number - 1)) + "\n" + snippet.source


@pytest.fixture
def load_snippet(tmp_path, monkeypatch, pg_cluster):
    """Import a README block as the module ``readme_snippet`` from a file of its own."""
    names = []

    def load(key, driver, replica="lagging", replica_url=None):
        monkeypatch.setenv("PRIMARY_URL", pg_cluster.primary.url(driver))
        monkeypatch.setenv("REPLICA_URL", replica_url or pg_cluster.replica(replica).url(driver))
        name = f"readme_snippet_{len(names)}"
        path = tmp_path / f"{name}.py"
        path.write_text(_source(key))
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        names.append(name)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in names:
        del sys.modules[name]


@pytest.fixture
def no_item_table(pg_cluster):
    """The quickstarts' table 'item' does not exist before, and is dropped after."""
    drop = "DROP TABLE IF EXISTS item"
    pg_cluster.execute(pg_cluster.primary, drop)
    yield
    pg_cluster.execute(pg_cluster.primary, drop)
    pg_cluster.wait_for_replay(include_delayed=True)


def _rows(cluster, node, sql):
    return [row[0] for row in cluster.execute(node, sql)]


def test_flask_quickstart(pg_cluster, no_item_table, load_snippet):
    """POST /items, then GET /items by the same client and by a new one; GET /login."""
    module = load_snippet(FLASK_QUICKSTART, "psycopg")
    app, db = module.app, module.db
    lagging = pg_cluster.replica("lagging")

    @app.get("/who")
    def who():  # added by the test: which server answers this request's reads
        return str(db.session.execute(sa.text("SELECT inet_server_port()")).scalar())

    try:
        pg_cluster.wait_for_replay(include_delayed=True)  # the table create_all made
        writer = app.test_client()
        response = writer.post("/items")
        assert (response.status_code, response.headers["Location"]) == (302, "/items")
        # The replica replays 500 ms late: only the sticky cookie makes this read see it.
        response = writer.get("/items")
        assert (response.status_code, response.json) == (200, ["x"])
        response = writer.get("/login")
        assert (response.status_code, response.headers["Location"]) == (302, "/items")
        primary_sql = "SELECT name FROM item ORDER BY id"
        assert _rows(pg_cluster, pg_cluster.primary, primary_sql) == ["x", "logged in"]
        visitor = app.test_client()
        assert visitor.get("/who").text == str(lagging.port)
        pg_cluster.wait_for_replay(include_delayed=True)
        assert visitor.get("/items").json == ["x", "logged in"]
    finally:
        for engine in db._app_engines[app].values():
            engine.dispose()


def test_several_databases_example(pg_cluster, load_snippet, monkeypatch):
    """The example's GET reads both databases from their replicas ('users' is the
    database 'second' of the cluster, made here if missing)."""
    if not pg_cluster.execute(
        pg_cluster.primary, "SELECT 1 FROM pg_database WHERE datname = 'second'"
    ):
        pg_cluster.execute(pg_cluster.primary, "CREATE DATABASE second")
        pg_cluster.wait_for_replay(include_delayed=True)
    monkeypatch.setenv("USERS_PRIMARY_URL", pg_cluster.primary.url("psycopg", database="second"))
    replica = pg_cluster.replica("replica")
    monkeypatch.setenv("USERS_REPLICA_URL", replica.url("psycopg", database="second"))
    lagging = pg_cluster.replica("lagging")
    monkeypatch.setenv("USERS_REPLICA2_URL", lagging.url("psycopg", database="second"))
    module = load_snippet(SEVERAL_DATABASES, "psycopg", replica="replica")
    app, db = module.app, module.db
    rep = app.extensions["replicated"]
    try:
        with app.app_context():
            db.create_all()  # outside a request: each on its primary
        pg_cluster.wait_for_replay(include_delayed=True)  # users_r2 is the lagging one
        assert app.test_client().get("/page").json == {"items": 0, "users": 0}
        decisions = {key: r.metrics() for key, r in rep.databases(app).routers.items()}
        assert {key: m.get("requests_to_replica", 0) for key, m in decisions.items()} == {
            None: 1,
            "users": 1,
        }
        users = rep.router(app, bind_key="users")
        sizes = [users.node_named(name).engine.pool.size() for name in ("users_r1", "users_r2")]
        assert sizes == [5, 3]  # SQLAlchemy's default, and users_r2's own engine options
    finally:
        with app.app_context():
            db.drop_all()
        for router in rep.databases(app):
            router.close()
            for node in (router.primary, *router.replicas):
                node.engine.dispose()
        for engine in db._app_engines[app].values():
            engine.dispose()


def test_quart_quickstart_and_its_cli_command(pg_cluster, no_item_table, load_snippet):
    """POST /items, GET /items/1 by the same client, then the 'count' command."""
    module = load_snippet(QUART_CLI_COMMAND, "asyncpg")
    app = module.app

    async def visit():
        async with app.test_app() as test_app:
            client = test_app.test_client()
            response = await client.post("/items")
            assert response.status_code == 201
            # The replica replays 500 ms late: only the sticky cookie makes this read see it.
            response = await client.get("/items/1")
            assert (response.status_code, await response.get_data(as_text=True)) == (200, "x")

    asyncio.run(visit())
    assert _rows(pg_cluster, pg_cluster.primary, "SELECT name FROM item") == ["x"]
    result = app.test_cli_runner().invoke(args=["count"])
    assert (result.exit_code, result.output) == (0, "1\n"), result.output


def test_the_discovery_config_is_valid():
    """The README's REPLICATED_REPLICA_DISCOVERY block loads as it says."""
    from flask import Flask

    from replicated_core.config import load_config

    namespace = {"app": Flask("readme")}
    exec(_source(DISCOVERY_CONFIG), namespace)
    spec = load_config(namespace["app"].config).discovery
    assert spec is not None
    assert (spec.name, spec.url.port, spec.record.value, spec.interval) == (
        "replicas.db.internal",
        5432,
        "A",
        30.0,
    )


def test_the_celery_example_is_what_the_celery_test_runs():
    """The README's Celery block is run, with a real worker, by tests/test_jobs.py
    (its app is tests/server_apps/jobs_app.py): it compiles, and its two calls are
    the ones that app makes."""
    source = SNIPPETS[CELERY_JOBS].source
    compile(source, "README.md", "exec")
    app = (Path(__file__).parent / "server_apps" / "jobs_app.py").read_text()
    for call in (
        "token=rep.consistency_token())",
        "with app.app_context(), use_replica(after=token):",
    ):
        assert call in source
        assert call in app


def test_the_balanced_example_reads_a_writers_rows_through_haproxy(
    pg_cluster, haproxy_factory, no_item_table, load_snippet
):
    """The example's app behind HAProxy over 'replica' and 'lagging' (500 ms late): 20
    POST-then-GET pairs by one client, none stale; the address is shown as balanced."""
    balancer = haproxy_factory([pg_cluster.replica("replica"), pg_cluster.replica("lagging")])
    url = balancer.url_for(pg_cluster.replica("replica").url("psycopg"))
    module = load_snippet(BALANCED_EXAMPLE, "psycopg", replica_url=url)
    app, db = module.app, module.db
    pg_cluster.execute(pg_cluster.primary, "CREATE TABLE item (id SERIAL PRIMARY KEY)")
    pg_cluster.wait_for_replay(include_delayed=True)

    @app.post("/items")
    def add():  # added by the test
        item_id = db.session.execute(sa.text("INSERT INTO item DEFAULT VALUES RETURNING id"))
        row = item_id.scalar()
        db.session.commit()
        return str(row)

    @app.get("/items/<int:item_id>")
    def get(item_id):
        found = db.session.execute(sa.text(f"SELECT id FROM item WHERE id = {item_id}"))
        return ("", 200) if found.scalar() is not None else ("", 404)

    try:
        client = app.test_client()
        statuses = [
            client.get(f"/items/{client.post('/items').text}").status_code for _ in range(20)
        ]
        assert statuses == [200] * 20
        result = app.test_cli_runner().invoke(args=["replicated", "status"])
        assert result.output.splitlines()[2].split()[-1] == "yes", result.output
    finally:
        app.extensions["replicated"].router(app).close()
        for engine in {*db._app_engines[app].values()}:
            engine.dispose()
        for node in app.extensions["replicated"].router(app).replicas:
            node.engine.dispose()
