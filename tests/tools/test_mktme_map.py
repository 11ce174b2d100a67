"""mktme-map: map with a KeyID (creating the space), show, unmap, list, destroy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mktme_sandbox.client import Mount
from tools_helpers import Run

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
        assert "ENOKEY" in done.stderr
        assert "spaces/" in done.stderr
    finally:
        if (mnt.root / "spaces" / name).exists():
            mnt.space(name).destroy()


def test_an_unaligned_address_is_einval(tool: Run, mnt: Mount) -> None:
    name = space_name() + "-einval"
    try:
        done = tool("mktme-map", "map", name, "0x7f0000000001", "4096")
        assert done.returncode == 1
        assert "EINVAL" in done.stderr
    finally:
        if (mnt.root / "spaces" / name).exists():
            mnt.space(name).destroy()


def test_showing_a_missing_space_exits_3(tool: Run) -> None:
    done = tool("mktme-map", "show", "no-such-space")
    assert done.returncode == 3
    assert "no space" in done.stderr


def test_memory_counts_the_pages_of_each_keyid_as_page_keyid_does(
    tool: Run, mnt: Mount, tmp_path: Path
) -> None:
    """The counts come from mm/keyid_map.svg; they must agree with mm/page_keyid
    and mm/kpageflags read directly (BUDDY bit 10 marks a free page)."""
    keyid = mnt.add_key("type=cpu algorithm=aes-xts-128")
    name = space_name()
    try:
        tool("mktme-map", "map", name, "0x7f0000000000", "128K", "-k", str(keyid), "--populate")
        picture = tmp_path / "memory.svg"
        done = tool("mktme-map", "memory", "--json", "-o", str(picture))
        assert done.returncode == 0, done.stderr
        counts = json.loads(done.stdout)
        assert picture.read_text() == mnt.read_text("mm/keyid_map.svg")
        keyids = mnt.page_keyids()
        free = [
            bool(int.from_bytes(mnt.read_bytes("mm/kpageflags", pfn * 8, 8), "little") >> 10 & 1)
            for pfn in range(len(keyids))
        ]
        in_use = sum(1 for k, f in zip(keyids, free, strict=True) if k == keyid and not f)
        assert counts["pages"] == len(keyids)
        assert counts["pages_per_cell"] == 1
        assert sum(v for c, v in counts["keyids"][str(keyid)].items() if c != "free") == in_use
        assert in_use >= 32  # the 128K just populated
        table = tool("mktme-map", "memory").stdout.splitlines()
        assert table[0].split()[0] == "KEYID"
        assert any(line.split()[0] == str(keyid) for line in table[1:])
    finally:
        tool("mktme-map", "destroy", name)
        mnt.clear_key(keyid)


def test_the_output_option_belongs_to_memory_only(tool: Run) -> None:
    done = tool("mktme-map", "list", "-o", "x.svg")
    assert done.returncode == 2
    assert done.stderr.strip() == "mktme-map: -o is for the memory command only"
