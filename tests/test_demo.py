"""The demo apps: add an item, be served by the primary; a new visitor gets the replica."""

from __future__ import annotations

import http.client
import os
import queue
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest

from examples.demo import SCHEMA
from examples.flask_app import create_app as create_flask_app
from examples.quart_app import create_app as create_quart_app


def _files(tmp_path):
    paths = tmp_path / "p.sqlite3", tmp_path / "r.sqlite3"
    for path in paths:
        with sqlite3.connect(path) as conn:
            conn.execute(SCHEMA.format(pk="INTEGER PRIMARY KEY"))
    return paths


def test_flask_demo(tmp_path):
    primary, replica = _files(tmp_path)
    app = create_flask_app(f"sqlite:///{primary}", f"sqlite:///{replica}")
    writer, visitor = app.test_client(), app.test_client()
    page = writer.post("/items", data={"name": "pear"}, follow_redirects=True).text
    assert "<li>pear</li>" in page
    assert 'id="node">master (primary)' in page
    assert "the client wrote recently" in page
    page = visitor.get("/").text
    assert "<li>pear</li>" not in page
    assert 'id="node">slave (replica)' in page
    assert "read-only request" in page


async def test_quart_demo(tmp_path):
    primary, replica = _files(tmp_path)
    app = create_quart_app(f"sqlite+aiosqlite:///{primary}", f"sqlite+aiosqlite:///{replica}")
    async with app.test_app() as test_app:
        writer, visitor = test_app.test_client(), test_app.test_client()
        response = await writer.post("/items", form={"name": "plum"}, follow_redirects=True)
        page = await response.get_data(as_text=True)
        assert "<li>plum</li>" in page
        assert 'id="node">master (primary)' in page
        page = await (await visitor.get("/")).get_data(as_text=True)
        assert "<li>plum</li>" not in page
        assert 'id="node">slave (replica)' in page


def _dispose(app):
    for engine in app.extensions["sqlalchemy"]._app_engines[app].values():
        engine.dispose()


def test_the_page_shows_host_port_and_database_only(postgresql_backend, pg_cluster):
    """As the status command does: no driver, no user name, no password."""
    replica = pg_cluster.replica("replica")
    app = create_flask_app(pg_cluster.primary.url("psycopg"), replica.url("psycopg"))
    try:
        page = app.test_client().get("/").text
    finally:
        _dispose(app)
    assert f'<span id="server">127.0.0.1:{replica.port}/app</span>' in page
    assert "postgres" not in page


def test_the_page_shows_a_sqlite_file_as_its_path(tmp_path):
    primary, replica = _files(tmp_path)
    app = create_flask_app(f"sqlite:///{primary}", f"sqlite:///{replica}")
    try:
        page = app.test_client().get("/").text
    finally:
        _dispose(app)
    assert f'<span id="server">{replica}</span>' in page


# -- the demo as a newcomer runs it: its own process, its own servers --------------------

REPO = Path(__file__).resolve().parent.parent
OPEN_TIMEOUT = 180.0  # a cluster start and the 3 s replay on a busy 2-core machine


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Demo:
    """``python -m examples.demo`` in a subprocess, with its output read line by line."""

    def __init__(self, args, tmpdir):
        self.port = _free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "examples.demo", *args, "--port", str(self.port)],
            cwd=REPO,
            env={**os.environ, "TMPDIR": str(tmpdir)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines = queue.Queue()
        self.stdout = []
        self.stderr = []
        self.readers = [
            threading.Thread(target=self._read, args=(stream, kept), daemon=True)
            for stream, kept in ((self.process.stdout, self.stdout), (self.process.stderr, None))
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, stream, kept):
        for line in stream:
            if kept is None:
                self.stderr.append(line)
            else:
                kept.append(line)
                self.lines.put(line)

    def wait_for_open(self):
        deadline = time.monotonic() + OPEN_TIMEOUT
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.process.poll() is None, "".join(self.stdout + self.stderr)
                continue
            if line.startswith("Open "):
                return line
        pytest.fail(f"The demo printed no 'Open' line in {OPEN_TIMEOUT:g} s: {self.stdout}")

    def request(self, method, path, body=None, cookie=None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
        if cookie:
            headers["Cookie"] = cookie
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheader("Set-Cookie"), response.read().decode()
        finally:
            connection.close()

    def stop(self, number):
        """Send ``number``, wait for the exit (2 minutes at most) and close the pipes."""
        self.process.send_signal(number)
        try:
            return self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            for reader in self.readers:
                reader.join(timeout=10)
            self.process.stdout.close()
            self.process.stderr.close()


def _span(page, name):
    match = re.search(f'<(?:span|b|i) id="{name}">([^<]*)<', page)
    assert match is not None, page
    return match.group(1)


def _processes_mentioning(folder):
    """Pids whose command line names ``folder`` (the demo's database servers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(folder) in (entry / "cmdline").read_text():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.fixture
def demo_tmpdir():
    """A fresh, empty TMPDIR for the demo, which the servers' OS user can enter."""
    folder = Path(tempfile.mkdtemp(prefix="replicated-demo-test-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "stop"),
    [
        pytest.param(["flask"], signal.SIGINT, id="postgresql-flask-ctrl-c"),
        pytest.param(["quart"], signal.SIGTERM, id="postgresql-quart-sigterm"),
        pytest.param(["flask", "--sqlite"], signal.SIGTERM, id="sqlite-flask-sigterm"),
    ],
)
def test_every_page_works_once_the_demo_says_open_and_it_leaves_nothing_behind(
    request, demo_tmpdir, args, stop
):
    """Requests sent the moment "Open" appears; then a stop signal, and TMPDIR is empty."""
    if "--sqlite" not in args:
        # The demo needs the PostgreSQL server binaries, as the cluster fixtures do (they
        # skip without them, or fail when REPLICATED_REQUIRE_POSTGRES=1).
        request.getfixturevalue("pg_cluster_factory")
    demo = _Demo(args, demo_tmpdir)
    try:
        opened = demo.wait_for_open()
        assert opened == f"Open http://127.0.0.1:{demo.port}/ (Ctrl-C stops the demo)\n"
        status, _, page = demo.request("GET", "/")
        assert status == 200, page
        assert _span(page, "node") == "slave (replica)"
        name = f"first-minute-{stop.name}"
        status, cookie, _ = demo.request("POST", "/items", body=urlencode({"name": name}))
        assert status == 303
        status, _, page = demo.request("GET", "/", cookie=cookie.split(";")[0])
        assert status == 200, page
        assert f"<li>{name}</li>" in page
        assert _span(page, "node") == "master (primary)"
        if "--sqlite" in args:
            [folder] = demo_tmpdir.iterdir()
            assert _span(page, "server") == str(folder / "primary.sqlite3")
        else:
            ports = re.search(
                r"primary on port (\d+), streaming replica on port (\d+)", "".join(demo.stdout)
            )
            assert ports is not None, demo.stdout
            assert _span(page, "server") == f"127.0.0.1:{ports.group(1)}/app"
            assert _processes_mentioning(demo_tmpdir) != []
    finally:
        returncode = demo.stop(stop)
    assert returncode == 0, "".join(demo.stdout + demo.stderr)
    assert list(demo_tmpdir.iterdir()) == []
    assert _processes_mentioning(demo_tmpdir) == []
    assert "Traceback" not in "".join(demo.stderr)
