"""The routing rules: where a request reads, as a pure function of what is known at
its start. ``decide()`` is the only place they are written."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .nodes import Node
    from .sticky import StickyToken

__all__ = [
    "FORCED",
    "READONLY",
    "WEBSOCKET",
    "Decision",
    "Reason",
    "ReplicaView",
    "RequestFacts",
    "decide",
]

# The bits of ``RequestFacts.kind``.
READONLY = 1
FORCED = 2
WEBSOCKET = 4


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
    # The three flags as bits (READONLY, FORCED, WEBSOCKET): all of the facts that
    # ``decide()`` reads, so a key for remembering its answers.
    kind: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reads", self.readonly and not self.forced_primary)
        kind = (
            (READONLY if self.readonly else 0)
            | (FORCED if self.forced_primary else 0)
            | (WEBSOCKET if self.websocket else 0)
        )
        object.__setattr__(self, "kind", kind)


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """A replica as the health registry reports it at the start of a request."""

    node: Node
    usable: bool
    replay_lsn: int | None
    lag_seconds: float = 0.0


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
) -> tuple[Decision, ...]:
    """The decisions a request may take for its reads: the primary's alone, or one
    per replica that may serve them (the caller picks one, at random).

    A write (by method or decorator) takes the primary. A sticky client reads from
    a replica only if that replica has replayed past the client's write (WAL mode);
    with no position in the token (time mode) it reads from the primary. The cookie
    may be dropped once every configured replica has replayed the write: dropping
    it when only the first one has would let the next request hit a stale one.
    """
    if facts.forced_primary:
        return (Decision(primary, Reason.DECORATOR),)
    if not facts.readonly:
        return (Decision(primary, Reason.WEBSOCKET if facts.websocket else Reason.WRITE_METHOD),)
    usable = [r for r in replicas if r.usable]
    if sticky is not None:
        if sticky.lsn is None:
            return (Decision(primary, Reason.STICKY),)
        lsn = sticky.lsn
        caught_up = [r.node for r in usable if r.replay_lsn is not None and r.replay_lsn >= lsn]
        if not caught_up:
            return (Decision(primary, Reason.STICKY_REPLICAS_BEHIND),)
        everywhere = all(r.replay_lsn is not None and r.replay_lsn >= lsn for r in replicas)
        return tuple(Decision(n, Reason.REPLICA_CAUGHT_UP, everywhere) for n in caught_up)
    if not usable:
        return (Decision(primary, Reason.NO_REPLICA),)
    return tuple(Decision(r.node, Reason.READ) for r in usable)
