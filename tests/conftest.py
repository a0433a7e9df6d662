"""Shared fixtures. The PostgreSQL cluster fixtures (pg_cluster, pg_cluster_factory)
come from the project's own pytest plugin, replicated_core.testing.pytest_plugin."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import (
    Backend,
    create_pg_schema,
    dispose_flask_app,
    make_flask_app,
    make_quart_app,
    pg_backend,
    sqlite_backend,
)


@pytest.fixture(scope="session")
def postgresql_backend(pg_cluster: Any) -> Backend:
    create_pg_schema(pg_cluster)
    return pg_backend(pg_cluster)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Backend:
    """Each adapter test runs on SQLite files and on the real PostgreSQL cluster."""
    if request.param == "sqlite":
        return sqlite_backend(tmp_path)
    backend: Backend = request.getfixturevalue("postgresql_backend")
    return backend


@pytest.fixture
def flask_app_factory(backend: Backend) -> Iterator[Callable[..., Any]]:
    apps: list[Any] = []

    def build(**kwargs: Any) -> Any:
        app = make_flask_app(backend, **kwargs)
        apps.append(app)
        return app

    yield build
    for app in apps:
        dispose_flask_app(app)


@pytest.fixture
def flask_app(flask_app_factory: Callable[..., Any]) -> Any:
    return flask_app_factory()


@pytest.fixture
def pg_flask_app(postgresql_backend: Backend) -> Iterator[Any]:
    """A Flask app on the PostgreSQL cluster only, for what SQLite cannot show."""
    app = make_flask_app(postgresql_backend)
    yield app
    dispose_flask_app(app)


@pytest.fixture
async def quart_app_factory(backend: Backend) -> Any:
    apps: list[Any] = []

    def build(**kwargs: Any) -> Any:
        app = make_quart_app(backend, **kwargs)
        apps.append(app)
        return app

    yield build
    for app in apps:
        await app.rep.dispose(app)


@pytest.fixture
def quart_app(quart_app_factory: Callable[..., Any]) -> Any:
    return quart_app_factory()


@pytest.fixture(scope="module")
def fault_cluster(pg_cluster_factory: Callable[..., Any]) -> Any:
    """A cluster of its own (primary, r1, r2) for tests that stop or pause nodes.

    Tests must leave every node running and replaying when they finish.
    """
    from replicated_core.testing.pgcluster import ReplicaSpec

    cluster = pg_cluster_factory([ReplicaSpec("r1"), ReplicaSpec("r2")])
    create_pg_schema(cluster)
    return cluster


@pytest.fixture
def fault_backend(fault_cluster: Any) -> Backend:
    return pg_backend(fault_cluster)


_RELIABILITY: list[tuple[str, dict[str, Any]]] = []


@pytest.fixture
def reliability() -> Callable[[str, dict[str, Any]], None]:
    """Record a scenario's figures for the summary printed at the end of the run."""

    def record(scenario: str, figures: dict[str, Any]) -> None:
        _RELIABILITY.append((scenario, figures))

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _RELIABILITY:
        return
    terminalreporter.section("reliability figures")
    for scenario, figures in _RELIABILITY:
        details = ", ".join(f"{key}: {value}" for key, value in figures.items())
        terminalreporter.write_line(f"{scenario}: {details}")


@pytest.fixture
def fault_flask_factory(fault_backend: Backend) -> Iterator[Callable[..., Any]]:
    """Flask apps on the fault cluster, disposed even when the test fails."""
    apps: list[Any] = []

    def build(**kwargs: Any) -> Any:
        app = make_flask_app(fault_backend, **kwargs)
        apps.append(app)
        return app

    yield build
    for app in apps:
        dispose_flask_app(app)
