"""Shared pieces of the mount tests: module-scoped mounts and a shell.

Mounts come from ``sandbox.pytest_plugin.mounted`` (it fails on tracebacks in
the daemon log); they live in a world-traversable directory under /tmp so that
the unprivileged user of the ownership tests can reach them. At teardown each
mount must still answer and its dmesg must show no internal error.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.pytest_plugin import MountedSandbox, fuse_unavailable_reason, mounted

NOBODY = 65534
OTHER = 65533


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


@contextlib.contextmanager
def _checked_mount(**options: Any) -> Iterator[MountedSandbox]:
    directory = Path(tempfile.mkdtemp(prefix="mktme-fs-test-"))
    directory.chmod(0o755)
    try:
        with mounted(directory / "mnt", **options) as sandbox:
            yield sandbox
            assert (sandbox.path / "README").read_text(), "the daemon stopped answering"
            assert "internal error" not in sandbox.dmesg()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def module_mount() -> Iterator[Callable[..., MountedSandbox]]:
    """``module_mount(**options)``: a mount that lasts for the test module."""
    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with contextlib.ExitStack() as stack:
        yield lambda **options: stack.enter_context(_checked_mount(**options))


@pytest.fixture
def sh() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``sh(script, cwd, user=None)``: run a bash script."""
    return run_shell
