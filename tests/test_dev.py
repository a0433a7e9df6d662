"""The ``./dev`` script: what a newcomer sees on a fresh machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DEV = Path(__file__).resolve().parent.parent / "dev"

# A stand-in for a pyenv shim of a version that is not selected: it exists on PATH,
# prints pyenv's complaint and fails, as `pyenv: python3.13: command not found` does.
FAILING_SHIM = """#!/bin/sh
echo "pyenv: $(basename "$0"): command not found" >&2
echo "The \\`$(basename "$0")' command exists in these Python versions:" >&2
exit 127
"""


def _python_bin_function() -> str:
    """The text of ``./dev``'s ``python_bin`` function, to run it on its own."""
    match = re.search(r"^python_bin\(\) \{\n.*?^\}\n", DEV.read_text(), re.MULTILINE | re.DOTALL)
    assert match is not None, f"'{DEV}' has no python_bin function"
    return match.group(0)


def _run_python_bin(path: str) -> subprocess.CompletedProcess[str]:
    script = "set -euo pipefail\n" + _python_bin_function() + "python_bin\n"
    return subprocess.run(
        ["bash", "-c", script],
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _this_python_first(folder: Path) -> str:
    """A PATH on which python3 is the interpreter running the tests (3.11 or newer)."""
    folder.mkdir()
    (folder / "python3").symlink_to(sys.executable)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def test_python_bin_says_nothing_about_candidates_that_fail(tmp_path):
    """Failing interpreters come first on PATH: the pick is quiet and falls through."""
    shims = tmp_path / "shims"
    shims.mkdir()
    for name in ("python3.13", "python3.12", "python3.11"):
        shim = shims / name
        shim.write_text(FAILING_SHIM)
        shim.chmod(0o755)
    path = f"{shims}{os.pathsep}{_this_python_first(tmp_path / 'good')}"
    result = _run_python_bin(path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "python3\n", "")


def test_python_bin_on_this_machine_prints_no_pyenv_lines():
    """The machine's own PATH (pyenv shims here): whatever it picks, stderr stays empty."""
    result = _run_python_bin(os.environ["PATH"])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    picked = subprocess.run(
        [result.stdout.strip(), "-c", "import sys; print(sys.version_info >= (3, 11))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert picked.stdout == "True\n"


@pytest.mark.parametrize("args", [[], ["nonsense"]])
def test_dev_without_a_command_prints_usage_only(args):
    result = subprocess.run(
        [str(DEV), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert result.stdout.startswith("The project's two commands on a fresh machine:\n")
    assert result.stderr == ""
