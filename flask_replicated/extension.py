"""``FlaskReplicated``: the Flask + Flask-SQLAlchemy adapter."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary, WeakSet

import click
from flask import Flask, Response, current_app, has_app_context, request
from flask.cli import AppGroup
from flask.signals import request_started, request_tearing_down
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import text

from replicated_core.binds import build_nodes
from replicated_core.config import DEFAULTS, load_config, options_to_settings
from replicated_core.failover import lost_connection, with_failover
from replicated_core.health import describe_error
from replicated_core.router import Router
from replicated_core.status import ClusterStatus, build_status, status_queries
from replicated_core.sticky import StickyCodec, find_cookie
from replicated_core.wal import PRIMARY_POSITION_SQL, REPLICA_PROBE_SQL, ReplicaProbe, parse_lsn

from .engines import RoutedEngines

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Engine

    from replicated_core.routing import Node

__all__ = ["FlaskReplicated"]

logger = logging.getLogger("replicated")


class FlaskReplicated:
    """Routes a Flask-SQLAlchemy app's reads to replicas and its writes to the primary.

    Create it after Flask-SQLAlchemy: ``db = SQLAlchemy(app); FlaskReplicated(app)``,
    or ``rep = FlaskReplicated(); rep.init_app(app)`` after ``db.init_app(app)``.
    Keyword options are defaults for the ``REPLICATED_*`` keys of each app's config
    (``sticky_mode="time"`` for ``REPLICATED_STICKY_MODE``); the config wins.
    """

    def __init__(self, app: Flask | None = None, **options: Any) -> None:
        self._settings = options_to_settings(options)
        self._routers: WeakKeyDictionary[Flask, Router] = WeakKeyDictionary()
        self._hooked: WeakSet[SQLAlchemy] = WeakSet()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read the app's config once, check it, and hook the app's requests.

        Raises ``ConfigError`` naming the key for bad config, and RuntimeError when
        Flask-SQLAlchemy was not set up on the app first.
        """
        db = app.extensions.get("sqlalchemy")
        if not isinstance(db, SQLAlchemy):
            raise RuntimeError(
                "FlaskReplicated needs Flask-SQLAlchemy on the app first: call "
                "'db.init_app(app)' (or 'SQLAlchemy(app)') before 'FlaskReplicated(app)'."
            )
        for key, value in {**DEFAULTS, **self._settings}.items():
            app.config.setdefault(key, value)
        config = load_config(app.config)
        with app.app_context():
            engines: dict[str | None, Engine] = dict(db.engines)
        default = engines.get(None)
        binds = {key: engine for key, engine in engines.items() if key is not None}
        primary, replicas = build_nodes(config, binds, default)
        codec = StickyCodec(app.secret_key) if app.secret_key else None
        router = Router(config, primary, replicas, codec)
        router.probe = probe_replica
        # The one private touch: Flask-SQLAlchemy keeps each app's engines in this
        # mapping and offers no hook to route its default entry.
        db._app_engines[app] = RoutedEngines(engines, router)
        self._routers[app] = router
        app.extensions["replicated"] = self
        if db not in self._hooked:
            # Once per db: db.session is shared by every app of this db. The factory's
            # class is already its own subclass of the session class (sessionmaker
            # makes one), and the new one derives from it.
            factory = db.session.session_factory
            factory.class_ = with_failover(factory.class_, self._router_of_session)
            self._hooked.add(db)
        app.cli.add_command(self._cli())
        hooks = _Hooks(app, router, db)
        _replace_teardown(app, db, hooks.close_session)
        request_started.connect(hooks.request_started, app, weak=False)
        app.after_request(hooks.after_request)
        request_tearing_down.connect(hooks.request_tearing_down, app, weak=False)

    def router(self, app: Flask | None = None) -> Router:
        """The router of ``app`` (default: the current app)."""
        target = app if app is not None else current_app._get_current_object()  # type: ignore[attr-defined]
        return self._routers[target]

    def counters(self, app: Flask | None = None) -> dict[str, int]:
        """Per-process counters of ``app`` (default: the current app), by name."""
        return self.router(app).metrics()

    def status(self, app: Flask | None = None) -> ClusterStatus:
        """Ask every node how it is (one query each); what ``flask replicated status`` shows."""
        router = self.router(app)
        results: dict[str, tuple[object, ...] | BaseException] = {}
        for name, sql in status_queries(router).items():
            node = router.node_named(name)
            try:
                with node.engine.connect() as conn:
                    results[name] = tuple(conn.execute(text(sql)).one())
            except Exception as error:
                results[name] = error
        return build_status(router, results)

    def _cli(self) -> click.Group:
        group = AppGroup("replicated", help="Primary/replica routing tools.")

        @group.command("status")
        @click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
        def status(as_json: bool) -> None:
            """Show every node: reachable, in recovery, lag, usable. Exits 1 when the
            primary is unreachable or no replica is usable."""
            report = self.status()
            click.echo(report.to_json() if as_json else report.to_table())
            if not report.healthy:
                raise SystemExit(1)

        return group

    def _router_of_session(self, session: object) -> Router | None:
        if not has_app_context():
            return None
        return self._routers.get(current_app._get_current_object())  # type: ignore[attr-defined]


class _Hooks:
    """One app's request hooks, in request order. They run on every request: each
    reads the request once and leaves as soon as there is nothing to do."""

    def __init__(self, app: Flask, router: Router, db: SQLAlchemy) -> None:
        self.app = app
        self.router = router
        self.db = db
        self.cookie = router.config.cookie_name
        self.header = router.config.debug_header

    def request_started(self, app: Flask, **extra: Any) -> None:
        router = self.router
        req = request._get_current_object()  # type: ignore[attr-defined]
        endpoint = req.endpoint
        view = app.view_functions.get(endpoint) if endpoint is not None else None
        facts = router.facts(req.method, endpoint, view)
        if router.needs_positions(facts):
            router.health.refresh(probe_replica)
        router.begin(facts, find_cookie(req.environ.get("HTTP_COOKIE"), self.cookie))

    def after_request(self, response: Response) -> Response:
        router = self.router
        scope = router.scope()
        if scope is None:
            return response
        if self.header is not None:
            response.headers[self.header] = scope.decision.node.name
        if scope.wrote or scope.decision.drop_cookie:
            lsn = write_position(router) if router.needs_write_position(scope) else None
            path = self.app.config["APPLICATION_ROOT"] or "/"
            update = router.cookie_update(lsn, secure=request.is_secure, path=path, scope=scope)
            if update is not None:
                update.apply(response)
        return response

    def request_tearing_down(self, app: Flask, **extra: Any) -> None:
        self.router.end()

    def close_session(self, exc: BaseException | None) -> None:
        # Flask-SQLAlchemy's own teardown, but a connection that died after the
        # request's work does not fail a request that already has its answer.
        session = self.db.session
        try:
            session.remove()
        except Exception as error:
            if not lost_connection(error):
                raise
            session.registry.clear()
            logger.debug("A connection died after its request's work: %s", error.__class__)


def _replace_teardown(app: Flask, db: SQLAlchemy, close: Callable[[Any], None]) -> None:
    """Put ``close`` in place of Flask-SQLAlchemy's session teardown for ``app``.

    Both remove the session; replacing rather than adding saves a teardown call on
    every request. If Flask-SQLAlchemy's is not found, ``close`` is added to run
    before it (teardowns run in reverse order) and leaves it nothing to do.
    """
    funcs = app.teardown_appcontext_funcs
    for index, func in enumerate(funcs):
        if func == getattr(db, "_teardown_session", None):
            funcs[index] = close
            return
    app.teardown_appcontext(close)


def probe_replica(node: Node) -> ReplicaProbe:
    """Read a replica's replay position and lag (one query on a pooled connection)."""
    with node.engine.connect() as conn:
        row = conn.execute(text(REPLICA_PROBE_SQL)).one()
    return ReplicaProbe.from_row(tuple(row))


def write_position(router: Router) -> int | None:
    """The primary's WAL position after this request's writes; None if it cannot say."""
    try:
        with router.primary.engine.connect() as conn:
            return parse_lsn(conn.execute(text(PRIMARY_POSITION_SQL)).scalar())
    except Exception as error:
        logger.warning(
            "Could not read the primary's WAL position (%s): this client stays on the "
            "primary for the sticky time instead.",
            describe_error(error, router.health.secrets),
        )
        return None
