"""mktme-map: map with a KeyID (creating the space), show, unmap, list, destroy."""

from __future__ import annotations

import os

import pytest
from tools_helpers import Run

from mktme_sandbox.client import Mount

pytestmark = pytest.mark.mount


def space_name() -> str:
    return f"maptest-{os.getpid()}"


def test_help_teaches_the_commands_with_examples_and_exit_status(tool: Run) -> None:
    done = tool("mktme-map", "--help")
    assert done.returncode == 0
    for text in ("map SPACE ADDR LEN", "unmap", "show SPACE", "examples:", "exit status"):
        assert text in done.stdout


def test_map_show_unmap_destroy(tool: Run, mnt: Mount) -> None:
    keyid = mnt.add_key("type=cpu algorithm=aes-xts-128")
    name = space_name()
    try:
        done = tool(
            "mktme-map", "map", name, "0x7f0000000000", "64K", "-k", str(keyid), "--populate"
        )
        assert done.returncode == 0, done.stderr
        tool("mktme-map", "map", name, "0x7f0000100000", "4096", "-p", "r--")
        shown = tool("mktme-map", "show", name).stdout.splitlines()
        assert shown[0].split() == ["RANGE", "SIZE", "PERMS", "KEYID", "RSS"]
        assert shown[1].split()[:5] == [
            "7f0000000000-7f0000010000",
            "64",
            "KiB",
            "rw-p",
            str(keyid),
        ]
        assert shown[2].split()[:5] == ["7f0000100000-7f0000101000", "4", "KiB", "r--p", "0"]
        assert name in tool("mktme-map", "list").stdout
        assert tool("mktme-map", "unmap", name, "0x7f0000000000", "64K").returncode == 0
        assert len(mnt.space(name).smaps()) == 1
        assert tool("mktme-map", "destroy", name).returncode == 0
        assert not (mnt.root / "spaces" / name).exists()
    finally:
        if (mnt.root / "spaces" / name).exists():
            mnt.space(name).destroy()
        mnt.clear_key(keyid)


def test_mapping_with_a_keyid_never_programmed_is_enokey(tool: Run, mnt: Mount) -> None:
    free = next(k.keyid for k in mnt.key_table() if not k.programmed)
    name = space_name() + "-enokey"
    try:
        done = tool("mktme-map", "map", name, "0x7f0000000000", "4096", "-k", str(free))
        assert done.returncode == 1
        assert "ENOKEY" in done.stderr and "spaces/" in done.stderr
    finally:
        if (mnt.root / "spaces" / name).exists():
            mnt.space(name).destroy()


def test_an_unaligned_address_is_einval(tool: Run, mnt: Mount) -> None:
    name = space_name() + "-einval"
    try:
        done = tool("mktme-map", "map", name, "0x7f0000000001", "4096")
        assert done.returncode == 1 and "EINVAL" in done.stderr
    finally:
        if (mnt.root / "spaces" / name).exists():
            mnt.space(name).destroy()


def test_showing_a_missing_space_exits_3(tool: Run) -> None:
    done = tool("mktme-map", "show", "no-such-space")
    assert done.returncode == 3 and "no space" in done.stderr
