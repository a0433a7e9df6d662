"""The routing rules as a pure function: no server, no framework."""

import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from replicated_core.config import load_config
from replicated_core.nodes import Node, Role
from replicated_core.router import Router
from replicated_core.rules import Decision, Reason, ReplicaView, RequestFacts, decide
from replicated_core.scope import RequestScope
from replicated_core.sticky import StickyCodec, StickyToken

ENGINE = sa.create_engine("sqlite://")
PRIMARY = Node("master", Role.PRIMARY, ENGINE)
R1 = Node("r1", Role.REPLICA, ENGINE)
R2 = Node("r2", Role.REPLICA, ENGINE)
READ = RequestFacts(method="GET", view="items", readonly=True, forced_primary=False)
WRITE = RequestFacts(method="POST", view="items", readonly=False, forced_primary=False)
FORCED = RequestFacts(method="GET", view="items", readonly=True, forced_primary=True)


def views(*positions, usable=(True, True)):
    return [
        ReplicaView(node, ok, lsn)
        for node, ok, lsn in zip((R1, R2), usable, positions, strict=True)
    ]


def test_a_read_may_go_to_any_usable_replica():
    assert decide(READ, None, PRIMARY, views(None, None)) == (
        Decision(R1, Reason.READ),
        Decision(R2, Reason.READ),
    )


def test_a_write_method_goes_to_the_primary():
    assert decide(WRITE, None, PRIMARY, views(None, None)) == (
        Decision(PRIMARY, Reason.WRITE_METHOD),
    )


def test_the_decorator_beats_the_method():
    assert decide(FORCED, None, PRIMARY, views(None, None)) == (
        Decision(PRIMARY, Reason.DECORATOR),
    )


def test_websockets_go_to_the_primary_unless_readonly():
    ws = RequestFacts(method="GET", view="ws", readonly=False, forced_primary=False, websocket=True)
    assert decide(ws, None, PRIMARY, views(None, None)) == (Decision(PRIMARY, Reason.WEBSOCKET),)


def test_unusable_replicas_are_skipped():
    assert decide(READ, None, PRIMARY, views(None, None, usable=(False, True))) == (
        Decision(R2, Reason.READ),
    )
    assert decide(READ, None, PRIMARY, views(None, None, usable=(False, False))) == (
        Decision(PRIMARY, Reason.NO_REPLICA),
    )


def test_time_sticky_goes_to_the_primary():
    assert decide(READ, StickyToken(), PRIMARY, views(10, 10)) == (
        Decision(PRIMARY, Reason.STICKY),
    )


def test_wal_sticky_waits_for_a_replica_that_replayed_the_write():
    token = StickyToken(lsn=100)
    assert decide(READ, token, PRIMARY, views(99, 50)) == (
        Decision(PRIMARY, Reason.STICKY_REPLICAS_BEHIND),
    )
    assert decide(READ, token, PRIMARY, views(99, 100)) == (
        Decision(R2, Reason.REPLICA_CAUGHT_UP, drop_cookie=False),
    )


def test_wal_sticky_cookie_drops_only_when_every_replica_caught_up():
    token = StickyToken(lsn=100)
    assert decide(READ, token, PRIMARY, views(100, 150)) == (
        Decision(R1, Reason.REPLICA_CAUGHT_UP, drop_cookie=True),
        Decision(R2, Reason.REPLICA_CAUGHT_UP, drop_cookie=True),
    )
    down_but_behind = views(150, 20, usable=(True, False))
    assert decide(READ, token, PRIMARY, down_but_behind) == (
        Decision(R1, Reason.REPLICA_CAUGHT_UP, drop_cookie=False),
    )
    unknown = views(150, None)
    assert decide(READ, token, PRIMARY, unknown) == (
        Decision(R1, Reason.REPLICA_CAUGHT_UP, drop_cookie=False),
    )


def test_the_kind_of_a_request_holds_its_three_flags():
    kinds = {
        RequestFacts("GET", "v", readonly, forced, websocket).kind
        for readonly in (False, True)
        for forced in (False, True)
        for websocket in (False, True)
    }
    assert kinds == set(range(8))


# -- settling a request answers what decide() answers --------------------------------

SECRET = "routing-test-secret"

FACTS = st.builds(
    RequestFacts,
    method=st.just("GET"),
    view=st.just("v"),
    readonly=st.booleans(),
    forced_primary=st.booleans(),
    websocket=st.booleans(),
)
TOKENS = st.none() | st.just(StickyToken()) | st.integers(0, 300).map(StickyToken)
VIEWS = st.builds(
    lambda usable, positions: tuple(views(*positions, usable=usable)),
    st.tuples(st.booleans(), st.booleans()),
    st.tuples(st.none() | st.integers(0, 300), st.none() | st.integers(0, 300)),
)


class _Health:
    """Stands in for the registry: hands out the views it was last given, one tuple
    until the next change, as Health does."""

    probing = False

    def __init__(self):
        self.current = ()
        self.stable_views = None

    def views(self):
        return self.current


@settings(max_examples=200, deadline=None)
@given(
    requests=st.lists(st.tuples(FACTS, TOKENS, VIEWS, st.booleans()), min_size=1, max_size=12),
    stable=st.booleans(),
)
def test_settle_decides_as_decide_does(requests, stable):
    """Whatever the requests and however the replicas' state changes between them,
    ``Requests.settle`` (which remembers answers while the views stay the same)
    answers what ``decide()`` answers for the views of that moment."""
    config = load_config({"REPLICATED_STICKY_MODE": "wal"})
    router = Router(config, PRIMARY, [R1, R2], StickyCodec(SECRET))
    router.codec.cluster = "a-cluster"  # tokens with positions are bound to one
    health = _Health()
    router.requests._health = health
    picks = []

    def choose(choices, cumulative):
        assert cumulative is None  # no weights: an even pick
        pick = choices[len(picks) % len(choices)]
        picks.append(pick)
        return pick

    router.requests._choose = choose
    for facts, token, replica_views, changed in requests:
        if changed or not health.current:
            health.current = replica_views  # a new tuple: the memo must not answer
        health.stable_views = health.current if stable else None
        cookie = None if token is None else router.codec.dumps(token)
        scope = RequestScope(router)
        picks.clear()
        router.requests.settle(scope, facts, cookie)
        sticky = token if facts.reads else None
        candidates = decide(facts, sticky, PRIMARY, health.current)
        assert scope.decision in candidates
        if len(candidates) > 1:
            assert picks == [(scope.decision, scope.counted)]
        assert scope.sticky == sticky
        assert scope.counted == router.requests._counter_names(scope.decision, sticky is not None)
