"""The routing intent of the running code, kept in contextvars.

Two variables hold it: the request scope, set by an adapter for the length of a
request, and an override stack set by ``use_primary()``, ``use_replica()`` and
``@changes_database``. Both are contextvars, so threads and asyncio tasks never
see each other's intent, and both are reset with tokens, so nothing leaks into
the next request served by the same thread.
"""

from __future__ import annotations

import enum
import functools
import inspect
import math
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast, overload

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine
    from types import TracebackType

    from .nodes import Node
    from .scope import RequestScope

__all__ = [
    "Intent",
    "Override",
    "changes_database",
    "current_override",
    "current_scope",
    "use_primary",
    "use_replica",
]

P = ParamSpec("P")
R = TypeVar("R")

PRIMARY_MARKER = "__replicated_primary__"


class Intent(enum.Enum):
    """Where the code means its statements to go."""

    PRIMARY = "primary"
    REPLICA = "replica"


@dataclass(slots=True)
class Override:
    """One ``use_primary()``/``use_replica()`` block; remembers the replica it picked.

    ``token`` restores the previous override. It lives here, in the context, and
    not on the block object, so one block object can be entered by many threads or
    tasks at once.
    """

    intent: Intent
    node: Node | None = field(default=None)
    token: Token[Override | None] | None = field(default=None, repr=False)
    # ``use_replica(after=...)``: a consistency token the replica must have replayed.
    after: str | None = field(default=None, repr=False)
    # ``use_replica(max_lag=...)``: the most lag, in seconds, a replica may have to
    # serve the block; None: any usable replica.
    max_lag: float | None = field(default=None)
    # The replica picked for the block on each further database of an app (the
    # default database's is ``node``), by router: every database follows the block.
    picks: dict[object, Node] | None = field(default=None, repr=False)


_override: ContextVar[Override | None] = ContextVar("replicated_override", default=None)
_scope: ContextVar[RequestScope | None] = ContextVar("replicated_scope", default=None)


# Set by the router module: awaited before an async ``use_replica(after=...)`` block
# or decorated coroutine, so that the wait for a replica to replay the token's
# position does not block the event loop.
token_waiter: Callable[[str, float | None], Awaitable[None]] | None = None

# The variables themselves, for the per-statement paths: ``scope_var.get()`` saves
# the call around it, and those paths run for every statement.
override_var = _override
scope_var = _scope


def current_override() -> Override | None:
    """The innermost active ``use_primary()``/``use_replica()`` block, if any."""
    return _override.get()


def current_scope() -> RequestScope | None:
    """The routing state of the request being served, or None outside a request."""
    return _scope.get()


class _IntentBlock:
    """A context manager (``with`` and ``async with``) that is also a decorator for
    sync and async functions."""

    __slots__ = ("_after", "_intent", "_max_lag")

    def __init__(
        self, intent: Intent, after: str | None = None, max_lag: float | None = None
    ) -> None:
        self._intent = intent
        self._after = after
        self._max_lag = max_lag

    def __enter__(self) -> None:
        override = Override(self._intent, after=self._after, max_lag=self._max_lag)
        override.token = _override.set(override)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Blocks exit in reverse order within one context: the current override is
        # the one this block entered.
        override = _override.get()
        if override is not None and override.token is not None:
            _override.reset(override.token)

    async def __aenter__(self) -> None:
        after = self._after
        if after is not None and token_waiter is not None:
            await token_waiter(after, self._max_lag)
        self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    @overload
    def __call__(
        self, func: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...
    @overload
    def __call__(self, func: Callable[P, R]) -> Callable[P, R]: ...
    def __call__(self, func: Callable[P, Any]) -> Callable[P, Any]:
        decorator = f"@use_{self._intent.value}()"
        return _wrap(func, self._intent, decorator, self._after, self._max_lag)


def _wrap(
    func: Callable[P, Any],
    intent: Intent,
    decorator: str,
    after: str | None = None,
    max_lag: float | None = None,
) -> Callable[P, Any]:
    # A fresh Override per call: a decorated coroutine may run in many tasks at once,
    # so the token must live in the call's frame, not on a shared object.
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        # The intent would be reset before the body runs, or leak to the caller at
        # each yield: neither is what the decorator says.
        name = getattr(func, "__qualname__", repr(func))
        raise TypeError(
            f"'{decorator}' cannot decorate the generator '{name}': the intent would not "
            f"hold while it runs. Use a 'with use_{intent.value}():' block inside it instead."
        )
    if inspect.iscoroutinefunction(func):
        coro_func = cast("Callable[P, Coroutine[Any, Any, Any]]", func)

        @functools.wraps(func)
        async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            if after is not None and token_waiter is not None:
                await token_waiter(after, max_lag)
            token = _override.set(Override(intent, after=after, max_lag=max_lag))
            try:
                return await coro_func(*args, **kwargs)
            finally:
                _override.reset(token)

        return async_wrapper

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
        token = _override.set(Override(intent, after=after, max_lag=max_lag))
        try:
            return func(*args, **kwargs)
        finally:
            _override.reset(token)

    return wrapper


def use_primary() -> _IntentBlock:
    """Send every statement inside the block (or decorated function) to the primary.

    Works inside and outside a request, nests, and restores the previous intent on
    exit. Within a request, reads after the block stay on the primary too, so the
    request sees its own writes.
    """
    return _IntentBlock(Intent.PRIMARY)


def use_replica(*, after: str | None = None, max_lag: float | None = None) -> _IntentBlock:
    """Send every statement inside the block (or decorated function) to a replica.

    One replica serves the whole block. A write inside it raises ``ReplicaWriteError``.
    When no replica is usable, the primary serves the reads.

    ``after`` is a consistency token (``rep.consistency_token()``, handed to a job by
    the request that wrote): the block then reads from a replica that has replayed
    its position, else from the primary. When no replica has it yet, the block waits
    up to ``REPLICATED_CATCH_UP_TIMEOUT`` for one to: in async code, enter the block
    with ``async with`` (or decorate a coroutine), so that the wait is awaited; a
    plain ``with`` in async code does not wait. A token that does not check (another key,
    cluster or app, garbled) also sends the block to the primary: never an error,
    never a stale read. A token with a position holds whatever its age.

    With ``max_lag`` (seconds), only a replica whose current lag is within it serves
    the block, else the primary; ``max_lag=0`` takes only replicas reporting no lag.
    """
    if after is not None and not isinstance(after, str):
        raise TypeError(
            "use_replica(after=...) takes the str of a consistency token, got "
            f"{type(after).__name__}."
        )
    if max_lag is not None:
        if isinstance(max_lag, bool) or not isinstance(max_lag, int | float):
            raise TypeError(f"max_lag must be a number of seconds, not {max_lag!r}")
        if math.isnan(max_lag) or max_lag < 0:
            raise ValueError(f"max_lag must be zero or more seconds, not {max_lag!r}")
        max_lag = float(max_lag)
    return _IntentBlock(Intent.REPLICA, after, max_lag)


@overload
def changes_database(
    func: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]: ...
@overload
def changes_database(func: Callable[P, R]) -> Callable[P, R]: ...
def changes_database(func: Callable[P, Any]) -> Callable[P, Any]:
    """Mark a view (sync or async) so that its whole request uses the primary.

    Place it below ``@app.route``, as in flask_replicated 1.1. The adapters see the
    mark before the request's own hooks run; called outside a request, the function
    still runs on the primary.
    """
    wrapper = _wrap(func, Intent.PRIMARY, "@changes_database")
    setattr(wrapper, PRIMARY_MARKER, True)
    return wrapper


def forces_primary(view: object) -> bool:
    """Whether ``view`` was decorated with ``@changes_database``."""
    return getattr(view, PRIMARY_MARKER, False) is True
