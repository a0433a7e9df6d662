"""What depends on the database, one module per database.

A backend (``protocol.Backend``) says what a position is and how to read, compare
and carry it, and which driver errors mean "read-only" or "connection lost". The
router picks one per engine with ``backend_for(engine.dialect.name)``; a dialect
with no backend of its own gets one with no positions (as SQLite).

Adding a database is one new module here, one line in ``_REGISTRY``, and its tests
in ``tests/test_backends.py``.
"""

from __future__ import annotations

from .postgresql import PostgreSQL
from .protocol import Backend, ErrorKind, Position, ReplicaProbe
from .sqlite import NoPositions, SQLite

__all__ = [
    "TOKEN_POSITIONS",
    "Backend",
    "ErrorKind",
    "Position",
    "ReplicaProbe",
    "backend_for",
    "classify_driver_error",
]

_POSTGRESQL = PostgreSQL()
_NO_POSITIONS = NoPositions()

_REGISTRY: dict[str, Backend] = {
    dialect: backend for backend in (_POSTGRESQL, SQLite) for dialect in backend.dialects
}

# How the sticky token carries a position unless its router's primary has positions
# of another backend: PostgreSQL's, so that every token issued so far still reads.
TOKEN_POSITIONS: Backend = _POSTGRESQL


def backend_for(dialect_name: str) -> Backend:
    """The backend of a SQLAlchemy dialect (``engine.dialect.name``); one with no
    positions for a dialect that has none of its own."""
    return _REGISTRY.get(dialect_name, _NO_POSITIONS)


def classify_driver_error(error: BaseException) -> ErrorKind | None:
    """What a driver error means, where its engine is not known: the first backend
    that recognises it says."""
    for backend in _BACKENDS:
        kind = backend.classify_error(error)
        if kind is not None:
            return kind
    return None


_BACKENDS: tuple[Backend, ...] = tuple(dict.fromkeys(_REGISTRY.values()))
