"""The project's own static checks run with its tests: ruff, mypy and shellcheck.

They cover the package, the tests, the tools of mountpoint-tools/ and the
experiments of examples/ (their Python scripts without a .py suffix are named
one by one: ruff and mypy only find *.py files by themselves). shellcheck runs
over the bash tools where it is installed; the suite installs nothing, so
without it that check is skipped and says why.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
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


TOOLS_PY = _rel(list((ROOT / "mountpoint-tools").glob("*.py"))) + _scripts(
    "mountpoint-tools", "python"
)
EXAMPLES_PY = _rel(list((ROOT / "examples").glob("*.py"))) + _scripts("examples", "python")
PYTHON = ["sandbox", "tests", *TOOLS_PY, *EXAMPLES_PY]
TYPED = ["sandbox", "mountpoint-tools/mktmefs.py", "examples/lab.py"]
BASH = [
    *_rel(list((ROOT / "mountpoint-tools").glob("*.sh"))),
    *_scripts("mountpoint-tools", "bash"),
    *_scripts("examples", "bash"),
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
        ["mypy", *TYPED],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_static_check_passes(command: list[str], tmp_path: Path) -> None:
    if command[0] == "mypy":
        command = [*command, "--cache-dir", str(tmp_path / "mypy")]
    done = _run([str(BIN / command[0]), *command[1:]])
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_lint_covers_every_tool_and_experiment() -> None:
    assert {"mountpoint-tools/mktmefs.py", "mountpoint-tools/mktme-walk"} <= set(TOOLS_PY)
    assert {"examples/lab.py", "examples/run-all"} <= set(EXAMPLES_PY)
    assert {"mountpoint-tools/mktme-lib.sh", "mountpoint-tools/mktme-key"} <= set(BASH)
    assert "examples/tour" in BASH


def test_shellcheck_passes_on_the_bash_tools() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip(
            "shellcheck is not installed (apt-get install shellcheck); the suite installs nothing"
        )
    done = _run([shellcheck, *BASH])
    assert done.returncode == 0, done.stdout + done.stderr
