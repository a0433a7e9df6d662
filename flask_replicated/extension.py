"""``FlaskReplicated``: the Flask + Flask-SQLAlchemy adapter."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary, WeakSet

import click
from flask import Flask, current_app, has_app_context, has_request_context
from flask.cli import AppGroup
from flask.globals import request_ctx
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import text

from replicated_core.backends import ReplicaProbe, backend_for
from replicated_core.binds import build_bind_nodes, build_nodes
from replicated_core.config import DEFAULTS, StickyMode, load_config, options_to_settings
from replicated_core.cookie import find_cookie
from replicated_core.databases import Databases
from replicated_core.discovery import Discovery, require_dnspython
from replicated_core.failover import lost_connection, with_failover
from replicated_core.prober import ThreadProber
from replicated_core.router import PROBE_MARK, Router
from replicated_core.status import (
    AppStatus,
    ClusterStatus,
    build_status,
    reported_by_the_table,
    status_queries,
)
from replicated_core.sticky import StickyCodec, token_salt

from .engines import discovered_engines, install_routed_engines, prepare_engines

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from replicated_core.backends import Position
    from replicated_core.nodes import Node
    from replicated_core.scope import Requests, RequestScope

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
        self._databases: WeakKeyDictionary[Flask, Databases] = WeakKeyDictionary()
        self._hooked: WeakSet[SQLAlchemy] = WeakSet()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read the app's config once, check it, and hook the app's requests.

        Raises ``ConfigError`` naming the key for bad config, and RuntimeError when
        Flask-SQLAlchemy was not set up on the app first.
        """
        if "replicated" in app.extensions:
            raise RuntimeError("FlaskReplicated is already set up on this app.")
        db = app.extensions.get("sqlalchemy")
        if not isinstance(db, SQLAlchemy):
            raise RuntimeError(
                "FlaskReplicated needs Flask-SQLAlchemy on the app first: call "
                "'db.init_app(app)' (or 'SQLAlchemy(app)') before 'FlaskReplicated(app)'."
            )
        for key, value in {**DEFAULTS, **self._settings}.items():
            app.config.setdefault(key, value)
        config = load_config(app.config)
        if config.discovery is not None:
            require_dnspython()
        engines, replica_engines = prepare_engines(db, app, config)
        make = discovered_engines(db, app, config.discovery) if config.discovery else None
        default = engines.get(None)
        binds = {key: engine for key, engine in engines.items() if key is not None}
        primary, replicas = build_nodes(config, binds, default, replica_engines)
        nodes: dict[str | None, tuple[Node, list[Node]]] = {None: (primary, replicas)}
        nodes.update(build_bind_nodes(config, binds, primary, replica_engines))

        def codec() -> StickyCodec | None:
            if not app.secret_key:
                return None
            return StickyCodec(
                app.secret_key,
                salt=token_salt(config.cookie_name),
                fallbacks=app.config.get("SECRET_KEY_FALLBACKS"),
            )

        databases = Databases.build(config, nodes, codec, name=app.name)
        for each in databases:
            each.prober = ThreadProber(each.health, probe_replica, on_overdue=each.cut_off)
            if each.catch_up is not None:
                each.catch_up.run = first_row
        router = databases.default
        if config.discovery is not None and make is not None:
            # The default database's replicas (the only ones DNS can give).
            discovery = Discovery(config.discovery, router, make, dispose=_dispose_engine)
            prober = router.prober
            assert isinstance(prober, ThreadProber)
            router.discovery = prober.discovery = discovery
            discovery.refresh()  # the first requests find the replicas there now
        install_routed_engines(db, app, databases)
        self._routers[app] = router
        self._databases[app] = databases
        app.extensions["replicated"] = self
        if db not in self._hooked:
            # Once per db: db.session is shared by every app of this db. The factory's
            # class is already its own subclass of the session class (sessionmaker
            # makes one), and the new one derives from it.
            factory = db.session.session_factory
            factory.class_ = with_failover(factory.class_, self._router_of_session)
            self._hooked.add(db)
        for each in databases:
            if each.balanced is not None:
                # Sticky reads on a replica behind one address: checked on the
                # connection the session begins its transaction on.
                each.balanced.listen(db.session.session_factory.class_)
        app.cli.add_command(self._cli())
        hooks = _Hooks(app, databases, db)
        _replace_teardown(app, db, hooks.close_session)
        # A WSGI middleware, the way ProxyFix is installed: it opens the request's
        # scope before Flask's own hooks and closes it after them. Flask's hooks and
        # signals cost a dozen calls each on every request; this costs a few.
        app.wsgi_app = hooks.middleware(app.wsgi_app)  # type: ignore[method-assign,assignment]

    def router(self, app: Flask | None = None, *, bind_key: str | None = None) -> Router:
        """The router of ``app`` (default: the current app) for the database of
        ``bind_key`` (default: the default database)."""
        if bind_key is None:
            target = app if app is not None else current_app._get_current_object()  # type: ignore[attr-defined]
            return self._routers[target]
        return self.databases(app).router(bind_key)

    def databases(self, app: Flask | None = None) -> Databases:
        """Every routed database of ``app`` (default: the current app)."""
        target = app if app is not None else current_app._get_current_object()  # type: ignore[attr-defined]
        return self._databases[target]

    def counters(self, app: Flask | None = None) -> dict[str, int]:
        """Per-process counters of ``app`` (default: the current app), by name."""
        return self.router(app).metrics()

    def consistency_token(self, app: Flask | None = None) -> str:
        """A token that covers everything committed so far, for a job to read with
        ``use_replica(after=token)``: inside a request that wrote, its writes (the
        position read as its commit's connection went back to the pool); otherwise
        the primary's current position, read on a pooled connection (one round trip).
        Where positions cannot be read (SQLite), a token that keeps its holder on the
        primary for the sticky time. Needs SECRET_KEY.

        With several databases: the positions of the databases this request wrote
        (a time entry for one whose position was not read, as in the cookie), or
        else of every database's primary (one round trip each)."""
        databases = self.databases(app)
        if not databases.several:
            router = databases.default
            scope = router.requests.scope()
            position = scope.position if scope is not None else None
            if position is None and router.backend.has_positions:
                position = _primary_position(router)
            return router.token_for(position)
        positions = databases.written()
        if not positions:
            for each in databases:
                positions[each] = _primary_position(each) if each.backend.has_positions else None
        return databases.token_for(positions)

    def status(self, app: Flask | None = None, *, bind_key: str | None = None) -> ClusterStatus:
        """Ask every node of a database (default: the default database) how it is (one
        query each); what ``flask replicated status`` shows for it."""
        router = self.router(app, bind_key=bind_key)
        results: dict[str, tuple[object, ...] | BaseException] = {}
        for name, sql in status_queries(router).items():
            try:
                node = router.node_named(name)  # KeyError: it left DNS meanwhile
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
            databases = self.databases()
            with reported_by_the_table():
                reports = [
                    (databases.label(each), self.status(bind_key=key))
                    for key, each in databases.routers.items()
                ]
            report = reports[0][1] if len(reports) == 1 else AppStatus(tuple(reports))
            click.echo(report.to_json() if as_json else report.to_table())
            if not report.healthy:
                raise SystemExit(1)

        return group

    def _router_of_session(self, session: object) -> Router | None:
        if not has_app_context():
            return None
        return self._routers.get(current_app._get_current_object())  # type: ignore[attr-defined]


class _Hooks:
    """One app's per-request work: open the routing scope around the WSGI app (one per
    routed database), decide at the first statement, set the cookie and debug header
    as the response starts, and close Flask-SQLAlchemy's session."""

    def __init__(self, app: Flask, databases: Databases, db: SQLAlchemy) -> None:
        self.app = app
        self.databases = databases
        router = self.router = databases.default
        self.requests = router.requests
        self.db = db
        self.views = app.view_functions
        self.cookie = router.config.cookie_name
        self.header = router.config.debug_header
        token_header = router.config.token_header
        self.token_header = token_header
        # Where WSGI puts that request header.
        self.token_key = (
            None if token_header is None else "HTTP_" + token_header.upper().replace("-", "_")
        )
        # Whether a response after a write carries the primary's WAL position.
        self.wal = router.sticky_mode is StickyMode.WAL and router.codec is not None

    def middleware(self, wsgi_app: WSGIApplication) -> WSGIApplication:
        if self.databases.several:
            return self.middleware_of_several(wsgi_app)
        requests = self.requests
        settle = self.settle
        respond = self.respond
        header = self.header

        def serve(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
            scope = requests.open(settle)

            def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
                # Flask calls this inside its request context, after its after_request
                # hooks: the last moment a write can still set the cookie.
                scope.answered = True
                decision = scope.settled_decision
                if scope.wrote or header or (decision is not None and decision.drop_cookie):
                    respond(scope, environ, headers)
                return start_response(status, headers, exc_info)

            try:
                return wsgi_app(environ, start)
            finally:
                requests.end_scope(scope)

        return serve

    def middleware_of_several(self, wsgi_app: WSGIApplication) -> WSGIApplication:
        """``middleware`` for an app with several routed databases: a scope for each,
        each decided at its own first statement, and one cookie for all."""
        databases = self.databases
        resolvers = [self.settle] + [
            functools.partial(self.settle, requests=router.requests) for router in databases.all[1:]
        ]
        header = self.header

        def serve(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
            scopes = databases.open(resolvers)

            def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
                for scope in scopes:
                    scope.answered = True
                if header or databases.touched(scopes):
                    self.respond_for_several(scopes, environ, headers)
                return start_response(status, headers, exc_info)

            try:
                return wsgi_app(environ, start)
            finally:
                databases.end(scopes)

        return serve

    def respond_for_several(
        self, scopes: list[RequestScope], environ: WSGIEnvironment, headers: list[tuple[str, str]]
    ) -> None:
        """``respond`` with several databases: the debug header names the node of each
        (``Databases.describe``), and one cookie carries the writes of all."""
        if scopes[0].closed:
            return
        header = self.header
        if header is not None:
            name = header.lower()
            headers[:] = [h for h in headers if h[0].lower() != name]
            headers.append((header, self.databases.describe(scopes)))
        if not self.databases.touched(scopes):
            return
        raw = environ.get("HTTP_COOKIE")
        cookie = find_cookie(raw, self.cookie) if raw else None
        token = environ.get(self.token_key) if self.token_key is not None else None
        path = self.app.config["APPLICATION_ROOT"] or "/"
        secure = environ.get("wsgi.url_scheme") in ("https", "wss")
        update = self.databases.cookie_update(scopes, cookie, token, secure=secure, path=path)
        if update is not None:
            headers.append(("Set-Cookie", update.header_value))
            if self.token_header is not None and update.value is not None:
                headers.append((self.token_header, update.value))

    def settle(self, scope: RequestScope, requests: Requests | None = None) -> None:
        """Decide where the request reads, at its first use of the database.

        The request is found through Flask's request context, not the environ this
        middleware was given: a middleware installed before this one runs inside it
        and may hand Flask a copy. Flask's URL matching puts the rule (and so the view)
        on the request before any hook or view runs. A statement before that goes to
        the primary, and the request is decided later.

        ``requests`` is the lifecycle of the scope's database (default: the default
        database's).
        """
        if not has_request_context():
            return  # before Flask pushed its request context: not yet (the primary)
        ctx = request_ctx._get_current_object()  # type: ignore[attr-defined]
        if ctx.app is not self.app:
            return  # another app's request, pushed inside this one's: not this one's
        req = ctx.request
        rule = req.url_rule
        if rule is not None:
            endpoint = rule.endpoint
            facts = self.requests.facts(req.method, endpoint, self.views.get(endpoint))
        elif req.routing_exception is not None:
            facts = self.requests.facts(req.method, None, None)  # a 404 or 405
        else:
            return  # a session interface or URL converter, before the match: not yet
        environ = req.environ
        raw = environ.get("HTTP_COOKIE")
        token = environ.get(self.token_key) if self.token_key is not None else None
        cookie = find_cookie(raw, self.cookie) if raw else None
        (requests or self.requests).settle(scope, facts, cookie, token)

    def respond(
        self, scope: RequestScope, environ: WSGIEnvironment, headers: list[tuple[str, str]]
    ) -> None:
        """Add the debug header and the sticky cookie change to a starting response."""
        if scope.closed:
            return
        header = self.header
        if header is not None:
            name = header.lower()
            headers[:] = [h for h in headers if h[0].lower() != name]
            headers.append((header, scope.decision.node.name))
        decision = scope.settled_decision
        if scope.wrote or (decision is not None and decision.drop_cookie):
            # Read on the connection that committed, as it went back to the pool.
            lsn = scope.position if self.wal else None
            path = self.app.config["APPLICATION_ROOT"] or "/"
            # What request.is_secure reads, after any proxy fix-up of the environ.
            secure = environ.get("wsgi.url_scheme") in ("https", "wss")
            update = self.requests.cookie_update(lsn, secure=secure, path=path, scope=scope)
            if update is not None:
                headers.append(("Set-Cookie", update.header_value))
                if self.token_header is not None and update.value is not None:
                    headers.append((self.token_header, update.value))

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


def _dispose_engine(node: Node) -> None:
    # A replica that left DNS, whose connections are all back in its pool.
    node.engine.dispose()


def _primary_position(router: Router) -> Position | None:
    # The primary's current position, on a pooled connection (one round trip).
    with router.primary.engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        return router.backend.read_primary_position(raw)


def probe_replica(node: Node) -> ReplicaProbe:
    """Read a replica's replay position and lag: one round trip on a pooled
    connection, in autocommit (no BEGIN, no ROLLBACK). Its connection is marked so
    that ``Router.cut_off`` leaves it alone: its answer tells when a hung replica is
    back."""
    backend = backend_for(node.engine.dialect.name)
    row = _first_row(node, backend.replica_probe_sql, probe=True)
    if row is None:
        raise RuntimeError(f"The position check of replica '{node.name}' returned no row.")
    return backend.replica_probe(row)


def first_row(node: Node, sql: str) -> tuple[object, ...] | None:
    """The first row of ``sql`` on ``node`` (a catch-up wait), in autocommit. Not
    marked as a probe: a replica that hangs meanwhile has it cut off like a read."""
    return _first_row(node, sql, probe=False)


def _first_row(node: Node, sql: str, *, probe: bool) -> tuple[object, ...] | None:
    # A query that outlived its engine's pool (the app disposed of it meanwhile)
    # closes its connection rather than hand it back to a pool nobody will close.
    engine = node.engine
    pool = engine.pool
    with engine.connect() as conn:
        info = conn.info  # the pooled connection's
        if probe:
            info[PROBE_MARK] = True
        try:
            auto = conn.execution_options(isolation_level="AUTOCOMMIT")
            row = auto.execute(text(sql)).first()
        finally:
            info.pop(PROBE_MARK, None)
            if engine.pool is not pool:
                conn.invalidate()
    return None if row is None else tuple(row)
