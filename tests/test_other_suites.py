"""Flask-SQLAlchemy's and Flask-Migrate's own test suites pass with the router on
every app they create, exactly as they pass without it.

Each suite comes from its sdist on the package registry, at the installed version
(downloaded once into the virtualenv, never kept in this repository), and runs
twice in a subprocess: plain, then with tests/other_suites/sitecustomize.py, which
adds ``FlaskReplicated`` with a replica to each app (its docstring says which
replica and why). The sets of passing tests must be the same.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

SHIM = Path(__file__).parent / "other_suites"
CACHE = Path(sys.prefix) / ".cache" / "other-suites"

# Each project's own test command (Flask-Migrate's tox.ini runs "pytest -p no:logging").
SUITES = {
    "flask-sqlalchemy": [],
    "flask-migrate": ["-p", "no:logging"],
}


def _sdist(project: str) -> Path:
    """The unpacked sdist of the installed version of ``project``."""
    version = importlib.metadata.version(project)
    folder = CACHE / f"{project}-{version}"
    if (folder / "tests").is_dir():
        return folder
    downloads = CACHE / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"),
            *("--no-binary", ":all:", "--dest", str(downloads), f"{project}=={version}"),
        ],
        check=True,
        timeout=300,
    )
    stem = project.replace("-", "_")
    (archive,) = [
        p for p in downloads.glob("*.tar.gz") if p.name.lower() == f"{stem}-{version}.tar.gz"
    ]
    unpacked = CACHE / "unpacking"
    shutil.rmtree(unpacked, ignore_errors=True)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4 and later
            tar.extractall(unpacked, filter="data")
        else:
            tar.extractall(unpacked)
    (top,) = unpacked.iterdir()
    top.rename(folder)
    return folder


def _start(source: Path, work: Path, args: list[str], *, router: bool) -> subprocess.Popen[str]:
    """Start the suite in a fresh copy of ``source``; its report goes to ``work``."""
    copy = work / ("with-router" if router else "plain")
    shutil.copytree(source, copy)
    env = {
        **os.environ,
        # The suites start "flask" from PATH, which must be this virtualenv's.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.pop("PYTHONPATH", None)
    if router:
        env.update(
            PYTHONPATH=str(SHIM),
            REPLICATED_SHIM="1",
            REPLICATED_SHIM_LOG=str(work / "shim.log"),
        )
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "pytest", "tests", *args),
            # pytest-asyncio is this project's, not theirs: its start-up warning would
            # be an error under their filterwarnings.
            *("-p", "no:asyncio", "-p", "no:cacheprovider", "-q"),
            f"--junitxml={work / copy.name}.xml",
        ],
        cwd=copy,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _outcomes(process: subprocess.Popen[str], report: Path) -> dict[str, str]:
    """Wait for a run; every test's outcome by id ("passed", or the kind and message)."""
    try:
        output, _ = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode in (0, 1), output[-5000:]
    outcomes: dict[str, str] = {}
    for case in ET.parse(report).iter("testcase"):
        kinds = [child for child in case if child.tag in ("failure", "error", "skipped")]
        test = f"{case.get('classname')}::{case.get('name')}"
        outcomes[test] = "passed"
        if kinds:
            outcomes[test] = f"{kinds[0].tag}: {(kinds[0].get('message') or '')[:300]}"
    return outcomes


# Outcomes that differ by necessity, each with the whole failure the router run must
# show. Flask-SQLAlchemy's tests of its engine options replace `_make_engine` with one
# Mock: every engine the app gets, its own and the replica made the same way (the
# router makes engines through Flask-SQLAlchemy's entry point, so that the driver
# defaults and a subclass's `_make_engine` apply), is then that same object. The
# router rightly refuses a replica that is the primary itself.
SAME_MOCK = (
    "failure: replicated_core.errors.ConfigError: 'REPLICATED_REPLICAS' names the replica "
    "'replica', whose URL is the primary's. Point it at a replica server, or remove it."
)
INHERENT = {
    "flask-sqlalchemy": {
        f"tests.test_engine::{test}[{base}]": SAME_MOCK
        for test in ("test_mysql_defaults", "test_sqlite_memory_defaults")
        for base in ("Model", "model_class1", "model_class3")
    },
    "flask-migrate": {},
}


@pytest.mark.slow
@pytest.mark.parametrize("project", list(SUITES))
def test_the_suite_passes_the_same_with_the_router(project, tmp_path):
    source = _sdist(project)
    started = time.perf_counter()
    # Both runs at once: each waits mostly on its own subprocesses and files.
    runs = {
        router: _start(source, tmp_path, SUITES[project], router=router) for router in (False, True)
    }
    plain = _outcomes(runs[False], tmp_path / "plain.xml")
    routed = _outcomes(runs[True], tmp_path / "with-router.xml")
    seconds = time.perf_counter() - started
    shim_log = (tmp_path / "shim.log").read_text().splitlines()
    installed = sum(line.startswith("installed ") for line in shim_log)
    skipped = sorted({line for line in shim_log if not line.startswith("installed ")})
    passed = sum(v == "passed" for v in plain.values())
    print(
        f"\n{project}: {len(plain)} tests, {passed} pass plain; both runs took {seconds:.1f} s; "
        f"router installed on {installed} apps; {skipped or 'none skipped'}"
    )
    differ = {
        test: (plain.get(test), routed.get(test))
        for test in plain.keys() | routed.keys()
        if (plain.get(test) == "passed") != (routed.get(test) == "passed")
    }
    expected = {test: ("passed", outcome) for test, outcome in INHERENT[project].items()}
    assert differ == expected
    assert passed >= 5
    assert installed >= 5
    # Only an app with nothing to route goes without the router.
    assert all(line.endswith(": no SQLALCHEMY_DATABASE_URI") for line in skipped)
