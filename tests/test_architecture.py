"""Where knowledge lives: what depends on the database stays in ``replicated_core.backends``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "replicated_core"

# Names in code (not in comments or docstrings) that only PostgreSQL's backend needs:
# its functions and views, its drivers and their error attributes, its WAL positions.
_PG_NAME = re.compile(r"^(pg_.*|.*_lsn|pgcode|sqlstate|asyncpg|psycopg2?)$", re.IGNORECASE)
# Modules of the core that hold PostgreSQL's positions (gone into the backend).
_PG_MODULES = {"wal"}
_PG_TEXT = re.compile(
    r"pg_|::text|asyncpg|psycopg|^postgresql$|^postgres$"
    # A SQLSTATE: five digits and capitals, at least one a digit (25006, XX000,
    # 0A000, 57P01), or a class prefix such as "08".
    r"|^(?=[0-9A-Z]*[0-9])[0-9A-Z]{5}$|^0[0-9]$"
)

# What may stay, and why.
_ALLOWED = {
    # The SQL classifier lexes PostgreSQL's syntax (dollar quotes, E'' strings) and
    # SQLite's, and knows PostgreSQL's advisory lock functions: a backend says which
    # syntax it speaks (Backend.postgresql_syntax), the lexers stay with the classifier.
    "statements.py",
}

# ReplicaView.replay_lsn, StickyToken.lsn and RequestScope fields keep their names:
# renaming them would churn every caller for no change in what they mean.
_ALLOWED_NAMES = {"replay_lsn", "receive_lsn"}


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                ids.add(id(value))
    return ids


def _findings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        texts: list[str] = []
        if isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, ast.Attribute):
            names.append(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.arg) or (isinstance(node, ast.keyword) and node.arg):
            names.append(node.arg)
        elif isinstance(node, ast.alias):
            names.extend(node.name.split("."))
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = set(node.module.split(".")) & _PG_MODULES
            found.extend(f"{path.name}:{node.lineno}: module {m!r}" for m in sorted(modules))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            texts.append(node.value)
        for name in names:
            if name not in _ALLOWED_NAMES and _PG_NAME.match(name.strip("_")):
                found.append(f"{path.name}:{node.lineno}: name {name!r}")
        for text in texts:
            if _PG_TEXT.search(text):
                found.append(f"{path.name}:{node.lineno}: text {text.splitlines()[0]!r}")
    return found


def test_the_core_outside_backends_knows_no_postgresql():
    """The core outside ``backends/`` (and the test harness) names nothing that only
    PostgreSQL has, so that adding a database is one new backend module."""
    found = [
        finding
        for path in sorted(CORE.glob("*.py"))
        if path.name not in _ALLOWED
        for finding in _findings(path)
    ]
    assert found == [], "PostgreSQL specifics outside backends/:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('x = "SELECT pg_is_in_recovery()"', ["probe.py:1: text 'SELECT pg_is_in_recovery()'"]),
        ('if code == "25006": pass', ["probe.py:1: text '25006'"]),
        ('if code.startswith("08"): pass', ["probe.py:1: text '08'"]),
        (
            "from .wal import parse_lsn",
            ["probe.py:1: module 'wal'", "probe.py:1: name 'parse_lsn'"],
        ),
        ('if dialect.driver == "asyncpg": pass', ["probe.py:1: text 'asyncpg'"]),
        ('"""Reads pg_last_wal_replay_lsn()."""\nname = "UTF-8"\nmode = "wal"', []),
    ],
)
def test_the_scan_sees_postgresql_specifics(tmp_path, source, expected):
    """The scan above can fail: it finds each kind of PostgreSQL specific."""
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert sorted(_findings(path)) == sorted(expected)
