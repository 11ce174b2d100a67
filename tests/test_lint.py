"""The project's own static checks run with its tests: ruff and mypy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "sandbox", "tests"],
        ["ruff", "format", "--check", "sandbox", "tests"],
        ["mypy", "sandbox"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_static_check_passes(command, tmp_path):
    if command[0] == "mypy":
        command = [*command, "--cache-dir", str(tmp_path / "mypy")]
    done = subprocess.run(
        [str(BIN / command[0]), *command[1:]],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
