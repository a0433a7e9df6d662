"""The request scope: opened when a request starts, settled at its first use of the
database, ended when it is done; and what a response's sticky cookie becomes."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING, TypeAlias

from .config import StickyMode
from .cookie import CookieUpdate
from .intent import forces_primary, scope_var
from .nodes import Role
from .rules import Decision, Reason, RequestFacts, decide
from .sticky import StickyToken, later

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from contextvars import ContextVar, Token

    from .backends import Position
    from .balanced import Balanced
    from .catchup import CatchUp
    from .config import ReplicatedConfig
    from .counters import Counters
    from .health import Health
    from .nodes import Node
    from .prober import ThreadProber
    from .rules import ReplicaView
    from .sticky import StickyCodec
    from .weights import Spread

    # A candidate decision and the counter names of a request that takes it.
    _Choice: TypeAlias = tuple[Decision, tuple[str, ...]]
    # What ``decide()`` answered from these views: the candidates (and the only one,
    # if so), with their cumulative weights (None: even).
    _Known: TypeAlias = tuple[
        Sequence[ReplicaView],
        _Choice | None,
        Sequence[_Choice],
        tuple[float, ...] | None,
    ]

__all__ = ["REQUESTS_BY", "RequestScope", "Requests"]

# The prefix of the counters of requests by reason and node: "requests_by.read.r1".
REQUESTS_BY = "requests_by."

logger = logging.getLogger("replicated")

_TIME_TOKEN = StickyToken()  # no position: the primary for the sticky time

# Views times methods: far more than any app has.
_MAX_FACTS = 4096

# Added to ``RequestFacts.kind`` in the memo's index when a time-mode cookie came.
_TIME_COOKIE = 8


class RequestScope:
    """The routing state of one request, mutated as its statements run.

    ``owner`` is the router that opened it, so that another app's engines used in
    the same request are not steered by it; ``token`` resets the contextvar.
    ``closed`` is set when the request ends: a task the request spawned holds a copy
    of the context, and must then route like code outside a request.

    A scope opened without a decision gets one from ``resolver`` the first time its
    decision (or facts) is asked for, usually at the request's first statement: a
    request that never uses the database never pays for it. The resolver settles the
    scope (``Requests.settle``) or, while the request cannot be decided yet (its view
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
        # The counter names this request adds to when it ends (set when it settles).
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


class Requests:
    """One router's request lifecycle: ``open`` (or ``begin``), ``settle``, ``end``,
    and the sticky cookie a response sets or deletes.

    ``owner`` is the router whose scopes these are; ``choose`` picks one of the
    candidate decisions ``decide()`` returns, given their cumulative weights (None:
    evenly); ``spread`` says which replicas are in rotation and which candidates
    take reads.
    """

    def __init__(
        self,
        owner: object,
        config: ReplicatedConfig,
        primary: Node,
        health: Health,
        counters: Counters,
        codec: StickyCodec | None,
        sticky_mode: StickyMode,
        sticky_ttl: float,
        choose: Callable[[Sequence[_Choice], tuple[float, ...] | None], _Choice],
        show_position: Callable[[Position], str],
        spread: Spread,
        scope_var: ContextVar[RequestScope | None] = scope_var,
    ) -> None:
        self._owner = owner
        # Where the scopes live: one contextvar per database of an app (router.py).
        self._scope_var = scope_var
        self._show_position = show_position  # for the debug log
        self._config = config
        self._primary = primary
        self._health = health
        self._counters = counters
        self._choose = choose
        self._spread = spread
        self._sticky_ttl = sticky_ttl
        self._max_age = math.ceil(sticky_ttl)
        # The codec that reads cookies: None when there is none or sticky mode is off.
        self._codec = codec if sticky_mode is not StickyMode.OFF else None
        # Whether a response after a write carries the primary's WAL position.
        self._wal = codec is not None and sticky_mode is StickyMode.WAL
        # Started by the first request that reads (set by the router).
        self.thread_prober: ThreadProber | None = None
        # Waits for a replica to replay a sticky client's write (set by the router).
        self.catch_up: CatchUp | None = None
        # The replicas behind one address, whose sticky reads are checked on their own
        # connection (set by the router; None when there is none).
        self.balanced: Balanced | None = None
        self._facts: dict[tuple[str, str | None, object, bool], RequestFacts] = {}
        self._names: dict[tuple[Reason, Node, bool], tuple[str, ...]] = {}
        self._with_writes: dict[tuple[str, ...], tuple[str, ...]] = {}
        # What ``decide()`` answered for a request without a cookie or with a time-mode
        # one, by ``kind | _TIME_COOKIE``: nothing else in such a request changes the
        # answer, as long as the health registry hands out the same views.
        self._memo: list[_Known] = [((), None, (), None)] * 16
        self._not_routed = Decision(primary, Reason.NOT_ROUTED)
        self._settling = threading.Lock()
        # The last time-mode cookie: its second, path and Secure flag, and itself.
        self._time_update: tuple[int, str, bool, CookieUpdate] | None = None

    @property
    def codec_in_use(self) -> StickyCodec | None:
        """The codec that reads and writes tokens: None without one or in sticky mode off."""
        return self._codec

    @property
    def max_age(self) -> int:
        """The sticky cookie's Max-Age, in whole seconds."""
        return self._max_age

    def after_fork(self, counters: Counters) -> None:
        """Start afresh in a child process: new counters and a new lock (a thread of
        the parent may have held it)."""
        self._counters = counters
        self._settling = threading.Lock()

    # -- opening -------------------------------------------------------------------

    def facts(
        self, method: str, view_name: str | None, view: object, *, websocket: bool = False
    ) -> RequestFacts:
        """What the rules need to know of a request: its method and view function."""
        key = (method, view_name, view, websocket)
        facts = self._facts.get(key)
        if facts is None:
            config = self._config
            readonly = config.websocket_readonly if websocket else method in config.readonly_methods
            facts = RequestFacts(method, view_name, readonly, forces_primary(view), websocket)
            # Only matched views are kept, so a client inventing methods or paths
            # cannot grow the table.
            if view is not None and len(self._facts) < _MAX_FACTS:
                self._facts[key] = facts
        return facts

    def needs_positions(self, facts: RequestFacts) -> bool:
        """Whether a request with ``facts`` reads from replicas, so wants fresh health."""
        return facts.reads and self._health.probing

    def begin(
        self, facts: RequestFacts, cookie: str | None, header: str | None = None
    ) -> RequestScope:
        """Decide where the request reads and make that the current scope."""
        scope = RequestScope(self._owner)
        self.settle(scope, facts, cookie, header)
        scope.token = self._scope_var.set(scope)
        return scope

    def open(self, resolver: Callable[[RequestScope], None]) -> RequestScope:
        """Open the current request's scope, to be decided on first use.

        ``resolver`` runs when a statement (or anything else) needs the decision; it
        calls ``settle`` with the request's facts, or returns without settling while
        the request cannot be decided yet: meanwhile statements go to the primary.
        """
        scope = RequestScope(
            self._owner, resolver=resolver, pending=self._not_routed, counted=("requests_total",)
        )
        scope.token = self._scope_var.set(scope)
        return scope

    def read_token(self, cookie: str | None, header: str | None = None) -> StickyToken | None:
        """The valid token of a request's sticky cookie or token header (the one that
        asks more, when both came), or None; never raises."""
        codec = self._codec
        if codec is None:
            return None
        sticky = None if cookie is None else codec.loads(cookie, self._sticky_ttl)
        if header is not None:
            sticky = later(sticky, codec.loads(header, self._sticky_ttl))
        return sticky

    def settle(
        self,
        scope: RequestScope,
        facts: RequestFacts,
        cookie: str | None,
        header: str | None = None,
    ) -> None:
        """Make the decision of ``scope`` (opened by ``open``) from the request's facts,
        its sticky cookie and its token header. The request is counted when it ends.

        With a ``ThreadProber`` (Flask), the first request that reads starts it;
        async adapters start theirs before calling ``begin``.
        """
        sticky = None
        if facts.reads:
            prober = self.thread_prober
            if prober is not None:
                prober.used = True  # keeps it from stopping for want of use
                if not prober.ready:
                    prober.ensure_started()
            if cookie is not None or header is not None:
                sticky = self.read_token(cookie, header)
        health = self._health
        views = health.stable_views or health.views()
        if sticky is not None and sticky.lsn is not None:
            # The answer depends on the cookie's position: not worth remembering.
            known = self._candidates(facts, sticky, views)
            catch_up = self.catch_up
            if known[1] is not None and catch_up is not None and catch_up.blocks:
                known = self._after_waiting(facts, sticky, views, known, catch_up)
        else:
            index = facts.kind if sticky is None else facts.kind | _TIME_COOKIE
            known = self._memo[index]
            if known[0] is not views:
                known = self._memo[index] = self._candidates(facts, sticky, views)
        _, only, choices, cumulative = known
        decision, counted = only or self._choose(choices, cumulative)
        # Threads or tasks sharing the request's context may ask at once: the first
        # to get here decides for all (one replica per request). acquire() and release()
        # rather than ``with``: measured by ./dev bench instructions, about 1,000 fewer
        # per request.
        lock = self._settling
        lock.acquire()
        try:
            if scope.settled_decision is not None:
                return
            scope._facts = facts  # the slot behind the read-only ``facts`` property
            scope.sticky = sticky
            scope.settled_decision = decision
            scope.counted = counted
        finally:
            lock.release()
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s %s: %s '%s' because %s%s",
                facts.method,
                facts.view,
                decision.node.role.value,
                decision.node.name,
                decision.reason.value,
                f" (sticky at {self._show_position(sticky.lsn)})" if sticky and sticky.lsn else "",
            )

    def _after_waiting(
        self,
        facts: RequestFacts,
        sticky: StickyToken,
        views: Sequence[ReplicaView],
        known: _Known,
        catch_up: CatchUp,
    ) -> _Known:
        # No replica has the client's write in the cached positions: wait briefly for
        # one to replay it (blocking; sync adapters), then decide again.
        if known[1] is None or known[1][0].reason is not Reason.STICKY_REPLICAS_BEHIND:
            return known
        node = catch_up.pick(sticky.lsn, self._spread.in_rotation(views))
        if node is None or not catch_up.wait(node, sticky.lsn):
            return known
        health = self._health
        return self._candidates(facts, sticky, health.stable_views or health.views())

    async def wait_for_replica(
        self, facts: RequestFacts, cookie: str | None, header: str | None = None
    ) -> None:
        """For async adapters, before ``begin``: if the request is a sticky read that no
        replica can serve from the cached positions, wait (awaited) up to the catch-up
        timeout for one to replay the client's write, so that ``begin`` finds it."""
        catch_up = self.catch_up
        if catch_up is None or not catch_up.awaits or not facts.reads:
            return
        sticky = self.read_token(cookie, header)
        if sticky is None or sticky.lsn is None:
            return
        health = self._health
        views = self._spread.in_rotation(health.stable_views or health.views())
        seen = views if self.balanced is None else self.balanced.sticky_views(views, sticky.lsn)
        if decide(facts, sticky, self._primary, seen)[0].reason is Reason.STICKY_REPLICAS_BEHIND:
            node = catch_up.pick(sticky.lsn, views)
            if node is not None:
                await catch_up.wait_async(node, sticky.lsn)

    def _candidates(
        self, facts: RequestFacts, sticky: StickyToken | None, views: Sequence[ReplicaView]
    ) -> _Known:
        """What ``decide()`` answers from the replicas in rotation, narrowed and weighed
        by the spread, each with the counters a request so decided adds to."""
        spread = self._spread
        ruled = spread.in_rotation(views)
        balanced = self.balanced
        decisions: Sequence[Decision]
        if balanced is not None and sticky is not None and sticky.lsn is not None:
            # Never dropped early: nothing tells that every server behind the balanced
            # address has replayed the write.
            ruled = balanced.sticky_views(ruled, sticky.lsn)
            decisions = tuple(
                Decision(d.node, d.reason) if d.drop_cookie else d
                for d in decide(facts, sticky, self._primary, ruled)
            )
        else:
            decisions = decide(facts, sticky, self._primary, ruled)
        cumulative = None
        if len(decisions) > 1:
            decisions, cumulative = spread.narrow(decisions, _node_of, views)
        choices = tuple(
            (decision, self._counter_names(decision, sticky is not None)) for decision in decisions
        )
        only = choices[0] if len(choices) == 1 else None
        return views, only, choices, cumulative

    def _counter_names(self, decision: Decision, sticky: bool) -> tuple[str, ...]:
        key = (decision.reason, decision.node, sticky)
        names = self._names.get(key)
        if names is None:
            # By reason and node too, for the Prometheus collector (replicated_core.prometheus).
            found = [
                "requests_total",
                f"{REQUESTS_BY}{decision.reason.name.lower()}.{decision.node.name}",
            ]
            if decision.node.role is Role.REPLICA:
                found.append("requests_to_replica")
            else:
                found.append(f"requests_to_primary.{decision.reason.name.lower()}")
            if decision.reason is Reason.NO_REPLICA:
                found.append("fallbacks")
            if sticky:
                found.append("sticky_hits")
            names = self._names[key] = tuple(found)
        return names

    # -- while it runs -------------------------------------------------------------

    def move(self, scope: RequestScope, decision: Decision) -> None:
        """Send the rest of ``scope``'s reads by ``decision`` (counted as such), after its
        replica turned out not to have what it needs (balanced.py)."""
        scope.settled_decision = decision
        scope.counted = self._counter_names(decision, scope.sticky is not None)

    def scope(self) -> RequestScope | None:
        """The scope of the request this router is serving now, if any."""
        scope = self._scope_var.get()
        if scope is None or scope.owner is not self._owner or scope.closed:
            return None
        return scope

    def current_decision(self) -> Decision | None:
        """The decision of the request being served by this router, if any."""
        scope = self.scope()
        return scope.decision if scope is not None else None

    # -- ending --------------------------------------------------------------------

    def end(self) -> None:
        """Close the request scope opened by ``begin``; a no-op when there is none."""
        scope = self.scope()
        if scope is not None:
            self.end_scope(scope)

    def end_scope(self, scope: RequestScope) -> None:
        """Close ``scope``, opened by ``begin`` or ``open`` in this context, and count
        the request (one increment for all its counters)."""
        if scope.token is not None:
            names = scope.counted
            if scope.wrote:
                names = self._with_writes.get(names) or self._with_writes.setdefault(
                    names, (*names, "writes")
                )
            self._counters.add_event(names)
            self._scope_var.reset(scope.token)
            scope.token = None
        scope.closed = True
        scope.resolver = None  # it holds the request; copies of the context live on

    # -- the response's cookie -----------------------------------------------------

    def needs_write_position(self, scope: RequestScope | None = None) -> bool:
        """Whether the response must carry the primary's WAL position (ask it first).

        ``scope`` is the current request's, when the caller has it at hand.
        """
        scope = scope or self.scope()
        return scope is not None and scope.wrote and self._wal

    def cookie_update(
        self,
        lsn: int | None = None,
        *,
        secure: bool = False,
        path: str = "/",
        scope: RequestScope | None = None,
    ) -> CookieUpdate | None:
        """How the current response must change the sticky cookie, if at all.

        After a write: set it (with ``lsn``, the primary's position after the write,
        in WAL mode). After a read that found every replica caught up: delete it.
        ``secure`` tells whether the request came over HTTPS; ``path`` is the app's root;
        ``scope`` is the current request's, when the caller has it at hand.
        """
        scope = scope or self.scope()
        codec = self._codec
        if scope is None or codec is None:
            return None
        name = self._config.cookie_name
        if scope.wrote:
            if lsn is not None:
                value = codec.dumps(StickyToken(lsn))
                return CookieUpdate(name, value, self._max_age, path, secure)
            # A time-mode cookie is the same for every write of the same second.
            now = int(time.time())
            last = self._time_update
            if last is not None and last[0] == now and last[1] == path and last[2] is secure:
                return last[3]
            value = codec.dumps(_TIME_TOKEN, now)
            update = CookieUpdate(name, value, self._max_age, path, secure)
            self._time_update = (now, path, secure, update)
            return update
        if scope.settled_decision is not None and scope.settled_decision.drop_cookie:
            return CookieUpdate(name, None, 0, path, secure)
        return None


def _node_of(decision: Decision) -> Node:
    return decision.node
