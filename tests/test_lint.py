"""The project's own static checks run with its tests: ruff, mypy and shellcheck.

They cover the package (with its client, its tools and its experiments), the
tests and the launchers of mountpoint-tools/ (Python scripts without a .py
suffix, named one by one: ruff only finds *.py files by itself). mypy runs
as plain ``mypy``: what it checks (the package and the tests, both strict) and
how are pyproject.toml's [tool.mypy], nothing on the command line. shellcheck
runs over the bash scripts (the tour, scripts/) where it is installed; the
suite installs nothing, so without it that check is skipped and says why.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _rel(paths: list[Path]) -> list[str]:
    return [str(path.relative_to(ROOT)) for path in sorted(paths)]


def _scripts(folder: str, language: str) -> list[str]:
    """The extensionless executables of ``folder`` whose #! line names ``language``."""
    found = [
        path
        for path in (ROOT / folder).iterdir()
        if path.is_file() and not path.suffix and language in path.open().readline()
    ]
    return _rel(found)


PACKAGE = "sandbox/mktme_sandbox"
LAUNCHERS = [*_scripts("mountpoint-tools", "python"), *_scripts("scripts", "python")]
PYTHON = ["sandbox", "tests", *LAUNCHERS]
TYPED = ["sandbox", "tests"]  # what plain `mypy` checks: [tool.mypy] files in pyproject.toml
BASH = [
    *_scripts(f"{PACKAGE}/examples", "bash"),
    *_scripts("mountpoint-tools", "bash"),
    *_scripts("scripts", "bash"),
    ".ci/run",
]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, check=False, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", *PYTHON],
        ["ruff", "format", "--check", *PYTHON],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_static_check_passes(command: list[str], tmp_path: Path) -> None:
    if command[0] == "mypy":
        command = [*command, "--cache-dir", str(tmp_path / "mypy")]
    done = _run([str(BIN / command[0]), *command[1:]])
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_lint_covers_every_tool_launcher_experiment_script_and_test() -> None:
    tools = ("mktme-key", "mktme-map", "mktme-peek", "mktme-walk", "mktme-find")
    assert {f"mountpoint-tools/{tool}" for tool in tools} | {"scripts/load"} == set(LAUNCHERS)
    assert (ROOT / PACKAGE / "client.py").exists()
    assert (ROOT / PACKAGE / "tools").is_dir()
    assert (ROOT / PACKAGE / "examples" / "run_all.py").exists()  # under "sandbox"
    assert {f"{PACKAGE}/examples/tour", "scripts/tour", "scripts/test"} <= set(BASH)
    mypy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert (mypy["files"], mypy["strict"]) == (TYPED, True)


def test_shellcheck_passes_on_the_bash_tools() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip(
            "shellcheck is not installed (apt-get install shellcheck); the suite installs nothing"
        )
    done = _run([shellcheck, *BASH])
    assert done.returncode == 0, done.stdout + done.stderr
