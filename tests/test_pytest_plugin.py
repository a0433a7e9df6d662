"""The shipped pytest plugin: loaded by every pytest run of every project that installs
the package, so loading it is cheap and works anywhere (no POSIX-only module, no
PostgreSQL driver); its fixtures skip with a reason where the tools are missing, or
fail when CI requires them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest_plugins = ["pytester"]

NO_BINARIES = """
import replicated_core.testing.pgcluster as pgcluster
pgcluster.find_bindir = lambda: None
"""

NO_DRIVER = """
import sys
sys.modules["psycopg"] = None  # as if psycopg were not installed
"""

NOT_POSIX = """
import replicated_core.testing.pytest_plugin as plugin
plugin._POSIX = False  # what a Windows machine reports
"""

USES_CLUSTER = """
def test_needs_postgres(pg_cluster):
    pass
"""

# What Windows lacks, made to fail to import in the child process: 'import pwd'
# raises ImportError when sys.modules holds None for it.
WITHOUT_PWD = "import sys; sys.modules['pwd'] = None\n"

HEAVY = ["psycopg", "replicated_core.testing.pgcluster", "asyncpg", "sqlalchemy.ext.asyncio"]


def _run_python(code):
    # The plugin is loaded the way other projects load it: by its entry point.
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DISABLE_PLUGIN_AUTOLOAD"}
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_PWD + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


def test_importing_the_plugin_needs_no_posix_module_and_imports_nothing_heavy():
    result = _run_python(
        f"""
        import json, time
        import pytest  # loaded by any pytest run anyway: not the plugin's cost
        started = time.perf_counter()
        import replicated_core.testing.pytest_plugin
        took = time.perf_counter() - started
        loaded = [name for name in {HEAVY!r} if sys.modules.get(name) is not None]
        print(json.dumps({{"loaded": loaded, "ms": round(took * 1000, 1)}}))
        """
    )
    assert result.stderr == ""
    assert result.returncode == 0
    figures = json.loads(result.stdout)
    print(f"importing the plugin after pytest: {figures['ms']} ms")
    assert figures["loaded"] == []


def test_the_cluster_harness_imports_without_pwd():
    """pwd is only needed to run the servers as 'postgres' when the tests run as root."""
    result = _run_python("import replicated_core.testing.pgcluster; print('imported')")
    assert (result.returncode, result.stdout, result.stderr) == (0, "imported\n", "")


def test_a_pytest_run_without_pwd_collects_with_the_plugin_loaded(tmp_path):
    (tmp_path / "test_trivial.py").write_text("def test_one():\n    pass\n")
    result = _run_python(
        f"""
        import pytest
        code = pytest.main(["--co", "-q", "-p", "no:cacheprovider", {str(tmp_path)!r}])
        plugin = "replicated_core.testing.pytest_plugin"
        print("plugin loaded:", sys.modules.get(plugin) is not None)
        sys.exit(code)
        """
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test_trivial.py::test_one" in result.stdout
    assert "plugin loaded: True" in result.stdout


@pytest.fixture
def project(pytester):
    pytester.makepyfile(USES_CLUSTER)
    return pytester


SKIP_REASONS = {
    NO_BINARIES: (
        "PostgreSQL server binaries were not found by 'pg_config --bindir' nor in"
        " '/usr/lib/postgresql/*/bin'. Install the PostgreSQL server (Debian: 'apt-get install"
        " postgresql') to run the tests that need it."
    ),
    NO_DRIVER: (
        "The PostgreSQL cluster fixtures need psycopg, which is not installed. Install it"
        " ('pip install \"replicated-router[postgresql]\"') to run the tests that need it."
    ),
    NOT_POSIX: (
        "The PostgreSQL cluster fixtures run only on POSIX systems such as Linux: they"
        " pause servers with signals and, as root, run them as the OS user 'postgres'."
    ),
}


@pytest.mark.parametrize("missing", list(SKIP_REASONS), ids=["binaries", "driver", "posix"])
def test_without_the_tools_the_cluster_tests_skip_with_a_reason(project, monkeypatch, missing):
    monkeypatch.delenv("REPLICATED_REQUIRE_POSTGRES", raising=False)
    project.makeconftest(missing)
    result = project.runpytest_subprocess("-rs", "-p", "no:asyncio", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    (line,) = [line for line in result.outlines if line.startswith("SKIPPED")]
    assert line.split(": ", 1)[1] == SKIP_REASONS[missing]


@pytest.mark.parametrize("missing", list(SKIP_REASONS), ids=["binaries", "driver", "posix"])
def test_the_environment_switch_turns_the_skip_into_a_failure(project, monkeypatch, missing):
    monkeypatch.setenv("REPLICATED_REQUIRE_POSTGRES", "1")
    project.makeconftest(missing)
    result = project.runpytest_subprocess("-p", "no:asyncio", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    assert (
        f"{SKIP_REASONS[missing]} REPLICATED_REQUIRE_POSTGRES=1 is set, so this fails"
        " instead of skipping; unset it or set REPLICATED_REQUIRE_POSTGRES=0 to skip them."
    ) in result.outlines
