"""What the test apps served by real servers share: their settings, read from the
environment that tests/test_servers.py hands the server (never printed: the URLs hold
the cluster's password)."""

from __future__ import annotations

import json
import os
import threading
from typing import Any

ENV = "SERVERS_TEST_SETTINGS"
WHO_SQL = "SELECT inet_server_port(), pg_is_in_recovery()"


def load() -> dict[str, Any]:
    """The settings: {"urls": {node: url}, "async_urls": {...}, "replicas": [...],
    "secret_key": ..., "query_at_import": bool, "config": {more app config}}."""
    settings: dict[str, Any] = json.loads(os.environ[ENV])
    return settings


class ReadCounter:
    """This process's reads, numbered in the order they were served: the test compares
    the order of replica picks between worker processes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def next(self) -> int:
        with self._lock:
            self._count += 1
            return self._count


def served_by(port: int, in_recovery: bool, seq: int) -> dict[str, Any]:
    """Who answered a read: the server's port and role, this worker's pid, the read's number."""
    return {"port": port, "in_recovery": in_recovery, "pid": os.getpid(), "seq": seq}
