"""Real app servers on the real cluster: gunicorn (sync, gthread, sync with --preload and
an app that queries at import) and hypercorn, 4 workers each, driven over HTTP by httpx
from 20 clients, each with its own cookies. Figures go to the terminal summary.

Each server model gets a server of its own, started once for the three tests below
(in this order: the first sees the workers' replica picks from their very first read)
and always stopped, with every process of its group, at the end.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from support import group_members, listening_socket, wait_for_group_exit

pytestmark = pytest.mark.slow

APPS = Path(__file__).parent / "server_apps"
HOST = "127.0.0.1"
WORKERS = 4
THREADS = 4  # gthread's threads per worker
CLIENTS = 20
PAIRS = 25  # POST then GET, per client
READS = 20  # cookie-less GETs per client
PHASE_CAP = 60.0  # seconds: every load loop stops by then, whatever it has done
# Longer than the server's own worker timeout, so that a hung worker is killed by the
# server (and shows in its log) before a client gives up on it.
REQUEST_TIMEOUT = 15.0
WORKER_TIMEOUT = 10
START_TIMEOUT = 60.0
COOKIE = "replicated_sticky"
TOKEN_HEADER = "Replicated-Token"  # the default REPLICATED_TOKEN_HEADER
CLOSE = {"Connection": "close"}
REPLICAS = ["r1", "r2", "lagging"]
PAUSED = "r1"
BEFORE, PAUSE, AFTER = 2.5, 3.0, 2.0
WARM_UP_READS = 3  # per client, before the clock starts: every worker's pools open
# The pick order of two workers is compared over their first reads: with independent
# random generators and three replicas, two workers agree on all of them by chance
# with probability (1/3)**10, one in 59,000.
SEQUENCE = 10
# Each of the three replicas gets a third of cookie-less reads on average; of 400, a
# share under 15% is 8 standard deviations off (room for a replica left out for a
# second by a late check on a busy machine), yet "every worker picks the same one"
# (or the primary serves them) gives 0%.
MIN_SHARE = 0.15
# As in tests/test_faults.py: a 3 s pause spans several downtimes and check timeouts,
# as a pause of a minute does with the defaults (2 s and 30 s).
APP_CONFIG = {"REPLICATED_CONNECT_TIMEOUT": 1, "REPLICATED_REPLICA_DOWNTIME": 1}
# The target is "at least half of before"; what is asserted is a floor far
# below it (see test_replica_pause) and the exact ratio is printed.
TARGET_RATIO = 0.5
FLOOR_RATIO = 0.10
# A writer's next read served by a replica (issue 14, requirement 4).
TARGET_SHARE = 0.98


# -- the cluster --------------------------------------------------------------------


@dataclass
class Cluster:
    cluster: Any
    seed_id: int  # a row every node has: what cookie-less readers read
    names: dict[int, str]  # port -> node name

    def redact(self, text: str) -> str:
        return text.replace(self.cluster.password, "********")


@pytest.fixture(scope="module")
def servers_cluster(pg_cluster_factory: Callable[..., Any]) -> Iterator[Cluster]:
    """A primary, two replicas and one that applies commits 500 ms late, with one row;
    stopped when the module is done rather than at the end of the session."""
    from replicated_core.testing.pgcluster import ReplicaSpec

    cluster = pg_cluster_factory(
        [ReplicaSpec("r1"), ReplicaSpec("r2"), ReplicaSpec("lagging", apply_delay_ms=500)]
    )
    engine = sa.create_engine(cluster.primary.url("psycopg"))
    with engine.begin() as conn:
        conn.execute(
            sa.text("CREATE TABLE server_items (id SERIAL PRIMARY KEY, token VARCHAR(64) NOT NULL)")
        )
        seed_id = conn.execute(
            sa.text("INSERT INTO server_items (token) VALUES ('seed') RETURNING id")
        ).scalar_one()
    engine.dispose()
    cluster.wait_for_replay(include_delayed=True)
    names = {node.port: node.name for node in cluster.nodes}
    yield Cluster(cluster, seed_id, names)
    cluster.stop()


# -- the servers --------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """One way to serve the app: the command (given the address to bind) and what it runs."""

    name: str
    command: Callable[[str], list[str]]
    query_at_import: bool = False


def _gunicorn(*options: str) -> Callable[[str], list[str]]:
    def command(bind: str) -> list[str]:
        return [
            *(sys.executable, "-m", "gunicorn", "--bind", bind),
            *("--workers", str(WORKERS), "--timeout", str(WORKER_TIMEOUT)),
            *("--graceful-timeout", "5", *options, "flask_app:app"),
        ]

    return command


def _hypercorn(bind: str) -> list[str]:
    return [
        *(sys.executable, "-m", "hypercorn", "--bind", bind),
        *("--workers", str(WORKERS), "quart_app:app"),
    ]


# Keyed by test id (no spaces, for -k and node ids); the name is what figures say.
MODELS = {
    model.name.replace(" --", "-").replace(" ", "-"): model
    for model in [
        Model("gunicorn sync", _gunicorn("--worker-class", "sync")),
        Model(
            "gunicorn gthread",
            _gunicorn("--worker-class", "gthread", "--threads", str(THREADS)),
        ),
        Model(
            "gunicorn sync --preload",
            _gunicorn("--worker-class", "sync", "--preload"),
            query_at_import=True,
        ),
        Model("hypercorn", _hypercorn),
    ]
}


@dataclass
class Server:
    model: Model
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    cluster: Cluster
    workers: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log(self) -> str:
        return self.cluster.redact(self.log_path.read_text(errors="replace"))

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def worker_timeouts(self) -> list[str]:
        """The server's log lines that say it killed a worker for hanging."""
        return [line for line in self.log().splitlines() if "WORKER TIMEOUT" in line]

    def wait_ready(self) -> None:
        """Wait until every worker has answered ``GET /health`` (it loaded the app)."""
        deadline = time.monotonic() + START_TIMEOUT
        with httpx.Client(base_url=self.url, timeout=5, verify=_SSL) as client:

            def ask(_: int) -> int | None:
                try:
                    # A new connection each time: a kept-alive one stays with one worker.
                    response = client.get("/health", headers=CLOSE)
                except httpx.HTTPError:
                    return None
                return int(response.json()["pid"]) if response.status_code == 200 else None

            with ThreadPoolExecutor(max_workers=8) as pool:
                while len(self.workers) < WORKERS:
                    if self.process.poll() is not None:
                        pytest.fail(
                            f"The server '{self.model.name}' exited with status"
                            f" {self.process.returncode} while starting; its log says:\n"
                            + self.log_tail()
                        )
                    if time.monotonic() > deadline:
                        pytest.fail(
                            f"Only {len(self.workers)} of the {WORKERS} workers of"
                            f" '{self.model.name}' answered within {START_TIMEOUT:g} s; its"
                            " log says:\n" + self.log_tail()
                        )
                    self.workers.update(p for p in pool.map(ask, range(16)) if p is not None)
                    time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server and every process of its group; raise if one is left."""
        group = self.process.pid
        if self.process.poll() is None:
            # gunicorn: SIGINT is its quick shutdown; hypercorn shuts down on it too.
            self.process.send_signal(signal.SIGINT)
        if not wait_for_group_exit(group, 10):
            with contextlib.suppress(ProcessLookupError):  # gone meanwhile
                os.killpg(group, signal.SIGKILL)
        self.process.wait(timeout=10)
        if not wait_for_group_exit(group, 10):
            raise RuntimeError(
                f"The processes {group_members(group)} of the server '{self.model.name}'"
                " are still running after SIGKILL; stop them by hand."
            )


@pytest.fixture(scope="module", params=list(MODELS))
def server(
    request: pytest.FixtureRequest,
    servers_cluster: Cluster,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    """The app served by one model, 4 workers; stopped (all its processes) at the end."""
    model = MODELS[request.param]
    cluster = servers_cluster.cluster
    nodes = {"primary": cluster.primary, **{name: cluster.replica(name) for name in REPLICAS}}
    settings = {
        "urls": {name: node.url("psycopg") for name, node in nodes.items()},
        "async_urls": {name: node.url("asyncpg") for name, node in nodes.items()},
        "replicas": REPLICAS,
        # One key for all workers, as a deployment must have (the sticky cookie).
        "secret_key": secrets.token_hex(16),
        "query_at_import": model.query_at_import,
        "config": APP_CONFIG,
    }
    env = {
        **os.environ,
        "SERVERS_TEST_SETTINGS": json.dumps(settings),
        "PYTHONPATH": os.pathsep.join([str(APPS), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHONUNBUFFERED": "1",
    }
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with listening_socket(HOST) as sock, log_path.open("wb") as log:
        process = subprocess.Popen(
            model.command(f"fd://{sock.fileno()}"),
            cwd=APPS,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=[sock.fileno()],
        )
        port = sock.getsockname()[1]
    running = Server(model, process, port, log_path, servers_cluster)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


# -- the clients --------------------------------------------------------------------


@dataclass
class Sample:
    start: float
    end: float
    status: int | None  # None: the request failed in transport
    body: dict[str, Any] | None
    error: str | None  # anything but a 2xx or a 404 (a stale read, counted apart)
    had_cookie: bool = False


# httpx loads the CA bundle for every client it makes by default: 20 clients made
# at once take most of a second of CPU on a busy 2-core machine. The servers are plain
# HTTP; one context serves every client.
_SSL = ssl.create_default_context()


def _client(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT, verify=_SSL)


def _send(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Sample:
    had_cookie = COOKIE in client.cookies
    start = time.monotonic()
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as error:
        text = f"{method} {path}: {type(error).__name__}: {error}"
        return Sample(start, time.monotonic(), None, None, text[:300], had_cookie)
    end = time.monotonic()
    try:
        body = response.json()
    except ValueError:
        body = None
    error = None
    if not (response.is_success or response.status_code == 404) or not isinstance(body, dict):
        error = f"{method} {path}: {response.status_code} {response.text[:200]!r}"
    return Sample(start, end, response.status_code, body, error, had_cookie)


def _in_threads(count: int, loop: Callable[[int], list[Any]]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=count) as pool:
        return [item for items in pool.map(loop, range(count)) for item in items]


def _node(cluster: Cluster, sample: Sample) -> str | None:
    if sample.body is None or "port" not in sample.body:
        return None
    return cluster.names.get(sample.body["port"], f"port {sample.body['port']}")


def _replica_share(served: Counter[str | None]) -> float:
    """The share of ``served`` (GETs by node) that r1 and r2, the fast replicas, served."""
    total = sum(served.values())
    return (served["r1"] + served["r2"]) / total if total else 0.0


def _share(counts: Counter[str], total: int) -> dict[str, str]:
    return {name: f"{counts[name] / total:.0%}" for name in sorted(counts)} if total else {}


def _pair_outcome(
    cluster: Cluster, pairs: list[tuple[str, Sample, Sample | None]]
) -> tuple[dict[str, Any], dict[str, Any], list[str], list[Any], list[tuple[str, Sample]]]:
    """What POST-then-GET pairs found: the figures to print, the checks every such test
    makes (to compare with ``PAIR_CHECKS``), the errors, the wrong answers, the GETs."""
    errors = []
    for _, post, get in pairs:
        if post.error is not None or get is None:
            errors.append(post.error or f"POST /items answered {post.body!r}, without an id")
        elif get.error is not None:
            errors.append(get.error)
    gets = [(token, get) for token, _, get in pairs if get is not None and get.error is None]
    stale = [get for _, get in gets if get.status == 404]
    # Answers that crossed between workers or requests: a row, but not this client's.
    wrong = [get.body for token, get in gets if get.status == 200 and get.body["token"] != token]
    nodes = Counter(_node(cluster, get) for _, get in gets if get.status == 200)
    ends = [(get or post).end for _, post, get in pairs]
    elapsed = max(ends) - min(post.start for _, post, _ in pairs) if pairs else 0.0
    figures = {
        "pairs": len(pairs),
        "errors": len(errors),
        "stale": len(stale),
        "wrong answers": len(wrong),
        "GETs served by": dict(sorted(nodes.items(), key=lambda kv: str(kv[0]))),
        "pairs/s": round(len(pairs) / elapsed, 1) if elapsed > 0 else None,
    }
    checks = {
        "pairs": len(pairs),
        "errors": len(errors),
        "stale": len(stale),
        "wrong answers": len(wrong),
        # Requirement 4 of issue 14: r1 and r2 replay within milliseconds, so the
        # short wait puts a writer's next read on one of them (the target is 98%).
        "a caught-up replica served at least 98% of the GETs": _replica_share(nodes)
        >= TARGET_SHARE,
    }
    return figures, checks, errors, wrong, gets


PAIR_CHECKS = {
    "pairs": CLIENTS * PAIRS,
    "errors": 0,
    "stale": 0,
    "wrong answers": 0,
    "a caught-up replica served at least 98% of the GETs": True,
}


# -- the tests ----------------------------------------------------------------------


def test_cookieless_reads_spread_over_replicas(server, servers_cluster, reliability):
    """Readers without a cookie: every replica gets a fair share, and no two workers
    pick replicas in the same order (a random generator copied by a fork would)."""
    deadline = time.monotonic() + PHASE_CAP
    path = f"/items/{servers_cluster.seed_id}"

    def reader(_: int) -> list[Sample]:
        with _client(server) as client:
            # A new connection per read, so that reads spread over the workers as
            # connections do, and every worker's pick order shows.
            return [
                _send(client, "GET", path, headers=CLOSE)
                for _ in range(READS)
                if time.monotonic() < deadline
            ]

    samples = _in_threads(CLIENTS, reader)
    errors = [s.error for s in samples if s.error is not None]
    served = [s for s in samples if s.error is None and s.status == 200]
    nodes = Counter(_node(servers_cluster, s) for s in served)
    picks: dict[int, list[tuple[int, str | None]]] = {}
    for s in served:
        assert s.body is not None
        picks.setdefault(s.body["pid"], []).append((s.body["seq"], _node(servers_cluster, s)))
    orders = {pid: [n for _, n in sorted(found)][:SEQUENCE] for pid, found in picks.items()}
    compared = [pid for pid, order in orders.items() if len(order) == SEQUENCE]
    same_order = [(a, b) for a, b in itertools.combinations(compared, 2) if orders[a] == orders[b]]
    figures = {
        "reads": len(samples),
        "errors": len(errors),
        "stale": sum(s.status == 404 for s in samples),
        "share": _share(nodes, len(served)),
        "workers": len(picks),
        "workers compared": len(compared),
        "workers with the same pick order": len({p for pair in same_order for p in pair}),
    }
    reliability(f"{server.model.name}: cookie-less reads", figures)
    expected = {
        "reads": CLIENTS * READS,
        "errors": 0,
        "stale": 0,
        "sent a cookie": 0,
        "at least two workers compared": True,
        "pairs of workers with the same pick order": 0,
        "replicas under their share": [],
    }
    found = {
        "reads": len(samples),
        "errors": len(errors),
        "stale": figures["stale"],
        "sent a cookie": sum(s.had_cookie for s in samples),
        "at least two workers compared": len(compared) >= 2,
        "pairs of workers with the same pick order": len(same_order),
        "replicas under their share": [
            name for name in REPLICAS if nodes[name] < MIN_SHARE * max(1, len(served))
        ],
    }
    assert found == expected, (figures, errors[:5], {p: orders[p] for p in compared})


def test_post_then_get_reads_own_write(server, servers_cluster, reliability):
    """20 clients, each with its cookies, POST a row then GET it: never a miss."""
    deadline = time.monotonic() + PHASE_CAP

    def client_loop(number: int) -> list[tuple[str, Sample, Sample | None]]:
        pairs: list[tuple[str, Sample, Sample | None]] = []
        with _client(server) as client:
            for sent in range(PAIRS):
                if time.monotonic() > deadline:
                    break
                token = f"{number}-{sent}-{uuid.uuid4().hex}"
                post = _send(client, "POST", "/items", data={"token": token})
                item_id = (post.body or {}).get("id")
                if post.error is not None or not isinstance(item_id, int):
                    pairs.append((token, post, None))
                    continue
                pairs.append((token, post, _send(client, "GET", f"/items/{item_id}")))
        return pairs

    pairs = _in_threads(CLIENTS, client_loop)
    figures, found, errors, wrong, gets = _pair_outcome(servers_cluster, pairs)
    reliability(f"{server.model.name}: POST then GET", figures)
    found["GETs sent without the sticky cookie"] = sum(not get.had_cookie for _, get in gets)
    expected = {**PAIR_CHECKS, "GETs sent without the sticky cookie": 0}
    assert found == expected, (figures, errors[:5], wrong[:3])


def test_header_only_clients_read_own_write(server, servers_cluster, reliability):
    """20 API clients that keep no cookies POST a row, then GET it sending back only the
    consistency token the POST's response carried: never a miss."""
    deadline = time.monotonic() + PHASE_CAP

    def client_loop(number: int) -> list[tuple[str, Sample, Sample | None, str | None]]:
        pairs: list[tuple[str, Sample, Sample | None, str | None]] = []
        with _client(server) as client:
            for sent in range(PAIRS):
                if time.monotonic() > deadline:
                    break
                token = f"{number}-{sent}-{uuid.uuid4().hex}"
                post, header = _send_keeping_header(client, "POST", "/items", data={"token": token})
                item_id = (post.body or {}).get("id")
                if post.error is not None or not isinstance(item_id, int):
                    pairs.append((token, post, None, header))
                    continue
                headers = {TOKEN_HEADER: header} if header is not None else {}
                get, _ = _send_keeping_header(client, "GET", f"/items/{item_id}", headers=headers)
                pairs.append((token, post, get, header))
        return pairs

    pairs = _in_threads(CLIENTS, client_loop)
    figures, found, errors, wrong, _ = _pair_outcome(
        servers_cluster, [(token, post, get) for token, post, get, _ in pairs]
    )
    reliability(f"{server.model.name}: header-only POST then GET", figures)
    found["POSTs answered without the token header"] = sum(h is None for _, _, _, h in pairs)
    found["requests sent with a cookie"] = sum(
        s.had_cookie for _, post, get, _ in pairs for s in (post, get) if s is not None
    )
    expected = {
        **PAIR_CHECKS,
        "POSTs answered without the token header": 0,
        "requests sent with a cookie": 0,
    }
    assert found == expected, (figures, errors[:5], wrong[:3])


def _send_keeping_header(
    client: httpx.Client, method: str, path: str, **kwargs: Any
) -> tuple[Sample, str | None]:
    """``_send`` for a client that keeps no cookies: the request must carry no Cookie
    header, and whatever the response set is dropped; also the token header it carried."""
    seen: dict[str, str | None] = {}

    def check(request: httpx.Request) -> None:
        seen["cookie"] = request.headers.get("cookie")

    def keep(response: httpx.Response) -> None:
        seen["token"] = response.headers.get(TOKEN_HEADER)

    client.event_hooks = {"request": [check], "response": [keep]}
    try:
        sample = _send(client, method, path, **kwargs)
    finally:
        client.cookies.clear()
    sample.had_cookie = seen.get("cookie") is not None
    return sample, seen.get("token")


def test_replica_pause(server, servers_cluster, reliability):
    """Cookie-less readers while r1 is frozen (SIGSTOP) for 3 s: no error, no worker
    killed by the server's timeout, and throughput during the pause not collapsed.

    The issue's target, at least half of the throughput before the pause, is printed,
    not asserted: on a busy 2-core machine the same code measured from 26% to 140%.
    What is asserted is a floor of a tenth, which a stalled site misses by far (the
    issue measured 330 requests/s falling to 1.3; with no working detection, every
    sync worker is stuck on r1 within 0.1 s and the rate is 0).
    """
    node = servers_cluster.cluster.replica(PAUSED)
    path = f"/items/{servers_cluster.seed_id}"

    def warm(_: int) -> list[str | None]:
        with _client(server) as client:
            return [_send(client, "GET", path).error for _ in range(WARM_UP_READS)]

    # Every worker's pools open to every node first, in case this test runs alone.
    warm_up = _in_threads(CLIENTS, warm)
    origin = time.monotonic()
    pause_at, resume_at = origin + BEFORE, origin + BEFORE + PAUSE
    stop_at = resume_at + AFTER
    times: dict[str, float] = {}

    def freeze() -> None:
        time.sleep(max(0.0, pause_at - time.monotonic()))
        times["paused"] = time.monotonic()
        node.pause()
        try:
            time.sleep(max(0.0, resume_at - time.monotonic()))
        finally:
            node.resume()
            times["resumed"] = time.monotonic()

    def reader(_: int) -> list[Sample]:
        samples = []
        with _client(server) as client:
            while time.monotonic() < min(stop_at, origin + PHASE_CAP):
                samples.append(_send(client, "GET", path))
        return samples

    freezer = threading.Thread(target=freeze)
    freezer.start()
    try:
        samples = _in_threads(CLIENTS, reader)
    finally:
        freezer.join()
        node.resume()
    paused, resumed = times["paused"], times["resumed"]

    def rate(start: float, end: float) -> float:
        done = sum(start <= s.end < end for s in samples)
        return done / (end - start)

    before = rate(origin, paused)
    during = rate(paused, resumed)
    after = rate(resumed, max(s.end for s in samples))
    waits = [s.end - s.start for s in samples if paused <= s.start < resumed]
    errors = [e for e in warm_up if e is not None] + [s.error for s in samples if s.error]
    timeouts = server.worker_timeouts()
    # A worker that died and was replaced answers with a pid not seen at the start.
    replaced = sorted({s.body["pid"] for s in samples if s.body} - server.workers)
    figures = {
        "requests": len(samples),
        "errors": len(errors),
        "req/s before": round(before, 1),
        "during": round(during, 1),
        "after": round(after, 1),
        "during/before": f"{during / before:.0%} (target {TARGET_RATIO:.0%})" if before else None,
        "longest wait started during (s)": round(max(waits, default=0.0), 2),
        # Requests that waited on the frozen server until SIGCONT, not cut off earlier.
        "held until the resume": sum(s.start < resumed - 1 and s.end >= resumed for s in samples),
        "worker timeouts": len(timeouts),
    }
    reliability(f"{server.model.name}: {PAUSED} paused {PAUSE:g} s", figures)
    found = {
        "errors": len(errors),
        "worker timeouts": timeouts,
        "workers replaced": replaced,
        "throughput during the pause at least a tenth of before": during >= FLOOR_RATIO * before,
    }
    expected = {
        "errors": 0,
        "worker timeouts": [],
        "workers replaced": [],
        "throughput during the pause at least a tenth of before": True,
    }
    assert found == expected, (figures, errors[:5])
