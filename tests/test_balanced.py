"""Replicas behind one address (issue 15, part 2): HAProxy (``mode tcp``, round-robin)
in front of the session cluster's 'replica' (replays at once) and 'lagging' (500 ms
late), given to the app as one replica. Each new connection reaches the next server,
so a position read on one connection says nothing of the next. With
``REPLICATED_BALANCED_REPLICAS`` a sticky read checks the client's position on the
connection it reads on. Every server is asked who answered (``inet_server_port()``).
Figures go to the terminal summary under "reliability figures"."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from support import (
    Backend,
    ServerProcess,
    create_pg_schema,
    dispose_flask_app,
    listening_socket,
    make_flask_app,
    make_quart_app,
)

from replicated_core import use_replica
from replicated_core.config import ConfigError, load_config

PAIRS = 100  # POST then GET, per test-client run
READS = 60  # cookie-less GETs
PAUSED_PAIRS, PAUSE = 30, 0.15  # pairs with a pause between the POST and the GET
TIME_CAP = 60.0  # seconds: every loop stops by then, whatever it has done
BALANCED = {"REPLICATED_BALANCED_REPLICAS": ["slave"]}  # the one replica's bind name
TOKEN_HEADER = "Replicated-Token"


@pytest.fixture(scope="module")
def balancer(pg_cluster: Any, haproxy_factory: Callable[..., Any]) -> Any:
    """HAProxy in front of 'replica' and 'lagging' (two apply delays)."""
    return haproxy_factory([pg_cluster.replica("replica"), pg_cluster.replica("lagging")])


@pytest.fixture
def backend(pg_cluster: Any, balancer: Any) -> Backend:
    """The cluster with one more label, 'reader': the balanced address. Who answered is
    told by the server's port, so a read through it names 'replica' or 'lagging'."""
    create_pg_schema(pg_cluster)
    nodes = {"primary": pg_cluster.primary, **{n.name: n for n in pg_cluster.replicas}}
    urls = {label: node.url("psycopg") for label, node in nodes.items()}
    async_urls = {label: node.url("asyncpg") for label, node in nodes.items()}
    urls["reader"] = balancer.url_for(urls["replica"])
    async_urls["reader"] = balancer.url_for(async_urls["replica"])
    return Backend(
        "postgresql",
        urls,
        async_urls,
        "SELECT inet_server_port()",
        {str(node.port): label for label, node in nodes.items()},
    )


@pytest.fixture
def flask_factory(backend: Backend) -> Iterator[Callable[..., Any]]:
    apps: list[Any] = []

    def build(**config: Any) -> Any:
        app = make_flask_app(backend, "reader", **config)
        apps.append(app)
        return app

    yield build
    for app in apps:
        dispose_flask_app(app)


@pytest.fixture
async def quart_factory(backend: Backend) -> Any:
    apps: list[Any] = []

    def build(**config: Any) -> Any:
        app = make_quart_app(backend, "reader", **config)
        apps.append(app)
        return app

    yield build
    for app in apps:
        await app.rep.dispose(app)


def _figures(served: Counter[str], stale: int, pairs: int) -> dict[str, Any]:
    replicas = served["replica"] + served["lagging"]
    return {
        "pairs": pairs,
        "stale": stale,
        "GETs served by": dict(sorted(served.items())),
        "replica share": f"{replicas / pairs:.0%}" if pairs else None,
    }


# -- Flask, test client -------------------------------------------------------------


def _flask_pairs(
    app: Any, pairs: int, *, header: bool = False, pause: float = 0.0
) -> tuple[Counter[str], int, int]:
    """POST a row, then GET the list (``pause`` seconds later), with one client's cookie
    (or, with ``header``, no cookies and the token header only): who served each GET,
    how many missed their own row, and how many pairs ran."""
    served: Counter[str] = Counter()
    stale = done = 0
    deadline = time.monotonic() + TIME_CAP
    with app.test_client(use_cookies=not header) as client:
        client.get("/items")  # the prober's first round
        for _ in range(pairs):
            if time.monotonic() > deadline:
                break
            name = uuid.uuid4().hex
            posted = client.post("/items", data={"name": name})
            assert posted.status_code == 303
            headers = {TOKEN_HEADER: posted.headers[TOKEN_HEADER]} if header else {}
            time.sleep(pause)
            body = client.get("/items", headers=headers).get_json()
            served[body["node"]] += 1
            stale += name not in body["names"]
            done += 1
    return served, stale, done


def test_flask_without_the_setting_a_balanced_address_gives_stale_reads(
    flask_factory: Any, reliability: Any
) -> None:
    """What the issue reports, on the code before it: the cached position (or a
    catch-up wait's) is some server's, and the read's connection reaches another. The
    GET comes 0.15 s after its POST: long enough for a check to see the write on the
    fast server, too short for the lagging one (500 ms) to have it."""
    app = flask_factory()
    served, stale, done = _flask_pairs(app, PAUSED_PAIRS, pause=PAUSE)
    reliability("balanced address, Flask, without the setting", _figures(served, stale, done))
    assert done == PAUSED_PAIRS
    assert stale > 0, served


@pytest.mark.parametrize("header", [False, True], ids=["cookie", "header"])
def test_flask_a_writers_reads_through_a_balanced_address_are_never_stale(
    flask_factory: Any, reliability: Any, header: bool
) -> None:
    app = flask_factory(**BALANCED)
    served, stale, done = _flask_pairs(app, PAIRS, header=header)
    counts = app.extensions["replicated"].counters(app)
    figures = _figures(served, stale, done)
    figures["balanced checks"] = counts.get("balanced_checks", 0)
    figures["moved to the primary"] = counts.get("balanced_behind", 0)
    transport = "token header" if header else "cookie"
    reliability(f"balanced address, Flask test client, {transport}", figures)
    assert done == PAIRS
    assert stale == 0, served
    assert counts.get("balanced_checks", 0) > 0
    # The fast server has each write at once: the connections that reach it serve.
    assert served["replica"] > 0, served
    # The lagging one never has it in time (500 ms against a 0.1 s wait).
    assert served["lagging"] == 0, served
    assert served["primary"] == counts.get("balanced_behind", 0), (served, counts)


def test_flask_a_long_enough_wait_serves_every_writer_from_a_replica(flask_factory: Any) -> None:
    """With a wait longer than the slow server's delay, a connection that reaches it
    waits there instead of leaving the read to the primary."""
    app = flask_factory(REPLICATED_CATCH_UP_TIMEOUT=2, **BALANCED)
    served, stale, done = _flask_pairs(app, 10)
    assert (done, stale) == (10, 0)
    assert served["primary"] == 0, served


def test_flask_a_connection_that_has_seen_the_write_asks_nothing_more(
    flask_factory: Any,
) -> None:
    """Once both servers have the write, the client's reads are checked once per pooled
    connection, then known; and the cookie stays (nothing tells that every server behind
    the address has the write)."""
    app = flask_factory(**BALANCED)
    rep = app.extensions["replicated"]
    with app.test_client() as client:
        client.get("/items")
        name = uuid.uuid4().hex
        assert client.post("/items", data={"name": name}).status_code == 303
        time.sleep(0.8)  # both servers have replayed it (the slow one 500 ms late)
        served: Counter[str] = Counter()
        for _ in range(20):
            response = client.get("/items")
            assert name in response.get_json()["names"]
            assert "Set-Cookie" not in response.headers
            served[response.get_json()["node"]] += 1
    counts = rep.counters(app)
    assert served["primary"] == 0, served
    assert counts.get("balanced_behind", 0) == 0, counts
    assert counts["balanced_checks"] <= 5, counts  # the pooled connections the reads got
    assert counts["balanced_checks"] + counts["balanced_known"] == 20, counts


def test_flask_without_the_setting_the_cookie_is_dropped_once_replayed(
    flask_factory: Any,
) -> None:
    """What the setting changes for the cookie: a plain replica drops it once replayed."""
    app = flask_factory()
    with app.test_client() as client:
        client.get("/items")
        assert client.post("/items", data={"name": "x"}).status_code == 303
        time.sleep(0.8)
        cookies = [client.get("/items").headers.get("Set-Cookie", "") for _ in range(5)]
    assert any("Max-Age=0" in cookie for cookie in cookies), cookies


def test_flask_cookieless_readers_use_both_servers(flask_factory: Any, reliability: Any) -> None:
    """Concurrent readers hold several connections, which HAProxy spreads over both
    servers (one reader at a time would reuse one pooled connection, so one server)."""
    app = flask_factory(**BALANCED)

    def reader(_: int) -> list[str]:
        with app.test_client() as client:
            return [client.get("/who").get_data(as_text=True) for _ in range(READS // 6)]

    served = Counter(_in_threads(6, reader))
    reliability("balanced address, Flask, cookie-less readers", dict(sorted(served.items())))
    assert served["primary"] == 0, served
    assert served["replica"] > 0, served
    assert served["lagging"] > 0, served
    assert app.extensions["replicated"].counters(app).get("balanced_checks", 0) == 0


def test_flask_jobs_with_a_token_read_their_write_through_a_balanced_address(
    flask_factory: Any, reliability: Any
) -> None:
    app = flask_factory(**BALANCED)
    rep = app.extensions["replicated"]
    served: Counter[str] = Counter()
    stale = 0
    with app.test_client() as client:
        client.get("/items")
    for _ in range(30):
        name = uuid.uuid4().hex
        with app.app_context():
            app.db.session.add(app.Item(name=name))
            app.db.session.commit()
            token = rep.consistency_token()
        with app.app_context(), use_replica(after=token):
            names = app.db.session.scalars(sa.select(app.Item.name)).all()
            served[app.backend.who(app.db.session)] += 1
            stale += name not in names
    reliability("balanced address, Flask jobs", _figures(served, stale, 30))
    assert stale == 0, served
    assert served["lagging"] == 0, served
    # Not asserted: a replica share. One job at a time may get the same pooled
    # connection every time, and so the same server: all replica, or all primary.
    assert served["replica"] + served["primary"] == 30, served


# -- Quart, test client -------------------------------------------------------------


async def _quart_pairs(
    app: Any, pairs: int, *, header: bool = False, pause: float = 0.0
) -> tuple[Counter[str], int]:
    served: Counter[str] = Counter()
    stale = 0
    client = app.test_client()
    await client.get("/items")
    deadline = time.monotonic() + TIME_CAP
    for _ in range(pairs):
        if time.monotonic() > deadline:
            break
        name = uuid.uuid4().hex
        posted = await client.post("/items", form={"name": name})
        assert posted.status_code == 303
        headers = {}
        if header:
            headers = {TOKEN_HEADER: posted.headers[TOKEN_HEADER]}
            client.cookie_jar.clear()
        await asyncio.sleep(pause)
        body = await (await client.get("/items", headers=headers)).get_json()
        served[body["node"]] += 1
        stale += name not in body["names"]
    return served, stale


@pytest.mark.parametrize("header", [False, True], ids=["cookie", "header"])
async def test_quart_a_writers_reads_through_a_balanced_address_are_never_stale(
    quart_factory: Any, reliability: Any, header: bool
) -> None:
    app = quart_factory(**BALANCED)
    served, stale = await _quart_pairs(app, PAIRS, header=header)
    counts = app.rep.counters(app)
    done = sum(served.values())
    figures = _figures(served, stale, done)
    figures["balanced checks"] = counts.get("balanced_checks", 0)
    figures["moved to the primary"] = counts.get("balanced_behind", 0)
    transport = "token header" if header else "cookie"
    reliability(f"balanced address, Quart test client, {transport}", figures)
    assert app.errors == []
    assert done == PAIRS
    assert stale == 0, served
    assert served["replica"] > 0, served
    assert served["lagging"] == 0, served
    assert served["primary"] == counts.get("balanced_behind", 0), (served, counts)


async def test_quart_without_the_setting_a_balanced_address_gives_stale_reads(
    quart_factory: Any,
) -> None:
    app = quart_factory()
    served, stale = await _quart_pairs(app, PAUSED_PAIRS, pause=PAUSE)
    assert stale > 0, served


async def test_quart_cookieless_readers_use_both_servers(
    quart_factory: Any, reliability: Any
) -> None:
    app = quart_factory(**BALANCED)
    client = app.test_client()

    async def reader() -> list[str]:
        return [await (await client.get("/who")).get_data(as_text=True) for _ in range(READS // 6)]

    served = Counter(
        name for names in await asyncio.gather(*[reader() for _ in range(6)]) for name in names
    )
    reliability("balanced address, Quart, cookie-less readers", dict(sorted(served.items())))
    assert served["primary"] == 0, served
    assert served["replica"] > 0, served
    assert served["lagging"] > 0, served


async def test_quart_jobs_with_a_token_read_their_write_through_a_balanced_address(
    quart_factory: Any, reliability: Any
) -> None:
    app = quart_factory(**BALANCED)
    served: Counter[str] = Counter()
    stale = 0
    await app.test_client().get("/items")
    for _ in range(30):
        name = uuid.uuid4().hex
        async with app.app_context():
            app.rep.session.add(app.Item(name=name))
            await app.rep.session.commit()
            token = await app.rep.consistency_token()
        async with app.app_context(), use_replica(after=token):
            names = (await app.rep.session.scalars(sa.select(app.Item.name))).all()
            served[await app.who()] += 1
            stale += name not in names
    reliability("balanced address, Quart jobs", _figures(served, stale, 30))
    assert stale == 0, served
    assert served["lagging"] == 0, served
    # Not asserted: a replica share (see the Flask test).
    assert served["replica"] + served["primary"] == 30, served


# -- the setting and the status command ------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            ["reader"],
            "'REPLICATED_BALANCED_REPLICAS' names 'reader', which is not a replica. The "
            "replicas are: 'slave'.",
        ),
        (
            "slave",
            "'REPLICATED_BALANCED_REPLICAS' must be a list of replica names, such as "
            "['reader'], got 'slave'. The replicas are: 'slave'.",
        ),
        (
            ["slave", "slave"],
            "'REPLICATED_BALANCED_REPLICAS' names a replica twice: ['slave', 'slave'].",
        ),
        (
            [3],
            "'REPLICATED_BALANCED_REPLICAS' names 3, which is not a replica. The "
            "replicas are: 'slave'.",
        ),
    ],
)
def test_a_bad_balanced_setting_fails_naming_the_key(value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config({"REPLICATED_BALANCED_REPLICAS": value})
    assert str(raised.value) == message


def test_balanced_replicas_by_url_are_named_by_their_key() -> None:
    config = load_config(
        {
            "REPLICATED_REPLICAS": {"reader": "postgresql://app@reader/app"},
            "REPLICATED_BALANCED_REPLICAS": ["reader"],
        }
    )
    assert config.balanced_replicas == frozenset({"reader"})


def test_the_status_command_shows_a_balanced_replica(flask_factory: Any) -> None:
    app = flask_factory(**BALANCED)
    result = app.test_cli_runner().invoke(args=["replicated", "status"])
    assert result.exit_code == 0, result.output
    header, primary, replica = result.output.splitlines()[:3]
    assert header.split()[-1] == "balanced"
    assert primary.split()[-1] == "-"
    assert replica.split()[0] == "slave"
    assert replica.split()[-1] == "yes"
    nodes = json.loads(
        app.test_cli_runner().invoke(args=["replicated", "status", "--json"]).output
    )["nodes"]
    assert [n["balanced"] for n in nodes] == [False, True]


# -- behind real servers --------------------------------------------------------------

APPS = Path(__file__).parent / "server_apps"
HOST = "127.0.0.1"
WORKERS = 4
CLIENTS = 8
SERVER_PAIRS = 25  # per client
SERVER_READS = 20  # cookie-less GETs per client


@dataclass(frozen=True)
class _Model:
    name: str
    command: Callable[[str], list[str]]


SERVER_MODELS = {
    "gunicorn-sync": _Model(
        "gunicorn sync",
        lambda bind: [
            *(sys.executable, "-m", "gunicorn", "--bind", bind, "--workers", str(WORKERS)),
            *("--worker-class", "sync", "--timeout", "20", "flask_app:app"),
        ],
    ),
    "hypercorn": _Model(
        "hypercorn",
        lambda bind: [
            *(sys.executable, "-m", "hypercorn", "--bind", bind, "--workers", str(WORKERS)),
            "quart_app:app",
        ],
    ),
}


@pytest.fixture(scope="module")
def server_items(pg_cluster: Any) -> int:
    """The servers' table, with one row every node has: what cookie-less readers read."""
    engine = sa.create_engine(pg_cluster.primary.url("psycopg"))
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS server_items"))
        conn.execute(
            sa.text("CREATE TABLE server_items (id SERIAL PRIMARY KEY, token VARCHAR(64) NOT NULL)")
        )
        seed: int = conn.execute(
            sa.text("INSERT INTO server_items (token) VALUES ('seed') RETURNING id")
        ).scalar_one()
    engine.dispose()
    pg_cluster.wait_for_replay(include_delayed=True)
    return seed


@pytest.fixture(scope="module", params=list(SERVER_MODELS))
def balanced_server(
    request: pytest.FixtureRequest,
    pg_cluster: Any,
    balancer: Any,
    server_items: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, str]]:
    """The server apps of tests/test_servers.py, their one replica the balanced address;
    4 workers; stopped with all their processes at the end."""
    model = SERVER_MODELS[request.param]
    primary = pg_cluster.primary
    settings = {
        "urls": {"primary": primary.url("psycopg"), "reader": balancer.url_for(primary.url())},
        "async_urls": {
            "primary": primary.url("asyncpg"),
            "reader": balancer.url_for(primary.url("asyncpg")),
        },
        "replicas": ["reader"],
        "secret_key": secrets.token_hex(16),
        "query_at_import": False,
        "config": {"REPLICATED_BALANCED_REPLICAS": ["reader"]},
    }
    env = {
        **os.environ,
        "SERVERS_TEST_SETTINGS": json.dumps(settings),
        "PYTHONPATH": os.pathsep.join([str(APPS), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHONUNBUFFERED": "1",
    }
    log_path = tmp_path_factory.mktemp("balanced-server") / "server.log"
    with listening_socket(HOST) as sock:
        server = ServerProcess.start(
            model.name,
            model.command(f"fd://{sock.fileno()}"),
            cwd=APPS,
            env=env,
            log_path=log_path,
            pass_fds=[sock.fileno()],
            redact=lambda text: text.replace(pg_cluster.password, "********"),
        )
        port = sock.getsockname()[1]
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            server.check_running()
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"'{model.name}' did not answer within 60 s:\n{server.log_tail()}")
            time.sleep(0.1)
        yield model.name, url
    finally:
        # SIGINT: gunicorn's quick shutdown; hypercorn shuts down on it too.
        server.stop(signal.SIGINT)


def _in_threads(count: int, loop: Callable[[int], list[Any]]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=count) as pool:
        return [item for items in pool.map(loop, range(count)) for item in items]


@pytest.mark.slow
@pytest.mark.parametrize("header", [False, True], ids=["cookie", "header"])
def test_servers_writers_read_their_writes_through_a_balanced_address(
    balanced_server: tuple[str, str], pg_cluster: Any, reliability: Any, header: bool
) -> None:
    """Real servers, 4 workers, 8 httpx clients with their own cookies (or only the
    token header), 25 POST-then-GET pairs each: 0 stale."""
    name, url = balanced_server
    ports = {node.port: node.name for node in pg_cluster.nodes}
    deadline = time.monotonic() + TIME_CAP

    def client_loop(number: int) -> list[tuple[int, str | None]]:
        outcomes: list[tuple[int, str | None]] = []
        with httpx.Client(base_url=url, timeout=15) as client:
            for _ in range(SERVER_PAIRS):
                if time.monotonic() > deadline:
                    break
                token = uuid.uuid4().hex
                posted = client.post("/items", data={"token": token})
                assert posted.status_code == 201, posted.text
                headers = {}
                if header:
                    headers = {TOKEN_HEADER: posted.headers[TOKEN_HEADER]}
                    client.cookies.clear()
                got = client.get(f"/items/{posted.json()['id']}", headers=headers)
                body = got.json()
                outcomes.append((got.status_code, ports.get(body.get("port"))))
        return outcomes

    outcomes = _in_threads(CLIENTS, client_loop)
    stale = sum(1 for status, _ in outcomes if status == 404)
    served = Counter(node or "?" for status, node in outcomes if status == 200)
    transport = "token header" if header else "cookie"
    figures = _figures(served, stale, len(outcomes))
    reliability(f"balanced address, {name}, {transport}", figures)
    assert len(outcomes) == CLIENTS * SERVER_PAIRS
    assert stale == 0, served
    # Not asserted: that 'lagging' served none. A GET queued for longer than its delay
    # (500 ms) finds the write there too, which is no stale read.
    assert served["replica"] > 0, served


@pytest.mark.slow
def test_servers_cookieless_readers_use_both_servers(
    balanced_server: tuple[str, str], pg_cluster: Any, server_items: int, reliability: Any
) -> None:
    name, url = balanced_server
    ports = {node.port: node.name for node in pg_cluster.nodes}
    deadline = time.monotonic() + TIME_CAP

    def reader(_: int) -> list[str]:
        seen: list[str] = []
        with httpx.Client(base_url=url, timeout=15) as client:
            for _ in range(SERVER_READS):
                if time.monotonic() > deadline:
                    break
                got = client.get(f"/items/{server_items}")
                assert got.status_code == 200, got.text
                seen.append(ports.get(got.json()["port"], "?"))
        return seen

    served = Counter(_in_threads(CLIENTS, reader))
    reliability(f"balanced address, {name}, cookie-less readers", dict(sorted(served.items())))
    assert sum(served.values()) == CLIENTS * SERVER_READS
    assert served["primary"] == 0, served
    assert served["replica"] > 0, served
    assert served["lagging"] > 0, served
