"""The routing decision for a request: a pure function of what is known at its start."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from contextvars import Token

    from sqlalchemy.engine import Engine

    from .sticky import StickyToken

__all__ = [
    "Decision",
    "Node",
    "Reason",
    "ReplicaView",
    "RequestFacts",
    "RequestScope",
    "Role",
    "decide",
]


class Role(enum.Enum):
    PRIMARY = "primary"
    REPLICA = "replica"

    # Members are singletons: hash them by identity, in C, not by name in Python
    # (they key the router's per-request counter lookup).
    __hash__ = object.__hash__


@dataclass(frozen=True, slots=True, eq=False)
class Node:
    """One database server as the router sees it: a bind name and its sync Engine."""

    name: str
    role: Role
    engine: Engine


class Reason(enum.Enum):
    """Why a request, or a statement, went where it went."""

    WRITE_METHOD = "the method may write"
    WEBSOCKET = "websocket"
    DECORATOR = "@changes_database"
    PINNED = "the request used the primary, so it reads its own writes there"
    STICKY = "the client wrote recently"
    STICKY_REPLICAS_BEHIND = "the client wrote and no replica has replayed it yet"
    REPLICA_CAUGHT_UP = "the client wrote and this replica has replayed it"
    READ = "read-only request"
    NO_REPLICA = "no usable replica"
    FAILOVER = "the first replica failed; the read was retried"
    NOT_ROUTED = "the request was not routed to a view yet"

    __hash__ = object.__hash__  # as Role's


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What an adapter knows about a request before its first statement."""

    method: str
    view: str | None
    readonly: bool
    forced_primary: bool
    websocket: bool = False
    # Whether the request's reads may go to a replica: read-only and not forced.
    reads: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reads", self.readonly and not self.forced_primary)


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """A replica as the health registry reports it at the start of a request."""

    node: Node
    usable: bool
    replay_lsn: int | None


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request reads, why, and whether its sticky cookie can be dropped."""

    node: Node
    reason: Reason
    drop_cookie: bool = False


def decide(
    facts: RequestFacts,
    sticky: StickyToken | None,
    primary: Node,
    replicas: Sequence[ReplicaView],
    choose: Callable[[Sequence[Node]], Node],
) -> Decision:
    """Choose the node that serves a request's reads.

    A write (by method or decorator) takes the primary. A sticky client reads from
    a replica only if that replica has replayed past the client's write (WAL mode);
    with no position in the token (time mode) it reads from the primary. The cookie
    may be dropped once every configured replica has replayed the write: dropping
    it when only the first one has would let the next request hit a stale one.
    """
    if facts.forced_primary:
        return Decision(primary, Reason.DECORATOR)
    if not facts.readonly:
        return Decision(primary, Reason.WEBSOCKET if facts.websocket else Reason.WRITE_METHOD)
    usable = [r for r in replicas if r.usable]
    if sticky is not None:
        if sticky.lsn is None:
            return Decision(primary, Reason.STICKY)
        lsn = sticky.lsn
        caught_up = [r.node for r in usable if r.replay_lsn is not None and r.replay_lsn >= lsn]
        if not caught_up:
            return Decision(primary, Reason.STICKY_REPLICAS_BEHIND)
        everywhere = all(r.replay_lsn is not None and r.replay_lsn >= lsn for r in replicas)
        return Decision(choose(caught_up), Reason.REPLICA_CAUGHT_UP, drop_cookie=everywhere)
    if not usable:
        return Decision(primary, Reason.NO_REPLICA)
    return Decision(choose([r.node for r in usable]), Reason.READ)


class RequestScope:
    """The routing state of one request, mutated as its statements run.

    ``owner`` is the router that opened it, so that another app's engines used in
    the same request are not steered by it; ``token`` resets the contextvar.
    ``closed`` is set when the request ends: a task the request spawned holds a copy
    of the context, and must then route like code outside a request.

    A scope opened without a decision gets one from ``resolver`` the first time its
    decision (or facts) is asked for, usually at the request's first statement: a
    request that never uses the database never pays for it. The resolver settles the
    scope (``Router.settle``) or, while the request cannot be decided yet (its view
    is not known), leaves it: ``pending`` answers meanwhile and the resolver is asked
    again next time.
    """

    __slots__ = (
        "_facts",
        "answered",
        "closed",
        "counted",
        "owner",
        "pending",
        "position",
        "resolver",
        "settled_decision",
        "sticky",
        "token",
        "wrote",
    )

    def __init__(
        self,
        owner: object,
        facts: RequestFacts | None = None,
        decision: Decision | None = None,
        sticky: StickyToken | None = None,
        resolver: Callable[[RequestScope], None] | None = None,
        pending: Decision | None = None,
        counted: tuple[str, ...] = (),
    ) -> None:
        self.owner = owner
        self._facts = facts
        # The decision once made, None before: the per-statement paths read this slot
        # and call the ``decision`` property only when it is None.
        self.settled_decision = decision
        self.sticky = sticky
        self.resolver = resolver
        self.pending = pending
        self.wrote = False
        # The primary's highest WAL position read after this request's commits.
        self.position: int | None = None
        # Set when the response starts: a commit after that cannot reach the cookie.
        self.answered = False
        self.closed = False
        # The counter names this request adds to when it ends (set by the router).
        self.counted = counted
        self.token: Token[RequestScope | None] | None = None

    @property
    def decision(self) -> Decision:
        """Where the request reads, and why; made now if it was not yet."""
        decision = self.settled_decision
        if decision is None:
            resolver = self.resolver
            if resolver is not None:
                resolver(self)  # settles the scope, or leaves it for later
            decision = self.settled_decision or self.pending
            if decision is None:
                raise RuntimeError("A request scope has no decision and no way to make one.")
        return decision

    @decision.setter
    def decision(self, decision: Decision) -> None:
        self.settled_decision = decision

    @property
    def facts(self) -> RequestFacts:
        """What is known of the request; found now if it was not yet."""
        if self._facts is None:
            self.decision  # noqa: B018 - resolving sets the facts too
        if self._facts is None:
            raise RuntimeError("The request is not routed to a view yet: nothing is known.")
        return self._facts
