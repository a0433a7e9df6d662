"""A throwaway PostgreSQL streaming-replication cluster for tests.

One primary and any number of hot-standby replicas, each a real ``postgres`` server on its
own loopback port, made with ``initdb`` and ``pg_basebackup -R``. Durability is traded for
speed (``fsync=off``), so never point this at data you care about.

Uses only the standard library and psycopg (imported when a query is first made, so that
importing this module never needs it). When the current process is root, every server
command runs as the OS user ``postgres``, which PostgreSQL requires.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self
from urllib.parse import quote

if TYPE_CHECKING:
    import pwd
    from collections.abc import Sequence
    from types import TracebackType

    import psycopg

__all__ = [
    "NodeRole",
    "PgCluster",
    "PgClusterError",
    "PgNode",
    "ReplicaSpec",
    "StopMode",
    "find_bindir",
    "free_port",
]

SUPERUSER = "postgres"
SERVER_OS_USER = "postgres"
HOST = "127.0.0.1"

_REDACTED = "********"
_LOG_TAIL_LINES = 20
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 60.0
_POLL_INTERVAL = 0.01
_PORT_ATTEMPTS = 5
_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")

# Settings shared by every node; replicas inherit them through pg_basebackup.
# synchronous_commit stays on: with fsync off it costs nothing, and it makes
# pg_current_wal_lsn() after a COMMIT cover that commit, which wait_for_replay relies on.
_COMMON_SETTINGS = f"""
# Added by replicated_core.testing.pgcluster: a throwaway test cluster, not durable.
listen_addresses = '{HOST}'
max_connections = 100
shared_buffers = '32MB'
ssl = off
password_encryption = 'scram-sha-256'
fsync = off
full_page_writes = off
synchronous_commit = on
wal_level = replica
max_wal_senders = 10
wal_keep_size = '256MB'
hot_standby = on
hot_standby_feedback = on
wal_retrieve_retry_interval = '200ms'
jit = off
include_if_exists = 'node.conf'
"""

_PG_HBA = """\
# Written by replicated_core.testing.pgcluster: a password is required everywhere.
# TYPE  DATABASE     USER  ADDRESS          METHOD
local   all          all                    scram-sha-256
local   replication  all                    scram-sha-256
host    all          all   127.0.0.0/8      scram-sha-256
host    replication  all   127.0.0.0/8      scram-sha-256
"""

_port_lock = threading.Lock()
_ports_handed_out: set[int] = set()


class PgClusterError(RuntimeError):
    """A PostgreSQL server or tool of a test cluster failed."""


class NodeRole(StrEnum):
    PRIMARY = "primary"
    REPLICA = "replica"


class StopMode(StrEnum):
    """How ``pg_ctl stop -m`` would shut a server down; sent as the same signal."""

    FAST = "fast"
    IMMEDIATE = "immediate"


@dataclass(frozen=True)
class ReplicaSpec:
    """One streaming replica: its name, how long it waits before applying commits, and
    where it listens: ``host``, a loopback address (127.0.0.2 too reaches this machine
    on Linux), and ``port`` (None: a free one). Replicas on different addresses may
    share a port, as servers behind one DNS name with several A records do."""

    name: str
    apply_delay_ms: int = 0
    host: str = "127.0.0.1"
    port: int | None = None

    def __post_init__(self) -> None:
        if not _NAME_PATTERN.fullmatch(self.name) or self.name == NodeRole.PRIMARY:
            raise ValueError(
                f"The replica name '{self.name}' cannot be used. Use lowercase letters,"
                " digits and underscores, starting with a letter, and not 'primary'."
            )
        if self.apply_delay_ms < 0:
            raise ValueError(
                f"The replica '{self.name}' has apply_delay_ms={self.apply_delay_ms}."
                " Use 0 for no delay or a positive number of milliseconds."
            )


def find_bindir() -> Path | None:
    """Return the directory of the PostgreSQL server binaries, or None if there are none.

    Asks ``pg_config --bindir`` first, then falls back to the newest
    ``/usr/lib/postgresql/*/bin`` (Debian and Ubuntu) that has ``initdb``.
    """
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            completed = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=False, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            completed = None
        if completed is not None and completed.returncode == 0:
            bindir = Path(completed.stdout.strip())
            if _has_server_binaries(bindir):
                return bindir
    candidates = [
        initdb.parent
        for initdb in Path("/usr/lib/postgresql").glob("*/bin/initdb")
        if _has_server_binaries(initdb.parent)
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda bindir: _version_key(bindir.parent.name))


def _has_server_binaries(bindir: Path) -> bool:
    return all((bindir / tool).is_file() for tool in ("initdb", "postgres", "pg_basebackup"))


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) if part.isdigit() else -1 for part in version.split("."))


def _free_port() -> int:
    """Return a loopback TCP port nobody listens on, not handed out before by this process."""
    with _port_lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((HOST, 0))
                port: int = sock.getsockname()[1]
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port


def free_port() -> int:
    """A free loopback port, for replicas that share one on different addresses
    (``ReplicaSpec(host="127.0.0.2", port=port)``)."""
    return _free_port()


def _conf_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _child_pids(parent: int) -> list[int]:
    """Return the pids of the direct children of ``parent``, read from /proc.

    One read of the kernel's list when it has one: a scan of every process reads
    hundreds of files, and each read waits for the GIL again, which takes seconds when
    a test's 100 client threads are busy (the pause then starts seconds late).
    """
    try:
        listed = Path("/proc", str(parent), "task", str(parent), "children").read_text()
    except OSError:
        pass
    else:
        return [int(pid) for pid in listed.split()]
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses; fields resume after the last ")".
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == parent:
            children.append(int(entry))
    return children


class _PortInUseError(Exception):
    pass


@dataclass(frozen=True)
class _Runtime:
    """How server commands run: which binaries, as which OS user, with which password."""

    bindir: Path
    os_user: pwd.struct_passwd | None
    password: str = field(repr=False)

    @classmethod
    def create(cls, bindir: Path) -> _Runtime:
        os_user = None
        if os.geteuid() == 0:
            import pwd  # POSIX only: importing this module must work anywhere

            try:
                os_user = pwd.getpwnam(SERVER_OS_USER)
            except KeyError:
                raise PgClusterError(
                    "PostgreSQL refuses to run as root and there is no OS user"
                    f" '{SERVER_OS_USER}' to run it as. Create that user or run as another user."
                ) from None
        return cls(bindir=bindir, os_user=os_user, password=secrets.token_urlsafe(24))

    def redact(self, text: str) -> str:
        return text.replace(self.password, _REDACTED)

    def give(self, path: Path) -> None:
        """Make ``path`` belong to the OS user the servers run as."""
        if self.os_user is not None:
            os.chown(path, self.os_user.pw_uid, self.os_user.pw_gid)

    def env(self, **extra: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env["LC_ALL"] = "C"
        env.update(extra)
        return env

    def popen(self, args: Sequence[str | Path], **kwargs: Any) -> subprocess.Popen[bytes]:
        uid = gid = None
        groups: list[int] | None = None
        if self.os_user is not None:
            uid, gid, groups = self.os_user.pw_uid, self.os_user.pw_gid, []
        return subprocess.Popen(
            [str(arg) for arg in args], user=uid, group=gid, extra_groups=groups, **kwargs
        )

    def run(self, args: Sequence[str | Path], *, cwd: Path, doing: str, **env: str) -> None:
        """Run a PostgreSQL tool to completion; raise PgClusterError with its output if it fails."""
        with self.popen(
            args,
            cwd=cwd,
            env=self.env(**env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        ) as process:
            output, _ = process.communicate()
        if process.returncode != 0:
            text = self.redact(output.decode(errors="replace").strip())
            raise PgClusterError(
                f"'{Path(args[0]).name}' failed with exit status {process.returncode}"
                f" while {doing}:\n{text}"
            )


@dataclass(eq=False)
class PgNode:
    """One PostgreSQL server of a PgCluster: the primary or a hot-standby replica."""

    name: str
    port: int
    datadir: Path
    role: NodeRole
    apply_delay_ms: int = 0
    host: str = HOST
    fixed_port: bool = False
    _runtime: _Runtime = field(repr=False, kw_only=True)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False, init=False)
    _paused: list[int] = field(default_factory=list, repr=False, init=False)

    @property
    def node_dir(self) -> Path:
        """The directory holding the data directory, the log and the Unix socket."""
        return self.datadir.parent

    @property
    def log_path(self) -> Path:
        return self.node_dir / "postgres.log"

    def url(self, driver: str = "psycopg", database: str = "app") -> str:
        """Return a URL for SQLAlchemy (``driver`` "psycopg" or "asyncpg") or libpq ("")."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        password = quote(self._runtime.password, safe="")
        return f"{scheme}://{SUPERUSER}:{password}@{self.host}:{self.port}/{database}"

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and wait until it accepts connections; a replica also in recovery.

        Does nothing if it is already running.
        """
        if not self.is_running():
            self._launch(retry_port=False)

    def stop(self, mode: StopMode | Literal["fast", "immediate"] = StopMode.FAST) -> None:
        """Stop the server and wait for it to exit; resumes it first if paused.

        "fast" shuts down cleanly, "immediate" like a crash (the next start recovers).
        Does nothing if it is not running.
        """
        process = self._process
        if process is None:
            return
        self.resume()
        if process.poll() is None:
            fast = StopMode(mode) == StopMode.FAST
            process.send_signal(signal.SIGINT if fast else signal.SIGQUIT)
            try:
                process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP to the postmaster and its children): connects hang."""
        process = self._require_running("pause")
        if self._paused:
            return
        # The postmaster first, so that it forks no new child while the others are stopped.
        os.kill(process.pid, signal.SIGSTOP)
        self._paused = [process.pid]
        for pid in _child_pids(process.pid):
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                continue
            self._paused.append(pid)

    def resume(self) -> None:
        """Undo pause() (SIGCONT to every process it stopped); does nothing if not paused."""
        for pid in reversed(self._paused):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                continue
        self._paused = []

    def _require_running(self, action: str) -> subprocess.Popen[bytes]:
        process = self._process
        if process is None or process.poll() is not None:
            raise PgClusterError(
                f"The PostgreSQL node '{self.name}' is not running, so it cannot {action}."
                " Call its start() first."
            )
        return process

    def _connect(self, timeout: int = 10) -> psycopg.Connection[tuple[Any, ...]]:
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=SUPERUSER,
            password=self._runtime.password,
            dbname="postgres",
            connect_timeout=timeout,
            autocommit=True,
        )

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._connect() as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description is not None else []

    def _poll(self, sql: str, params: Sequence[Any], deadline: float) -> bool:
        """Run ``sql`` every few milliseconds until it returns true or ``deadline`` passes."""
        with self._connect(timeout=max(2, int(deadline - time.monotonic()))) as conn:
            while True:
                row = conn.execute(sql, params).fetchone()
                if row is not None and row[0]:
                    return True
                if time.monotonic() > deadline:
                    return False
                time.sleep(_POLL_INTERVAL)

    def _write_node_conf(self) -> None:
        lines = [
            "# This node's own settings, written by replicated_core.testing.pgcluster.",
            f"port = {self.port}",
            f"listen_addresses = {_conf_string(self.host)}",
            f"unix_socket_directories = {_conf_string(str(self.node_dir))}",
            f"cluster_name = {_conf_string(self.name)}",
        ]
        if self.apply_delay_ms:
            lines.append(f"recovery_min_apply_delay = '{self.apply_delay_ms}ms'")
        (self.datadir / "node.conf").write_text("\n".join(lines) + "\n")

    def _make_node_dir(self) -> None:
        self.node_dir.mkdir()
        self._runtime.give(self.node_dir)
        self.log_path.touch()
        self._runtime.give(self.log_path)

    def _initdb(self) -> None:
        self._make_node_dir()
        pwfile = self.node_dir / "pwfile"
        pwfile.touch(mode=0o600)
        self._runtime.give(pwfile)
        pwfile.write_text(self._runtime.password + "\n")
        try:
            self._runtime.run(
                [
                    self._runtime.bindir / "initdb",
                    f"--pgdata={self.datadir}",
                    f"--username={SUPERUSER}",
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                    "--no-instructions",
                ],
                cwd=self.node_dir,
                doing=f"creating the primary's data directory '{self.datadir}'",
            )
        finally:
            pwfile.unlink()
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write(_COMMON_SETTINGS)
        (self.datadir / "pg_hba.conf").write_text(_PG_HBA)
        self._write_node_conf()

    def _clone(self, primary: PgNode) -> None:
        self._make_node_dir()
        conninfo = f"host={HOST} port={primary.port} user={SUPERUSER} application_name={self.name}"
        self._runtime.run(
            [
                self._runtime.bindir / "pg_basebackup",
                f"--pgdata={self.datadir}",
                f"--dbname={conninfo}",
                "--wal-method=stream",
                "--checkpoint=fast",
                "--write-recovery-conf",
                "--no-sync",
                "--no-manifest",
            ],
            cwd=self.node_dir,
            doing=f"copying the primary into the replica '{self.name}'",
            PGPASSWORD=self._runtime.password,
        )
        self._write_node_conf()

    def _launch(self, *, retry_port: bool) -> None:
        for attempt in range(_PORT_ATTEMPTS):
            try:
                self._spawn()
            except _PortInUseError:
                if not retry_port or self.fixed_port or attempt == _PORT_ATTEMPTS - 1:
                    raise PgClusterError(
                        f"The PostgreSQL node '{self.name}' could not listen on port {self.port},"
                        " which another process took. Stop that process or start a new cluster."
                    ) from None
                self.port = _free_port()
                self._write_node_conf()
            else:
                break
        if self.role == NodeRole.REPLICA:
            self._wait_until(
                "SELECT pg_is_in_recovery()", (), f"is in recovery on port {self.port}"
            )

    def _spawn(self) -> None:
        log_start = self.log_path.stat().st_size
        with self.log_path.open("ab") as log:
            process = self._runtime.popen(
                [self._runtime.bindir / "postgres", "-D", self.datadir],
                cwd=self.node_dir,
                env=self._runtime.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._process = process
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._accepts_connections(process.pid):
            if process.poll() is not None:
                self._process = None
                with self.log_path.open("rb") as log:
                    log.seek(log_start)
                    if b"Address already in use" in log.read():
                        raise _PortInUseError
                raise PgClusterError(
                    f"The PostgreSQL node '{self.name}' exited with status {process.returncode}"
                    f" while starting; the end of its log '{self.log_path}' says why:\n"
                    + self._log_tail()
                )
            if time.monotonic() > deadline:
                self.stop(StopMode.IMMEDIATE)
                raise PgClusterError(
                    f"The PostgreSQL node '{self.name}' did not accept connections within"
                    f" {_START_TIMEOUT:g} seconds, so it was stopped; the end of its log"
                    f" '{self.log_path}' may say why:\n" + self._log_tail()
                )
            time.sleep(_POLL_INTERVAL)

    def _accepts_connections(self, pid: int) -> bool:
        # postmaster.pid: pid, data directory, start time, port, socket directory,
        # listen address, shared memory key, status ("ready" or "standby" when open).
        try:
            lines = (self.datadir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return (
            len(lines) >= 8
            and lines[0].strip() == str(pid)
            and lines[7].strip() in ("ready", "standby")
        )

    def _wait_until(
        self, sql: str, params: Sequence[Any], what: str, timeout: float = _START_TIMEOUT
    ) -> None:
        if not self._poll(sql, params, time.monotonic() + timeout):
            raise PgClusterError(
                f"The PostgreSQL node '{self.name}' did not report that it {what} within"
                f" {timeout:g} seconds; the end of its log '{self.log_path}' may say why:\n"
                + self._log_tail()
            )

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as error:
            return f"(the log cannot be read: {error})"
        return self._runtime.redact("\n".join(lines[-_LOG_TAIL_LINES:]))


@dataclass(eq=False)
class PgCluster:
    """A running primary with its streaming replicas, made by ``PgCluster.start``."""

    base_dir: Path
    primary: PgNode
    replicas: list[PgNode]
    _runtime: _Runtime = field(repr=False, kw_only=True)

    @classmethod
    def start(
        cls, base_dir: Path, replicas: Sequence[ReplicaSpec], *, bindir: Path | None = None
    ) -> PgCluster:
        """Create and start a primary and one streaming replica per spec under ``base_dir``.

        Returns once every replica streams from the primary and accepts read-only
        connections. The servers run as the OS user 'postgres' when this process is root, so
        that user must be able to enter ``base_dir``. On failure, whatever started is stopped.
        """
        names = [spec.name for spec in replicas]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(
                f"The replica name '{duplicates[0]}' is used more than once. Give every"
                " replica its own name."
            )
        if bindir is None:
            bindir = find_bindir()
        if bindir is None:
            raise PgClusterError(
                "PostgreSQL server binaries were not found by 'pg_config --bindir' nor in"
                " '/usr/lib/postgresql/*/bin'. Install the PostgreSQL server."
            )
        runtime = _Runtime.create(bindir)
        base_dir = base_dir.absolute()
        base_dir.mkdir(parents=True, exist_ok=True)
        runtime.give(base_dir)

        def node(
            name: str,
            role: NodeRole,
            apply_delay_ms: int = 0,
            host: str = HOST,
            port: int | None = None,
        ) -> PgNode:
            return PgNode(
                name=name,
                port=_free_port() if port is None else port,
                datadir=base_dir / name / "data",
                role=role,
                apply_delay_ms=apply_delay_ms,
                host=host,
                fixed_port=port is not None,
                _runtime=runtime,
            )

        cluster = cls(
            base_dir=base_dir,
            primary=node(NodeRole.PRIMARY.value, NodeRole.PRIMARY),
            replicas=[
                node(s.name, NodeRole.REPLICA, s.apply_delay_ms, s.host, s.port) for s in replicas
            ],
            _runtime=runtime,
        )
        try:
            cluster.primary._initdb()
            cluster.primary._launch(retry_port=True)
            cluster.primary._query("CREATE DATABASE app")
            with ThreadPoolExecutor(max_workers=max(1, len(cluster.replicas))) as pool:
                for future in [pool.submit(cluster._add, r) for r in cluster.replicas]:
                    future.result()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _add(self, replica: PgNode) -> None:
        replica._clone(self.primary)
        replica._launch(retry_port=True)
        replica._wait_until(
            "SELECT status = 'streaming' FROM pg_stat_wal_receiver",
            (),
            f"streams from the primary on port {self.primary.port}",
        )

    @property
    def password(self) -> str:
        """The superuser's password; keep it out of logs and messages."""
        return self._runtime.password

    @property
    def nodes(self) -> list[PgNode]:
        return [self.primary, *self.replicas]

    def replica(self, name: str) -> PgNode:
        for node in self.replicas:
            if node.name == name:
                return node
        known = ", ".join(f"'{node.name}'" for node in self.replicas) or "none"
        raise LookupError(f"The cluster has no replica named '{name}'; its replicas: {known}.")

    def stop(self) -> None:
        """Stop every node (fast shutdown), resuming paused ones first. Safe to call twice."""
        for node in self.nodes:
            node.resume()
        for node in [*self.replicas, self.primary]:
            node.stop(StopMode.FAST)

    def execute(self, node: PgNode, sql: str) -> list[tuple[Any, ...]]:
        """Run ``sql`` on ``node``'s database 'app' in autocommit mode; return its rows."""
        import psycopg

        with psycopg.connect(node.url(driver=""), autocommit=True) as conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description is not None else []

    def wait_for_replay(self, timeout: float = 10.0, include_delayed: bool = False) -> None:
        """Wait until the replicas have replayed the primary's current WAL position.

        Replicas with an apply delay are skipped unless ``include_delayed`` is true.
        Raises TimeoutError if one has not caught up within ``timeout`` seconds.
        """
        [(lsn,)] = self.primary._query("SELECT pg_current_wal_lsn()::text")
        deadline = time.monotonic() + timeout
        for node in self.replicas:
            if node.apply_delay_ms and not include_delayed:
                continue
            sql = "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn"
            if not node._poll(sql, (lsn,), deadline):
                [(replayed,)] = node._query("SELECT pg_last_wal_replay_lsn()::text")
                raise TimeoutError(
                    f"The replica '{node.name}' did not replay the primary's WAL up to {lsn}"
                    f" within {timeout:g} seconds; it has replayed up to {replayed}."
                )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
