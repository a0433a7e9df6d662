"""Replica health as pure logic, with a hand-driven clock: lag, down-marks, overdue."""

from __future__ import annotations

import sqlalchemy as sa

from replicated_core.backends import ReplicaProbe
from replicated_core.health import Health
from replicated_core.nodes import Node, Role

NODE = Node("r1", Role.REPLICA, sa.create_engine("sqlite://"))


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def health(clock, max_lag=30.0):
    return Health(
        [NODE], probing=True, check_interval=0.1, max_lag=max_lag, downtime=5, clock=clock
    )


def probe(replay, receive, server_lag):
    return ReplicaProbe(True, replay, receive, server_lag)


def test_an_idle_primary_does_not_look_like_lag():
    """35 s idle, then one write that a 500 ms-delayed replica has not replayed yet:
    the server says 35 s since the last replayed commit; the real wait is 0.5 s."""
    clock = Clock()
    h = health(clock)
    h.record(NODE, probe(100, 100, 0.0))
    clock.now += 35
    h.record(NODE, probe(100, 200, 35.0))
    assert h.states["r1"].lag_seconds == 0.0
    assert h.usable("r1")
    clock.now += 0.4
    h.record(NODE, probe(100, 200, 35.4))
    assert round(h.states["r1"].lag_seconds, 3) == 0.4
    clock.now += 0.2
    h.record(NODE, probe(200, 200, 0.0))
    assert h.states["r1"].lag_seconds == 0.0


def test_a_replica_that_stopped_replaying_grows_its_lag():
    clock = Clock()
    h = health(clock, max_lag=1.0)
    h.record(NODE, probe(100, 100, 0.0))
    for step in range(1, 16):
        clock.now += 0.1
        h.record(NODE, probe(100, 100 + step, 0.1 * step))
    assert round(h.states["r1"].lag_seconds, 3) == 1.4
    assert not h.usable("r1")


def test_a_replica_behind_at_the_first_check_keeps_the_servers_figure():
    clock = Clock()
    h = health(clock)
    h.record(NODE, probe(100, 900, 120.0))
    assert h.states["r1"].lag_seconds == 120.0
    assert not h.usable("r1")


def test_steady_lag_is_measured_from_the_oldest_waiting_position():
    """A replica that stays 2 s behind under constant writes reads as steady 1.9 s (the
    estimate is behind by up to one check interval, as positions are seen when checked),
    not as a sawtooth that drops to zero whenever it replays one observed position."""
    clock = Clock()
    h = health(clock)
    h.record(NODE, probe(0, 0, 0.0))
    lags = []
    for step in range(1, 60):
        clock.now += 0.1
        received = step * 10
        replayed = max(0, (step - 20) * 10)  # 20 checks = 2 s behind
        h.record(NODE, probe(replayed, received, 0.0))
        lags.append(round(h.states["r1"].lag_seconds, 3))
    assert lags[25:] == [1.9] * len(lags[25:])


def test_down_then_back_needs_a_fresh_check():
    clock = Clock()
    h = health(clock)
    h.record(NODE, probe(100, 100, 0.0))
    h.mark_down(NODE, ConnectionRefusedError("refused"))
    assert not h.usable("r1")
    clock.now += 6
    assert not h.usable("r1")  # downtime over, but no check has said it is fine
    h.record(NODE, probe(100, 100, 0.0))
    assert h.usable("r1")


def test_stable_views_follow_every_change_and_downtime():
    """The request path reads ``stable_views`` instead of calling ``views()``: it must
    never outlive a change of state, and is withheld while a downtime runs (when the
    views change with time alone)."""
    clock = Clock()
    h = health(clock, max_lag=1.0)
    assert h.stable_views is None
    h.record(NODE, probe(100, 100, 0.0))
    first = h.views()
    assert h.stable_views is first
    assert first[0].usable
    clock.now += 0.5
    h.record(NODE, probe(100, 200, 0.0))  # received 200, replay stuck at 100
    clock.now += 2
    h.record(NODE, probe(100, 200, 0.0))  # now 2 s behind: past max lag
    assert h.stable_views is None
    assert not h.views()[0].usable
    assert h.stable_views is not None
    assert not h.stable_views[0].usable
    h.mark_down(NODE, ConnectionRefusedError("refused"))
    assert h.stable_views is None
    assert not h.views()[0].usable
    assert h.stable_views is None  # the downtime ends by the clock alone
    clock.now += 6
    assert not h.views()[0].usable  # still needs a fresh check
    assert h.stable_views is not None
    h.record(NODE, probe(300, 300, 0.0))
    assert h.stable_views is None
    assert h.views()[0].usable
    assert h.stable_views is not None


class InterleavingClock(Clock):
    """A clock that, at its ``at``-th reading, runs ``action`` in another thread, as if
    the scheduler switched threads right there, and gives it 0.2 s to finish (it cannot
    while the reader holds a lock it needs)."""

    def __init__(self, at, action):
        super().__init__()
        self.readings, self.at, self.action = 0, at, action
        self.thread = None

    def __call__(self):
        self.readings += 1
        if self.readings == self.at:
            import threading

            self.thread = threading.Thread(target=self.action)
            self.thread.start()
            self.thread.join(0.2)
        return self.now


def test_a_failure_during_a_check_being_recorded_is_not_undone():
    """A request marks the replica down while a check's answer is being recorded: both
    must land as if one came after the other. Without the lock, the failure lands in
    the middle of the record, which then clears the downtime it just started: the
    replica serves reads again at once, with no position known."""
    h = None

    def fail():
        h.mark_down(NODE, ConnectionResetError("reset"))

    clock = InterleavingClock(at=1, action=fail)
    h = health(clock)
    h.record(NODE, probe(100, 100, 0.0))  # reads the clock once: the failure comes then
    clock.thread.join()
    assert (h.marked_down, h.states["r1"].down_until) == (1, 1005.0)
    assert not h.usable("r1")


def test_a_check_started_before_a_failure_cannot_end_the_downtime():
    """A position check starts; a request then fails on the replica and marks it down;
    the check's answer arrives after that. It says nothing of the replica since the
    failure, so the replica stays down for its downtime and needs a check started after
    the failure."""
    clock = Clock()
    h = health(clock)
    h.record(NODE, probe(100, 100, 0.0))
    (check,) = h.plan().checks  # the prober starts a check of r1
    assert check.node is NODE
    clock.now += 0.05
    h.mark_down(NODE, ConnectionResetError("reset"))
    clock.now += 0.05
    h.finish(check, probe(100, 100, 0.0))  # the stale answer
    assert not h.usable("r1")
    assert h.states["r1"].down_until == 1000.05 + 5
    assert h.plan().checks == []  # no check during the downtime
    clock.now += 6
    (check,) = h.plan().checks
    assert not h.usable("r1")  # downtime over, but no check has said it is fine yet
    h.finish(check, probe(100, 100, 0.0))
    assert h.usable("r1")
