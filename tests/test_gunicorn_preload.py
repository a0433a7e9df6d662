"""Real gunicorn, --preload and 4 sync workers, on an app that reads at import
(tests/preload_app.py), on the real cluster, driven over HTTP by httpx. Figures go
to the terminal summary; only correctness is asserted (0 errors, 0 stale reads, no
worker killed by gunicorn's timeout)."""

from __future__ import annotations

import collections
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

HEADER = "X-Served-By"
WORKERS = 4
TESTS = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Gunicorn:
    """gunicorn --preload serving tests/preload_app.py; its log in a file."""

    def __init__(self, cluster: Any, log: Path, **env: str) -> None:
        self.port = free_port()
        self.log = log
        self.base = f"http://127.0.0.1:{self.port}"
        r1, r2 = cluster.replica("r1"), cluster.replica("r2")
        self.env = {
            **os.environ,
            "PRELOAD_PRIMARY_URL": cluster.primary.url("psycopg"),
            "PRELOAD_R1_URL": r1.url("psycopg"),
            "PRELOAD_R2_URL": r2.url("psycopg"),
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Gunicorn:
        args = [
            sys.executable,
            "-m",
            "gunicorn",
            "--preload",
            f"--workers={WORKERS}",
            "--worker-class=sync",
            f"--bind=127.0.0.1:{self.port}",
            "--timeout=10",
            "--graceful-timeout=5",
            f"--error-logfile={self.log}",
            "--log-level=info",
            "preload_app:app",
        ]
        self.process = subprocess.Popen(args, cwd=TESTS, env=self.env)
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, f"gunicorn exited:\n{self.log_text()}"
            try:
                if httpx.get(f"{self.base}/who", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"gunicorn never answered:\n{self.log_text()}"
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def test_preloaded_workers_answer_every_write_and_read(fault_cluster, tmp_path, reliability):
    """20 clients, each POST then GET of its own row, 300 pairs: every answer right
    (the row just written, read back through the sticky cookie), and every worker
    reads from both replicas."""
    pairs_per_client, clients = 15, 20
    errors: list[str] = []
    workers: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    lock = threading.Lock()
    names = itertools.count()

    with Gunicorn(fault_cluster, tmp_path / "gunicorn.log") as server:

        def client_loop() -> None:
            with httpx.Client(base_url=server.base, timeout=15) as client:
                for _ in range(pairs_per_client):
                    name = f"preload-{next(names)}"
                    try:
                        posted = client.post("/items", data={"name": name})
                        got = client.get(f"/items/{posted.json()['id']}")
                        problem = None if got.json() == {"name": name} else got.text[:200]
                    except Exception as error:
                        problem = repr(error)[:200]
                    with lock:
                        if problem is not None:
                            errors.append(f"{name}: {problem}")

        threads = [threading.Thread(target=client_loop) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with httpx.Client(base_url=server.base, timeout=15) as reader:  # no cookie
            for _ in range(200):
                response = reader.get("/who")
                workers[response.headers["X-Worker"]][response.headers[HEADER]] += 1
        log = server.log_text()
    reliability(
        "gunicorn --preload, 4 sync workers",
        {
            "POST/GET pairs": pairs_per_client * clients,
            "errors": len(errors),
            "replica reads by worker": {w: dict(c) for w, c in sorted(workers.items())},
        },
    )
    assert errors == []
    assert "WORKER TIMEOUT" not in log
    assert len(workers) > 1
    assert all(set(picks) == {"r1", "r2"} for picks in workers.values())


@pytest.mark.parametrize("connect_timeout", ["1", "2"])
def test_a_paused_replica_under_load(fault_cluster, tmp_path, reliability, connect_timeout):
    """8 clients (twice the workers) send GETs: 1 s of warm-up, 3 s before, r1 paused
    for 3 s, then resumed for 3 s; requests/s in each phase. Requests stuck on r1 are cut off
    once its check is overdue (REPLICATED_CONNECT_TIMEOUT) and fail over to r2."""
    phase = 3.0
    samples: list[tuple[float, float, int]] = []  # start, end, status
    lock = threading.Lock()
    r1 = fault_cluster.replica("r1")

    with Gunicorn(
        fault_cluster, tmp_path / "gunicorn.log", PRELOAD_CONNECT_TIMEOUT=connect_timeout
    ) as server:
        start = time.monotonic() + 1.0  # after the warm-up
        stop_at = start + 3 * phase

        def client_loop() -> None:
            with httpx.Client(base_url=server.base, timeout=20) as client:
                while time.monotonic() < stop_at:
                    began = time.monotonic()
                    try:
                        status = client.get("/who").status_code
                    except httpx.HTTPError:
                        status = 599
                    with lock:
                        samples.append((began, time.monotonic(), status))

        threads = [threading.Thread(target=client_loop) for _ in range(2 * WORKERS)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(max(0.0, start + phase - time.monotonic()))
            r1.pause()
            paused = time.monotonic()
            time.sleep(max(0.0, paused + phase - time.monotonic()))
        finally:
            r1.resume()
        resumed = time.monotonic()
        for thread in threads:
            thread.join()
        log = server.log_text()

    def rate(begin: float, end: float) -> float:
        done = sum(1 for _, finished, _ in samples if begin <= finished < end)
        return round(done / (end - begin), 1)

    before, during = rate(start, paused), rate(paused, resumed)
    after = rate(resumed, max(resumed + 0.5, max(s[1] for s in samples)))
    waits = sorted(end - began for began, end, _ in samples if paused <= began < resumed)
    reliability(
        f"gunicorn --preload, 4 sync workers, r1 paused 3 s, connect timeout {connect_timeout} s",
        {
            "requests/s before": before,
            "during": during,
            "after": after,
            "during/before": round(during / before, 2) if before else None,
            "longest wait during (s)": round(waits[-1], 2) if waits else None,
            "errors": sum(status != 200 for _, _, status in samples),
        },
    )
    assert [s for s in samples if s[2] != 200] == []
    assert "WORKER TIMEOUT" not in log
