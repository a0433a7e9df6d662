"""Async engines from the Flask-SQLAlchemy-style config keys, for Quart apps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from replicated_core.binds import is_shared_primary
from replicated_core.config import DEFAULT_PRIMARY_BIND
from replicated_core.errors import ConfigError

if TYPE_CHECKING:
    from replicated_core.config import DiscoverySpec, ReplicatedConfig

__all__ = ["create_discovered_engine", "create_engines"]


def create_engines(
    config: Mapping[str, Any], engine_options: Mapping[str, Any], replicated: ReplicatedConfig
) -> tuple[dict[str | None, AsyncEngine], dict[str, AsyncEngine]]:
    """One AsyncEngine for ``SQLALCHEMY_DATABASE_URI`` (key None) and one per bind,
    and one per replica of ``REPLICATED_REPLICAS`` and ``REPLICATED_BIND_REPLICAS``
    (by replica name).

    Binds are URLs, or dicts with a ``"url"`` key and engine options, as in
    Flask-SQLAlchemy. ``SQLALCHEMY_ENGINE_OPTIONS`` and ``engine_options`` apply
    to all of them, under a bind's or replica's own options. A primary bind with the
    URL of ``SQLALCHEMY_DATABASE_URI`` is the same engine as key None (one pool), with
    the bind's own options. No connection is opened here.
    """
    uri = config.get("SQLALCHEMY_DATABASE_URI")
    binds = config.get("SQLALCHEMY_BINDS") or {}
    if uri is None and not binds:
        raise ConfigError(
            "'SQLALCHEMY_DATABASE_URI' is not set. Set it to the primary's URL, with an "
            "async driver such as 'postgresql+asyncpg://' or 'sqlite+aiosqlite://'."
        )
    if not isinstance(binds, Mapping):
        raise ConfigError("'SQLALCHEMY_BINDS' must be a dict of bind names to URLs.")
    shared = {**config.get("SQLALCHEMY_ENGINE_OPTIONS", {}), **engine_options}
    specs: dict[str | None, Any] = {None: uri} if uri is not None else {}
    specs.update(binds)
    primary_bind = replicated.primary_bind or DEFAULT_PRIMARY_BIND
    shared_primary = (
        not replicated.replicas
        and replicated.discovery is None
        and uri is not None
        and primary_bind in binds
        and _is_shared_primary(uri, _url_of(binds[primary_bind]))
    )
    if shared_primary:
        # One engine for both keys, made from the bind's spec: its own options win.
        specs[None] = specs.pop(primary_bind)
    engines: dict[str | None, AsyncEngine] = {}
    replicas: dict[str, AsyncEngine] = {}
    try:
        for key, spec in specs.items():
            name = "SQLALCHEMY_DATABASE_URI" if key is None else f"SQLALCHEMY_BINDS['{key}']"
            engines[key] = _create(name, spec, shared)
        if shared_primary:
            engines[primary_bind] = engines[None]
        for replica in replicated.replicas:
            spec = {**replica.options, "url": replica.url}
            replicas[replica.name] = _create(f"REPLICATED_REPLICAS['{replica.name}']", spec, shared)
        for bind_key, bind_specs in replicated.bind_replicas.items():
            for bind_replica in bind_specs:
                spec = {**bind_replica.options, "url": bind_replica.url}
                where = f"REPLICATED_BIND_REPLICAS['{bind_key}']['{bind_replica.name}']"
                replicas[bind_replica.name] = _create(where, spec, shared)
    except ConfigError:
        for engine in (*engines.values(), *replicas.values()):
            engine.sync_engine.dispose()
        raise
    return engines, replicas


def create_discovered_engine(
    config: Mapping[str, Any], engine_options: Mapping[str, Any], spec: DiscoverySpec, url: URL
) -> AsyncEngine:
    """The AsyncEngine of a replica found through DNS at ``url``: the options of every
    engine (``SQLALCHEMY_ENGINE_OPTIONS``, ``engine_options``) under the spec's own."""
    shared = {**config.get("SQLALCHEMY_ENGINE_OPTIONS", {}), **engine_options}
    own = {**spec.engine_options, "url": url}
    return _create("REPLICATED_REPLICA_DISCOVERY", own, shared)


def _url_of(spec: Any) -> Any:
    return spec.get("url") if isinstance(spec, Mapping) else spec


def _is_shared_primary(uri: Any, bind_url: Any) -> bool:
    try:
        return is_shared_primary(make_url(uri), make_url(bind_url))
    except Exception:
        return False  # not URLs: _create says so, naming the key


def _create(name: str, spec: Any, shared: Mapping[str, Any]) -> AsyncEngine:
    options = dict(shared)
    if isinstance(spec, Mapping):
        options.update(spec)
        url = options.pop("url", None)
    else:
        url = spec
    if not isinstance(url, str | URL) or not url:
        raise ConfigError(f"'{name}' must be a database URL.")
    try:
        return create_async_engine(url, **options)
    except Exception as error:
        # The message names the key; the URL is left out, it may hold a password.
        raise ConfigError(
            f"'{name}' cannot be used: {type(error).__name__}. It needs an async "
            "driver, such as 'postgresql+asyncpg://' or 'sqlite+aiosqlite://'."
        ) from None
