"""The ``REPLICATED_*`` settings: defaults, validation, and one typed object."""

from __future__ import annotations

import enum
import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeGuard

from sqlalchemy.engine import URL, make_url

from .errors import ConfigError

__all__ = [
    "DEFAULTS",
    "DiscoverySpec",
    "RecordType",
    "ReplicaURL",
    "ReplicatedConfig",
    "StickyMode",
    "load_config",
]

PREFIX = "REPLICATED_"

# The binds style's names, when neither REPLICATED_PRIMARY_BIND nor
# REPLICATED_REPLICA_BINDS is set and REPLICATED_REPLICAS is not used.
DEFAULT_PRIMARY_BIND = "master"
DEFAULT_REPLICA_BINDS = ("slave",)
# The name the primary goes by when it is SQLALCHEMY_DATABASE_URI, not a bind.
DEFAULT_PRIMARY_NAME = "(default)"


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

# None for the bind names: "not set", so that a clash with REPLICATED_REPLICAS shows.
DEFAULTS: Mapping[str, object] = {
    "REPLICATED_PRIMARY_BIND": None,
    "REPLICATED_REPLICA_BINDS": None,
    "REPLICATED_REPLICAS": None,
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
    "REPLICATED_TOKEN_HEADER": "Replicated-Token",
    "REPLICATED_CATCH_UP_TIMEOUT": 0.1,
    "REPLICATED_REPLICA_WEIGHTS": None,
    "REPLICATED_PREFER_LEAST_LAG": False,
    "REPLICATED_BALANCED_REPLICAS": None,
    "REPLICATED_REPLICA_DISCOVERY": None,
    "REPLICATED_BIND_REPLICAS": None,
}

# RFC 6265 cookie-name token: visible ASCII except separators.
_COOKIE_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HEADER_NAME = _COOKIE_NAME


@dataclass(frozen=True, slots=True)
class ReplicaURL:
    """One replica given by URL in ``REPLICATED_REPLICAS``, with its own engine options."""

    name: str
    url: URL
    options: Mapping[str, object] = field(default_factory=dict)


class RecordType(enum.Enum):
    """The DNS records that list discovered replicas."""

    A = "A"  # one address per record; the port is the URL's
    SRV = "SRV"  # a host and a port per record


@dataclass(frozen=True, slots=True)
class DiscoverySpec:
    """``REPLICATED_REPLICA_DISCOVERY``: replicas found by resolving the URL's host.

    ``nameservers`` are (address, port) pairs; empty: the system's resolver settings.
    ``timeout`` bounds one resolution; a replica gone from DNS is disposed of once its
    connections are back in its pool, or after ``drain_timeout``.
    """

    url: URL
    record: RecordType = RecordType.A
    interval: float = 30.0
    nameservers: tuple[tuple[str, int], ...] = ()
    timeout: float = 2.0
    drain_timeout: float = 60.0
    engine_options: Mapping[str, object] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The DNS name looked up (the URL's host)."""
        return self.url.host or ""


@dataclass(frozen=True, slots=True)
class ReplicatedConfig:
    """Validated settings. Build it with ``load_config``.

    Two styles: binds (``primary_bind`` and ``replica_binds`` name binds of
    SQLALCHEMY_BINDS; ``replicas`` is empty), or replicas by URL (``replicas`` is
    set, the primary is SQLALCHEMY_DATABASE_URI, ``primary_bind`` is None and
    ``replica_binds`` empty).
    """

    primary_bind: str | None
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
    token_header: str | None = "Replicated-Token"
    # How long a sticky read waits for a replica to replay its client's write before
    # the primary serves it; 0: no wait.
    catch_up_timeout: float = 0.1
    replicas: tuple[ReplicaURL, ...] = ()
    # Each replica's share of reads, by replica name; a replica not named weighs 1,
    # one that weighs 0 takes none (out of rotation).
    replica_weights: Mapping[str, float] = field(default_factory=dict)
    # Of the replicas that may serve a read, only the least lagging take it.
    prefer_least_lag: bool = False
    # The replicas that are one address in front of several servers (a load balancer):
    # a sticky read checks the client's position on the connection it reads on.
    balanced_replicas: frozenset[str] = frozenset()
    # Replicas found through DNS, besides ``replicas``; None: none.
    discovery: DiscoverySpec | None = None
    # The replicas of each further database, by its bind key in SQLALCHEMY_BINDS
    # (whose URL is that database's primary); replica names are unique in the app.
    bind_replicas: Mapping[str, tuple[ReplicaURL, ...]] = field(default_factory=dict)

    def replica_weight(self, name: str) -> float:
        """The weight of the replica called ``name`` (1 unless configured)."""
        return self.replica_weights.get(name, 1.0)

    def sticky_ttl(self, mode: StickyMode) -> float:
        """Seconds a client stays sticky after a write in ``mode`` (a resolved mode)."""
        if self.sticky_seconds is not None:
            return self.sticky_seconds
        return DEFAULT_STICKY_SECONDS[mode]


def load_config(settings: Mapping[str, object]) -> ReplicatedConfig:
    """Validate the ``REPLICATED_*`` keys of ``settings``, filling in the defaults.

    Raises ``ConfigError`` with a sentence naming the key for an unknown key, a wrong
    type or an impossible value. Bind names are checked later, against the binds.
    No message shows a value that may hold a password.
    """
    unknown = sorted(k for k in settings if k.startswith(PREFIX) and k not in DEFAULTS)
    if unknown:
        known = ", ".join(sorted(DEFAULTS))
        raise ConfigError(f"Unknown setting '{unknown[0]}'. The known settings are: {known}.")
    value = {**DEFAULTS, **{k: v for k, v in settings.items() if k in DEFAULTS}}
    sticky_mode = _enum("REPLICATED_STICKY_MODE", value, StickyMode)
    sticky_seconds = value["REPLICATED_STICKY_SECONDS"]
    replicas = _replicas(value["REPLICATED_REPLICAS"])
    discovery = _discovery(value["REPLICATED_REPLICA_DISCOVERY"])
    primary_bind: str | None = None
    replica_binds: tuple[str, ...] = ()
    if replicas or discovery is not None:
        by_url = "REPLICATED_REPLICAS" if replicas else "REPLICATED_REPLICA_DISCOVERY"
        for key in ("REPLICATED_REPLICA_BINDS", "REPLICATED_PRIMARY_BIND"):
            if value[key] is not None:
                raise ConfigError(
                    f"'{by_url}' and '{key}' are both set. Give the replicas one "
                    f"way: by URL in '{by_url}' (the primary is then "
                    "SQLALCHEMY_DATABASE_URI), or as binds named in 'REPLICATED_REPLICA_BINDS'."
                )
    else:
        raw_primary = value["REPLICATED_PRIMARY_BIND"]
        raw_replicas = value["REPLICATED_REPLICA_BINDS"]
        primary_bind = _name(
            "REPLICATED_PRIMARY_BIND", DEFAULT_PRIMARY_BIND if raw_primary is None else raw_primary
        )
        replica_binds = _names(
            "REPLICATED_REPLICA_BINDS",
            DEFAULT_REPLICA_BINDS if raw_replicas is None else raw_replicas,
        )
    bind_replicas = _bind_replicas(
        value["REPLICATED_BIND_REPLICAS"],
        [spec.name for spec in replicas] if replicas else [primary_bind or "", *replica_binds],
    )
    for header in ("REPLICATED_DEBUG_HEADER", "REPLICATED_TOKEN_HEADER"):
        if value[header] is not None:
            _token(header, value[header])
    debug, token = value["REPLICATED_DEBUG_HEADER"], value["REPLICATED_TOKEN_HEADER"]
    if isinstance(debug, str) and isinstance(token, str) and debug.lower() == token.lower():
        raise ConfigError(
            "'REPLICATED_DEBUG_HEADER' and 'REPLICATED_TOKEN_HEADER' name the same header: "
            "give them different names (or set one to None)."
        )
    return ReplicatedConfig(
        primary_bind=primary_bind,
        replica_binds=replica_binds,
        replicas=replicas,
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
        token_header=None
        if value["REPLICATED_TOKEN_HEADER"] is None
        else _token("REPLICATED_TOKEN_HEADER", value["REPLICATED_TOKEN_HEADER"]),
        catch_up_timeout=_seconds(
            "REPLICATED_CATCH_UP_TIMEOUT", value["REPLICATED_CATCH_UP_TIMEOUT"], zero=True
        ),
        replica_weights=_weights(
            value["REPLICATED_REPLICA_WEIGHTS"],
            [spec.name for spec in replicas] if replicas else list(replica_binds),
            {key: [spec.name for spec in specs] for key, specs in bind_replicas.items()},
            discovery=discovery is not None,
        ),
        prefer_least_lag=_bool("REPLICATED_PREFER_LEAST_LAG", value),
        discovery=discovery,
        bind_replicas=bind_replicas,
        balanced_replicas=_balanced(
            value["REPLICATED_BALANCED_REPLICAS"],
            [spec.name for spec in replicas] if replicas else list(replica_binds),
            [spec.name for specs in bind_replicas.values() for spec in specs],
        ),
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


_HIDDEN = "a value not shown (it may hold a password)"
_MASKED = "'***'"
# A key naming a secret: libpq's password, passfile, sslpassword, sslkey; passwd (MySQL).
_SECRET_KEY = re.compile(r"pass|pwd|secret|token|key|auth|cred", re.IGNORECASE)


def _shown(value: object, *, masked: bool = False) -> str:
    """``repr(value)`` for an error message, with no password in it.

    A value in the wrong key is often a URL (``REPLICATED_REPLICA_BINDS =
    "postgresql://app:secret@..."``) and error messages end up in logs: a URL is shown
    with its password hidden, and a text that may hold one anyway is not shown. In a
    dict (or a ``(name, value)`` pair) the names are shown and no text is, at any depth
    (``masked``): any text there may be a password (``{"connect_args": {"pw": ...}}``),
    and nothing is shown under a name such as 'password'.
    """
    if isinstance(value, str | URL) and masked:
        return _MASKED
    if isinstance(value, str):
        shown = value
        if "://" in value:
            try:
                shown = make_url(value).render_as_string(hide_password=True)
            except Exception:
                return _HIDDEN
        # A password may also be in a URL's query or a libpq "key=value" string.
        return _HIDDEN if "password" in shown.lower() else repr(shown)
    if isinstance(value, URL):
        return _shown(value.render_as_string(hide_password=True))
    if _is_pair(value):
        return f"({_shown_pair(value[0], value[1], ', ')})"
    if isinstance(value, list | tuple):
        items = ", ".join(_shown(item, masked=masked) for item in value)
        return f"[{items}]" if isinstance(value, list) else f"({items})"
    if isinstance(value, Mapping):
        return "{" + ", ".join(_shown_pair(k, v) for k, v in value.items()) + "}"
    if isinstance(value, int | float | bool | None):
        return repr(value)
    return f"a {type(value).__name__}"


def _is_pair(value: object) -> TypeGuard[tuple[str, object]]:
    # ("connect_args", {...}): an item of a list given where a dict was expected.
    return isinstance(value, tuple) and len(value) == 2 and _is_name(value[0])


def _is_name(value: object) -> bool:
    return isinstance(value, str) and value.isidentifier()


def _shown_pair(name: object, value: object, between: str = ": ") -> str:
    shown_name = repr(name) if _is_name(name) else _shown(name)
    if isinstance(name, str) and _SECRET_KEY.search(name):
        return f"{shown_name}{between}{_MASKED}"
    return f"{shown_name}{between}{_shown(value, masked=True)}"


def _looks_like_url(value: object) -> bool:
    return isinstance(value, URL) or (isinstance(value, str) and "://" in value)


def _replicas(value: object, key: str = "REPLICATED_REPLICAS") -> tuple[ReplicaURL, ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"'{key}' must be a dict of replica names to URLs, such as "
            f"{{'replica1': 'postgresql://app@replica1/app'}}, got a {type(value).__name__}."
        )
    if not value:
        raise ConfigError(f"'{key}' is empty. Give at least one replica, or leave the key out.")
    replicas = []
    for name, spec in value.items():
        if not isinstance(name, str) or not name or _looks_like_url(name):
            raise ConfigError(f"'{key}' must have replica names as keys, got {_shown(name)}.")
        if name == DEFAULT_PRIMARY_NAME:
            raise ConfigError(
                f"'{key}' names a replica '{name}', the primary's name. Choose another name."
            )
        where = f"{key}['{name}']"
        options: dict[str, object] = {}
        if isinstance(spec, Mapping):
            options = dict(spec)
            raw = options.pop("url", None)
        else:
            raw = spec
        if not isinstance(raw, str | URL) or not raw:
            raise ConfigError(
                f"'{where}' must be a database URL, or a dict with a 'url' key and engine options."
            )
        for option in options:
            if not isinstance(option, str):
                raise ConfigError(
                    f"'{where}' has an engine option that is not a name: {_shown(option)}."
                )
        try:
            url = make_url(raw)
        except Exception as error:
            # The text is not shown: a URL that does not parse may still hold a password.
            raise ConfigError(
                f"'{where}' is not a database URL ({type(error).__name__}). Write it as "
                "SQLALCHEMY_DATABASE_URI is written, such as 'postgresql://app@replica1/app'."
            ) from None
        replicas.append(ReplicaURL(name, url, options))
    return tuple(replicas)


_DISCOVERY_KEYS = (
    "url",
    "record",
    "interval",
    "nameservers",
    "timeout",
    "drain_timeout",
    "engine_options",
)


def _discovery(value: object) -> DiscoverySpec | None:
    key = "REPLICATED_REPLICA_DISCOVERY"
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"'{key}' must be a dict such as {{'url': "
            f"'postgresql://app@replicas.db.internal/app', 'interval': 30}}, got "
            f"{_shown(value)}."
        )
    unknown = sorted(str(k) for k in value if k not in _DISCOVERY_KEYS)
    if unknown:
        known = ", ".join(repr(k) for k in _DISCOVERY_KEYS)
        raise ConfigError(
            f"'{key}' has an unknown key {_shown(unknown[0])}. Its keys are: {known} "
            "(engine options go in 'engine_options')."
        )
    raw = value.get("url")
    if not isinstance(raw, str | URL) or not raw:
        raise ConfigError(
            f"'{key}['url']' must be a database URL whose host is the DNS name to resolve."
        )
    try:
        url = make_url(raw)
    except Exception as error:
        raise ConfigError(
            f"'{key}['url']' is not a database URL ({type(error).__name__}). Write it as "
            "SQLALCHEMY_DATABASE_URI is written, with the DNS name to resolve as its host."
        ) from None
    if not url.host:
        raise ConfigError(
            f"'{key}['url']' must be a database server's URL whose host is the DNS name to "
            f"resolve, got {_shown(url)}."
        )
    record = value.get("record", "A")
    if record not in [r.value for r in RecordType]:
        choices = ", ".join(repr(r.value) for r in RecordType)
        raise ConfigError(f"'{key}['record']' must be one of {choices}, got {_shown(record)}.")
    options = value.get("engine_options", {})
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise ConfigError(
            f"'{key}['engine_options']' must be a dict of engine options, such as "
            f"{{'pool_size': 10}}, got {_shown(options)}."
        )
    return DiscoverySpec(
        url=url,
        record=RecordType(record),
        interval=_seconds(f"{key}['interval']", value.get("interval", 30.0)),
        nameservers=_nameservers(f"{key}['nameservers']", value.get("nameservers", ())),
        timeout=_seconds(f"{key}['timeout']", value.get("timeout", 2.0)),
        drain_timeout=_seconds(
            f"{key}['drain_timeout']", value.get("drain_timeout", 60.0), zero=True
        ),
        engine_options=dict(options),
    )


def _nameservers(key: str, value: object) -> tuple[tuple[str, int], ...]:
    # "10.0.0.2", "10.0.0.2:5353", "[fd00::53]:5353": an IP address, and a port.
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigError(f"'{key}' must be a list such as ['10.0.0.2', '127.0.0.1:5353'].")
    found = []
    for item in value:
        host, port = (item, "53") if isinstance(item, str) else ("", "")
        if isinstance(item, str) and item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest.removeprefix(":") or "53"
        elif isinstance(item, str) and item.count(":") == 1:
            host, port = item.split(":")
        try:
            ipaddress.ip_address(host)
            number = int(port)
        except ValueError:
            number = 0
        if not 0 < number < 65536:
            raise ConfigError(
                f"'{key}' must hold IP addresses with an optional port, such as "
                f"'127.0.0.1:5353', got {_shown(item)}."
            )
        found.append((host, number))
    return tuple(found)


def _bind_replicas(value: object, taken: list[str]) -> dict[str, tuple[ReplicaURL, ...]]:
    # ``taken``: the names of the default database's nodes, which no replica of another
    # database may have (one name, one node, in the status table and the metrics).
    key = "REPLICATED_BIND_REPLICAS"
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(
            f"'{key}' must be a dict of bind keys (of SQLALCHEMY_BINDS) to their replicas, "
            f"such as {{'users': {{'users_replica1': 'postgresql://app@replica1/users'}}}}, "
            f"got {_shown(value)}."
        )
    names: dict[str, str] = dict.fromkeys(taken, "the default database")
    found: dict[str, tuple[ReplicaURL, ...]] = {}
    for bind_key, replicas in value.items():
        if not isinstance(bind_key, str) or not bind_key or _looks_like_url(bind_key):
            raise ConfigError(
                f"'{key}' must have bind keys of SQLALCHEMY_BINDS as keys, got {_shown(bind_key)}."
            )
        if bind_key == DEFAULT_PRIMARY_NAME:
            raise ConfigError(
                f"'{key}' gives replicas to the bind '{bind_key}', the name of the default "
                "database in the status command and the debug header. Rename that bind."
            )
        if bind_key in names:
            raise ConfigError(
                f"'{key}' gives replicas to the bind '{bind_key}', which is a node of "
                f"{names[bind_key]}. Give each database's replicas once."
            )
        where = f"{key}['{bind_key}']"
        if replicas is None:
            raise ConfigError(f"'{where}' must be a dict of replica names to URLs, got None.")
        specs = _replicas(replicas, where)
        for spec in specs:
            if spec.name in names or spec.name in value:
                other = names.get(spec.name) or f"the bind '{spec.name}'"
                raise ConfigError(
                    f"'{where}' names a replica '{spec.name}', a name {other} already has. "
                    "Give every replica of the app its own name."
                )
            names[spec.name] = f"the database '{bind_key}'"
        found[bind_key] = specs
    return found


def _name(key: str, value: object) -> str:
    # A URL is refused here, so that no later message names a "bind" that is a URL.
    if not isinstance(value, str) or not value or _looks_like_url(value):
        raise ConfigError(
            f"'{key}' must be the name of a bind in SQLALCHEMY_BINDS, got {_shown(value)}."
            + _url_hint(key, value)
        )
    return value


def _url_hint(key: str, value: object) -> str:
    if key == "REPLICATED_REPLICA_BINDS" and _looks_like_url(value):
        return " To give replicas by URL, use 'REPLICATED_REPLICAS'."
    return ""


def _names(key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigError(
            f"'{key}' must be a list of bind names from SQLALCHEMY_BINDS, got "
            f"{_shown(value)}.{_url_hint(key, value)}"
        )
    names = tuple(value)
    if not names:
        raise ConfigError(
            f"'{key}' is empty. Name at least one replica bind from SQLALCHEMY_BINDS."
        )
    for name in names:
        _name(key, name)
    if len(set(names)) != len(names):
        raise ConfigError(f"'{key}' names a bind twice: {_shown(list(names))}.")
    return names


def _finite(value: object) -> float | None:
    # A finite number as a float; None for anything else (a bool, NaN, an int too big).
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _weights(
    value: object,
    names: list[str],
    others: Mapping[str, list[str]] | None = None,
    *,
    discovery: bool = False,
) -> dict[str, float]:
    # ``names``: the default database's fixed replicas, by bind name or by their name in
    # REPLICATED_REPLICAS; ``others``: those of each further database, by bind key;
    # ``discovery``: the default database has discovered replicas too, which weigh 1.
    key = "REPLICATED_REPLICA_WEIGHTS"
    if value is None:
        return {}
    databases = {"": names, **(others or {})}
    names = [name for group in databases.values() for name in group]
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"'{key}' must be a dict of replica names to weights, such as "
            f"{{'replica1': 3, 'replica2': 1}}, got {_shown(value)}."
        )
    weights: dict[str, float] = {}
    for name, weight in value.items():
        if name not in names:
            known = ", ".join(repr(n) for n in names)
            raise ConfigError(
                f"'{key}' names {_shown(name)}, which is not a replica. The replicas are: {known}."
            )
        number = _finite(weight)
        if number is None or number < 0:
            raise ConfigError(
                f"'{key}['{name}']' must be zero or a positive number, got {_shown(weight)}."
            )
        weights[name] = number
    for database, group in databases.items():
        if database == "" and discovery:
            continue
        if all(weights.get(name, 1.0) == 0 for name in group):
            which = f" of the database '{database}'" if database else ""
            raise ConfigError(
                f"'{key}' gives every replica{which} the weight 0, so no replica would serve "
                "reads. Give at least one a positive weight (0 keeps a replica out of rotation)."
            )
    return weights


def _balanced(value: object, names: list[str], others: list[str]) -> frozenset[str]:
    # ``names``: the replicas, by bind name or by their name in REPLICATED_REPLICAS;
    # ``others``: those of the further databases (REPLICATED_BIND_REPLICAS).
    key = "REPLICATED_BALANCED_REPLICAS"
    if value is None:
        return frozenset()
    names = [*names, *others]
    known = ", ".join(repr(n) for n in names)
    if isinstance(value, str) or not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise ConfigError(
            f"'{key}' must be a list of replica names, such as ['reader'], got "
            f"{_shown(value)}. The replicas are: {known}."
        )
    balanced = list(value)
    for name in balanced:
        if not isinstance(name, str) or name not in names:
            raise ConfigError(
                f"'{key}' names {_shown(name)}, which is not a replica. The replicas are: {known}."
            )
    if len(set(balanced)) != len(balanced):
        raise ConfigError(f"'{key}' names a replica twice: {_shown(balanced)}.")
    return frozenset(balanced)


def _methods(value: object) -> frozenset[str]:
    key = "REPLICATED_READONLY_METHODS"
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigError(f"'{key}' must be a list of HTTP methods such as ['GET', 'HEAD'].")
    methods = list(value)
    for method in methods:
        if not isinstance(method, str) or not method.isalpha():
            raise ConfigError(f"'{key}' must hold HTTP method names, got {_shown(method)}.")
    return frozenset(m.upper() for m in methods)


def _enum(key: str, value: Mapping[str, object], kind: type[StickyMode]) -> StickyMode:
    raw = value[key]
    try:
        return kind(raw)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in kind)
        raise ConfigError(f"'{key}' must be one of {choices}, got {_shown(raw)}.") from None


def _seconds(key: str, value: object, *, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"'{key}' must be a number of seconds, got {_shown(value)}.")
    seconds = float(value)
    if zero and seconds == 0:
        return seconds
    if not math.isfinite(seconds) or seconds <= 0:
        what = "zero or a positive number" if zero else "a positive number"
        raise ConfigError(f"'{key}' must be {what} of seconds, got {_shown(value)}.")
    return seconds


def _bool(key: str, value: Mapping[str, object]) -> bool:
    raw = value[key]
    if not isinstance(raw, bool):
        raise ConfigError(f"'{key}' must be True or False, got {_shown(raw)}.")
    return raw


def _token(key: str, value: object) -> str:
    if not isinstance(value, str) or not _COOKIE_NAME.match(value):
        raise ConfigError(
            f"'{key}' must be a non-empty name of letters, digits and '-_.', got {_shown(value)}."
        )
    return value
