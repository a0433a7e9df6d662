"""Replicas found through DNS (REPLICATED_REPLICA_DISCOVERY): a real DNS server
(dnsmasq on loopback) whose records the tests change, and real replicas that listen on
their own loopback addresses (A records) or ports (SRV records). The server that
answered a read says who it is."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from quart import Quart
from sqlalchemy import text

from flask_replicated import FlaskReplicated
from quart_replicated import QuartReplicated
from replicated_core.config import load_config
from replicated_core.errors import ConfigError
from replicated_core.testing.pgcluster import ReplicaSpec, free_port

NAME = "replicas.test"
SRV_NAME = "_postgresql._tcp.replicas.test"
WHO = "SELECT host(inet_server_addr()), inet_server_port(), pg_is_in_recovery()"
INTERVAL = 0.2  # seconds between two resolutions
DEADLINE = 10.0  # the bound of every wait below


@pytest.fixture(scope="module")
def a_cluster(pg_cluster_factory: Any) -> Any:
    """A primary and two replicas on one port, at 127.0.0.2 and 127.0.0.3: one DNS
    name with two A records reaches both."""
    port = free_port()
    return pg_cluster_factory(
        [
            ReplicaSpec("disc_a", host="127.0.0.2", port=port),
            ReplicaSpec("disc_b", host="127.0.0.3", port=port),
        ]
    )


def _discovery(
    cluster: Any, dns: Any, driver: str, record: str = "A", **extra: Any
) -> dict[str, Any]:
    port = cluster.replicas[0].port
    host = NAME if record == "A" else SRV_NAME
    return {
        "url": f"postgresql+{driver}://postgres:{cluster.password}@{host}:{port}/app",
        "record": record,
        "interval": INTERVAL,
        "nameservers": [dns.nameserver],
        **extra,
    }


def _flask_app(
    cluster: Any, dns: Any, record: str = "A", check_interval: float = 0.05, **extra: Any
) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="discovery-tests",
        SQLALCHEMY_DATABASE_URI=cluster.primary.url("psycopg"),
        REPLICATED_CHECK_INTERVAL=check_interval,
        REPLICATED_REPLICA_DISCOVERY=_discovery(cluster, dns, "psycopg", record, **extra),
    )
    db = SQLAlchemy(app)
    FlaskReplicated(app)

    @app.get("/who")
    def who() -> str:
        address, port, recovery = db.session.execute(text(WHO)).one()
        return f"{address}:{port}:{recovery}"

    @app.get("/slow")
    def slow() -> str:
        db.session.execute(text("SELECT pg_sleep(1.5)"))
        address, port, recovery = db.session.execute(text(WHO)).one()
        return f"{address}:{port}:{recovery}"

    app.extensions["db"] = db
    return app


def _dispose_flask(app: Flask) -> None:
    router = app.extensions["replicated"].router(app)
    router.close()
    engines = [n.engine for n in (router.primary, *router.replicas)]
    engines += [leaving.node.engine for leaving in router.discovery._leaving]
    for engine in engines:
        engine.dispose()


def _flask_who(client: Any) -> str:
    response = client.get("/who")
    assert response.status_code == 200, response.text
    return str(response.text)


def _wait(predicate: Any, what: str) -> float:
    """Wait (bounded) until ``predicate()``; how long it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > DEADLINE:
            pytest.fail(f"Not within {DEADLINE:g} s: {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def _usable_in_prometheus(router: Any) -> dict[str, float]:
    from replicated_core.prometheus import ReplicatedCollector

    [usable] = [
        m for m in ReplicatedCollector(lambda: [router]).collect() if m.name.endswith("usable")
    ]
    return {sample.labels["node"]: sample.value for sample in usable.samples}


def _names(router: Any) -> set[str]:
    return {node.name for node in router.replicas}


# -- Flask, A records --------------------------------------------------------------------


def test_flask_replicas_join_and_leave_with_their_a_records(a_cluster, dns_server, caplog):
    port = a_cluster.replicas[0].port
    dns_server.set_a(NAME, ["127.0.0.2"])
    app = _flask_app(a_cluster, dns_server)
    router = app.extensions["replicated"].router(app)
    client = app.test_client()
    try:
        assert _names(router) == {f"{NAME}/127.0.0.2:{port}"}
        # The first read waits for the first round of checks: the replica is known fine.
        assert {_flask_who(client) for _ in range(20)} == {f"127.0.0.2:{port}:True"}

        dns_server.set_a(NAME, ["127.0.0.2", "127.0.0.3"])
        seen: set[str] = set()

        def both_read() -> bool:
            seen.add(_flask_who(client))
            return f"127.0.0.3:{port}:True" in seen

        joined_after = _wait(both_read, "the new replica 127.0.0.3 takes reads")
        # Within an interval and a check (plus the jitter and a busy machine's slack).
        assert joined_after < INTERVAL * 1.1 + 2.0
        assert seen <= {f"127.0.0.2:{port}:True", f"127.0.0.3:{port}:True"}

        assert _usable_in_prometheus(router) == {
            f"{NAME}/127.0.0.2:{port}": 1.0,
            f"{NAME}/127.0.0.3:{port}": 1.0,
        }

        dns_server.set_a(NAME, ["127.0.0.3"])
        _wait(lambda: _names(router) == {f"{NAME}/127.0.0.3:{port}"}, "127.0.0.2 leaves")
        assert {_flask_who(client) for _ in range(30)} == {f"127.0.0.3:{port}:True"}
        assert _usable_in_prometheus(router) == {f"{NAME}/127.0.0.3:{port}": 1.0}
        assert a_cluster.password not in caplog.text
    finally:
        _dispose_flask(app)


def test_flask_a_replica_that_joins_is_checked_before_it_takes_reads(a_cluster, dns_server):
    """127.0.0.4 has no server: found in DNS, it is checked, marked down, never read,
    also between its joining and its first check (checks half a second apart here)."""
    port = a_cluster.replicas[0].port
    dns_server.set_a(NAME, ["127.0.0.2"])
    app = _flask_app(a_cluster, dns_server, check_interval=0.5)
    router = app.extensions["replicated"].router(app)
    client = app.test_client()
    try:
        _flask_who(client)
        dns_server.set_a(NAME, ["127.0.0.2", "127.0.0.4"])
        dead = f"{NAME}/127.0.0.4:{port}"
        answers: set[str] = set()
        start = time.monotonic()
        for _ in range(5000):  # as many reads as fit, with no pause, until it is down
            answers.add(_flask_who(client))
            state = router.health.states.get(dead)
            if state is not None and state.down_since is not None:
                break
            assert time.monotonic() - start < DEADLINE
        else:
            pytest.fail("127.0.0.4 was not marked down within 5000 reads")
        answers |= {_flask_who(client) for _ in range(20)}
        assert answers == {f"127.0.0.2:{port}:True"}
        assert router.metrics().get("retries", 0) == 0  # no read was sent there
    finally:
        _dispose_flask(app)


def test_flask_a_request_in_flight_on_a_leaving_replica_completes_then_it_is_drained(
    a_cluster, dns_server
):
    port = a_cluster.replicas[0].port
    dns_server.set_a(NAME, ["127.0.0.2"])
    app = _flask_app(a_cluster, dns_server)
    router = app.extensions["replicated"].router(app)
    client = app.test_client()
    try:
        assert _flask_who(client) == f"127.0.0.2:{port}:True"
        [leaving] = router.replicas
        pool = leaving.engine.pool
        answers: list[Any] = []
        slow = threading.Thread(target=lambda: answers.append(client.get("/slow")))
        slow.start()
        _wait(lambda: pool.checkedout() == 1, "the slow read holds its connection")

        dns_server.set_a(NAME, ["127.0.0.3"])
        _wait(lambda: leaving not in router.replicas, "127.0.0.2 leaves")
        _wait(lambda: _flask_who(client) == f"127.0.0.3:{port}:True", "reads go to 127.0.0.3")
        # New reads never reach the replica that left, while its slow read goes on.
        assert {_flask_who(client) for _ in range(20)} == {f"127.0.0.3:{port}:True"}
        assert slow.is_alive()
        assert leaving.engine.pool is pool  # not disposed of under the read
        assert router.discovery.status().draining == (leaving.name,)

        slow.join(DEADLINE)
        [response] = answers
        assert (response.status_code, response.text) == (200, f"127.0.0.2:{port}:True")
        _wait(lambda: leaving.engine.pool is not pool, "the pool of 127.0.0.2 is disposed of")
        assert pool.checkedin() == 0  # its connections were closed
        assert router.discovery.status().draining == ()
    finally:
        _dispose_flask(app)


def test_flask_a_resolver_down_keeps_the_last_set(a_cluster, dns_server, caplog):
    port = a_cluster.replicas[0].port
    dns_server.set_a(NAME, ["127.0.0.2", "127.0.0.3"])
    app = _flask_app(a_cluster, dns_server, timeout=0.2)
    router = app.extensions["replicated"].router(app)
    discovery = router.discovery
    client = app.test_client()
    try:
        _flask_who(client)
        before = _names(router)
        assert len(before) == 2
        dns_server.stop()
        failures = discovery.failures
        _wait(lambda: _flask_who(client) and discovery.failures >= failures + 3, "3 failures")
        assert _names(router) == before
        assert router.metrics()["discovery_failures"] == discovery.failures >= 3
        answers = {_flask_who(client) for _ in range(40)}
        assert answers == {f"127.0.0.2:{port}:True", f"127.0.0.3:{port}:True"}
        status = discovery.status()
        assert str(status.error).startswith(
            "LifetimeTimeout: The resolution lifetime expired after "
        )
        failed = [r for r in caplog.records if r.getMessage().startswith("Could not resolve")]
        assert len(failed) == 1  # once per episode
        assert failed[0].levelno == logging.WARNING
        assert (
            failed[0]
            .getMessage()
            .endswith(
                f"The 2 replicas found before keep serving reads; it is tried again every "
                f"{INTERVAL:g} s, and this is logged once until it resolves again."
            )
        )

        dns_server.start()
        _wait(lambda: _flask_who(client) and discovery.status().error is None, "resolves again")
        assert "The replicas of 'REPLICATED_REPLICA_DISCOVERY' resolve again: 2 found." in (
            caplog.text
        )
        assert _names(router) == before
    finally:
        _dispose_flask(app)


def test_flask_status_shows_discovery(a_cluster, dns_server):
    port = a_cluster.replicas[0].port
    dns_server.set_a(NAME, ["127.0.0.2", "127.0.0.3"])
    app = _flask_app(a_cluster, dns_server)
    try:
        runner = app.test_cli_runner()
        result = runner.invoke(args=["replicated", "status", "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        names = [f"{NAME}/127.0.0.2:{port}", f"{NAME}/127.0.0.3:{port}"]
        assert [n["name"] for n in report["nodes"]] == ["(default)", *names]
        assert [n["address"] for n in report["nodes"][1:]] == [
            f"127.0.0.2:{port}/app",
            f"127.0.0.3:{port}/app",
        ]
        assert all(n["usable"] for n in report["nodes"][1:])
        discovery = report["discovery"]
        assert discovery["resolved_ago"] >= 0
        del discovery["resolved_ago"]
        assert discovery == {
            "name": NAME,
            "record": "A",
            "interval": INTERVAL,
            "replicas": names,
            "draining": [],
            "resolutions": 1,
            "failures": 0,
            "error": None,
        }
        table = runner.invoke(args=["replicated", "status"]).output
        last = table.splitlines()[-1]
        assert last.startswith(
            f"discovery: A records of {NAME} every {INTERVAL:g} s: 2 replicas, resolved "
        )
        assert a_cluster.password not in result.output + table
    finally:
        _dispose_flask(app)


@pytest.mark.filterwarnings("ignore:This process .* fork:DeprecationWarning")
def test_flask_workers_forked_after_discovery_resolve_on_their_own(a_cluster, dns_server):
    """gunicorn --preload: the app resolved and read before the fork; each child reads
    from the discovered replicas and resolves again itself (no lock or thread of the
    parent's). Its discovery counters start at 0, as its other counters do: the
    multiprocess mirror sums the processes' counts, so a child that kept the parent's
    would count the parent's resolutions once more."""
    from test_forks import run_children

    port = a_cluster.replicas[0].port
    dns_server.set_a(NAME, ["127.0.0.2", "127.0.0.3"])
    app = _flask_app(a_cluster, dns_server, timeout=0.2)
    router = app.extensions["replicated"].router(app)
    client = app.test_client()
    keys = ("position_checks", "discovery_resolutions", "discovery_failures")
    try:
        _flask_who(client)  # the prober runs, the pools hold connections
        dns_server.stop()  # a failure too, for the child not to inherit
        failures = router.discovery.failures
        _wait(lambda: _flask_who(client) and router.discovery.failures > failures, "a failure")
        dns_server.start()
        _wait(lambda: _flask_who(client) and router.discovery.status().error is None, "again")
        assert all(router.metrics()[key] > 0 for key in keys)

        def child(index: int) -> dict[str, Any]:
            at_fork = {key: router.metrics()[key] for key in keys}
            answers = sorted({_flask_who(client) for _ in range(20)})
            start = time.monotonic()
            while router.discovery.resolutions < 1 and time.monotonic() - start < 5:
                _flask_who(client)
                time.sleep(0.02)
            return {
                "at_fork": at_fork,
                "answers": answers,
                "resolved": router.discovery.resolutions >= 1,
            }

        reports = run_children(child)
        assert reports == [
            {
                "at_fork": dict.fromkeys(keys, 0),
                "answers": [f"127.0.0.2:{port}:True", f"127.0.0.3:{port}:True"],
                "resolved": True,
            }
        ] * len(reports)
    finally:
        _dispose_flask(app)


@pytest.mark.parametrize("fixed", [False, True])
def test_flask_the_dns_server_down_at_start_up_is_logged_as_no_replica_found_yet(
    caplog: Any, fixed: bool
) -> None:
    """No replica was found before: reads go to the fixed replicas, or the primary."""
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="discovery-tests",
        SQLALCHEMY_DATABASE_URI="postgresql+psycopg://app:s3cret@127.0.0.1:1/app",
        REPLICATED_REPLICA_DISCOVERY={
            "url": "postgresql+psycopg://app:s3cret@replicas.test:1/app",
            "timeout": 0.3,
            "nameservers": ["127.0.0.1:9"],  # nothing answers there
        },
    )
    if fixed:
        app.config["REPLICATED_REPLICAS"] = {
            "reporting": "postgresql+psycopg://app:s3cret@127.0.0.2:1/app"
        }
    SQLAlchemy(app)
    with caplog.at_level(logging.WARNING, logger="replicated"):
        router = FlaskReplicated(app).router(app)
    try:
        [record] = [r for r in caplog.records if r.getMessage().startswith("Could not resolve")]
        where = "the fixed replicas" if fixed else "the primary"
        start = (
            "Could not resolve the replicas of 'REPLICATED_REPLICA_DISCOVERY' (A records of "
            f"'{NAME}'): {str(router.discovery.status().error).rstrip('.')}. "
        )
        assert record.getMessage() == start + (
            f"No replica has been found yet: reads go to {where} until the name resolves; "
            "it is tried again every 30 s, and this is logged once until it resolves."
        )
        assert "s3cret" not in caplog.text
        assert router.discovery.failures == 1
    finally:
        router.close()


# -- Flask, SRV records ------------------------------------------------------------------


def test_flask_srv_records_give_each_replica_its_port(pg_cluster, dns_server):
    replica, lagging = pg_cluster.replica("replica"), pg_cluster.replica("lagging")
    dns_server.set_srv(SRV_NAME, [("127.0.0.1", replica.port)])
    app = _flask_app(pg_cluster, dns_server, record="SRV")
    router = app.extensions["replicated"].router(app)
    client = app.test_client()
    try:
        assert _names(router) == {f"{SRV_NAME}/127.0.0.1:{replica.port}"}
        assert {_flask_who(client) for _ in range(10)} == {f"127.0.0.1:{replica.port}:True"}
        dns_server.set_srv(SRV_NAME, [("127.0.0.1", lagging.port)])
        _wait(lambda: _flask_who(client) == f"127.0.0.1:{lagging.port}:True", "the move")
        assert _names(router) == {f"{SRV_NAME}/127.0.0.1:{lagging.port}"}
    finally:
        _dispose_flask(app)


# -- Quart -------------------------------------------------------------------------------


def _quart_app(cluster: Any, dns: Any, record: str = "A", **extra: Any) -> Quart:
    app = Quart(__name__)
    app.config.update(
        SECRET_KEY="discovery-tests",
        SQLALCHEMY_DATABASE_URI=cluster.primary.url("asyncpg"),
        REPLICATED_CHECK_INTERVAL=0.05,
        REPLICATED_REPLICA_DISCOVERY=_discovery(cluster, dns, "asyncpg", record, **extra),
    )
    rep = QuartReplicated(app)

    @app.get("/who")
    async def who() -> str:
        address, port, recovery = (await rep.session.execute(text(WHO))).one()
        return f"{address}:{port}:{recovery}"

    @app.get("/slow")
    async def slow() -> str:
        await rep.session.execute(text("SELECT pg_sleep(1.5)"))
        address, port, recovery = (await rep.session.execute(text(WHO))).one()
        return f"{address}:{port}:{recovery}"

    return app


async def _quart_who(client: Any) -> str:
    response = await client.get("/who")
    body = await response.get_data(as_text=True)
    assert response.status_code == 200, body
    return str(body)


async def _wait_async(predicate: Any, what: str) -> None:
    start = time.monotonic()
    while not await predicate():
        if time.monotonic() - start > DEADLINE:
            pytest.fail(f"Not within {DEADLINE:g} s: {what}")
        await asyncio.sleep(0.02)


async def test_quart_srv_replicas_join_and_leave(pg_cluster, dns_server):
    replica, lagging = pg_cluster.replica("replica"), pg_cluster.replica("lagging")
    dns_server.set_srv(SRV_NAME, [("127.0.0.1", replica.port)])
    app = _quart_app(pg_cluster, dns_server, record="SRV")
    rep = app.extensions["replicated"]
    router = rep.router(app)
    client = app.test_client()
    try:
        assert {await _quart_who(client) for _ in range(10)} == {f"127.0.0.1:{replica.port}:True"}
        await asyncio.to_thread(
            dns_server.set_srv, SRV_NAME, [("127.0.0.1", replica.port), ("127.0.0.1", lagging.port)]
        )
        seen: set[str] = set()

        async def both() -> bool:
            seen.add(await _quart_who(client))
            return f"127.0.0.1:{lagging.port}:True" in seen

        await _wait_async(both, "the new replica takes reads")
        await asyncio.to_thread(dns_server.set_srv, SRV_NAME, [("127.0.0.1", lagging.port)])

        async def gone() -> bool:
            await _quart_who(client)
            return _names(router) == {f"{SRV_NAME}/127.0.0.1:{lagging.port}"}

        await _wait_async(gone, "the first replica leaves")
        assert {await _quart_who(client) for _ in range(20)} == {f"127.0.0.1:{lagging.port}:True"}
    finally:
        await rep.dispose(app)


async def test_quart_a_request_in_flight_on_a_leaving_replica_completes_then_it_is_drained(
    a_cluster, dns_server
):
    port = a_cluster.replicas[0].port
    dns_server.set_a(NAME, ["127.0.0.2"])
    app = _quart_app(a_cluster, dns_server)
    rep = app.extensions["replicated"]
    router = rep.router(app)
    client = app.test_client()
    try:
        assert await _quart_who(client) == f"127.0.0.2:{port}:True"
        [leaving] = router.replicas
        pool = leaving.engine.pool
        slow = asyncio.create_task(client.get("/slow"))

        async def holding() -> bool:
            return bool(pool.checkedout() == 1)

        await _wait_async(holding, "the slow read holds its connection")
        await asyncio.to_thread(dns_server.set_a, NAME, ["127.0.0.3"])

        async def moved() -> bool:
            return await _quart_who(client) == f"127.0.0.3:{port}:True"

        await _wait_async(moved, "reads go to 127.0.0.3")
        assert leaving not in router.replicas
        assert {await _quart_who(client) for _ in range(20)} == {f"127.0.0.3:{port}:True"}
        assert not slow.done()
        assert router.discovery.status().draining == (leaving.name,)

        response = await asyncio.wait_for(slow, DEADLINE)
        body = await response.get_data(as_text=True)
        assert (response.status_code, body) == (200, f"127.0.0.2:{port}:True")

        async def drained() -> bool:
            await _quart_who(client)  # the prober runs while requests come
            return router.discovery.status().draining == ()

        await _wait_async(drained, "127.0.0.2 is drained")

        async def disposed() -> bool:
            await _quart_who(client)
            return leaving.name not in rep._state(app).by_node and pool.checkedin() == 0

        await _wait_async(disposed, "the engine of 127.0.0.2 is disposed of")
    finally:
        await rep.dispose(app)


async def test_quart_resolver_down_keeps_the_last_set_and_status_shows_it(
    a_cluster, dns_server, caplog
):
    port = a_cluster.replicas[0].port
    dns_server.set_a(NAME, ["127.0.0.2", "127.0.0.3"])
    app = _quart_app(a_cluster, dns_server, timeout=0.2)
    rep = app.extensions["replicated"]
    router = rep.router(app)
    discovery = router.discovery
    client = app.test_client()
    names = (f"{NAME}/127.0.0.2:{port}", f"{NAME}/127.0.0.3:{port}")
    try:
        await _quart_who(client)
        await asyncio.to_thread(dns_server.stop)
        failures = discovery.failures

        async def failed_thrice() -> bool:
            await _quart_who(client)  # the prober runs while requests come
            return discovery.failures >= failures + 3

        await _wait_async(failed_thrice, "3 failed resolutions")
        assert tuple(sorted(_names(router))) == names
        answers = {await _quart_who(client) for _ in range(40)}
        assert answers == {f"127.0.0.2:{port}:True", f"127.0.0.3:{port}:True"}
        failed = [r for r in caplog.records if r.getMessage().startswith("Could not resolve")]
        assert len(failed) == 1

        status = (await rep.status(app)).discovery
        assert status is not None
        assert (status.replicas, status.draining) == (names, ())
        assert str(status.error).startswith("LifetimeTimeout: ")
        assert status.resolved_ago is not None
        assert status.resolved_ago > INTERVAL  # the last one that answered
        assert (
            (await rep.status(app))
            .to_table()
            .splitlines()[-1]
            .startswith(
                f"discovery: A records of {NAME} every {INTERVAL:g} s: 2 replicas, resolved "
            )
        )
        assert a_cluster.password not in caplog.text
    finally:
        await rep.dispose(app)


# -- configuration -----------------------------------------------------------------------


def _error(discovery: Any, **settings: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config({"REPLICATED_REPLICA_DISCOVERY": discovery, **settings})
    return str(caught.value)


def test_bad_discovery_settings_fail_with_a_sentence_naming_the_key():
    url = "postgresql://app:s3cret@replicas.test/app"
    key = "REPLICATED_REPLICA_DISCOVERY"
    assert _error({"url": url, "intervall": 3}) == (
        f"'{key}' has an unknown key 'intervall'. Its keys are: 'url', 'record', 'interval', "
        "'nameservers', 'timeout', 'drain_timeout', 'engine_options' (engine options go in "
        "'engine_options')."
    )
    assert _error({"url": url, "record": "AAAA"}) == (
        f"'{key}['record']' must be one of 'A', 'SRV', got 'AAAA'."
    )
    assert _error({"url": url, "interval": 0}) == (
        f"'{key}['interval']' must be a positive number of seconds, got 0."
    )
    assert _error({"url": url, "nameservers": ["dns.local"]}) == (
        f"'{key}['nameservers']' must hold IP addresses with an optional port, such as "
        "'127.0.0.1:5353', got 'dns.local'."
    )
    assert _error({"url": "sqlite:///replica.db"}) == (
        f"'{key}['url']' must be a database server's URL whose host is the DNS name to "
        "resolve, got 'sqlite:///replica.db'."
    )
    assert _error({"url": "postgresql://app:s3cret@/app?host=/run/postgresql"}) == (
        f"'{key}['url']' must be a database server's URL whose host is the DNS name to "
        "resolve, got 'postgresql://app:***@/app?host=%2Frun%2Fpostgresql'."
    )
    assert _error({"url": url}, REPLICATED_REPLICA_BINDS=["slave"]) == (
        f"'{key}' and 'REPLICATED_REPLICA_BINDS' are both set. Give the replicas one way: by "
        f"URL in '{key}' (the primary is then SQLALCHEMY_DATABASE_URI), or as binds named in "
        "'REPLICATED_REPLICA_BINDS'."
    )
    assert _error(url) == (
        f"'{key}' must be a dict such as {{'url': "
        "'postgresql://app@replicas.db.internal/app', 'interval': 30}, got "
        "'postgresql://app:***@replicas.test/app'."
    )


def test_a_password_in_bad_discovery_engine_options_is_not_shown():
    """Keys are shown, as names; no text in a value is, at any depth (any may be a secret)."""
    url = "postgresql://app:s3cret@replicas.test/app"
    start = (
        "'REPLICATED_REPLICA_DISCOVERY['engine_options']' must be a dict of engine options, "
        "such as {'pool_size': 10}, got "
    )
    cases = [
        (
            {"connect_args": {"password": "s3cret"}, 5: 1},
            "{'connect_args': {'password': '***'}, 5: 1}.",
        ),
        ([("connect_args", {"password": "s3cret"})], "[('connect_args', {'password': '***'})]."),
        ([("password", "s3cret"), ("pool_size", 5)], "[('password', '***'), ('pool_size', 5)]."),
        ({"connect_args": {"passwd": 1234}, 5: 1}, "{'connect_args': {'passwd': '***'}, 5: 1}."),
        (
            {"connect_args": {"options": ["-c", "s3cret"]}, 5: 1},
            "{'connect_args': {'options': ['***', '***']}, 5: 1}.",
        ),
    ]
    for options, shown in cases:
        assert _error({"url": url, "engine_options": options}) == start + shown


def test_bad_engine_options_of_discovered_replicas_fail_at_start_up():
    discovery = {
        "url": "postgresql+psycopg://app:s3cret@replicas.test/app",
        "engine_options": {"pool_sizee": 3},
    }
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI="sqlite://", REPLICATED_REPLICA_DISCOVERY=discovery)
    SQLAlchemy(app)
    named = (
        "'REPLICATED_REPLICA_DISCOVERY' cannot make an engine (TypeError): the engine takes"
        " no option 'pool_sizee'. Fix or remove it."
    )
    with pytest.raises(ConfigError) as caught:
        FlaskReplicated(app)
    assert str(caught.value) == named  # the same sentence in both adapters
    assert "s3cret" not in str(caught.value)
    quart = Quart(__name__)
    quart.config.update(
        SQLALCHEMY_DATABASE_URI="sqlite+aiosqlite://",
        REPLICATED_REPLICA_DISCOVERY={
            **discovery,
            "url": "postgresql+asyncpg://app@replicas.test/app",
        },
    )
    with pytest.raises(ConfigError) as caught:
        QuartReplicated(quart)
    assert str(caught.value) == named


def test_discovery_settings_defaults_and_nameserver_ports():
    config = load_config(
        {
            "REPLICATED_REPLICA_DISCOVERY": {
                "url": "postgresql+psycopg://app@replicas.test/app",
                "nameservers": ["10.0.0.2", "127.0.0.1:5353", "[fd00::53]:5300"],
            }
        }
    )
    spec = config.discovery
    assert spec is not None
    assert (spec.name, spec.record.value, spec.interval, spec.timeout, spec.drain_timeout) == (
        "replicas.test",
        "A",
        30.0,
        2.0,
        60.0,
    )
    assert spec.nameservers == (("10.0.0.2", 53), ("127.0.0.1", 5353), ("fd00::53", 5300))
    assert (config.primary_bind, config.replica_binds, config.replicas) == (None, (), ())
