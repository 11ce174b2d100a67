"""Shared pieces of the mount tests: a shell, as a user or as another user.

The mounts come from ``module_mount`` (tests/conftest.py): one per module,
checked at teardown (it still answers, no internal error, ``mm/check`` ok).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from mktme_sandbox.mounting import MountedSandbox


def run_shell(
    script: str, cwd: Path, user: int | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``bash -c script`` in ``cwd``, as ``user`` (via setpriv) when given."""
    argv = ["bash", "-c", script]
    if user is not None:
        ids = ["--reuid", str(user), "--regid", str(user), "--clear-groups"]
        argv = ["setpriv", *ids, *argv]
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def sh() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``sh(script, cwd, user=None)``: run a bash script."""
    return run_shell


@pytest.fixture
def bash(sandbox: MountedSandbox) -> Callable[[str], str]:
    """``bash(script)``: run a script in the module's ``sandbox`` mount; fail with
    its stderr unless it succeeds; give its stdout."""

    def run(script: str) -> str:
        done = run_shell(f"set -euo pipefail\n{script}", sandbox.path)
        assert done.returncode == 0, f"{script!r} failed: {done.stderr}"
        return done.stdout

    return run


@pytest.fixture
def as_user(
    sandbox: MountedSandbox, sh: Callable[..., subprocess.CompletedProcess[str]]
) -> Callable[[int, str], tuple[int, str]]:
    """``as_user(uid, script)`` -> (exit status, stdout and stderr), in the
    module's ``sandbox`` mount."""

    def run(uid: int, script: str) -> tuple[int, str]:
        done = sh(script, sandbox.path, user=uid)
        return done.returncode, done.stdout + done.stderr

    return run
