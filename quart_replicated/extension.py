"""``QuartReplicated``: the Quart + SQLAlchemy asyncio adapter."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import click
from quart import Quart, Response, current_app, g, request, websocket
from quart.cli import ScriptInfo
from quart.signals import (
    request_started,
    request_tearing_down,
    websocket_started,
    websocket_tearing_down,
)
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from replicated_core.backends import ReplicaProbe, backend_for
from replicated_core.binds import build_bind_nodes, build_nodes
from replicated_core.config import DEFAULTS, load_config, options_to_settings
from replicated_core.cookie import find_cookie
from replicated_core.databases import Databases
from replicated_core.discovery import Discovery, require_dnspython
from replicated_core.failover import lost_connection, with_failover
from replicated_core.prober import TaskProber
from replicated_core.router import Router
from replicated_core.session import RoutingSession
from replicated_core.status import (
    AppStatus,
    ClusterStatus,
    build_status,
    reported_by_the_table,
    status_queries,
)
from replicated_core.sticky import StickyCodec, token_salt

from .engines import create_discovered_engine, create_engines

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from sqlalchemy.engine import URL, Engine
    from sqlalchemy.orm import Session

    from replicated_core.backends import Position
    from replicated_core.config import DiscoverySpec
    from replicated_core.nodes import Node
    from replicated_core.rules import RequestFacts

__all__ = ["QuartReplicated"]

logger = logging.getLogger("replicated")

_SESSION_KEY = "_replicated_session"


@dataclass(slots=True)
class _AppState:
    databases: Databases
    engines: dict[str | None, AsyncEngine]
    by_node: dict[str, AsyncEngine]
    sessions: async_sessionmaker[AsyncSession]
    prober: TaskProber | None = None
    # Each database's prober, by router (the default's is ``prober`` too).
    probers: dict[Router, TaskProber] = field(default_factory=dict)

    @property
    def router(self) -> Router:
        """The default database's router."""
        return self.databases.default

    async def first_row(self, node: Node, sql: str) -> tuple[object, ...] | None:
        """The first row of ``sql`` on ``node`` (a catch-up wait), in autocommit."""
        async with self.by_node[node.name].connect() as conn:
            auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
            row = (await auto.execute(text(sql))).first()
        return None if row is None else tuple(row)

    def discovered_engine(
        self, config: Mapping[str, Any], engine_options: Mapping[str, Any], spec: DiscoverySpec
    ) -> Callable[[str, URL], Engine]:
        """What makes the engine of each replica found through DNS (the sync engine of an
        AsyncEngine, which ``by_node`` then holds)."""

        def make(name: str, url: URL) -> Engine:
            engine = create_discovered_engine(config, engine_options, spec, url)
            self.by_node = {**self.by_node, name: engine}  # a new dict: requests read it
            return engine.sync_engine

        return make

    async def dispose_replica(self, node: Node) -> None:
        """Close the connections of a replica that left DNS, once they are all back."""
        engine = self.by_node.get(node.name)
        if engine is not None:
            await engine.dispose()  # still in by_node if cancelled: dispose() closes it
        self.by_node = {name: e for name, e in self.by_node.items() if name != node.name}

    async def primary_position(self, router: Router) -> Position | None:
        """The current position of ``router``'s primary (one round trip)."""
        backend = router.backend
        async with self.by_node[router.primary.name].connect() as conn:
            try:
                return await conn.run_sync(
                    lambda sync: backend.read_primary_position(sync.connection.dbapi_connection)
                )
            except Exception:
                # Read below SQLAlchemy's error handling, so nothing drops a connection
                # its server ended: back in the pool (asyncpg's rollback there does
                # nothing outside a transaction), it would fail every later call.
                await conn.invalidate()
                raise

    async def probe_replica(self, node: Node) -> ReplicaProbe:
        """Read a replica's replay position and lag: one round trip on a pooled
        connection, in autocommit (no BEGIN, no ROLLBACK)."""
        backend = backend_for(node.engine.dialect.name)
        async with self.by_node[node.name].connect() as conn:
            auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
            row = (await auto.execute(text(backend.replica_probe_sql))).one()
        return backend.replica_probe(tuple(row))


def _router_of_session(session: Session) -> Router | None:
    router = getattr(session, "router", None)
    return router if isinstance(router, Router) else None


def _sticky_cookie(headers: list[str], name: str) -> str | None:
    # HTTP/2 clients may split cookies over several headers, as Werkzeug knows.
    return find_cookie(";".join(headers), name) if headers else None


class QuartReplicated:
    """Routes a Quart app's reads to replicas and its writes to the primary.

    ``rep = QuartReplicated(app)`` (or ``init_app``) creates the async engines from
    ``SQLALCHEMY_DATABASE_URI`` and ``SQLALCHEMY_BINDS`` and hands out
    ``rep.session``, one AsyncSession per app context. Keyword options are defaults
    for the app's ``REPLICATED_*`` keys; ``session_options`` go to the AsyncSession
    (``expire_on_commit`` defaults to False, as SQLAlchemy advises for asyncio) and
    ``engine_options`` to every engine.
    """

    def __init__(
        self,
        app: Quart | None = None,
        *,
        session_options: dict[str, Any] | None = None,
        engine_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        self._settings = options_to_settings(options)
        self._session_options = {"expire_on_commit": False, **(session_options or {})}
        self._engine_options = engine_options or {}
        self._apps: WeakKeyDictionary[Quart, _AppState] = WeakKeyDictionary()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Quart) -> None:
        """Read the app's config once, check it, create the engines, hook the app.

        Raises ``ConfigError`` naming the key for bad config, and RuntimeError when
        the app has a router already. Engines are disposed when the app stops serving.
        """
        if "replicated" in app.extensions:
            raise RuntimeError("QuartReplicated is already set up on this app.")
        for key, value in {**DEFAULTS, **self._settings}.items():
            app.config.setdefault(key, value)
        config = load_config(app.config)
        if config.discovery is not None:
            require_dnspython()
            # Made (and disposed of) once here, so that bad options fail at start-up.
            spec = config.discovery
            create_discovered_engine(
                app.config, self._engine_options, spec, spec.url
            ).sync_engine.dispose()
        engines, replica_engines = create_engines(app.config, self._engine_options, config)
        default = engines.get(None)
        binds = {key: e.sync_engine for key, e in engines.items() if key is not None}
        sync_replicas = {name: e.sync_engine for name, e in replica_engines.items()}
        try:
            primary, replicas = build_nodes(
                config, binds, default.sync_engine if default is not None else None, sync_replicas
            )
            nodes: dict[str | None, tuple[Node, list[Node]]] = {None: (primary, replicas)}
            nodes.update(build_bind_nodes(config, binds, primary, sync_replicas))
        except Exception:
            for engine in (*engines.values(), *replica_engines.values()):
                engine.sync_engine.dispose()
            raise

        def codec() -> StickyCodec | None:
            if not app.secret_key:
                return None
            return StickyCodec(
                app.secret_key,
                salt=token_salt(config.cookie_name),
                fallbacks=app.config.get("SECRET_KEY_FALLBACKS"),
            )

        databases = Databases.build(config, nodes, codec, name=app.name)
        router = databases.default
        by_sync = {id(e.sync_engine): e for e in (*engines.values(), *replica_engines.values())}
        by_node = {
            n.name: by_sync[id(n.engine)]
            for each in databases
            for n in (each.primary, *each.replicas)
        }
        routed = {key: each for key, each in databases.routers.items() if key is not None}
        other = {k: e for k, e in binds.items() if k not in by_node and k not in routed}
        session_class = with_failover(RoutingSession, _router_of_session)
        for each in databases:
            if each.balanced is not None:
                # Sticky reads on a replica behind one address: checked on the
                # connection the session begins its transaction on.
                each.balanced.listen(session_class)
        sessions = async_sessionmaker(
            sync_session_class=session_class,
            router=router,
            bind_engines=other,
            routers=routed,
            **self._session_options,
        )
        state = _AppState(databases, engines, by_node, sessions)
        for each in databases:
            if each.health.probing:
                state.probers[each] = each.prober = TaskProber(each.health, state.probe_replica)
            if each.catch_up is not None:
                each.catch_up.run_async = state.first_row
        state.prober = state.probers.get(router)
        if config.discovery is not None:
            # The default database's replicas (the only ones DNS can give).
            discovery = Discovery(
                config.discovery,
                router,
                state.discovered_engine(app.config, self._engine_options, config.discovery),
                dispose_async=state.dispose_replica,
            )
            router.discovery = discovery
            if state.prober is not None:
                state.prober.discovery = discovery
            discovery.refresh()  # the first requests find the replicas there now
        self._apps[app] = state
        app.extensions["replicated"] = self
        _hook(app, state)
        app.cli.add_command(self._cli())
        app.teardown_appcontext(_close_session)
        app.after_serving(self._dispose)

    # -- public ------------------------------------------------------------------

    @property
    def session(self) -> AsyncSession:
        """The AsyncSession of the current app context (request, app_context, CLI).

        Created on first use, closed when the context ends; never shared between
        concurrent requests. Requires an app context.
        """
        session: AsyncSession | None = g.get(_SESSION_KEY)
        if session is None:
            session = self._state().sessions()
            setattr(g, _SESSION_KEY, session)
        return session

    @property
    def engine(self) -> AsyncEngine:
        """The primary's AsyncEngine for the current app."""
        state = self._state()
        return state.by_node[state.router.primary.name]

    def get_engine(self) -> AsyncEngine:
        """The AsyncEngine the current intent routes to (primary or a replica)."""
        state = self._state()
        return state.by_node[state.router.node().name]

    @property
    def engines(self) -> dict[str | None, AsyncEngine]:
        """Every AsyncEngine of the current app by bind key (None: the default URI)."""
        return dict(self._state().engines)

    def router(self, app: Quart | None = None, *, bind_key: str | None = None) -> Router:
        """The router of ``app`` (default: the current app) for the database of
        ``bind_key`` (default: the default database)."""
        return self._state(app).databases.router(bind_key)

    def databases(self, app: Quart | None = None) -> Databases:
        """Every routed database of ``app`` (default: the current app)."""
        return self._state(app).databases

    def counters(self, app: Quart | None = None) -> dict[str, int]:
        """Per-process counters of ``app`` (default: the current app), by name."""
        return self.router(app).metrics()

    async def consistency_token(self, app: Quart | None = None) -> str:
        """A token that covers everything committed so far, for a job to read with
        ``use_replica(after=token)``: inside a request that wrote, its writes; otherwise
        the primary's current position, read on a pooled connection (one round trip).
        Where positions cannot be read (SQLite), a token that keeps its holder on the
        primary for the sticky time. Needs SECRET_KEY.

        With several databases: the positions of the databases this request wrote
        (a time entry for one whose position was not read, as in the cookie), or
        else of every database's primary (one round trip each)."""
        state = self._state(app)
        databases = state.databases
        if not databases.several:
            router = state.router
            scope = router.requests.scope()
            position = scope.position if scope is not None else None
            if position is None and router.backend.has_positions:
                position = await state.primary_position(router)
            return router.token_for(position)
        positions = databases.written()
        if not positions:
            for each in databases:
                has = each.backend.has_positions
                positions[each] = await state.primary_position(each) if has else None
        return databases.token_for(positions)

    async def status(
        self, app: Quart | None = None, *, bind_key: str | None = None
    ) -> ClusterStatus:
        """Ask every node of a database (default: the default database) how it is (one
        query each); what ``quart replicated status`` shows for it."""
        state = self._state(app)
        router = state.databases.router(bind_key)
        results: dict[str, tuple[object, ...] | BaseException] = {}
        for name, sql in status_queries(router).items():
            try:
                async with state.by_node[name].connect() as conn:
                    results[name] = tuple((await conn.execute(text(sql))).one())
            except Exception as error:
                results[name] = error
        return build_status(router, results)

    def _cli(self) -> click.Group:
        group = click.Group("replicated", help="Primary/replica routing tools.")

        @group.command("status")
        @click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
        @click.pass_context
        def status(ctx: click.Context, as_json: bool) -> None:
            """Show every node: reachable, in recovery, lag, usable. Exits 1 when the
            primary is unreachable or no replica is usable."""
            app = ctx.ensure_object(ScriptInfo).load_app()

            async def run() -> ClusterStatus | AppStatus:
                databases = self.databases(app)
                try:
                    reports = [
                        (databases.label(each), await self.status(app, bind_key=key))
                        for key, each in databases.routers.items()
                    ]
                finally:
                    await self.dispose(app)
                return reports[0][1] if len(reports) == 1 else AppStatus(tuple(reports))

            with reported_by_the_table():
                report = asyncio.run(run())
            click.echo(report.to_json() if as_json else report.to_table())
            if not report.healthy:
                raise SystemExit(1)

        return group

    def _state(self, app: Quart | None = None) -> _AppState:
        target = app if app is not None else current_app._get_current_object()  # type: ignore[attr-defined]
        return self._apps[target]

    async def _dispose(self) -> None:
        await self.dispose()

    async def dispose(self, app: Quart | None = None) -> None:
        """Close every pooled connection of ``app``'s engines (default: current app).

        Runs on ``after_serving``; call it at the end of a CLI command's
        ``asyncio.run``, whose event loop the pooled connections belong to. Stops the
        position prober first (the next request starts it again).
        """
        state = self._state(app)
        for prober in state.probers.values():
            await prober.stop()
        engines = (*state.engines.values(), *state.by_node.values())
        for engine in {id(e): e for e in engines}.values():
            await engine.dispose()


# -- hooks, in request order; all async: a sync hook's contextvars are lost --------
#
# Plain functions over the app's state, not bound methods: Quart and blinker check
# every hook with ``inspect.iscoroutinefunction`` on every request, which unwraps a
# method first, and the state is then at hand without a lookup by app.


def _hook(app: Quart, state: _AppState) -> None:
    """Connect the per-request hooks of ``app``."""
    if state.databases.several:
        _hook_several(app, state)
        return
    router = state.router
    requests = router.requests
    cookie_name = router.config.cookie_name
    debug_header = router.config.debug_header
    token_header = router.config.token_header
    prober = state.prober

    async def request_started_(sender: Quart, **extra: Any) -> None:
        req = request._get_current_object()  # type: ignore[attr-defined]
        endpoint = req.endpoint
        view = sender.view_functions.get(endpoint) if endpoint is not None else None
        facts = requests.facts(req.method, endpoint, view)
        if prober is not None and requests.needs_positions(facts):
            await prober.ensure()
        headers = req.headers
        cookie = _sticky_cookie(headers.getlist("Cookie"), cookie_name)
        token = headers.get(token_header) if token_header is not None else None
        if cookie is not None or token is not None:
            await requests.wait_for_replica(facts, cookie, token)
        requests.begin(facts, cookie, token)

    async def websocket_started_(sender: Quart, **extra: Any) -> None:
        endpoint = websocket.endpoint
        view = sender.view_functions.get(endpoint) if endpoint is not None else None
        facts = requests.facts("WEBSOCKET", endpoint, view, websocket=True)
        if prober is not None and requests.needs_positions(facts):
            await prober.ensure()
        headers = websocket.headers
        cookie = _sticky_cookie(headers.getlist("Cookie"), cookie_name)
        token = headers.get(token_header) if token_header is not None else None
        if cookie is not None or token is not None:
            await requests.wait_for_replica(facts, cookie, token)
        requests.begin(facts, cookie, token)

    async def after_request(response: Response) -> Response:
        scope = requests.scope()
        if scope is None:
            return response
        # The last moment a write can still set the cookie.
        scope.answered = True
        if debug_header is not None:
            response.headers[debug_header] = scope.decision.node.name
        if scope.wrote or scope.decision.drop_cookie:
            # Read on the connection that committed, as it went back to the pool.
            lsn = scope.position if requests.needs_write_position(scope) else None
            path = current_app.config["APPLICATION_ROOT"] or "/"
            update = requests.cookie_update(lsn, secure=request.is_secure, path=path, scope=scope)
            if update is not None:
                update.apply(response)
                if token_header is not None and update.value is not None:
                    response.headers[token_header] = update.value
        return response

    async def tearing_down(sender: Quart, **extra: Any) -> None:
        requests.end()

    request_started.connect(request_started_, app, weak=False)
    websocket_started.connect(websocket_started_, app, weak=False)
    app.after_request(after_request)
    request_tearing_down.connect(tearing_down, app, weak=False)
    websocket_tearing_down.connect(tearing_down, app, weak=False)


def _hook_several(app: Quart, state: _AppState) -> None:
    """``_hook`` for an app with several routed databases: a scope for each, all
    decided as the request starts, and one cookie for all."""
    databases = state.databases
    default = databases.default
    config = default.config
    cookie_name = config.cookie_name
    debug_header = config.debug_header
    token_header = config.token_header
    each = [(router.requests, state.probers.get(router)) for router in databases]

    async def begin(facts: RequestFacts, cookie: str | None, token: str | None) -> None:
        for requests, prober in each:
            if prober is not None and requests.needs_positions(facts):
                await prober.ensure()
        if cookie is not None or token is not None:
            # Each database's short wait for a replica, at once: at most one timeout.
            await asyncio.gather(
                *(requests.wait_for_replica(facts, cookie, token) for requests, _ in each)
            )
        for requests, _ in each:
            requests.begin(facts, cookie, token)

    async def request_started_(sender: Quart, **extra: Any) -> None:
        req = request._get_current_object()  # type: ignore[attr-defined]
        endpoint = req.endpoint
        view = sender.view_functions.get(endpoint) if endpoint is not None else None
        facts = default.requests.facts(req.method, endpoint, view)
        headers = req.headers
        cookie = _sticky_cookie(headers.getlist("Cookie"), cookie_name)
        token = headers.get(token_header) if token_header is not None else None
        await begin(facts, cookie, token)

    async def websocket_started_(sender: Quart, **extra: Any) -> None:
        endpoint = websocket.endpoint
        view = sender.view_functions.get(endpoint) if endpoint is not None else None
        facts = default.requests.facts("WEBSOCKET", endpoint, view, websocket=True)
        headers = websocket.headers
        cookie = _sticky_cookie(headers.getlist("Cookie"), cookie_name)
        token = headers.get(token_header) if token_header is not None else None
        await begin(facts, cookie, token)

    async def after_request(response: Response) -> Response:
        found = databases.current_scopes()
        scopes = [scope for scope in found if scope is not None]
        if len(scopes) != len(found):
            return response
        # The last moment a write can still set the cookie.
        for scope in scopes:
            scope.answered = True
        if debug_header is not None:
            response.headers[debug_header] = databases.describe(scopes)
        if databases.touched(scopes):
            headers = request.headers
            cookie = _sticky_cookie(headers.getlist("Cookie"), cookie_name)
            token = headers.get(token_header) if token_header is not None else None
            path = current_app.config["APPLICATION_ROOT"] or "/"
            update = databases.cookie_update(
                scopes, cookie, token, secure=request.is_secure, path=path
            )
            if update is not None:
                update.apply(response)
                if token_header is not None and update.value is not None:
                    response.headers[token_header] = update.value
        return response

    async def tearing_down(sender: Quart, **extra: Any) -> None:
        for requests, _ in reversed(each):
            requests.end()

    request_started.connect(request_started_, app, weak=False)
    websocket_started.connect(websocket_started_, app, weak=False)
    app.after_request(after_request)
    request_tearing_down.connect(tearing_down, app, weak=False)
    websocket_tearing_down.connect(tearing_down, app, weak=False)


async def _close_session(exc: BaseException | None) -> None:
    session: AsyncSession | None = g.pop(_SESSION_KEY, None)
    if session is None:
        return
    try:
        await session.close()
    except Exception as error:
        if not lost_connection(error):
            raise
        logger.debug("A connection died after its request's work: %s", error.__class__)
