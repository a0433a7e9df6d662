"""Package shape: the import rule, the public names, the shared objects."""

from __future__ import annotations

import subprocess
import sys

import pytest

import flask_replicated
import replicated_core


def test_the_core_imports_no_framework():
    code = (
        "import sys, replicated_core, replicated_core.router, replicated_core.binds, "
        "replicated_core.sticky, replicated_core.statements\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('flask', 'quart', "
        "'flask_sqlalchemy', 'werkzeug') or m.startswith('sqlalchemy.ext.asyncio'))\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module", [replicated_core, flask_replicated])
def test_all_is_sorted_and_complete(module):
    assert list(module.__all__) == sorted(module.__all__)
    for name in module.__all__:
        assert hasattr(module, name), name


@pytest.mark.parametrize(
    "name", ["changes_database", "use_primary", "use_replica", "ReplicaWriteError"]
)
def test_adapters_reexport_the_core_objects(name):
    assert getattr(flask_replicated, name) is getattr(replicated_core, name)


def test_runtime_code_never_imports_the_test_harness():
    """Every module of the three packages but ``replicated_core.testing`` imported in a
    fresh interpreter: none of them pulls in the harness (clusters, the pytest plugin)."""
    code = (
        "import importlib, pkgutil, sys\n"
        "def walk(name):\n"
        "    package = importlib.import_module(name)\n"
        "    for info in pkgutil.iter_modules(package.__path__, name + '.'):\n"
        "        if info.name == 'replicated_core.testing':\n"
        "            continue\n"
        "        walk(info.name) if info.ispkg else importlib.import_module(info.name)\n"
        "for name in ('replicated_core', 'flask_replicated', 'quart_replicated'):\n"
        "    walk(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('replicated_core.testing')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_package_is_in_the_wheel():
    """setuptools installs only the packages pyproject.toml lists: a subpackage left out
    is missing from a non-editable install (the pytest plugin's entry point included)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    listed = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = sorted(
        ".".join(init.parent.relative_to(root).parts)
        for top in ("replicated_core", "flask_replicated", "quart_replicated")
        for init in (root / top).rglob("__init__.py")
    )
    assert sorted(listed) == found
