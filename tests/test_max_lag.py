"""use_replica(max_lag=...): a bound on the lag of the replica that serves a block."""

from __future__ import annotations

import math
from typing import Any

import pytest

from replicated_core import use_replica


@pytest.mark.parametrize("bad", [True, "1", None.__class__, [1]])
def test_a_non_number_is_a_type_error(bad: Any) -> None:
    with pytest.raises(TypeError, match="max_lag"):
        use_replica(max_lag=bad)


@pytest.mark.parametrize("bad", [-1, -0.5, math.nan])
def test_a_negative_or_nan_bound_is_a_value_error(bad: float) -> None:
    with pytest.raises(ValueError, match="max_lag"):
        use_replica(max_lag=bad)


def test_a_big_bound_reads_from_the_replica_in_a_block_and_a_decorator(pg_flask_app: Any) -> None:
    app = pg_flask_app
    backend, db = app.backend, app.db

    @use_replica(max_lag=3600)
    def read() -> str:
        return str(backend.who(db.session))

    with app.app_context():
        with use_replica(max_lag=3600):
            assert backend.who(db.session) == "replica"
        db.session.remove()
        assert read() == "replica"


def test_a_bound_the_delayed_replica_exceeds_reads_from_the_primary(
    postgresql_backend: Any,
) -> None:
    import time

    import sqlalchemy as sa
    from support import dispose_flask_app, make_flask_app

    app = make_flask_app(postgresql_backend, "lagging", REPLICATED_CHECK_INTERVAL=0.02)
    backend, db = app.backend, app.db
    try:
        with app.app_context():
            router = app.extensions["replicated"].router(app)
            with use_replica():  # starts the prober
                backend.who(db.session)
            db.session.remove()
            state = router.health.states["slave"]
            deadline = time.monotonic() + 5
            seen = False
            for _ in range(200):  # bounded: writes until a check sees the delay as lag
                if time.monotonic() > deadline:
                    break
                with db.engine.begin() as conn:
                    conn.execute(sa.text("INSERT INTO items (name) VALUES ('lag')"))
                time.sleep(0.1)
                if state.lag_seconds > 0.05:
                    seen = True
                    with use_replica(max_lag=0.05):
                        assert backend.who(db.session) == "primary"
                    db.session.remove()
                    break
            assert seen, "the delayed replica never showed a lag"
            with use_replica(max_lag=3600):
                assert backend.who(db.session) == "lagging"
            db.session.remove()
    finally:
        dispose_flask_app(app)


async def test_quart_a_big_bound_reads_from_the_replica(postgresql_backend: Any) -> None:
    from support import make_quart_app, text_of

    app = make_quart_app(postgresql_backend)

    @use_replica(max_lag=3600)
    async def read() -> str:
        return str(await app.who())

    @app.route("/bounded")
    async def bounded() -> Any:
        with use_replica(max_lag=3600):
            block = await app.who()
        return f"{block} {await read()}"

    try:
        response = await app.test_client().get("/bounded")
        assert await text_of(response) == "replica replica"
    finally:
        await app.rep.dispose(app)


async def test_quart_a_bound_the_delayed_replica_exceeds_reads_from_the_primary(
    postgresql_backend: Any,
) -> None:
    import asyncio
    import time

    import sqlalchemy as sa
    from support import make_quart_app

    app = make_quart_app(postgresql_backend, "lagging", REPLICATED_CHECK_INTERVAL=0.02)
    primary = sa.create_engine(postgresql_backend.url("primary"))
    try:
        async with app.test_app():
            router = app.rep.router(app)
            async with app.app_context():
                with use_replica():  # starts the prober
                    await app.who()
            state = router.health.states["slave"]
            deadline = time.monotonic() + 5
            seen = False
            for _ in range(200):  # bounded: writes until a check sees the delay as lag
                if time.monotonic() > deadline:
                    break
                with primary.begin() as conn:
                    conn.execute(sa.text("INSERT INTO items (name) VALUES ('lag')"))
                await asyncio.sleep(0.1)
                if state.lag_seconds > 0.05:
                    seen = True
                    async with app.app_context():
                        with use_replica(max_lag=0.05):
                            bounded = await app.who()
                        with use_replica(max_lag=0):
                            zero = await app.who()
                    assert (bounded, zero) == ("primary", "primary")
                    break
            assert seen, "the delayed replica never showed a lag"
            async with app.app_context():
                with use_replica(max_lag=3600):
                    assert await app.who() == "lagging"
    finally:
        primary.dispose()
        await app.rep.dispose(app)


def test_a_zero_bound_reads_from_a_replica_that_reports_no_lag(
    postgresql_backend: Any, pg_cluster: Any
) -> None:
    import time

    from support import dispose_flask_app, make_flask_app

    app = make_flask_app(postgresql_backend, "replica", REPLICATED_CHECK_INTERVAL=0.02)
    backend, db = app.backend, app.db
    try:
        with app.app_context():
            router = app.extensions["replicated"].router(app)
            with use_replica():  # starts the prober
                backend.who(db.session)
            db.session.remove()
            pg_cluster.wait_for_replay()
            state = router.health.states["slave"]
            deadline = time.monotonic() + 5
            while state.lag_seconds != 0 and time.monotonic() < deadline:  # bounded
                time.sleep(0.02)
            assert state.lag_seconds == 0, "the replica without delay kept reporting a lag"
            with use_replica(max_lag=0):
                assert backend.who(db.session) == "replica"
            db.session.remove()
    finally:
        dispose_flask_app(app)


APP_NAME = "max-lag-failover-test"


def test_a_read_retried_in_a_bounded_block_never_goes_outside_the_bound(
    postgresql_backend: Any,
) -> None:
    """The replica the block picked loses its connection (terminated on its server)
    mid-block: the retried read goes to a node within the bound or the primary, never
    to the delayed replica the bound excludes."""
    import time

    import sqlalchemy as sa
    from support import dispose_flask_app, make_flask_app, terminate_backends

    # A short downtime: the prober's own check may take the terminated connection
    # from the pool and mark 'replica' down; the next try then finds it back.
    app = make_flask_app(
        postgresql_backend,
        ["replica", "lagging"],
        REPLICATED_CHECK_INTERVAL=0.02,
        REPLICATED_REPLICA_DOWNTIME=0.3,
        # Its connections are found by name on the replica, to be terminated.
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 10, "connect_args": {"application_name": APP_NAME}},
    )
    backend, db = app.backend, app.db
    killer = sa.create_engine(postgresql_backend.url("replica"))
    try:
        with app.app_context():
            router = app.extensions["replicated"].router(app)
            with use_replica():  # starts the prober
                backend.who(db.session)
            db.session.remove()
            lagging, replica = router.health.states["lagging"], router.health.states["replica"]

            def lag_the_delayed_replica() -> bool:
                # Writes until a check sees the delay as lag on 'lagging' and none on
                # 'replica' (bounded); again before every try, as 'lagging' catches up
                # (and its lag drops to 0) half a second after the writes stop.
                deadline = time.monotonic() + 5
                for _ in range(200):
                    if time.monotonic() > deadline:
                        break
                    with db.engine.begin() as conn:
                        conn.execute(sa.text("INSERT INTO items (name) VALUES ('lag')"))
                    time.sleep(0.1)
                    if (
                        lagging.lag_seconds > 0.2
                        and replica.lag_seconds < 0.05
                        and router.health.usable("replica")
                    ):
                        return True
                return False

            # Up to 8 tries (bounded): on a busy machine a check may see 'replica' lag
            # for a moment, and the block then starts on the primary, where nothing can
            # be retried.
            seen: list[tuple[str, str, bool]] = []
            for _ in range(8):
                assert lag_the_delayed_replica()
                before = router.metrics().get("retries", 0)
                with use_replica(max_lag=0.1):
                    first = backend.who(db.session)
                    # The block's next transaction starts on a pooled connection, which
                    # dies under it at its first statement: every connection of this
                    # app to 'replica' is terminated in between.
                    db.session.commit()
                    terminate_backends(killer, APP_NAME)
                    retried = backend.who(db.session)
                db.session.remove()
                seen.append((first, retried, router.metrics().get("retries", 0) > before))
                if seen[-1] == ("replica", "primary", True):
                    break
        # The failed replica is left out of the retry, and the delayed one is outside
        # the bound: the primary is the one node left. Without a retry, the read stayed
        # on the replica within the bound; a block that started on the primary stayed.
        allowed = {("replica", "primary", True), ("replica", "replica", False)}
        assert [s for s in seen if s not in allowed and s[0] != "primary"] == [], seen
        assert seen[-1] == ("replica", "primary", True), seen
    finally:
        killer.dispose()
        dispose_flask_app(app)
