"""The router: turns the routing intent into a node for every statement.

Adapters build one Router per app from its engines, open a request scope at the
start of each request, and ask ``node()`` whenever SQLAlchemy needs a bind.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import event

from .config import ReplicatedConfig, StickyMode
from .counters import Counters
from .errors import ReplicaWriteError
from .health import Health
from .intent import (
    Intent,
    current_override,
    current_scope,
    enter_scope,
    exit_scope,
    forces_primary,
)
from .routing import Decision, Node, Reason, RequestFacts, RequestScope, Role, decide
from .statements import is_write_sql
from .sticky import StickyCodec, StickyToken
from .wal import format_lsn

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from sqlalchemy.engine import Engine

    from .wal import ReplicaProbe

__all__ = ["CookieUpdate", "Router"]

_READ_ONLY_SQLSTATE = "25006"

logger = logging.getLogger("replicated")

# The three ways a dialect hands a statement to the driver.
_EXECUTE_HOOKS = ("do_execute", "do_executemany", "do_execute_no_params")


class _Response(Protocol):
    def set_cookie(
        self,
        key: str,
        value: str = "",
        *,
        max_age: int | None = None,
        path: str | None = "/",
        secure: bool = False,
        httponly: bool = False,
        samesite: str | None = None,
    ) -> None: ...

    def delete_cookie(
        self,
        key: str,
        *,
        path: str | None = "/",
        secure: bool = False,
        httponly: bool = False,
        samesite: str | None = None,
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class CookieUpdate:
    """A change to the sticky cookie: set ``value``, or delete it when None.

    Always HttpOnly and SameSite=Lax; Secure when the request came over HTTPS; at
    the app's root path.
    """

    name: str
    value: str | None
    max_age: int
    path: str
    secure: bool

    def apply(self, response: _Response) -> None:
        """Set or delete the cookie on a Werkzeug-style (Flask or Quart) response."""
        if self.value is None:
            response.delete_cookie(
                self.name, path=self.path, secure=self.secure, httponly=True, samesite="Lax"
            )
        else:
            response.set_cookie(
                self.name,
                self.value,
                max_age=self.max_age,
                path=self.path,
                secure=self.secure,
                httponly=True,
                samesite="Lax",
            )


class Router:
    """Chooses the node for each statement of one app and guards replicas against writes."""

    def __init__(
        self,
        config: ReplicatedConfig,
        primary: Node,
        replicas: Sequence[Node],
        codec: StickyCodec | None,
    ) -> None:
        self.config = config
        self.primary = primary
        self.replicas = tuple(replicas)
        self.codec = codec
        self.sticky_mode = config.sticky_mode.resolve(primary.engine.dialect.name == "postgresql")
        self.sticky_ttl = config.sticky_ttl(self.sticky_mode)
        self.health = Health(
            self.replicas,
            probing=all(n.engine.dialect.name == "postgresql" for n in self.replicas),
            check_interval=config.check_interval,
            max_lag=config.max_lag,
            downtime=config.replica_downtime,
            probe_timeout=config.connect_timeout,
            secrets=[n.engine.url.password or "" for n in (primary, *self.replicas)],
        )
        self._replica_by_engine = {id(n.engine): n for n in self.replicas}
        self.counters = Counters()
        # A sync probe of one replica, set by sync adapters so that use_replica()
        # outside a request can refresh positions itself.
        self.probe: Callable[[Node], ReplicaProbe] | None = None
        if codec is None and self.sticky_mode is not StickyMode.OFF:
            logger.warning(
                "SECRET_KEY is not set, so the sticky cookie cannot be signed and is not "
                "used: after a write, a client's next requests read from replicas at once "
                "and may miss that write until the replicas catch up. Set SECRET_KEY to "
                "keep clients on the primary after their writes."
            )
        self._random = random.Random()
        self._install_guards()

    # -- per request -------------------------------------------------------------

    def facts(
        self, method: str, view_name: str | None, view: object, *, websocket: bool = False
    ) -> RequestFacts:
        """What the router needs to know of a request: its method and view function."""
        readonly = (
            self.config.websocket_readonly if websocket else method in self.config.readonly_methods
        )
        return RequestFacts(method, view_name, readonly, forces_primary(view), websocket)

    def begin(self, facts: RequestFacts, cookie: str | None) -> Decision:
        """Decide where the request reads and make that the current scope."""
        sticky = self.read_cookie(cookie) if facts.readonly and not facts.forced_primary else None
        decision = decide(facts, sticky, self.primary, self.health.views(), self._choose)
        enter_scope(RequestScope(self, facts, decision, sticky))
        self._count(decision, sticky is not None)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s %s: %s '%s' because %s%s",
                facts.method,
                facts.view,
                decision.node.role.value,
                decision.node.name,
                decision.reason.value,
                f" (sticky at {format_lsn(sticky.lsn)})" if sticky and sticky.lsn else "",
            )
        return decision

    def _count(self, decision: Decision, sticky: bool) -> None:
        names = ["requests_total"]
        if decision.node.role is Role.REPLICA:
            names.append("requests_to_replica")
        else:
            names.append(f"requests_to_primary.{decision.reason.name.lower()}")
        if decision.reason is Reason.NO_REPLICA:
            names.append("fallbacks")
        if sticky:
            names.append("sticky_hits")
        self.counters.add(*names)

    def needs_positions(self, facts: RequestFacts) -> bool:
        """Whether a request with ``facts`` reads from replicas, so wants fresh health."""
        return facts.readonly and not facts.forced_primary and self.health.probing

    def served_by(self) -> Node | None:
        """The node that served the current request's default reads, if in one."""
        scope = self._own_scope()
        return scope.decision.node if scope is not None else None

    def _own_scope(self) -> RequestScope | None:
        scope = current_scope()
        if scope is None or scope.owner is not self or scope.closed:
            return None
        return scope

    def end(self) -> None:
        """Close the request scope opened by ``begin``; a no-op when there is none."""
        scope = self._own_scope()
        if scope is not None:
            if scope.wrote:
                self.counters.add("writes")
            scope.closed = True
            exit_scope(scope)

    def read_cookie(self, cookie: str | None) -> StickyToken | None:
        """The valid sticky token in ``cookie``, or None; never raises."""
        if cookie is None or self.codec is None or self.sticky_mode is StickyMode.OFF:
            return None
        return self.codec.loads(cookie, max_age=self.sticky_ttl)

    def needs_write_position(self) -> bool:
        """Whether the response must carry the primary's WAL position (ask it first)."""
        scope = self._own_scope()
        return (
            scope is not None
            and scope.wrote
            and self.codec is not None
            and self.sticky_mode is StickyMode.WAL
        )

    def cookie_update(
        self, lsn: int | None = None, *, secure: bool = False, path: str = "/"
    ) -> CookieUpdate | None:
        """How the current response must change the sticky cookie, if at all.

        After a write: set it (with ``lsn``, the primary's position after the write,
        in WAL mode). After a read that found every replica caught up: delete it.
        ``secure`` tells whether the request came over HTTPS; ``path`` is the app's root.
        """
        scope = self._own_scope()
        if scope is None or self.codec is None or self.sticky_mode is StickyMode.OFF:
            return None
        name = self.config.cookie_name
        if scope.wrote:
            value = self.codec.dumps(StickyToken(lsn))
            return CookieUpdate(name, value, math.ceil(self.sticky_ttl), path, secure)
        if scope.decision.drop_cookie:
            return CookieUpdate(name, None, 0, path, secure)
        return None

    def metrics(self) -> dict[str, int]:
        """Every counter of this router: decisions by reason, writes, sticky hits,
        fallbacks, retries, replicas marked down and position checks."""
        return {
            **self.counters.snapshot(),
            "replicas_marked_down": self.health.marked_down,
            "position_checks": self.health.refreshes,
        }

    def current_decision(self) -> Decision | None:
        """The decision of the request being served by this router, if any."""
        scope = self._own_scope()
        return scope.decision if scope is not None else None

    # -- per statement -----------------------------------------------------------

    def node(self) -> Node:
        """The node for the next statement, from the current intent. The hot path."""
        override = current_override()
        scope = current_scope()
        if scope is not None and (scope.owner is not self or scope.closed):
            scope = None
        if override is not None:
            if override.intent is Intent.PRIMARY:
                if scope is not None and scope.decision.node is not self.primary:
                    # From now on the request reads its own writes on the primary.
                    scope.decision = Decision(self.primary, Reason.PINNED)
                return self.primary
            if override.node is None:
                override.node = self._replica_for_block(scope)
            return override.node
        if scope is None:
            return self.primary
        return scope.decision.node

    def engine(self) -> Engine:
        """The sync Engine for the next statement."""
        return self.node().engine

    # -- replicas ----------------------------------------------------------------

    def node_named(self, name: str) -> Node:
        """The node (primary or replica) whose bind name is ``name``."""
        for node in (self.primary, *self.replicas):
            if node.name == name:
                return node
        raise KeyError(name)

    def replica_of(self, bind: object) -> Node | None:
        """The replica node whose engine is ``bind``, or None (primary, other binds)."""
        return self._replica_by_engine.get(id(bind))

    def reroute(self, failed: Node) -> None:
        """Send the current request's (or block's) reads elsewhere after ``failed`` failed."""
        self.counters.add("retries")
        views = [v for v in self.health.views() if v.node is not failed]
        usable = [v.node for v in views if v.usable]
        override = current_override()
        if override is not None and override.node is failed:
            override.node = self._choose(usable) if usable else self.primary
        scope = self._own_scope()
        if scope is not None and scope.decision.node is failed:
            again = decide(scope.facts, scope.sticky, self.primary, views, self._choose)
            scope.decision = Decision(again.node, Reason.FAILOVER, again.drop_cookie)

    def _choose(self, nodes: Sequence[Node]) -> Node:
        # Random rather than round-robin: no counter shared between threads, and many
        # worker processes spread evenly without coordinating.
        return nodes[0] if len(nodes) == 1 else self._random.choice(nodes)

    def _replica_for_block(self, scope: RequestScope | None) -> Node:
        if scope is not None and scope.decision.node.role is Role.REPLICA:
            return scope.decision.node
        if scope is None and self.probe is not None:
            # Outside requests nobody else keeps the positions fresh (sync adapters).
            self.health.refresh(self.probe)
        usable = [view.node for view in self.health.views() if view.usable]
        return self._choose(usable) if usable else self.primary

    # -- guards ------------------------------------------------------------------

    def _install_guards(self) -> None:
        # Dialect-level hooks, called right before the driver's execute: unlike
        # before_cursor_execute, they do not switch every connection to SQLAlchemy's
        # slower event-aware path (about 15 us a statement).
        for hook in _EXECUTE_HOOKS:
            event.listen(self.primary.engine, hook, self._note_write)
        for node in self.replicas:
            refuse = self._refuse_write(node)
            for hook in _EXECUTE_HOOKS:
                event.listen(node.engine, hook, refuse)
            event.listen(node.engine, "handle_error", self._translate_refusal(node))
            event.listen(node.engine, "do_connect", self._limit_connect_time)

    def _limit_connect_time(self, dialect: Any, rec: Any, cargs: Any, cparams: Any) -> None:
        # A replica that hangs must not hang the request: bound the connect, unless the
        # app set its own timeout in the engine's connect_args.
        timeout = self.config.connect_timeout
        if dialect.driver in ("psycopg", "psycopg2"):
            cparams.setdefault("connect_timeout", max(1, math.ceil(timeout)))
        elif dialect.driver == "asyncpg":
            cparams.setdefault("timeout", timeout)

    def _note_write(self, cursor: Any, statement: str, *args: Any) -> None:
        scope = current_scope()
        if scope is not None and not scope.wrote and is_write_sql(statement):
            scope.wrote = True

    def _refuse_write(self, node: Node) -> Any:
        def refuse(cursor: Any, statement: str, *args: Any) -> None:
            if is_write_sql(statement):
                raise ReplicaWriteError(self.write_message(node))

        return refuse

    def _translate_refusal(self, node: Node) -> Any:
        def translate(context: Any) -> None:
            orig = context.original_exception
            code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
            if code == _READ_ONLY_SQLSTATE:
                raise ReplicaWriteError(self.write_message(node)) from context.sqlalchemy_exception

        return translate

    def write_message(self, node: Node) -> str:
        """The sentence that tells the user why a write was refused and what to do."""
        override = current_override()
        if override is not None and override.intent is Intent.REPLICA:
            return (
                f"A write was sent to the replica '{node.name}' inside 'use_replica()'. "
                "Move the write out of the 'use_replica()' block or wrap it in 'use_primary()'."
            )
        scope = current_scope()
        if scope is not None and scope.decision.node is node:
            facts = scope.facts
            kind = "websocket" if facts.websocket else f"{facts.method} request"
            return (
                f"The view '{facts.view}' wrote to the database during a {kind}, which is "
                "routed to a replica. Decorate it with '@changes_database' or wrap the "
                "write in 'use_primary()'."
            )
        return (
            f"A write was sent to the replica '{node.name}', which only serves reads. "
            "Send it to the primary: wrap it in 'use_primary()'."
        )
