"""Shared pieces of the mountpoint-tools tests: one mount, the tools, a tenant.

The mount comes from ``module_mount`` (tests/conftest.py) and lasts for the
test module: every test takes its own KeyIDs and spaces and gives them back,
as the tools' users would, and at the end ``mm/check`` must still say "ok".
Tests run the tools as programs, with ``MKTME_MNT`` set, exactly as a user
would; they prepare state through ``mountpoint-tools/mktmefs.py`` (standard
library only), never through ``sandbox`` (test_mktmefs.py imports it only to
hold mktmefs's copies of its tables equal to the originals).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mktme_sandbox.pytest_plugin import MountedSandbox

# The helpers of this folder and the tools' library, for every test module here.
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "mountpoint-tools")]

from mktmefs import Mount
from tools_helpers import TOOLS, VA, Run, Tenant


@pytest.fixture(scope="module")
def mnt(module_mount: Callable[..., MountedSandbox]) -> Mount:
    """A 64 MiB sandbox, seed 1, for the test module, seen through mktmefs."""
    return Mount(module_mount(phys_mem="64M", seed=1).path)


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
