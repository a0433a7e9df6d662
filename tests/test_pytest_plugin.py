"""The shipped pytest plugin: skip without PostgreSQL, or fail when CI requires it."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

NO_BINARIES = """
import replicated_core.pytest_plugin as plugin
plugin.find_bindir = lambda: None
"""

USES_CLUSTER = """
def test_needs_postgres(pg_cluster):
    pass
"""


@pytest.fixture
def project(pytester):
    pytester.makeconftest(NO_BINARIES)
    pytester.makepyfile(USES_CLUSTER)
    return pytester


def test_without_binaries_the_cluster_tests_skip_with_a_reason(project, monkeypatch):
    monkeypatch.delenv("REPLICATED_REQUIRE_POSTGRES", raising=False)
    result = project.runpytest("-rs", "-p", "no:asyncio")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*PostgreSQL server binaries were not found*"])


def test_the_environment_switch_turns_the_skip_into_a_failure(project, monkeypatch):
    monkeypatch.setenv("REPLICATED_REQUIRE_POSTGRES", "1")
    result = project.runpytest("-p", "no:asyncio")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*REPLICATED_REQUIRE_POSTGRES=1 is set*"])
