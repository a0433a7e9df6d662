"""The router: turns the routing intent into a node for every statement.

Adapters build one Router per routed database of an app from its engines (the app's
``Databases``, databases.py, holds them), open a request scope through
``router.requests`` (scope.py) at the start of each request, and ask ``node()``
whenever SQLAlchemy needs a bind.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import random
import socket
import threading
import weakref
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import event

from . import intent
from .backends import backend_for
from .balanced import Balanced
from .catchup import CatchUp
from .config import ReplicatedConfig, StickyMode
from .counters import Counters
from .guards import CUT_MARK, EXECUTE_HOOKS, guard_replica
from .health import Health, describe_error
from .intent import Intent, current_override, override_var
from .nodes import Node, Role
from .prober import TaskProber, ThreadProber
from .rules import Decision, Reason, decide
from .scope import Requests
from .statements import StatementKind, classify_sql
from .sticky import StickyToken, cluster_tag
from .weights import Spread

if TYPE_CHECKING:
    from collections.abc import Sequence
    from contextvars import ContextVar

    from sqlalchemy.engine import Connection
    from sqlalchemy.pool import ConnectionPoolEntry

    from .backends import Position
    from .discovery import Discovery
    from .intent import Override
    from .rules import ReplicaView
    from .scope import RequestScope
    from .sticky import StickyCodec

__all__ = ["Router", "live_routers"]


T = TypeVar("T")

logger = logging.getLogger("replicated")

# The three ways a dialect hands a statement to the driver.

# Set in a pooled connection's ``info`` while it runs a position check, or after the
# router cut it off from a hung replica.
PROBE_MARK = "replicated.probe"


# Every live router, for the fork handler below and the Prometheus collector.
_ROUTERS: weakref.WeakSet[Router] = weakref.WeakSet()
_SERIALS = itertools.count()


def live_routers() -> list[Router]:
    """Every router of this process not yet garbage-collected, oldest first."""
    return sorted(_ROUTERS, key=lambda router: router.serial)


def _after_fork_in_child() -> None:
    for router in list(_ROUTERS):
        router.after_fork()


# Once per process, at import: gunicorn --preload, uWSGI without lazy-apps and
# multiprocessing's fork start method all fork after the app (and its routers) exist.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Router:
    """Chooses the node for each statement of one database of an app and guards its
    replicas against writes.

    ``scope_var`` is where its request scopes live: None (``intent``'s) for the app's
    default database, a contextvar of its own for each further one.
    """

    def __init__(
        self,
        config: ReplicatedConfig,
        primary: Node,
        replicas: Sequence[Node],
        codec: StickyCodec | None,
        *,
        name: str = "",
        scope_var: ContextVar[RequestScope | None] | None = None,
    ) -> None:
        # The app's name (the adapters give it): the "app" label of its metrics.
        self.name = name
        # Where this router's request scopes live: the contextvar of ``intent`` for an
        # app's default database; one of its own for each further database of the app
        # (databases.py), so that each database has its own scope in a request.
        self._default = scope_var is None
        self._scope_var = intent.scope_var if scope_var is None else scope_var
        self.serial = next(_SERIALS)  # creation order, for live_routers()
        self.config = config
        self.primary = primary
        self.replicas = tuple(replicas)
        # What depends on the database, picked once per engine.
        self.backends = {n.name: backend_for(n.engine.dialect.name) for n in (primary, *replicas)}
        self.backend = self.backends[primary.name]
        if codec is not None and self.backend.has_positions:
            codec.positions = self.backend  # the token carries the primary's positions
        self._codec = codec
        self._sticky_mode = config.sticky_mode.resolve(self.backend.has_positions)
        self._sticky_ttl = config.sticky_ttl(self._sticky_mode)
        self.health = Health(
            self.replicas,
            probing=all(self.backends[n.name].has_positions for n in self.replicas),
            check_interval=config.check_interval,
            max_lag=config.max_lag,
            downtime=config.replica_downtime,
            probe_timeout=config.connect_timeout,
            secrets=[n.engine.url.password or "" for n in (primary, *self.replicas)],
            database=primary.name,
        )
        self.counters = Counters()
        # The short wait for a replica to replay a sticky client's write; its IO is
        # the adapter's. None where positions cannot be read.
        self.catch_up = (
            CatchUp(self.health, self.counters, self.backends, config.catch_up_timeout)
            if self.health.probing
            else None
        )
        self._prober: ThreadProber | TaskProber | None = None
        self._thread_prober: ThreadProber | None = None
        # What finds replicas through DNS (REPLICATED_REPLICA_DISCOVERY), set by the
        # adapter; it adds and removes replicas with add_replica() and remove_replica().
        self.discovery: Discovery | None = None
        # Pooled connections of each replica, to cut off those stuck on a hung one.
        self._entries: dict[str, weakref.WeakSet[ConnectionPoolEntry]] = {
            n.name: weakref.WeakSet() for n in self.replicas
        }
        self._entries_lock = threading.Lock()
        if codec is None and self._sticky_mode is not StickyMode.OFF:
            logger.warning(
                "SECRET_KEY is not set, so the sticky cookie cannot be signed and is not "
                "used: after a write, a client's next requests read from replicas at once "
                "and may miss that write until the replicas catch up. Set SECRET_KEY to "
                "keep clients on the primary after their writes."
            )
        self._random = random.Random()
        # How reads spread over the replicas: weights, and the least-lag preference.
        self.spread = Spread(
            self.replicas,
            config.replica_weights,
            least_lag=config.prefer_least_lag,
            tolerance=config.check_interval,
        )
        # The codec that reads cookies: None when there is none or sticky mode is off.
        self._codec_in_use = codec if self._sticky_mode is not StickyMode.OFF else None
        self.requests = Requests(
            self,
            config,
            primary,
            self.health,
            self.counters,
            codec,
            self._sticky_mode,
            self._sticky_ttl,
            self._choose,
            self.backend.format_position,
            self.spread,
            self._scope_var,
        )
        self.requests.catch_up = self.catch_up
        # Replicas behind one address: their sticky reads are checked on the connection
        # they read on; the adapter installs it on its session class.
        self.balanced = (
            Balanced(self, config.balanced_replicas)
            if self.health.probing
            and any(n.name in config.balanced_replicas for n in self.replicas)
            else None
        )
        self.requests.balanced = self.balanced
        self._warned_late_commit = False
        # The routers of the app's other databases (databases.py), for failover to find
        # the router of a replica that failed.
        self.siblings: tuple[Router, ...] = ()
        self._install_guards()
        if codec is not None and self.backend.has_positions:
            event.listen(primary.engine, "connect", self._learn_cluster(primary))
        for node in self.replicas:
            self._listen(node)
        _ROUTERS.add(self)

    # The cookie settings are read-only: what the request path keeps of them is
    # worked out once, here.

    @property
    def codec(self) -> StickyCodec | None:
        """What signs and checks sticky cookies; None without a secret key."""
        return self._codec

    @property
    def sticky_mode(self) -> StickyMode:
        """The sticky mode in use ("auto" resolved for the primary's database)."""
        return self._sticky_mode

    @property
    def sticky_ttl(self) -> float:
        """How long a sticky cookie holds, in seconds."""
        return self._sticky_ttl

    @property
    def prober(self) -> ThreadProber | TaskProber | None:
        """What checks replica positions in the background, set by the adapter.

        A ``ThreadProber`` (sync adapters) is started by ``requests.settle()`` for the first
        request that reads, or by ``use_replica()`` outside a request; an async
        adapter starts its ``TaskProber`` in its request hook. None where positions
        cannot be read (SQLite).
        """
        return self._prober

    @prober.setter
    def prober(self, prober: ThreadProber | TaskProber | None) -> None:
        if not self.health.probing:
            prober = None
        self._prober = prober
        self._thread_prober = prober if isinstance(prober, ThreadProber) else None
        self.requests.thread_prober = self._thread_prober

    def _listen(self, node: Node) -> None:
        # A replica's guards and connect listeners, at creation or when it joins.
        guard_replica(node, self.config.connect_timeout, self.requests.scope)
        event.listen(node.engine, "connect", self._remember_entry(node))
        if self._codec is not None and self.backend.has_positions:
            event.listen(node.engine, "connect", self._learn_cluster(node))

    # -- replicas that join and leave (replicated_core.discovery) -------------------

    def add_replica(self, node: Node) -> None:
        """Route reads to ``node`` too, once a position check says it is fine.

        Thread-safe against the request path: each registry it touches is replaced by
        a new one (or changed with one atomic assignment), never edited in place.
        """
        backend = backend_for(node.engine.dialect.name)
        self.backends[node.name] = backend
        password = node.engine.url.password
        if password and password not in self.health.secrets:
            self.health.secrets = (*self.health.secrets, password)
        with self._entries_lock:
            self._entries[node.name] = weakref.WeakSet()
        self._listen(node)
        self.spread.add(node)
        self.health.add(node)
        self.replicas = (*self.replicas, node)
        if self._thread_prober is not None:
            self._thread_prober.track(node)

    def remove_replica(self, node: Node) -> None:
        """Send no new read to ``node``; the requests and blocks already reading there
        go on with it. Its engine stays the caller's to dispose of once they are done."""
        self.replicas = tuple(n for n in self.replicas if n is not node)
        self.health.remove(node)
        self.spread.remove(node)
        if self._thread_prober is not None:
            self._thread_prober.untrack(node)
        with self._entries_lock:
            self._entries.pop(node.name, None)

    def after_fork(self) -> None:
        """Make this router safe to use in a child process right after a fork.

        Called for every live router by an ``os.register_at_fork`` handler: a new
        random generator (else every worker picks the same replicas in the same
        order), fresh health, locks and prober (the parent's threads do not exist
        here; its locks may have been held by one of them), fresh counters, and new
        pools for the primary and replica engines, as SQLAlchemy documents for
        forks (``dispose(close=False)``: the parent's connections are left to it).
        """
        self._random = random.Random()
        self.counters = Counters()
        self.requests.after_fork(self.counters)
        self.health.reset()
        if self.catch_up is not None:
            self.catch_up.counters = self.counters
            self.catch_up.reset()
        if self._prober is not None:
            self._prober.reset()
        self._entries_lock = threading.Lock()
        for entries in self._entries.values():
            entries.clear()
        for node in (self.primary, *self.replicas):
            node.engine.dispose(close=False)
        if self.discovery is not None:
            self.discovery.after_fork()

    def close(self) -> None:
        """Stop a ``ThreadProber`` and wait briefly for its checks in flight; the
        next read starts it again. Call it before disposing of the engines."""
        if self._thread_prober is not None:
            self._thread_prober.stop()

    def cut_off(self, node: Node) -> None:
        """Release the requests stuck on ``node``, a replica whose check is overdue.

        A paused server never answers and its sockets never time out, so each read
        on it would hold its worker until it runs again. Shutting down the sockets of
        its pooled connections (but not the position check's, whose answer tells when
        it is back) makes those reads fail at once; failover then sends each to
        another node, and the replica is not marked down for it. Sync drivers only.
        """
        with self._entries_lock:
            entries = list(self._entries.get(node.name, ()))
        for entry in entries:
            dbapi = entry.dbapi_connection
            fileno = getattr(dbapi, "fileno", None)
            if dbapi is None or fileno is None or entry.info.get(PROBE_MARK):
                continue
            entry.info[CUT_MARK] = True
            with contextlib.suppress(Exception):  # closed meanwhile
                sock = socket.socket(fileno=os.dup(fileno()))
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                finally:
                    sock.close()

    # -- metrics -----------------------------------------------------------------

    def metrics(self) -> dict[str, int]:
        """Every counter of this router: decisions by reason (and by reason and node,
        as ``requests_by.<reason>.<node>``), writes, sticky hits, fallbacks, retries,
        replicas marked down, position checks and catch-up waits; with discovery, the
        DNS resolutions that answered and those that failed."""
        found = {
            **self.counters.snapshot(),
            "replicas_marked_down": self.health.marked_down,
            "position_checks": self.health.refreshes,
        }
        discovery = self.discovery
        if discovery is not None:
            found["discovery_resolutions"] = discovery.resolutions
            found["discovery_failures"] = discovery.failures
        return found

    # -- per statement -----------------------------------------------------------

    def node(self) -> Node:
        """The node for the next statement, from the current intent. The hot path."""
        override = override_var.get()
        scope = self._scope_var.get()
        if override is None:
            if scope is None or scope.owner is not self or scope.closed:
                return self.primary
            decision = scope.settled_decision
            if decision is None:
                # The request's first statement: decide now, as the ``decision``
                # property would (which also raises if there is no way to decide).
                resolver = scope.resolver
                if resolver is not None:
                    resolver(scope)
                decision = scope.settled_decision or scope.pending or scope.decision
            return decision.node
        if scope is not None and (scope.owner is not self or scope.closed):
            scope = None
        if override.intent is Intent.PRIMARY:
            if scope is not None and scope.decision.node is not self.primary:
                # From now on the request reads its own writes on the primary.
                scope.decision = Decision(self.primary, Reason.PINNED)
            return self.primary
        node = override.node if self._default else self._block_node(override)
        if node is None:
            node = self._replica_for(override, scope)
            self._keep_pick(override, node)
        return node

    def _replica_for(
        self, override: Override, scope: RequestScope | None, failed: Sequence[Node] = ()
    ) -> Node:
        # A use_replica() block's node, none of ``failed``: after a token, one that has
        # replayed it.
        if override.after is not None:
            return self._replica_after(override.after, scope, failed)
        return self._replica_for_block(scope, failed)

    def _block_node(self, override: Override) -> Node | None:
        # The replica a use_replica() block reads from on this router's database (None:
        # not picked yet); the default database's is the override's own ``node``.
        if self._default:
            return override.node
        picks = override.picks
        return picks.get(self) if picks is not None else None

    def _keep_pick(self, override: Override, node: Node) -> None:
        if self._default:
            override.node = node
        elif override.picks is None:
            override.picks = {self: node}
        else:
            override.picks[self] = node

    # -- replicas ----------------------------------------------------------------

    def node_named(self, name: str) -> Node:
        """The node (primary or replica) whose bind name is ``name``."""
        for node in (self.primary, *self.replicas):
            if node.name == name:
                return node
        raise KeyError(name)

    def reads_go_to(self, node: Node) -> bool:
        """Whether the current block's, or else request's, reads go to ``node``."""
        override = current_override()
        if override is not None:
            return self._block_node(override) is node
        scope = self.requests.scope()
        return scope is not None and scope.decision.node is node

    def reroute(self, failed: Sequence[Node]) -> None:
        """Send the current request's (or block's) reads elsewhere after the last of
        ``failed`` failed, to none of them."""
        self.counters.add("retries")
        last = failed[-1]
        scope = self.requests.scope()
        override = current_override()
        if override is not None and self._block_node(override) is last:
            self._keep_pick(override, self._replica_for(override, scope, failed))
        if scope is not None and scope.decision.node is last:
            views = self._views(failed)
            choices = decide(scope.facts, scope.sticky, self.primary, views)
            again = self._choose(*self.spread.narrow(choices, _node_of, views))
            scope.decision = Decision(again.node, Reason.FAILOVER, again.drop_cookie)

    def _choose(self, choices: Sequence[T], cumulative: Sequence[float] | None = None) -> T:
        # Random rather than round-robin: no counter shared between threads, and many
        # worker processes spread evenly (or by weight) without coordinating.
        if len(choices) == 1:
            return choices[0]
        if cumulative is None:
            return self._random.choice(choices)
        return self._random.choices(choices, cum_weights=cumulative)[0]

    def _pick(self, nodes: Sequence[Node], views: Sequence[ReplicaView]) -> Node:
        # One of ``nodes``, replicas that may serve the read, by weight (and lag, if
        # preferred); the primary when there is none, or all of them weigh 0.
        kept, cumulative = self.spread.narrow(nodes, _itself, views)
        return self._choose(kept, cumulative) if kept else self.primary

    def token_for(self, position: Position | None) -> str:
        """A consistency token for ``position`` (the primary's, after the writes it must
        cover; None: only that its holder wrote, for the sticky time)."""
        codec = self._codec
        if codec is None:
            raise RuntimeError(
                "A consistency token needs SECRET_KEY to be signed: set SECRET_KEY (the "
                "same on every server and worker)."
            )
        return codec.dumps(StickyToken(position))

    def _views(self, failed: Sequence[Node] = ()) -> list[ReplicaView]:
        # The replicas in rotation, but ``failed``.
        views = self.spread.in_rotation(self.health.views())
        return [v for v in views if v.node not in failed] if failed else list(views)

    def _replica_after(
        self, value: str, scope: RequestScope | None, failed: Sequence[Node] = ()
    ) -> Node:
        # use_replica(after=token): a replica that has replayed the token's position.
        prober = self._prober
        if scope is None and prober is not None:
            # A job may be the first reader of the process: the first round of checks
            # also tells which cluster this is, which a token with a position needs.
            prober.ensure_started()
        codec = self._codec
        token = None if codec is None else codec.loads(value, math.inf)
        if token is None:
            if codec is not None and codec.no_entry(value):
                # Only of the app's other databases: nothing to wait for on this one.
                return self._replica_for_block(scope, failed)
            return self.primary  # a token that does not check: the safe choice
        if token.lsn is None:
            # Only "its holder wrote": the primary for the sticky time, as a cookie.
            fresh = codec is not None and codec.loads(value, self._sticky_ttl) is not None
            return self.primary if fresh else self._replica_for_block(scope, failed)
        lsn = token.lsn
        override = override_var.get()
        bound = override.max_lag if override is not None else None  # both may be given
        views = self._views(failed)
        caught_up = self._caught_up(views, lsn, bound)
        catch_up = self.catch_up
        if not caught_up and catch_up is not None and catch_up.blocks:
            node = catch_up.pick(lsn, views, bound)
            if node is not None and catch_up.wait(node, lsn):
                views = self._views(failed)
                caught_up = self._caught_up(views, lsn, bound)
        return self._pick(caught_up, views)

    def _caught_up(
        self, views: Sequence[ReplicaView], lsn: Position, bound: float | None
    ) -> list[Node]:
        # A balanced replica is checked on the block's own connection instead.
        if self.balanced is not None:
            views = self.balanced.sticky_views(views, lsn)
        return _caught_up(views, lsn, bound)

    async def await_token(self, value: str, max_lag: float | None = None) -> None:
        """Before an ``async with use_replica(after=value)`` block: wait, awaited, for
        a replica to replay the token's position, if it is this router's (its cluster
        and app) and no replica has it in the cached positions. The block's first
        statement then finds that replica caught up."""
        catch_up, codec = self.catch_up, self._codec
        if catch_up is None or not catch_up.awaits or codec is None:
            return
        token = codec.loads(value, math.inf)
        if token is None or token.lsn is None:
            return
        prober = self._prober
        if isinstance(prober, TaskProber):
            await prober.ensure()  # a job may be the first reader of the process
        views = self.spread.in_rotation(self.health.views())
        if self._caught_up(views, token.lsn, max_lag):
            return
        node = catch_up.pick(token.lsn, views, max_lag)
        if node is not None:
            await catch_up.wait_async(node, token.lsn)

    def _replica_for_block(self, scope: RequestScope | None, failed: Sequence[Node] = ()) -> Node:
        override = override_var.get()
        bound = override.max_lag if override is not None else None
        request_node = None if scope is None else scope.decision.node
        if (
            bound is None
            and request_node is not None
            and request_node.role is Role.REPLICA
            and request_node not in failed
        ):
            return request_node
        prober = self._prober
        if scope is None and prober is not None:
            # A job outside requests may be the first reader of the process.
            prober.ensure_started()
        views = self._views(failed)
        if bound is None:
            return self._pick([view.node for view in views if view.usable], views)
        within = [v.node for v in views if v.usable and v.lag_seconds <= bound]
        if request_node is not None and request_node in within:
            return request_node  # the request's replica, if it is within the bound
        return self._pick(within, views)

    # -- guards ------------------------------------------------------------------

    def _install_guards(self) -> None:
        # Dialect-level hooks, called right before the driver's execute: unlike
        # before_cursor_execute, they do not switch every connection to SQLAlchemy's
        # slower event-aware path (about 15 us a statement).
        primary = self.primary.engine
        backend = self.backend
        note = self._note_write if backend.postgresql_syntax else self._note_write_by_text
        for hook in EXECUTE_HOOKS:
            event.listen(primary, hook, note)
        if backend.wrote_sql(None) is not None:  # the server can tell what a commit wrote
            # What the primary did, not what the text says: a commit asks the
            # transaction whether it was given an xid (SELECT my_function(), DO $$).
            event.listen(primary, "commit", self._on_commit)
            if self._sticky_mode is StickyMode.WAL and self._codec is not None:
                # The position after the commit, on the connection that committed,
                # as it goes back to the pool: no second checkout.
                event.listen(primary.pool, "reset", self._on_primary_reset)

    # Listeners of do_execute/do_executemany (cursor, statement, parameters, context)
    # and do_execute_no_params (cursor, statement, context): named parameters rather
    # than *args, which would build a tuple for every statement.
    def _note_write(self, cursor: Any, statement: str, _a: Any = None, _b: Any = None) -> None:
        # The cheap first signal: a request known to have written asks the server
        # nothing at its commit.
        scope = self._scope_var.get()
        if scope is not None and not scope.wrote and classify_sql(statement) is _WRITE:
            scope.wrote = True

    def _note_write_by_text(
        self, cursor: Any, statement: str, _a: Any = None, _b: Any = None
    ) -> None:
        # No transaction ids to ask (SQLite): the text alone decides, in SQLite's syntax.
        scope = self._scope_var.get()
        if (
            scope is not None
            and not scope.wrote
            and classify_sql(statement, postgresql=False) is _WRITE
        ):
            scope.wrote = True

    def _on_commit(self, conn: Connection) -> None:
        scope = self._scope_var.get()
        if scope is None or scope.owner is not self or scope.closed:
            return
        if not scope.wrote or scope.answered:
            # One round trip in the committing transaction. An error propagates: the
            # transaction is then aborted, and the commit must not look like a success.
            sql = self.backend.wrote_sql(conn.dialect.server_version_info)
            if sql is not None and not conn.exec_driver_sql(sql).scalar():
                return
            scope.wrote = True
        if scope.answered:
            if self._codec_in_use is not None:
                self._warn_late_commit(scope)
        elif self._sticky_mode is StickyMode.WAL and self._codec is not None:
            conn.info[_COMMITTED] = scope

    def _on_primary_reset(self, dbapi_connection: Any, record: Any, state: Any) -> None:
        scope = record.info.pop(_COMMITTED, None)
        if scope is None or scope.closed or not state.asyncio_safe or state.terminate_only:
            return
        try:
            lsn = self.backend.read_primary_position(dbapi_connection)
        except Exception as error:
            # Read below SQLAlchemy's error handling: nothing else tells the pool that
            # the connection may be gone (its server ended it after the commit, as in a
            # failover). It is replaced at its next checkout rather than handed out.
            record.invalidate(error, soft=True)
            logger.warning(
                "Could not read the primary's position (%s): this client stays on the "
                "primary for the sticky time instead.",
                describe_error(error, self.health.secrets),
                extra={
                    "node": self.primary.name,
                    "reason": "primary_position",
                    "database": self.primary.name,
                },
            )
            return
        if lsn is not None and (scope.position is None or not scope.position >= lsn):
            scope.position = lsn

    def _warn_late_commit(self, scope: RequestScope) -> None:
        if self._warned_late_commit:
            return
        self._warned_late_commit = True
        facts = scope.settled_decision and scope.facts
        view = f"The view '{facts.view}' ({facts.method})" if facts else "A request"
        logger.warning(
            "%s committed a write after its response had started (in a "
            "'teardown_request' function or later), too late to set the sticky cookie: "
            "the client's next requests may read from a replica that has not replayed "
            "the write yet. Commit in the view or in an 'after_request' function. This "
            "is logged once.",
            view,
        )

    def _learn_cluster(self, node: Node) -> Any:
        # Tokens with a position are bound to the cluster: the first new connection to
        # any of its servers tells which it is (one query, once per process). Before
        # that, such tokens keep their clients on the primary.
        backend = self.backends[node.name]

        def learn(dbapi_connection: Any, entry: ConnectionPoolEntry) -> None:
            codec = self._codec
            if codec is None or codec.cluster is not None:
                return
            try:
                identifier = backend.read_cluster(dbapi_connection)
            except Exception as error:
                logger.warning(
                    "Could not read which cluster '%s' belongs to (%s): tokens stay "
                    "unbound, and their clients on the primary, until a connection can.",
                    node.name,
                    describe_error(error, self.health.secrets),
                    extra={
                        "node": node.name,
                        "reason": "cluster_unknown",
                        "database": self.primary.name,
                    },
                )
                return
            if identifier is not None:
                codec.cluster = cluster_tag(identifier)

        return learn

    def _remember_entry(self, node: Node) -> Any:
        def remember(dbapi_connection: Any, entry: ConnectionPoolEntry) -> None:
            with self._entries_lock:
                entries = self._entries.get(node.name)  # None: the replica left
                if entries is not None:
                    entries.add(entry)

        return remember


def _itself(node: Node) -> Node:
    return node


def _node_of(decision: Decision) -> Node:
    return decision.node


def _caught_up(views: Sequence[ReplicaView], lsn: Position, bound: float | None) -> list[Node]:
    # The usable replicas that have replayed ``lsn``, within the lag bound if any.
    return [
        view.node
        for view in views
        if view.usable
        and view.replay_lsn is not None
        and view.replay_lsn >= lsn
        and (bound is None or view.lag_seconds <= bound)
    ]


async def _await_tokens(value: str, max_lag: float | None) -> None:
    # For ``async with use_replica(after=...)``: the token names its cluster and app,
    # so at most one router takes it.
    for router in list(_ROUTERS):
        await router.await_token(value, max_lag)


intent.token_waiter = _await_tokens

_READ = StatementKind.READ
_WRITE = StatementKind.WRITE
# Where the commit listener leaves the request's scope for the pool's reset event, in
# the pooled connection's info.
_COMMITTED = "replicated_committed_scope"
