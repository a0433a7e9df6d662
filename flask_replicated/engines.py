"""The engines a Flask app's routers use: made the way Flask-SQLAlchemy makes them,
with ``SQLALCHEMY_ENGINE_OPTIONS``, and the routed ones (the default, and each bind
of ``REPLICATED_BIND_REPLICAS``) asking their routers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import URL, Engine

from replicated_core.binds import engine_error, is_shared_primary
from replicated_core.config import DEFAULT_PRIMARY_BIND
from replicated_core.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy

    from replicated_core.config import DiscoverySpec, ReplicatedConfig
    from replicated_core.databases import Databases
    from replicated_core.router import Router

    EngineFactory = Callable[[str, URL], Engine]

__all__ = ["RoutedEngines", "discovered_engines", "install_routed_engines", "prepare_engines"]


class RoutedEngines(dict[str | None, Engine]):
    """``db.engines`` for one app, whose default (``None``) key asks the router, and
    each routed bind key its database's router.

    Flask-SQLAlchemy documents that ``db.session``, ``db.engine`` and
    ``db.get_engine()`` all use ``db.engines[None]`` for models without a bind key,
    and ``db.engines[key]`` for a model's ``__bind_key__``, so routing those entries
    routes all of them. Bind keys that are not routed keep their engine.
    """

    def __init__(
        self,
        engines: Mapping[str | None, Engine],
        router: Router,
        routers: Mapping[str, Router] | None = None,
    ) -> None:
        super().__init__(engines)
        self.router = router
        self.routers = dict(routers or {})

    def __getitem__(self, key: str | None) -> Engine:
        if key is None:
            return self.router.node().engine
        router = self.routers.get(key)
        if router is not None:
            return router.node().engine
        return dict.__getitem__(self, key)


# Flask-SQLAlchemy 3.1 gives SQLALCHEMY_ENGINE_OPTIONS to the default engine only and
# has no public way to make one more engine the way it makes its own, nor to change
# an app's engines. The private names it uses for that are touched in this module
# only, so that a new Flask-SQLAlchemy version breaks one place: `_app_engines` (the
# app's engines), `_engine_options` (the `engine_options` given to SQLAlchemy()),
# `_apply_driver_defaults` and `_make_engine` (what its `init_app` calls for each
# engine: SQLite paths in the instance folder, in-memory pools, MySQL charset, and a
# subclass's own `_make_engine`), and `record_queries._listen` (SQLALCHEMY_RECORD_QUERIES).


def prepare_engines(
    db: SQLAlchemy, app: Flask, config: ReplicatedConfig
) -> tuple[dict[str | None, Engine], dict[str, Engine]]:
    """Make the engines the router routes; return the app's engines and the replicas'.

    The primary and every replica get ``SQLALCHEMY_ENGINE_OPTIONS`` (under
    Flask-SQLAlchemy's ``engine_options``, over which a bind's own dict in
    ``SQLALCHEMY_BINDS`` or ``REPLICATED_REPLICAS`` wins). A primary bind with the URL
    of ``SQLALCHEMY_DATABASE_URI`` becomes that same engine: one pool serves the
    primary. Other binds keep the engines Flask-SQLAlchemy made. Engines replaced
    here are disposed; none had been used unless the app used them before
    ``init_app``. Replicas given by URL are not added to ``db.engines``: the app's
    binds, metadata and migrations see one database.
    """
    maker = _EngineMaker(db, app)
    engines = maker.engines
    default = engines.get(None)
    replica_engines: dict[str, Engine] = {}
    try:
        for key, specs in config.bind_replicas.items():
            for spec in specs:
                where = f"REPLICATED_BIND_REPLICAS['{key}']['{spec.name}']"
                replica_engines[spec.name] = maker.replica(where, spec.name, spec.url, spec.options)
        if config.replicas and default is not None:  # else build_nodes says what is missing
            for spec in config.replicas:
                where = f"REPLICATED_REPLICAS['{spec.name}']"
                replica_engines[spec.name] = maker.replica(where, spec.name, spec.url, spec.options)
    except ConfigError:
        for engine in replica_engines.values():
            engine.dispose()
        raise
    for key in config.bind_replicas:
        if key in engines:  # else build_bind_nodes names the missing bind
            maker.remake(key)
    if config.replicas or config.discovery is not None:
        return engines, replica_engines
    name = config.primary_bind or DEFAULT_PRIMARY_BIND
    if name in engines:
        _, own = maker.bind_spec(name)
        if default is not None and is_shared_primary(default.url, engines[name].url):
            primary = default
            if own:
                primary = maker.make(None, app.config["SQLALCHEMY_DATABASE_URI"], own)
                default.dispose()
            engines[name].dispose()
            engines[None] = engines[name] = primary
        else:
            maker.remake(name)
    for name in config.replica_binds:
        if name in engines:
            maker.remake(name)
    return engines, replica_engines


def discovered_engines(db: SQLAlchemy, app: Flask, spec: DiscoverySpec) -> EngineFactory:
    """What makes the engine of each replica found through DNS: as the replicas given by
    URL, with ``SQLALCHEMY_ENGINE_OPTIONS`` under the spec's ``engine_options``. One
    engine is made (and disposed of) here, so that bad options fail at start-up."""
    maker = _EngineMaker(db, app)
    options = dict(spec.engine_options)
    try:
        maker.make(None, spec.url, options).dispose()
    except Exception as error:
        raise engine_error("REPLICATED_REPLICA_DISCOVERY", error, options) from None

    def make(name: str, url: URL) -> Engine:
        return maker.make(name, url, options)

    return make


def install_routed_engines(db: SQLAlchemy, app: Flask, databases: Databases) -> None:
    """Make the app's ``db.engines[None]`` (so ``db.session``, ``db.engine``) ask the
    default database's router, and ``db.engines[key]`` of each routed bind its own."""
    routers = {key: router for key, router in databases.routers.items() if key is not None}
    db._app_engines[app] = RoutedEngines(db._app_engines[app], databases.default, routers)


class _EngineMaker:
    """Makes one app's engines as Flask-SQLAlchemy's ``init_app`` does."""

    def __init__(self, db: SQLAlchemy, app: Flask) -> None:
        self.db = db
        self.app = app
        self.engines: dict[str | None, Engine] = db._app_engines[app]
        self.config_options: Mapping[str, Any] = app.config.get("SQLALCHEMY_ENGINE_OPTIONS") or {}
        self.shared = {**db._engine_options, **self.config_options}
        self.binds: Mapping[str, Any] = app.config.get("SQLALCHEMY_BINDS") or {}

    def bind_spec(self, name: str) -> tuple[str | URL, dict[str, Any]]:
        """A bind's URL and its own engine options (its dict form, less the URL)."""
        spec = self.binds[name]
        if isinstance(spec, Mapping):
            own = dict(spec)
            return own.pop("url"), own
        return spec, {}

    def remake(self, name: str) -> None:
        """Make bind ``name``'s engine again with the shared options, if it lacks some."""
        url, own = self.bind_spec(name)
        if all(key in own for key in self.config_options):
            return  # Flask-SQLAlchemy made it with the same options
        old = self.engines[name]
        self.engines[name] = self.make(name, url, own)
        old.dispose()

    def replica(self, where: str, name: str, url: str | URL, own: Mapping[str, Any]) -> Engine:
        """A replica's engine (``make``); a ConfigError naming ``where``, its config
        key, if its options are wrong."""
        try:
            return self.make(name, url, own)
        except Exception as error:
            raise engine_error(where, error, own) from None

    def make(self, key: str | None, url: str | URL, own: Mapping[str, Any]) -> Engine:
        """An engine for ``url``: the shared options, then ``own``, then the driver
        defaults, the way Flask-SQLAlchemy's ``init_app`` makes each of its engines."""
        options: dict[str, Any] = {**self.shared, **own, "url": url}
        echo = self.app.config.get("SQLALCHEMY_ECHO", False)
        options.setdefault("echo", echo)
        options.setdefault("echo_pool", echo)
        self.db._apply_driver_defaults(options, self.app)
        engine = self.db._make_engine(key, options, self.app)
        if self.app.config.get("SQLALCHEMY_RECORD_QUERIES", False):
            from flask_sqlalchemy import record_queries

            record_queries._listen(engine)
        return engine
