"""Replicas behind one address: HAProxy's read port, a Kubernetes read-only Service, a
cloud reader endpoint (``REPLICATED_BALANCED_REPLICAS``).

Behind such an address each new connection may reach another server, so a position
read on one connection (the prober's, a catch-up wait's) says nothing of the server
the next one reaches. A TCP balancer keeps a connection on one server for its life,
though, so a position checked on the connection a read runs on holds for that read.

For a sticky read (a cookie or header token with a position, or ``use_replica(after=)``)
that goes to a balanced replica, the check runs on the connection the request's
session begins its transaction on (``SessionEvents.after_begin``), before any of its
statements: the catch-up wait of ``catchup.py``, on that connection, in autocommit.
If that server has not replayed the position within ``REPLICATED_CATCH_UP_TIMEOUT``,
the request's (or block's) reads move to the primary and the statement is run again
there by the failover session (``failover.py``); nothing was read on the replica.

Each pooled connection remembers the position its server was last seen at (in the
pooled connection's ``info``, which SQLAlchemy clears when it reconnects): a later
sticky read that needs no more asks nothing. A connection whose server did not catch
up within the wait rests for a check interval: meanwhile such reads that reach it go
to the primary at once.

The cached health of a balanced replica is that of whichever server the prober's
connection reached: for a sticky read its position is not used (the check is), and
the sticky cookie is never dropped early, as nothing tells that every server behind
the address has replayed the write.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Any

from sqlalchemy import event

from .health import describe_error
from .intent import Intent, override_var
from .rules import Decision, Reason

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.orm import Session

    from .backends import Position
    from .nodes import Node
    from .router import Router
    from .rules import ReplicaView

__all__ = ["Balanced", "ReplicaBehind"]

logger = logging.getLogger("replicated")

# In a pooled connection's info: the replay position its server was last seen at, and
# until when (the router's clock) it rests after a wait that ran out.
_REPLAYED = "replicated.balanced_replayed"
_RESTING = "replicated.balanced_resting"


class ReplicaBehind(Exception):
    """The server a balanced replica's connection reached has not replayed the position
    a sticky read needs. The reads were moved to the primary before this was raised:
    running the statement again reads there (the failover session does so)."""

    def __init__(self, node: Node, position: str, timeout: float) -> None:
        super().__init__(
            f"Replica '{node.name}' is one address in front of several servers, and the "
            f"server this connection reached had not replayed the client's write "
            f"(position {position}) within {timeout:g} s: the reads of this request (or "
            "block) go to the primary. Run the statement again (the session of "
            "'db.session' and of the Quart adapter does)."
        )
        self.node = node


class Balanced:
    """The per-connection position check of one router's balanced replicas.

    ``listen(session_class)`` installs it on the session class the adapter routes;
    ``sticky_views`` is what the routing decision of a sticky read sees of them.
    """

    def __init__(self, router: Router, names: frozenset[str]) -> None:
        self._router = router
        self.nodes = tuple(n for n in router.replicas if n.name in names)
        self._by_engine: dict[Engine, Node] = {n.engine: n for n in self.nodes}
        self.names = frozenset(n.name for n in self.nodes)
        self.timeout = router.config.catch_up_timeout
        self.rest = max(router.config.check_interval, self.timeout)

    def listen(self, session_class: type[Session]) -> None:
        """Check sticky reads on the connections sessions of ``session_class`` begin."""
        event.listen(session_class, "after_begin", self._after_begin)

    # -- the decision ----------------------------------------------------------------

    def sticky_views(self, views: Sequence[ReplicaView], position: Position) -> list[ReplicaView]:
        """``views`` as a sticky read needing ``position`` sees them: a usable balanced
        replica counts as caught up (its cached position is some server's; the check on
        the read's own connection decides)."""
        names = self.names
        return [
            dataclasses.replace(view, replay_lsn=position)
            if view.node.name in names
            and view.usable
            and (view.replay_lsn is None or not view.replay_lsn >= position)
            else view
            for view in views
        ]

    # -- the check -------------------------------------------------------------------

    def _after_begin(self, session: Session, transaction: Any, connection: Connection) -> None:
        node = self._by_engine.get(connection.engine)
        if node is None:
            return
        position = self._needed(node)
        if position is None:
            return
        router = self._router
        info = connection.info  # the pooled connection's: it lives as long as the socket
        replayed = info.get(_REPLAYED)
        if replayed is not None and replayed >= position:
            router.counters.add("balanced_known")
            return
        clock = router.health.clock
        if info.get(_RESTING, 0.0) <= clock():
            backend = router.backends[node.name]
            router.counters.add("balanced_checks")
            try:
                replayed = backend.catch_up_on(
                    connection.connection.dbapi_connection, position, self.timeout
                )
            except Exception as error:
                # The prober, not this check, says whether the replica is down.
                logger.debug(
                    "The position check on a connection of replica '%s' failed (%s); the "
                    "primary serves the read.",
                    node.name,
                    describe_error(error, router.health.secrets),
                )
                replayed = None
            if replayed is not None:
                info[_REPLAYED] = replayed
                if replayed >= position:
                    return
            info[_RESTING] = clock() + self.rest
        router.counters.add("balanced_behind")
        self._to_primary(node)
        raise ReplicaBehind(node, router.backend.format_position(position), self.timeout)

    def _needed(self, node: Node) -> Position | None:
        # The position the reads now going to ``node`` must see: the block's token, or
        # else the request's sticky token. None: not a sticky read there.
        router = self._router
        override = override_var.get()
        if override is not None:
            if override.intent is Intent.PRIMARY:
                return None
            if override.after is not None and router._block_node(override) is node:
                codec = router.codec
                token = None if codec is None else codec.loads(override.after, math.inf)
                return None if token is None else token.lsn
        scope = router.requests.scope()
        if scope is None:
            return None
        decision = scope.settled_decision
        sticky = scope.sticky
        if decision is None or decision.node is not node or sticky is None:
            return None
        return sticky.lsn

    def _to_primary(self, node: Node) -> None:
        router = self._router
        override = override_var.get()
        if override is not None and router._block_node(override) is node:
            router._keep_pick(override, router.primary)
        scope = router.requests.scope()
        decision = scope.settled_decision if scope is not None else None
        if scope is not None and decision is not None and decision.node is node:
            router.requests.move(scope, Decision(router.primary, Reason.STICKY_REPLICAS_BEHIND))
