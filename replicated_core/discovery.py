"""Replicas found through DNS: a name with several A records (a Kubernetes headless
Service) or SRV records (a host and a port each), resolved again every interval.

``REPLICATED_REPLICA_DISCOVERY`` gives a URL whose host is that name. Each address
found becomes a replica named ``"<name>/<address>:<port>"`` (the same name at every
resolution), with an engine made by the adapter like its other replica engines. The
router's prober calls ``poll()`` (sync adapters) or ``work()`` (async ones) at each of
its ticks, so resolutions run off the request path, while the app serves requests:

- A replica that joins gets reads once a position check says it is fine.
- A replica that leaves gets no new read at once; the requests already reading there
  go on with its engine, which is disposed of once its connections are back in its
  pool (or after ``drain_timeout``).
- A resolution that fails (the DNS server down, the name gone, no address) keeps the
  replicas found before; the log says so once, and once more when it resolves again.

The DNS client is dnspython (``pip install replicated-router[discovery]``), imported
when a router with discovery is created.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import RecordType
from .errors import ConfigError
from .health import describe_error
from .nodes import Node, Role
from .status import DiscoveryStatus

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

    from sqlalchemy.engine import URL, Engine

    from .config import DiscoverySpec
    from .router import Router

__all__ = ["Discovery", "Target", "require_dnspython"]

logger = logging.getLogger("replicated")

_KEY = "REPLICATED_REPLICA_DISCOVERY"

# Each process waits up to this share of the interval more, at random, so that many
# worker processes started together do not all ask the DNS server at once.
_JITTER = 0.1


def require_dnspython() -> None:
    """Raise ``ConfigError`` naming the key if dnspython is not installed."""
    try:
        import dns.asyncresolver
        import dns.resolver  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"'{_KEY}' needs dnspython, which is not installed. Install it with "
            "'pip install \"replicated-router[discovery]\"'."
        ) from None


@dataclass(frozen=True, slots=True)
class Target:
    """One replica address found in DNS."""

    address: str
    port: int | None  # None: the URL has none, so the driver's default


@dataclass(slots=True)
class _Leaving:
    node: Node
    since: float


class Discovery:
    """Finds one router's replicas through DNS and adds them to it, or removes them.

    ``make_engine(name, url)`` makes a discovered replica's (sync) Engine, the way the
    adapter makes its other replica engines. A replica that left is disposed of with
    ``dispose`` (sync adapters: called from the prober's thread) or ``dispose_async``
    (async ones: awaited in the prober's event loop). Thread- and task-safe: one lock
    guards the set, held only while it changes.
    """

    def __init__(
        self,
        spec: DiscoverySpec,
        router: Router,
        make_engine: Callable[[str, URL], Engine],
        *,
        dispose: Callable[[Node], None] | None = None,
        dispose_async: Callable[[Node], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        require_dnspython()
        self.spec = spec
        self.router = router
        self.make_engine = make_engine
        self.dispose = dispose
        self.dispose_async = dispose_async
        self.clock = clock
        self._nodes: dict[str, Node] = {}  # the discovered replicas, by name
        self._leaving: list[_Leaving] = []  # those that left and are not disposed of yet
        self._resolved_at: float | None = None
        self._error: str | None = None
        self.after_fork()

    def after_fork(self) -> None:
        """Forget the parent's resolution in flight and its lock (a fork's child);
        the replicas still draining there are the parent's to close. The counters
        start at 0, as the router's do: the processes' counts are summed."""
        self._lock = threading.Lock()
        self._resolving = False
        self.resolutions = 0
        self.failures = 0
        self._next = 0.0
        self._random = random.Random()
        for leaving in self._leaving:
            leaving.node.engine.dispose(close=False)
        self._leaving = []

    @property
    def replicas(self) -> tuple[Node, ...]:
        """The replicas the last resolution found (or those before, if it failed)."""
        return tuple(self._nodes.values())

    # -- when -----------------------------------------------------------------------

    def _due(self) -> bool:
        # Claims the next resolution: True at most once until it is over.
        with self._lock:
            if self._resolving or self.clock() < self._next:
                return False
            self._resolving = True
            return True

    def _over(self) -> None:
        interval = self.spec.interval
        with self._lock:
            self._resolving = False
            self._next = self.clock() + interval * (1 + _JITTER * self._random.random())

    def poll(self) -> None:
        """For a sync prober's tick: resolve in a thread of its own when due (a slow
        DNS server holds up no check), and dispose of the replicas drained."""
        if self._due():
            threading.Thread(
                target=self._refresh_claimed, name="replicated-discovery", daemon=True
            ).start()
        dispose = self.dispose
        for node in self._drained():
            if dispose is not None:
                dispose(node)
            self.router.backends.pop(node.name, None)

    def work(self) -> list[Coroutine[Any, Any, None]]:
        """For an async prober's tick: what to run as tasks now (a resolution when
        due, the disposal of the replicas drained)."""
        found: list[Coroutine[Any, Any, None]] = []
        if self._due():
            found.append(self._refresh_claimed_async())
        found += [self._dispose_async(node) for node in self._drained()]
        return found

    # -- resolving --------------------------------------------------------------------

    def refresh(self) -> None:
        """Resolve now, blocking up to the timeout, and apply the answer (an adapter's
        ``init_app`` does, so that the first requests have the replicas)."""
        with self._lock:
            self._resolving = True
        self._refresh_claimed()

    def _refresh_claimed(self) -> None:
        try:
            targets = self._resolve()
        except Exception as error:
            self._failed(error)
        else:
            self._apply(targets)
        finally:
            self._over()

    async def _refresh_claimed_async(self) -> None:
        try:
            targets = await self._resolve_async()
        except Exception as error:
            self._failed(error)
        else:
            self._apply(targets)
        finally:
            self._over()

    def _resolver(self, kind: Any) -> Any:
        import dns.nameserver

        spec = self.spec
        resolver = kind(configure=not spec.nameservers)
        if spec.nameservers:
            servers = [dns.nameserver.Do53Nameserver(a, p) for a, p in spec.nameservers]
            resolver.nameservers = servers
        resolver.lifetime = spec.timeout
        resolver.timeout = spec.timeout
        return resolver

    def _resolve(self) -> list[Target]:
        import dns.resolver

        resolver = self._resolver(dns.resolver.Resolver)
        if self.spec.record is RecordType.A:
            return self._from_a(resolver.resolve(self.spec.name, "A"))
        answer = resolver.resolve(self.spec.name, "SRV")
        targets = []
        for target, port, known in self._srv_targets(answer):
            addresses = known or [r.address for r in resolver.resolve(target, "A")]
            targets += [Target(address, port) for address in addresses]
        return self._checked(targets)

    async def _resolve_async(self) -> list[Target]:
        import dns.asyncresolver

        resolver = self._resolver(dns.asyncresolver.Resolver)
        if self.spec.record is RecordType.A:
            return self._from_a(await resolver.resolve(self.spec.name, "A"))
        answer = await resolver.resolve(self.spec.name, "SRV")
        targets = []
        for target, port, known in self._srv_targets(answer):
            addresses = known or [r.address for r in await resolver.resolve(target, "A")]
            targets += [Target(address, port) for address in addresses]
        return self._checked(targets)

    def _from_a(self, answer: Any) -> list[Target]:
        port = self.spec.url.port
        return self._checked([Target(r.address, port) for r in answer])

    @staticmethod
    def _srv_targets(answer: Any) -> list[tuple[str, int, list[str]]]:
        # Each record's target host, port, and the addresses the answer already gives
        # for that host (its additional section); priority and weight are not used.
        import dns.rdatatype

        additional: dict[str, list[str]] = {}
        for rrset in answer.response.additional:
            if rrset.rdtype == dns.rdatatype.A:
                additional.setdefault(rrset.name.to_text(), []).extend(r.address for r in rrset)
        found = []
        for record in answer:
            host = record.target.to_text()
            found.append((host, int(record.port), additional.get(host, [])))
        return found

    def _checked(self, targets: list[Target]) -> list[Target]:
        if not targets:
            raise LookupError("no address in the answer")
        return sorted(set(targets), key=lambda t: (t.address, t.port or 0))

    def _failed(self, error: BaseException) -> None:
        self.failures += 1
        first = self._error is None
        self._error = describe_error(error)
        if first:
            again = f"it is tried again every {self.spec.interval:g} s, and this is logged once"
            if self._nodes:
                meanwhile = (
                    f"The {len(self._nodes)} replicas found before keep serving reads; "
                    f"{again} until it resolves again."
                )
            else:
                # No resolution has worked yet (at start-up): none to keep.
                where = "the fixed replicas" if self.router.replicas else "the primary"
                meanwhile = (
                    f"No replica has been found yet: reads go to {where} until the name "
                    f"resolves; {again} until it resolves."
                )
            logger.warning(
                "Could not resolve the replicas of '%s' (%s records of '%s'): %s. %s",
                _KEY,
                self.spec.record.value,
                self.spec.name,
                self._error.rstrip("."),
                meanwhile,
                extra={"node": None, "reason": "discovery_failed", "database": self._database},
            )

    @property
    def _database(self) -> str:
        return self.router.primary.name

    # -- applying ---------------------------------------------------------------------

    def _name(self, target: Target) -> str:
        if target.port is None:
            return f"{self.spec.name}/{target.address}"
        return f"{self.spec.name}/{target.address}:{target.port}"

    def _apply(self, targets: list[Target]) -> None:
        wanted = {self._name(target): target for target in targets}
        joined: list[Node] = []
        left: list[Node] = []
        with self._lock:
            now = self.clock()
            self.resolutions += 1
            self._resolved_at = now
            recovered, self._error = self._error is not None, None
            nodes = dict(self._nodes)
            for name in self._nodes:
                if name not in wanted:
                    left.append(nodes.pop(name))
            for name, target in wanted.items():
                if name in nodes:
                    continue
                url = self.spec.url.set(host=target.address, port=target.port)
                node = Node(name, Role.REPLICA, self.make_engine(name, url))
                nodes[name] = node
                joined.append(node)
            for node in left:
                self.router.remove_replica(node)
                self._leaving.append(_Leaving(node, now))
            for node in joined:
                self.router.add_replica(node)
            self._nodes = nodes
        extra = {"reason": "discovery", "database": self._database}
        if recovered:
            logger.warning(
                "The replicas of '%s' resolve again: %d found.",
                _KEY,
                len(nodes),
                extra={**extra, "node": None},
            )
        for node in joined:
            logger.info(
                "Replica '%s' joined (found in DNS); it serves reads once its position "
                "check says it is fine.",
                node.name,
                extra={**extra, "node": node.name},
            )
        for node in left:
            logger.info(
                "Replica '%s' left (gone from DNS); it gets no new reads, and its "
                "connections are closed once the requests reading there are done.",
                node.name,
                extra={**extra, "node": node.name},
            )

    # -- draining ---------------------------------------------------------------------

    def _drained(self) -> list[Node]:
        # The replicas that left and whose connections are all back in their pool
        # (after at least one check interval: a request that chose one just before it
        # left takes its connection right after), or whose drain time is up.
        now = self.clock()
        grace = self.router.health.check_interval
        with self._lock:
            done = [
                leaving
                for leaving in self._leaving
                if now - leaving.since >= self.spec.drain_timeout
                or (now - leaving.since >= grace and _idle(leaving.node))
            ]
            if not done:
                return []
            self._leaving = [leaving for leaving in self._leaving if leaving not in done]
        return [leaving.node for leaving in done]

    async def _dispose_async(self, node: Node) -> None:
        dispose = self.dispose_async
        if dispose is not None:
            await dispose(node)
        self.router.backends.pop(node.name, None)

    # -- status -----------------------------------------------------------------------

    def status(self) -> DiscoveryStatus:
        """What the status command shows of discovery."""
        resolved_at = self._resolved_at
        return DiscoveryStatus(
            name=self.spec.name,
            record=self.spec.record.value,
            interval=self.spec.interval,
            replicas=tuple(self._nodes),
            draining=tuple(leaving.node.name for leaving in self._leaving),
            resolved_ago=None if resolved_at is None else self.clock() - resolved_at,
            resolutions=self.resolutions,
            failures=self.failures,
            error=self._error,
        )


def _idle(node: Node) -> bool:
    # Whether no connection of the node's pool is checked out (pools that do not
    # count them: yes).
    checkedout = getattr(node.engine.pool, "checkedout", None)
    return checkedout is None or checkedout() == 0
