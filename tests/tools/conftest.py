"""Shared pieces of the tools tests: one mount, the tools, a tenant.

The mount comes from ``module_mount`` (tests/conftest.py) and lasts for the
test module: every test takes its own KeyIDs and spaces and gives them back,
as the tools' users would, and at the end ``mm/check`` must still be clean.
Tests run the tools as the installed console scripts (``.venv/bin/mktme-key``
...), with ``MKTME_MNT`` set, exactly as a user would; they prepare state
through ``mktme_sandbox.client`` (standard library only), never through the
in-process ``Machine``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator

import pytest

from mktme_sandbox.client import Mount
from mktme_sandbox.mounting import MountedSandbox
from tools_helpers import BIN, VA, Run, Tenant


@pytest.fixture(scope="module")
def mnt(module_mount: Callable[..., MountedSandbox]) -> Mount:
    """A 64 MiB sandbox, seed 1, for the test module (a client ``Mount``)."""
    return module_mount(phys_mem="64M", seed=1)


@pytest.fixture
def tool(mnt: Mount) -> Run:
    """``tool("mktme-key", "list")``: run a tool with MKTME_MNT set; never raises."""

    def run(
        name: str, *args: str, env: dict[str, str] | None = None, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        environ = dict(os.environ, MKTME_MNT=str(mnt.root)) if env is None else env
        return subprocess.run(
            [str(BIN / name), *args],
            env=environ,
            input=stdin,
            stdin=subprocess.DEVNULL if stdin is None else None,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return run


@pytest.fixture
def tenant(mnt: Mount) -> Iterator[Tenant]:
    keyid = mnt.add_key("type=cpu algorithm=aes-xts-128")
    space = mnt.new_space("tooltest")
    try:
        space.mmap(VA, 4096, "rw-", keyid=keyid, populate=True)
        yield Tenant(mnt, keyid, space, VA)
    finally:
        space.destroy()
        mnt.clear_key(keyid)
