"""A throwaway high-availability PostgreSQL cluster for tests: three nodes managed by
Patroni, with etcd as its store, HAProxy giving a write port (the leader) and a read
port (the replicas), and optionally PgBouncer in transaction pooling mode in front of
both, all on loopback.

Patroni runs from its own virtual environment (``PATRONI`` below, or ``patroni`` on
the PATH): it runs as the OS user 'postgres' when this process is root, as PostgreSQL
does, and that user must be able to run it. ``./dev test`` makes ``.venv-patroni``
with the system's Python for that. Like ``pgcluster``, durability is traded for speed
(``fsync=off``): never point this at data you care about.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote

from .pgcluster import HOST, SUPERUSER, PgClusterError, _free_port, _Runtime, find_bindir

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

__all__ = ["HaCluster", "HaNode", "find_patroni"]

SCOPE = "replicated"
REPLICATION_USER = "replicator"
_START_TIMEOUT = 90.0
_STOP_TIMEOUT = 30.0
_POLL = 0.1

# Where ./dev puts Patroni: a virtual environment of the system's Python, which the
# 'postgres' user can run (the project's own .venv may use a Python under /root).
_DEV_PATRONI = Path(__file__).resolve().parents[2] / ".venv-patroni" / "bin" / "patroni"


def find_patroni() -> Path | None:
    """The ``patroni`` program: $REPLICATED_PATRONI, ./dev's .venv-patroni, or the PATH."""
    given = os.environ.get("REPLICATED_PATRONI")
    if given:
        return Path(given)
    if _DEV_PATRONI.is_file():
        return _DEV_PATRONI
    found = shutil.which("patroni")
    return Path(found) if found else None


@dataclass(eq=False)
class HaNode:
    """One Patroni-managed PostgreSQL node: its server port and its REST API port."""

    name: str
    port: int
    api_port: int
    node_dir: Path
    _runtime: _Runtime = field(repr=False, kw_only=True)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False, init=False)

    @property
    def datadir(self) -> Path:
        return self.node_dir / "data"

    @property
    def config_path(self) -> Path:
        return self.node_dir / "patroni.yml"

    def url(self, driver: str = "psycopg", database: str = "app") -> str:
        """This node's own URL (not through HAProxy)."""
        return _url(self._runtime.password, self.port, driver, database)

    def state(self) -> dict[str, Any]:
        """Patroni's view of this node (its REST API's ``GET /patroni``)."""
        state: dict[str, Any] = _get_json(f"http://{HOST}:{self.api_port}/patroni")
        return state

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, patroni: Path) -> None:
        """Start this node's Patroni (which starts its PostgreSQL)."""
        if self.is_running():
            return
        log = (self.node_dir / "patroni.log").open("ab")
        try:
            self._process = self._runtime.popen(
                [patroni, self.config_path],
                cwd=self.node_dir,
                env=self._runtime.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    def stop(self) -> None:
        """Stop Patroni and its PostgreSQL (Patroni stops it on SIGTERM)."""
        process = self._process
        if process is None or process.poll() is not None:
            self._stop_orphan()
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(_STOP_TIMEOUT)
        self._stop_orphan()

    def kill_postmaster(self) -> int:
        """SIGKILL this node's postmaster (Patroni itself keeps running); its pid."""
        pid = self.postmaster_pid()
        if pid is None:
            raise PgClusterError(f"The node '{self.name}' has no running PostgreSQL to kill.")
        os.kill(pid, signal.SIGKILL)
        return pid

    def postmaster_pid(self) -> int | None:
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return None
        return int(first) if first.strip().isdigit() else None

    def _stop_orphan(self) -> None:
        # A PostgreSQL that outlived its Patroni (killed with SIGKILL): stop it too.
        pid = self.postmaster_pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGQUIT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + _STOP_TIMEOUT
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(_POLL)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.node_dir / "patroni.log").read_text(errors="replace")
        except OSError:
            return ""
        return self._runtime.redact("\n".join(text.splitlines()[-lines:]))


@dataclass(eq=False)
class HaCluster:
    """etcd, three Patroni nodes, HAProxy (write and read ports) and, if asked,
    PgBouncer (transaction pooling) in front of both ports; made by ``HaCluster.start``."""

    base_dir: Path
    nodes: list[HaNode]
    write_port: int
    read_port: int
    pgbouncer_port: int | None
    synchronous_mode: bool
    _runtime: _Runtime = field(repr=False, kw_only=True)
    _patroni: Path = field(repr=False, kw_only=True)
    _processes: dict[str, subprocess.Popen[bytes]] = field(
        default_factory=dict, repr=False, kw_only=True
    )

    @classmethod
    def start(
        cls,
        base_dir: Path,
        *,
        nodes: int = 3,
        synchronous_mode: bool = False,
        pgbouncer: bool = False,
    ) -> HaCluster:
        """Start etcd, ``nodes`` Patroni nodes and HAProxy (and PgBouncer) under
        ``base_dir``; return once there is a leader and every other node streams
        from it. On failure, whatever started is stopped."""
        bindir = find_bindir()
        if bindir is None:
            raise PgClusterError("The PostgreSQL server binaries were not found.")
        patroni = find_patroni()
        if patroni is None:
            raise PgClusterError(
                "Patroni was not found: run './dev test' (it makes .venv-patroni), or set "
                "REPLICATED_PATRONI to a 'patroni' program the 'postgres' user can run."
            )
        for tool in ("etcd", "haproxy", *(("pgbouncer",) if pgbouncer else ())):
            if shutil.which(tool) is None:
                raise PgClusterError(f"'{tool}' was not found: install it (Debian: see ./dev).")
        runtime = _Runtime.create(bindir)
        base_dir = base_dir.absolute()
        base_dir.mkdir(parents=True, exist_ok=True)
        runtime.give(base_dir)
        members = []
        for index in range(1, nodes + 1):
            node_dir = base_dir / f"n{index}"
            node_dir.mkdir()
            runtime.give(node_dir)
            members.append(
                HaNode(f"n{index}", _free_port(), _free_port(), node_dir, _runtime=runtime)
            )
        cluster = cls(
            base_dir=base_dir,
            nodes=members,
            write_port=_free_port(),
            read_port=_free_port(),
            pgbouncer_port=_free_port() if pgbouncer else None,
            synchronous_mode=synchronous_mode,
            _runtime=runtime,
            _patroni=patroni,
        )
        try:
            cluster._start_etcd(bindir)
            for node in members:
                cluster._write_patroni_config(node, bindir)
            members[0].start(patroni)  # the first one bootstraps; the others clone it
            cluster.wait_for_leader()
            for node in members[1:]:
                node.start(patroni)
            cluster._start_haproxy()
            cluster.wait_for_replicas(len(members) - 1)
            cluster.execute_on_leader("CREATE DATABASE app")
            if pgbouncer:
                cluster._start_pgbouncer()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    # -- URLs -------------------------------------------------------------------

    @property
    def password(self) -> str:
        """The superuser's password; keep it out of logs and messages."""
        return self._runtime.password

    def write_url(self, driver: str = "psycopg", database: str = "app") -> str:
        """HAProxy's write port: always the current leader."""
        return _url(self.password, self.write_port, driver, database)

    def read_url(self, driver: str = "psycopg", database: str = "app") -> str:
        """HAProxy's read port: the replicas, round robin."""
        return _url(self.password, self.read_port, driver, database)

    def pgbouncer_url(self, which: str, driver: str = "psycopg", **query: str) -> str:
        """A PgBouncer database, in transaction pooling mode: ``which`` is "write"
        (database 'app', in front of HAProxy's write port), "read" ('app_read', its
        read port) or a node's name ('app_n1', that node alone)."""
        if self.pgbouncer_port is None:
            raise PgClusterError("This cluster was started without PgBouncer.")
        if which == "write":
            database = "app"
        elif which == "read":
            database = "app_read"
        else:
            database = f"app_{self.node(which).name}"
        return _url(self.password, self.pgbouncer_port, driver, database, **query)

    def node(self, name: str) -> HaNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise LookupError(f"The cluster has no node named '{name}'.")

    # -- Patroni ------------------------------------------------------------------

    def members(self) -> list[dict[str, Any]]:
        """Patroni's members (``GET /cluster`` of any node that answers)."""
        error: Exception | None = None
        for node in self.nodes:
            try:
                return list(_get_json(f"http://{HOST}:{node.api_port}/cluster")["members"])
            except (OSError, ValueError, KeyError) as failure:
                error = failure
        raise PgClusterError(f"No Patroni REST API answered: {error}")

    def leader(self) -> HaNode | None:
        """The node Patroni holds as the running leader, if any."""
        try:
            members = self.members()
        except PgClusterError:
            return None
        for member in members:
            if member.get("role") in ("leader", "sync_standby_leader") and member.get("state") in (
                "running",
                "streaming",
            ):
                return self.node(member["name"])
        return None

    def wait_for_leader(self, timeout: float = _START_TIMEOUT, other_than: str = "") -> HaNode:
        """Until a leader (not ``other_than``) runs and accepts writes; that node."""
        deadline = time.monotonic() + timeout
        while True:
            leader = self.leader()
            if leader is not None and leader.name != other_than and self._writable(leader):
                return leader
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"No leader within {timeout:g} s. Patroni says: {self._describe()}\n"
                    + "\n".join(f"--- {n.name}:\n{n.log_tail()}" for n in self.nodes)
                )
            time.sleep(_POLL)

    def wait_for_replicas(self, count: int, timeout: float = _START_TIMEOUT) -> None:
        """Until ``count`` members stream from the leader and HAProxy's read port
        reaches a replica."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                streaming = [
                    m
                    for m in self.members()
                    if m.get("state") == "streaming" and m["role"] != "leader"
                ]
            except PgClusterError:
                streaming = []
            if len(streaming) >= count and self._reads_reach_a_replica():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{count} replicas were not streaming within {timeout:g} s: "
                    f"{self._describe()}\n"
                    + "\n".join(f"--- {n.name}:\n{n.log_tail()}" for n in self.nodes)
                )
            time.sleep(_POLL)

    def patronictl(self, *args: str) -> str:
        """Run ``patronictl`` with this cluster's config; its output."""
        patronictl = self._patroni.with_name("patronictl")
        command = [str(patronictl), "-c", str(self.nodes[0].config_path), *args]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=120, env=self._runtime.env()
        )
        output = self._runtime.redact(result.stdout + result.stderr)
        if result.returncode != 0:
            raise PgClusterError(f"patronictl {' '.join(args)} failed: {output}")
        return output

    def switchover(self, candidate: str | None = None) -> HaNode:
        """A planned switchover to ``candidate`` (default: any replica); the new leader."""
        old = self.wait_for_leader()
        args = ["switchover", SCOPE, "--leader", old.name, "--force"]
        if candidate is not None:
            args += ["--candidate", candidate]
        self.patronictl(*args)
        return self.wait_for_leader(other_than=old.name)

    def execute_on_leader(self, sql: str) -> list[tuple[Any, ...]]:
        """Run ``sql`` on the leader's database (autocommit); its rows."""
        leader = self.wait_for_leader()
        database = "postgres" if sql.startswith("CREATE DATABASE") else "app"
        return _execute(leader.url("", database), sql)

    # -- stopping ----------------------------------------------------------------

    def stop(self) -> None:
        """Stop everything: PgBouncer, HAProxy, the Patroni nodes, etcd. Safe twice."""
        for name in ("pgbouncer", "haproxy"):
            self._stop_process(name)
        for node in self.nodes:
            node.stop()
        self._stop_process("etcd")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the parts ---------------------------------------------------------------

    def _etcd_port(self) -> int:
        return int((self.base_dir / "etcd.port").read_text())

    def _start_etcd(self, bindir: Path) -> None:
        client, peer = _free_port(), _free_port()
        (self.base_dir / "etcd.port").write_text(str(client))
        data = self.base_dir / "etcd"
        self._spawn(
            "etcd",
            [
                "etcd",
                *("--name", "etcd0", "--data-dir", str(data)),
                *("--listen-client-urls", f"http://{HOST}:{client}"),
                *("--advertise-client-urls", f"http://{HOST}:{client}"),
                *("--listen-peer-urls", f"http://{HOST}:{peer}"),
                *("--initial-advertise-peer-urls", f"http://{HOST}:{peer}"),
                *("--initial-cluster", f"etcd0=http://{HOST}:{peer}"),
                *("--logger", "zap", "--log-level", "error"),
            ],
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            try:
                if _get_json(f"http://{HOST}:{client}/health").get("health") == "true":
                    return
            except (OSError, ValueError):
                pass
            self._check_alive("etcd")
            if time.monotonic() > deadline:
                raise TimeoutError("etcd did not answer its health check.")
            time.sleep(_POLL)

    def _write_patroni_config(self, node: HaNode, bindir: Path) -> None:
        password = self.password
        hba = [
            "local all all trust",
            "local replication all trust",
            f"host all all {HOST}/32 scram-sha-256",
            f"host replication all {HOST}/32 scram-sha-256",
        ]
        config = {
            "scope": SCOPE,
            "name": node.name,
            "log": {"level": "WARNING"},
            "restapi": {
                "listen": f"{HOST}:{node.api_port}",
                "connect_address": f"{HOST}:{node.api_port}",
            },
            "etcd3": {"hosts": [f"{HOST}:{self._etcd_port()}"]},
            "bootstrap": {
                "dcs": {
                    # Patroni's smallest: the leader key lives 20 s without renewal.
                    "ttl": 20,
                    "loop_wait": 1,
                    "retry_timeout": 5,
                    # A leader whose PostgreSQL dies is replaced at once, not restarted.
                    "primary_start_timeout": 0,
                    "synchronous_mode": self.synchronous_mode,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "parameters": {
                            "wal_level": "replica",
                            "hot_standby": "on",
                            "wal_log_hints": "on",
                            "max_wal_senders": 10,
                            "max_replication_slots": 10,
                            "wal_keep_size": "256MB",
                            "hot_standby_feedback": "on",
                            "max_connections": 200,
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}],
            },
            "postgresql": {
                "listen": f"{HOST}:{node.port}",
                "connect_address": f"{HOST}:{node.port}",
                "data_dir": str(node.datadir),
                "bin_dir": str(bindir),
                "pgpass": str(node.node_dir / "pgpass"),
                "pg_hba": hba,
                "authentication": {
                    "superuser": {"username": SUPERUSER, "password": password},
                    "replication": {"username": REPLICATION_USER, "password": password},
                    "rewind": {"username": SUPERUSER, "password": password},
                },
                "parameters": {
                    "unix_socket_directories": str(node.node_dir),
                    "fsync": "off",
                    "shared_buffers": "32MB",
                    "password_encryption": "scram-sha-256",
                    "wal_retrieve_retry_interval": "200ms",
                    "jit": "off",
                },
            },
        }
        # JSON is YAML: Patroni reads it as its config file.
        path = node.config_path
        path.touch(mode=0o600)
        self._runtime.give(path)
        path.write_text(json.dumps(config, indent=2))

    def _start_haproxy(self) -> None:
        def servers(check: str) -> str:
            return (
                "\n".join(
                    f"    server {n.name} {HOST}:{n.port} check port {n.api_port}"
                    for n in self.nodes
                )
                + f"\n    option httpchk OPTIONS {check}\n    http-check expect status 200\n"
            )

        config = f"""global
    maxconn 1000
defaults
    mode tcp
    timeout connect 2s
    timeout client 30m
    timeout server 30m
    timeout check 1s
    default-server inter 500ms fall 2 rise 1 on-marked-down shutdown-sessions
listen write
    bind {HOST}:{self.write_port}
{servers("/primary")}
listen read
    bind {HOST}:{self.read_port}
    balance roundrobin
{servers("/replica")}
"""
        path = self.base_dir / "haproxy.cfg"
        path.write_text(config)
        self._spawn("haproxy", ["haproxy", "-db", "-f", str(path)])

    def _start_pgbouncer(self) -> None:
        assert self.pgbouncer_port is not None
        directory = self.base_dir / "pgbouncer"
        directory.mkdir()
        self._runtime.give(directory)
        users = directory / "userlist.txt"
        users.touch(mode=0o600)
        self._runtime.give(users)
        users.write_text(f'"{SUPERUSER}" "{self.password}"\n')
        config = directory / "pgbouncer.ini"
        nodes = "".join(
            f"app_{node.name} = host={HOST} port={node.port} dbname=app\n" for node in self.nodes
        )
        config.write_text(
            f"""[databases]
app = host={HOST} port={self.write_port} dbname=app
app_read = host={HOST} port={self.read_port} dbname=app
{nodes}
[pgbouncer]
listen_addr = {HOST}
listen_port = {self.pgbouncer_port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {users}
pool_mode = transaction
max_client_conn = 500
default_pool_size = 20
server_reset_query =
server_check_delay = 1
server_connect_timeout = 2
server_login_retry = 1
ignore_startup_parameters = extra_float_digits,options
"""
        )
        self._runtime.give(config)
        self._spawn("pgbouncer", ["pgbouncer", str(config)], as_server_user=True)
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            try:
                _execute(self.pgbouncer_url("write", ""), "SELECT 1")
                return
            except Exception as error:
                self._check_alive("pgbouncer")
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"PgBouncer did not answer: {self._runtime.redact(str(error))}"
                    ) from None
            time.sleep(_POLL)

    def _spawn(self, name: str, command: Sequence[str], *, as_server_user: bool = False) -> None:
        log = (self.base_dir / f"{name}.log").open("ab")
        try:
            popen = self._runtime.popen if as_server_user else _popen
            self._processes[name] = popen(
                command,
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    def _check_alive(self, name: str) -> None:
        process = self._processes.get(name)
        if process is not None and process.poll() is not None:
            text = (self.base_dir / f"{name}.log").read_text(errors="replace")
            raise PgClusterError(
                f"'{name}' exited with status {process.returncode}:\n"
                + self._runtime.redact("\n".join(text.splitlines()[-20:]))
            )

    def _stop_process(self, name: str) -> None:
        process = self._processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(_STOP_TIMEOUT)

    def _writable(self, node: HaNode) -> bool:
        try:
            [(in_recovery,)] = _execute(node.url("", "postgres"), "SELECT pg_is_in_recovery()")
        except Exception:
            return False
        return not in_recovery

    def _reads_reach_a_replica(self) -> bool:
        try:
            [(in_recovery,)] = _execute(self.read_url("", "postgres"), "SELECT pg_is_in_recovery()")
        except Exception:
            return False
        return bool(in_recovery)

    def _describe(self) -> str:
        try:
            return json.dumps(
                [{k: m.get(k) for k in ("name", "role", "state", "lag")} for m in self.members()]
            )
        except PgClusterError as error:
            return str(error)


def _url(password: str, port: int, driver: str, database: str, **query: str) -> str:
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    url = f"{scheme}://{SUPERUSER}:{quote(password, safe='')}@{HOST}:{port}/{database}"
    if query:
        url += "?" + "&".join(f"{key}={quote(value, safe='')}" for key, value in query.items())
    return url


def _popen(command: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(list(command), **kwargs)


def _get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        # Patroni answers 503 with a JSON body for a node that is not what was asked.
        return json.loads(error.read())


def _execute(url: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=2) as conn:
        cursor = conn.execute(sql)
        return cursor.fetchall() if cursor.description is not None else []
