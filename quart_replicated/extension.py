"""``QuartReplicated``: the Quart + SQLAlchemy asyncio adapter."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
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
from replicated_core.binds import build_nodes
from replicated_core.config import DEFAULTS, load_config, options_to_settings
from replicated_core.cookie import find_cookie
from replicated_core.failover import lost_connection, with_failover
from replicated_core.prober import TaskProber
from replicated_core.router import Router
from replicated_core.session import RoutingSession
from replicated_core.status import (
    ClusterStatus,
    build_status,
    reported_by_the_table,
    status_queries,
)
from replicated_core.sticky import StickyCodec, token_salt

from .engines import create_engines

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from replicated_core.nodes import Node

__all__ = ["QuartReplicated"]

logger = logging.getLogger("replicated")

_SESSION_KEY = "_replicated_session"


@dataclass(slots=True)
class _AppState:
    router: Router
    engines: dict[str | None, AsyncEngine]
    by_node: dict[str, AsyncEngine]
    sessions: async_sessionmaker[AsyncSession]
    prober: TaskProber | None = None

    async def first_row(self, node: Node, sql: str) -> tuple[object, ...] | None:
        """The first row of ``sql`` on ``node`` (a catch-up wait), in autocommit."""
        async with self.by_node[node.name].connect() as conn:
            auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
            row = (await auto.execute(text(sql))).first()
        return None if row is None else tuple(row)

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
        engines, replica_engines = create_engines(app.config, self._engine_options, config)
        default = engines.get(None)
        binds = {key: e.sync_engine for key, e in engines.items() if key is not None}
        try:
            primary, replicas = build_nodes(
                config,
                binds,
                default.sync_engine if default is not None else None,
                {name: e.sync_engine for name, e in replica_engines.items()},
            )
        except Exception:
            for engine in (*engines.values(), *replica_engines.values()):
                engine.sync_engine.dispose()
            raise
        codec = (
            StickyCodec(
                app.secret_key,
                salt=token_salt(config.cookie_name),
                fallbacks=app.config.get("SECRET_KEY_FALLBACKS"),
            )
            if app.secret_key
            else None
        )
        router = Router(config, primary, replicas, codec, name=app.name)
        by_sync = {id(e.sync_engine): e for e in (*engines.values(), *replica_engines.values())}
        by_node = {n.name: by_sync[id(n.engine)] for n in (primary, *replicas)}
        other = {k: e for k, e in binds.items() if k not in by_node}
        session_class = with_failover(RoutingSession, _router_of_session)
        if router.balanced is not None:
            # Sticky reads on a replica behind one address: checked on the connection
            # the session begins its transaction on.
            router.balanced.listen(session_class)
        sessions = async_sessionmaker(
            sync_session_class=session_class,
            router=router,
            bind_engines=other,
            **self._session_options,
        )
        state = _AppState(router, engines, by_node, sessions)
        if router.health.probing:
            state.prober = router.prober = TaskProber(router.health, state.probe_replica)
        if router.catch_up is not None:
            router.catch_up.run_async = state.first_row
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

    def router(self, app: Quart | None = None) -> Router:
        """The router of ``app`` (default: the current app)."""
        return self._state(app).router

    def counters(self, app: Quart | None = None) -> dict[str, int]:
        """Per-process counters of ``app`` (default: the current app), by name."""
        return self.router(app).metrics()

    async def consistency_token(self, app: Quart | None = None) -> str:
        """A token that covers everything committed so far, for a job to read with
        ``use_replica(after=token)``: inside a request that wrote, its writes; otherwise
        the primary's current position, read on a pooled connection (one round trip).
        Where positions cannot be read (SQLite), a token that keeps its holder on the
        primary for the sticky time. Needs SECRET_KEY."""
        state = self._state(app)
        router = state.router
        scope = router.requests.scope()
        position = scope.position if scope is not None else None
        if position is None and router.backend.has_positions:
            backend = router.backend
            async with state.by_node[router.primary.name].connect() as conn:
                position = await conn.run_sync(
                    lambda sync: backend.read_primary_position(sync.connection.dbapi_connection)
                )
        return router.token_for(position)

    async def status(self, app: Quart | None = None) -> ClusterStatus:
        """Ask every node how it is (one query each); what ``quart replicated status`` shows."""
        state = self._state(app)
        results: dict[str, tuple[object, ...] | BaseException] = {}
        for name, sql in status_queries(state.router).items():
            try:
                async with state.by_node[name].connect() as conn:
                    results[name] = tuple((await conn.execute(text(sql))).one())
            except Exception as error:
                results[name] = error
        return build_status(state.router, results)

    def _cli(self) -> click.Group:
        group = click.Group("replicated", help="Primary/replica routing tools.")

        @group.command("status")
        @click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
        @click.pass_context
        def status(ctx: click.Context, as_json: bool) -> None:
            """Show every node: reachable, in recovery, lag, usable. Exits 1 when the
            primary is unreachable or no replica is usable."""
            app = ctx.ensure_object(ScriptInfo).load_app()

            async def run() -> ClusterStatus:
                try:
                    return await self.status(app)
                finally:
                    await self.dispose(app)

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
        if state.prober is not None:
            await state.prober.stop()
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
