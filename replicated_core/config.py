"""The ``REPLICATED_*`` settings: defaults, validation, and one typed object."""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["DEFAULTS", "ReplicatedConfig", "StickyMode", "load_config"]

PREFIX = "REPLICATED_"


class StickyMode(enum.Enum):
    """How a client's reads follow its own writes across requests."""

    AUTO = "auto"
    WAL = "wal"
    TIME = "time"
    OFF = "off"

    def resolve(self, primary_is_postgresql: bool) -> StickyMode:
        """The mode in force: ``auto`` is ``wal`` on PostgreSQL and ``time`` elsewhere."""
        if self is StickyMode.AUTO:
            return StickyMode.WAL if primary_is_postgresql else StickyMode.TIME
        return self


DEFAULT_STICKY_SECONDS = {StickyMode.TIME: 5.0, StickyMode.WAL: 30.0, StickyMode.OFF: 0.0}

DEFAULTS: Mapping[str, object] = {
    "REPLICATED_PRIMARY_BIND": "master",
    "REPLICATED_REPLICA_BINDS": ["slave"],
    "REPLICATED_READONLY_METHODS": ["GET", "HEAD"],
    "REPLICATED_STICKY_MODE": "auto",
    "REPLICATED_STICKY_SECONDS": None,
    "REPLICATED_COOKIE_NAME": "replicated_sticky",
    "REPLICATED_CHECK_INTERVAL": 0.1,
    "REPLICATED_MAX_LAG": 30.0,
    "REPLICATED_REPLICA_DOWNTIME": 30.0,
    "REPLICATED_CONNECT_TIMEOUT": 2.0,
    "REPLICATED_WEBSOCKET_READONLY": False,
    "REPLICATED_DEBUG_HEADER": None,
}

# RFC 6265 cookie-name token: visible ASCII except separators.
_COOKIE_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HEADER_NAME = _COOKIE_NAME


@dataclass(frozen=True, slots=True)
class ReplicatedConfig:
    """Validated settings. Build it with ``load_config``."""

    primary_bind: str
    replica_binds: tuple[str, ...]
    readonly_methods: frozenset[str]
    sticky_mode: StickyMode
    sticky_seconds: float | None
    cookie_name: str
    check_interval: float
    max_lag: float
    replica_downtime: float
    connect_timeout: float
    websocket_readonly: bool
    debug_header: str | None

    def sticky_ttl(self, mode: StickyMode) -> float:
        """Seconds a client stays sticky after a write in ``mode`` (a resolved mode)."""
        if self.sticky_seconds is not None:
            return self.sticky_seconds
        return DEFAULT_STICKY_SECONDS[mode]


def load_config(settings: Mapping[str, object]) -> ReplicatedConfig:
    """Validate the ``REPLICATED_*`` keys of ``settings``, filling in the defaults.

    Raises ``ConfigError`` with a sentence naming the key for an unknown key, a wrong
    type or an impossible value. Bind names are checked later, against the binds.
    """
    unknown = sorted(k for k in settings if k.startswith(PREFIX) and k not in DEFAULTS)
    if unknown:
        known = ", ".join(sorted(DEFAULTS))
        raise ConfigError(f"Unknown setting '{unknown[0]}'. The known settings are: {known}.")
    value = {**DEFAULTS, **{k: v for k, v in settings.items() if k in DEFAULTS}}
    sticky_mode = _enum("REPLICATED_STICKY_MODE", value, StickyMode)
    sticky_seconds = value["REPLICATED_STICKY_SECONDS"]
    return ReplicatedConfig(
        primary_bind=_name("REPLICATED_PRIMARY_BIND", value["REPLICATED_PRIMARY_BIND"]),
        replica_binds=_names("REPLICATED_REPLICA_BINDS", value["REPLICATED_REPLICA_BINDS"]),
        readonly_methods=_methods(value["REPLICATED_READONLY_METHODS"]),
        sticky_mode=sticky_mode,
        sticky_seconds=None
        if sticky_seconds is None
        else _seconds("REPLICATED_STICKY_SECONDS", sticky_seconds),
        cookie_name=_token("REPLICATED_COOKIE_NAME", value["REPLICATED_COOKIE_NAME"]),
        check_interval=_seconds("REPLICATED_CHECK_INTERVAL", value["REPLICATED_CHECK_INTERVAL"]),
        max_lag=_seconds("REPLICATED_MAX_LAG", value["REPLICATED_MAX_LAG"]),
        replica_downtime=_seconds(
            "REPLICATED_REPLICA_DOWNTIME", value["REPLICATED_REPLICA_DOWNTIME"]
        ),
        connect_timeout=_seconds("REPLICATED_CONNECT_TIMEOUT", value["REPLICATED_CONNECT_TIMEOUT"]),
        websocket_readonly=_bool("REPLICATED_WEBSOCKET_READONLY", value),
        debug_header=None
        if value["REPLICATED_DEBUG_HEADER"] is None
        else _token("REPLICATED_DEBUG_HEADER", value["REPLICATED_DEBUG_HEADER"]),
    )


def options_to_settings(options: Mapping[str, object]) -> dict[str, object]:
    """Turn extension keyword options (``sticky_mode="wal"``) into ``REPLICATED_*`` keys."""
    settings = {PREFIX + name.upper(): v for name, v in options.items()}
    unknown = sorted(k for k in settings if k not in DEFAULTS)
    if unknown:
        names = ", ".join(sorted(k.removeprefix(PREFIX).lower() for k in DEFAULTS))
        bad = unknown[0].removeprefix(PREFIX).lower()
        raise ConfigError(f"Unknown option '{bad}'. The known options are: {names}.")
    return settings


def _name(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"'{key}' must be the name of a bind in SQLALCHEMY_BINDS, got {value!r}.")
    return value


def _names(key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigError(
            f"'{key}' must be a list of bind names from SQLALCHEMY_BINDS, got {value!r}."
        )
    names = tuple(value)
    if not names:
        raise ConfigError(
            f"'{key}' is empty. Name at least one replica bind from SQLALCHEMY_BINDS."
        )
    for name in names:
        _name(key, name)
    if len(set(names)) != len(names):
        raise ConfigError(f"'{key}' names a bind twice: {list(names)!r}.")
    return names


def _methods(value: object) -> frozenset[str]:
    key = "REPLICATED_READONLY_METHODS"
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigError(f"'{key}' must be a list of HTTP methods such as ['GET', 'HEAD'].")
    methods = list(value)
    for method in methods:
        if not isinstance(method, str) or not method.isalpha():
            raise ConfigError(f"'{key}' must hold HTTP method names, got {method!r}.")
    return frozenset(m.upper() for m in methods)


def _enum(key: str, value: Mapping[str, object], kind: type[StickyMode]) -> StickyMode:
    raw = value[key]
    try:
        return kind(raw)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in kind)
        raise ConfigError(f"'{key}' must be one of {choices}, got {raw!r}.") from None


def _seconds(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"'{key}' must be a number of seconds, got {value!r}.")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"'{key}' must be a positive number of seconds, got {value!r}.")
    return seconds


def _bool(key: str, value: Mapping[str, object]) -> bool:
    raw = value[key]
    if not isinstance(raw, bool):
        raise ConfigError(f"'{key}' must be True or False, got {raw!r}.")
    return raw


def _token(key: str, value: object) -> str:
    if not isinstance(value, str) or not _COOKIE_NAME.match(value):
        raise ConfigError(
            f"'{key}' must be a non-empty name of letters, digits and '-_.', got {value!r}."
        )
    return value
