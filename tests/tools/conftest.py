"""Shared pieces of the mountpoint-tools tests: one mount, the tools, a tenant.

The mount comes from ``sandbox.pytest_plugin.mounted`` and lasts for the
session (per xdist worker): every test takes its own KeyIDs and spaces and
gives them back, as the tools' users would. Tests run the tools as programs,
with ``MKTME_MNT`` set, exactly as a user would; they prepare state through
``mountpoint-tools/mktmefs.py`` (standard library only), never through
``sandbox``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.pytest_plugin import fuse_unavailable_reason, mounted

# The helpers of this folder and the tools' library, for every test module here.
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "mountpoint-tools")]

from mktmefs import Mount
from tools_helpers import TOOLS, VA, Run, Tenant


@pytest.fixture(scope="session")
def mnt() -> Iterator[Mount]:
    """A 64 MiB sandbox, seed 1, for the whole session; mm/check must stay ok."""
    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    directory = Path(tempfile.mkdtemp(prefix="mktme-tools-test-"))
    try:
        with mounted(directory / "mnt", phys_mem="64M", seed=1) as sandbox:
            mount = Mount(sandbox.path)
            yield mount
            assert mount.check() == [], "the tools left the machine inconsistent"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def tool(mnt: Mount) -> Run:
    """``tool("mktme-key", "list")``: run a tool with MKTME_MNT set; never raises."""

    def run(
        name: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        environ = dict(os.environ, MKTME_MNT=str(mnt.root)) if env is None else env
        return subprocess.run(
            [str(TOOLS / name), *args],
            env=environ,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return run


@pytest.fixture
def tenant(mnt: Mount) -> Iterator[Tenant]:
    keyid = mnt.program_key("type=cpu algorithm=aes-xts-128")
    space = mnt.create_space("tooltest")
    try:
        space.mmap(VA, 4096, "rw-", keyid=keyid, populate=True)
        yield Tenant(mnt, keyid, space, VA)
    finally:
        space.destroy()
        mnt.clear_key(keyid)
