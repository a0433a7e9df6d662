"""Async engines from the Flask-SQLAlchemy-style config keys, for Quart apps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from replicated_core.errors import ConfigError

__all__ = ["create_engines"]


def create_engines(
    config: Mapping[str, Any], engine_options: Mapping[str, Any]
) -> dict[str | None, AsyncEngine]:
    """One AsyncEngine for ``SQLALCHEMY_DATABASE_URI`` (key None) and one per bind.

    Binds are URLs, or dicts with a ``"url"`` key and engine options, as in
    Flask-SQLAlchemy. ``SQLALCHEMY_ENGINE_OPTIONS`` and ``engine_options`` apply
    to all of them. No connection is opened here.
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
    engines: dict[str | None, AsyncEngine] = {}
    for key, spec in specs.items():
        options = dict(shared)
        if isinstance(spec, Mapping):
            options.update(spec)
            url = options.pop("url", None)
        else:
            url = spec
        name = "SQLALCHEMY_DATABASE_URI" if key is None else f"SQLALCHEMY_BINDS['{key}']"
        if not isinstance(url, str) or not url:
            raise ConfigError(f"'{name}' must be a database URL.")
        try:
            engines[key] = create_async_engine(url, **options)
        except Exception as error:
            for engine in engines.values():
                engine.sync_engine.dispose()
            # The message names the key; the URL is left out, it may hold a password.
            raise ConfigError(
                f"'{name}' cannot be used: {type(error).__name__}. It needs an async "
                "driver, such as 'postgresql+asyncpg://' or 'sqlite+aiosqlite://'."
            ) from None
    return engines
