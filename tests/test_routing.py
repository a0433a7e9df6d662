"""The routing decision as a pure function: no server, no framework."""

import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from replicated_core.config import load_config
from replicated_core.router import Router
from replicated_core.routing import (
    Decision,
    Node,
    Reason,
    ReplicaView,
    RequestFacts,
    RequestScope,
    Role,
    decide,
)
from replicated_core.sticky import StickyCodec, StickyToken

ENGINE = sa.create_engine("sqlite://")
PRIMARY = Node("master", Role.PRIMARY, ENGINE)
R1 = Node("r1", Role.REPLICA, ENGINE)
R2 = Node("r2", Role.REPLICA, ENGINE)
READ = RequestFacts(method="GET", view="items", readonly=True, forced_primary=False)
WRITE = RequestFacts(method="POST", view="items", readonly=False, forced_primary=False)
FORCED = RequestFacts(method="GET", view="items", readonly=True, forced_primary=True)


def first(nodes):
    return nodes[0]


def last(nodes):
    return nodes[-1]


def views(*positions, usable=(True, True)):
    return [
        ReplicaView(node, ok, lsn)
        for node, ok, lsn in zip((R1, R2), usable, positions, strict=True)
    ]


def test_a_read_goes_to_a_replica():
    assert decide(READ, None, PRIMARY, views(None, None), first) == Decision(R1, Reason.READ)
    assert decide(READ, None, PRIMARY, views(None, None), last) == Decision(R2, Reason.READ)


def test_a_write_method_goes_to_the_primary():
    assert decide(WRITE, None, PRIMARY, views(None, None), first) == Decision(
        PRIMARY, Reason.WRITE_METHOD
    )


def test_the_decorator_beats_the_method():
    assert decide(FORCED, None, PRIMARY, views(None, None), first) == Decision(
        PRIMARY, Reason.DECORATOR
    )


def test_websockets_go_to_the_primary_unless_readonly():
    ws = RequestFacts(method="GET", view="ws", readonly=False, forced_primary=False, websocket=True)
    assert decide(ws, None, PRIMARY, views(None, None), first).reason is Reason.WEBSOCKET


def test_unusable_replicas_are_skipped():
    assert decide(READ, None, PRIMARY, views(None, None, usable=(False, True)), first) == (
        Decision(R2, Reason.READ)
    )
    assert decide(READ, None, PRIMARY, views(None, None, usable=(False, False)), first) == (
        Decision(PRIMARY, Reason.NO_REPLICA)
    )


def test_time_sticky_goes_to_the_primary():
    assert decide(READ, StickyToken(), PRIMARY, views(10, 10), first) == Decision(
        PRIMARY, Reason.STICKY
    )


def test_wal_sticky_waits_for_a_replica_that_replayed_the_write():
    token = StickyToken(lsn=100)
    assert decide(READ, token, PRIMARY, views(99, 50), first) == Decision(
        PRIMARY, Reason.STICKY_REPLICAS_BEHIND
    )
    assert decide(READ, token, PRIMARY, views(99, 100), first) == Decision(
        R2, Reason.REPLICA_CAUGHT_UP, drop_cookie=False
    )


def test_wal_sticky_cookie_drops_only_when_every_replica_caught_up():
    token = StickyToken(lsn=100)
    assert decide(READ, token, PRIMARY, views(100, 150), first) == Decision(
        R1, Reason.REPLICA_CAUGHT_UP, drop_cookie=True
    )
    down_but_behind = views(150, 20, usable=(True, False))
    assert decide(READ, token, PRIMARY, down_but_behind, first).drop_cookie is False
    unknown = views(150, None)
    assert decide(READ, token, PRIMARY, unknown, first).drop_cookie is False


# -- the router's shortcuts agree with decide() --------------------------------------

SECRET = "routing-test-secret"


def _router():
    config = load_config({"REPLICATED_STICKY_MODE": "wal"})
    return Router(config, PRIMARY, [R1, R2], StickyCodec(SECRET))


@settings(max_examples=300, deadline=None)
@given(
    readonly=st.booleans(),
    forced=st.booleans(),
    websocket=st.booleans(),
    token=st.none() | st.just(StickyToken()) | st.integers(0, 300).map(StickyToken),
    usable=st.tuples(st.booleans(), st.booleans()),
    positions=st.tuples(st.none() | st.integers(0, 300), st.none() | st.integers(0, 300)),
)
def test_settle_decides_as_decide_does(readonly, forced, websocket, token, usable, positions):
    """Router.settle keeps ready-made decisions for plain reads and writes; whatever the
    request and the replicas' state, it must answer what the pure function answers."""
    router = _router()
    replica_views = tuple(views(*positions, usable=usable))
    router.health.views = lambda: replica_views
    router._choose = first
    facts = RequestFacts("GET", "v", readonly, forced, websocket)
    cookie = None if token is None else router.codec.dumps(token)
    scope = RequestScope(router)
    router.settle(scope, facts, cookie)
    sticky = token if readonly and not forced else None
    assert scope.decision == decide(facts, sticky, PRIMARY, replica_views, first)
    # Asked twice (the cached choices are reused), the answer is the same.
    again = RequestScope(router)
    router.settle(again, facts, cookie)
    assert again.decision == scope.decision
