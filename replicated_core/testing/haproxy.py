"""HAProxy in front of replicas, for tests: one loopback address that balances TCP
connections over several servers, as a read port, a Kubernetes read-only Service or a
cloud reader endpoint does.

``BalancedAddress.start(directory, [("r1", port1), ("r2", port2)])`` writes a config
file in ``directory`` (``mode tcp``, ``balance roundrobin``: each new connection goes
to the next server, and stays there for its life) and runs HAProxy in the foreground
(``-db``), stopped by ``stop()`` or at the end of a ``with`` block. Needs the
``haproxy`` binary (Debian: ``apt-get install haproxy``); uses only the standard
library.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

__all__ = ["BalancedAddress", "HAProxyError", "find_haproxy"]

HOST = "127.0.0.1"
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


class HAProxyError(RuntimeError):
    """HAProxy could not be started, or did not listen."""


def find_haproxy() -> Path | None:
    """The ``haproxy`` binary on PATH or in /usr/sbin (Debian's), or None."""
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    return Path(found) if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


def config_text(port: int, servers: Sequence[tuple[str, int]], *, check: bool = False) -> str:
    """The HAProxy config: one TCP listener on ``port`` balancing over ``servers``
    (name, loopback port) round-robin; with ``check``, a TCP check every 0.5 s."""
    lines = [
        "# Written by replicated_core.testing.haproxy: a test balancer on loopback.",
        "global",
        "    maxconn 2000",
        "defaults",
        "    mode tcp",
        "    timeout connect 2s",
        "    timeout client 1h",
        "    timeout server 1h",
        "listen replicas",
        f"    bind {HOST}:{port}",
        "    balance roundrobin",
    ]
    for name, server_port in servers:
        suffix = " check inter 500ms" if check else ""
        lines.append(f"    server {name} {HOST}:{server_port}{suffix}")
    return "\n".join(lines) + "\n"


@dataclass(eq=False)
class BalancedAddress:
    """A running HAProxy: ``port`` reaches one of ``servers`` per new connection."""

    port: int
    servers: tuple[tuple[str, int], ...]
    config_path: Path
    log_path: Path
    _process: subprocess.Popen[bytes] = field(repr=False)

    @classmethod
    def start(
        cls,
        directory: Path,
        servers: Sequence[tuple[str, int]],
        *,
        check: bool = False,
        binary: Path | None = None,
    ) -> BalancedAddress:
        """Start HAProxy on a free loopback port, balancing over ``servers``; return once
        it accepts connections. Raises ``HAProxyError`` with its log if it does not."""
        haproxy = binary or find_haproxy()
        if haproxy is None:
            raise HAProxyError(
                "The 'haproxy' binary was not found on PATH nor in /usr/sbin. Install it "
                "(Debian: 'apt-get install haproxy')."
            )
        directory.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        config_path = directory / f"haproxy-{port}.cfg"
        config_path.write_text(config_text(port, servers, check=check))
        log_path = directory / f"haproxy-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [str(haproxy), "-db", "-f", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        running = cls(port, tuple(servers), config_path, log_path, process)
        try:
            running._wait_listening()
        except BaseException:
            running.stop()
            raise
        return running

    def address(self) -> tuple[str, int]:
        """Where clients connect: (host, port)."""
        return HOST, self.port

    def url_for(self, url: str) -> str:
        """``url`` (a database URL on loopback) with its port replaced by this one's."""
        head, _, rest = url.rpartition(f"@{HOST}:")
        if not head:
            raise ValueError("The URL does not point at a loopback server.")
        _, slash, tail = rest.partition("/")
        return f"{head}@{HOST}:{self.port}{slash}{tail}"

    def is_running(self) -> bool:
        return self._process.poll() is None

    def stop(self) -> None:
        """Stop HAProxy (SIGTERM, then SIGKILL) and wait for it."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=_STOP_TIMEOUT)

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                raise HAProxyError(
                    f"HAProxy exited with status {self._process.returncode} while starting; "
                    f"its log says:\n{self.log_path.read_text(errors='replace')[-2000:]}"
                )
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise HAProxyError(
                        f"HAProxy did not listen on {HOST}:{self.port} within {_START_TIMEOUT:g} s."
                    ) from None
                time.sleep(0.02)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
