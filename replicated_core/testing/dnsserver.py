"""A throwaway DNS server for tests: dnsmasq on a free loopback port, whose records the
test changes while it runs.

A records live in a hosts file that dnsmasq reads again on SIGHUP, as a cluster's DNS
changes under a running app; SRV records are command-line options, so changing them
restarts the server on the same port. Each change returns once the server answers
with it. No record is ever cached (``--local-ttl=0``, no upstream servers).

Uses the standard library, and dnspython (imported when an answer is first checked).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

__all__ = ["DnsServer", "DnsServerError", "find_dnsmasq"]

HOST = "127.0.0.1"

_START_TIMEOUT = 10.0
_CHANGE_TIMEOUT = 10.0
_POLL_INTERVAL = 0.02
_READY = "ready.dnsserver.test"
_PORT_ATTEMPTS = 5


class DnsServerError(RuntimeError):
    """The test DNS server failed to start or to serve a change."""


def find_dnsmasq() -> Path | None:
    """The dnsmasq binary (Debian: package dnsmasq-base), or None where there is none."""
    found = shutil.which("dnsmasq") or (
        "/usr/sbin/dnsmasq" if os.access("/usr/sbin/dnsmasq", os.X_OK) else None
    )
    return Path(found) if found else None


def _free_port() -> int:
    # dnsmasq listens on TCP and UDP: a port free for both.
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((HOST, 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((HOST, port))
                except OSError:
                    continue
        return port


class DnsServer:
    """dnsmasq answering on ``HOST:port`` for the names a test gives it.

    ``set_a(name, addresses)`` and ``set_srv(name, targets)`` change the records and
    wait until the server answers with them; ``stop()`` and ``start()`` take it away
    and bring it back (a resolver outage).
    """

    def __init__(self, directory: Path, binary: Path) -> None:
        self.directory = directory
        self.binary = binary
        self.port = _free_port()
        self._hosts = directory / "hosts"
        self._log = directory / "dnsmasq.log"
        self._a: dict[str, tuple[str, ...]] = {}
        self._srv: dict[str, tuple[tuple[str, int], ...]] = {}
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def start_in(cls, directory: Path, binary: Path | None = None) -> DnsServer:
        """Start a server with no records, its files in ``directory`` (created)."""
        binary = binary or find_dnsmasq()
        if binary is None:
            raise DnsServerError(
                "dnsmasq was not found. Install it (Debian: 'apt-get install dnsmasq-base')."
            )
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)  # dnsmasq may read the hosts file as another user
        server = cls(directory, binary)
        server._write_hosts()
        for attempt in range(_PORT_ATTEMPTS):
            try:
                server.start()
            except DnsServerError:
                # Taken between the choice and the start (a client's ephemeral port):
                # another port, while no one has been told this one.
                if attempt == _PORT_ATTEMPTS - 1 or b"already in use" not in server._log_bytes():
                    raise
                server.port = _free_port()
            else:
                break
        return server

    @property
    def nameserver(self) -> str:
        """``"127.0.0.1:PORT"``, as ``REPLICATED_REPLICA_DISCOVERY["nameservers"]`` takes it."""
        return f"{HOST}:{self.port}"

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server (same port, same records) and wait until it answers."""
        if self.is_running():
            return
        log = self._log.open("ab")
        try:
            self._process = subprocess.Popen(
                [str(self.binary), *self._arguments()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._answers():
            if self._process.poll() is not None:
                self._process = None
                raise DnsServerError(
                    f"dnsmasq exited while starting on port {self.port}; its log "
                    f"'{self._log}' says why:\n{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise DnsServerError(
                    f"dnsmasq did not answer on port {self.port} within {_START_TIMEOUT:g} "
                    f"seconds; its log '{self._log}' may say why:\n{self._log_tail()}"
                )
            time.sleep(_POLL_INTERVAL)

    def stop(self) -> None:
        """Stop the server and wait for it to exit; does nothing if it is not running."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None

    def set_a(self, name: str, addresses: Sequence[str]) -> None:
        """Make ``name`` resolve to ``addresses`` (A records; none: no record)."""
        self._a[name] = tuple(addresses)
        self._write_hosts()
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGHUP)
        self._wait_for(name, "A", sorted(addresses))

    def set_srv(self, name: str, targets: Sequence[tuple[str, int]]) -> None:
        """Make ``name`` (such as ``_postgresql._tcp.replicas.test``) hold one SRV
        record per ``(address, port)``; each target host gets its A record. Restarts
        the server on the same port."""
        self._srv[name] = tuple(targets)
        self._write_hosts()
        self.stop()
        self.start()
        self._wait_for(name, "SRV", sorted(f"{_target(name, a)}.:{p}" for a, p in targets))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------------

    def _arguments(self) -> list[str]:
        import grp
        import pwd

        arguments = [
            "--keep-in-foreground",
            f"--port={self.port}",
            f"--listen-address={HOST}",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            f"--addn-hosts={self._hosts}",
            "--local-ttl=0",
            "--pid-file=",
            "--log-facility=-",
            # As the current user: root would otherwise switch to 'nobody'.
            f"--user={pwd.getpwuid(os.geteuid()).pw_name}",
            f"--group={grp.getgrgid(os.getegid()).gr_name}",
        ]
        for name, targets in self._srv.items():
            for address, port in targets:
                arguments.append(f"--srv-host={name},{_target(name, address)},{port}")
        return arguments

    def _write_hosts(self) -> None:
        # The name that tells the server answers (see _answers).
        records: dict[str, list[str]] = {HOST: [_READY]}
        for name, addresses in self._a.items():
            for address in addresses:
                records.setdefault(address, []).append(name)
        for name, targets in self._srv.items():
            for address, _ in targets:
                records.setdefault(address, []).append(_target(name, address))
        text = "".join(f"{a} {' '.join(names)}\n" for a, names in records.items())
        temporary = self._hosts.with_suffix(".new")
        temporary.write_text(text)
        temporary.chmod(0o644)
        temporary.replace(self._hosts)  # dnsmasq never reads half a file

    def _query(self, name: str, kind: str) -> list[str] | None:
        # The answers as text, [] for none, None when the server does not answer.
        import dns.exception
        import dns.resolver

        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [HOST]
        resolver.port = self.port
        resolver.lifetime = 1.0
        try:
            answer = resolver.resolve(name, kind)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException:
            return None
        if kind == "SRV":
            return sorted(f"{r.target}:{r.port}" for r in answer)
        return sorted(r.to_text() for r in answer)

    def _answers(self) -> bool:
        return bool(self._query(_READY, "A"))

    def _wait_for(self, name: str, kind: str, expected: list[str]) -> None:
        deadline = time.monotonic() + _CHANGE_TIMEOUT
        while True:
            found = self._query(name, kind)
            if found == expected:
                return
            if time.monotonic() > deadline:
                raise DnsServerError(
                    f"dnsmasq on port {self.port} still answers {found} for '{name}' "
                    f"({kind}) after {_CHANGE_TIMEOUT:g} seconds, not {expected}."
                )
            time.sleep(_POLL_INTERVAL)

    def _log_bytes(self) -> bytes:
        try:
            return self._log.read_bytes()
        except OSError:
            return b""

    def _log_tail(self) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-20:])
        except OSError as error:
            return f"(the log cannot be read: {error})"


def _target(name: str, address: str) -> str:
    # The host name an SRV record of ``name`` points at for ``address``.
    # (Host names may not hold the underscores of the service labels.)
    domain = ".".join(label for label in name.split(".") if not label.startswith("_"))
    return f"host-{address.replace('.', '-').replace(':', '-')}.{domain}"
