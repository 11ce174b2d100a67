"""``spaces/NAME/vmas/START-END``: one file per VMA, its bytes from offset 0,
through a real mount and the shell tools a user would point at a region."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator

import pytest

from mktme_sandbox.mounting import MountedSandbox

pytestmark = pytest.mark.mount

BASE = 0x10000000
K16, K64 = 0x4000, 0x10000
SECRET = b"the launch code is 0000"


@pytest.fixture(scope="module")
def sandbox(module_mount: Callable[..., MountedSandbox]) -> MountedSandbox:
    sandbox = module_mount(phys_mem="16M", seed=2)
    sandbox.program_key(1)
    return sandbox


@pytest.fixture
def space(sandbox: MountedSandbox, request: pytest.FixtureRequest) -> Iterator[str]:
    """A new space named after the test, removed afterwards."""
    name = request.node.name.removeprefix("test_")[:40]
    sandbox.create_space(name)
    yield name
    os.rmdir(sandbox.path / "spaces" / name)


def vma(start: int, end: int) -> str:
    return f"{start:08x}-{end:08x}"


def vmas(sandbox: MountedSandbox, space: str) -> list[str]:
    return sorted(os.listdir(sandbox.path / "spaces" / space / "vmas"))


def test_each_vma_is_a_file_named_as_in_maps_and_as_large_as_the_vma(
    sandbox: MountedSandbox, space: str, bash: Callable[[str], str]
) -> None:
    sandbox.map(space, BASE, "16K", keyid=1)
    sandbox.map(space, BASE + 0x100000, "64K", "r--")
    names = [line.split()[0] for line in sandbox.read_text(f"spaces/{space}/maps").splitlines()]
    assert (
        vmas(sandbox, space)
        == names
        == [
            vma(BASE, BASE + K16),
            vma(BASE + 0x100000, BASE + 0x100000 + K64),
        ]
    )
    assert bash(f"stat -c '%a %s' spaces/{space}/vmas/*").split() == [
        "600",
        "16384",
        "600",
        "65536",
    ]
    assert bash(f"stat -c %a spaces/{space}/vmas").strip() == "500"
    assert "vmas" in os.listdir(sandbox.path / "spaces" / space)


def test_grep_finds_a_secret_in_the_vma_that_holds_it_at_its_offset_there(
    sandbox: MountedSandbox, space: str, bash: Callable[[str], str]
) -> None:
    sandbox.map(space, BASE, "16K", keyid=1)
    sandbox.map(space, BASE + K16, "16K")  # KeyID 0: a VMA of its own
    sandbox.write_bytes(f"spaces/{space}/mem", BASE + K16 + 0x1234, SECRET)
    holder = f"spaces/{space}/vmas/{vma(BASE + K16, BASE + 2 * K16)}"
    assert bash(f"grep -la 'launch code' spaces/{space}/vmas/*").split() == [holder]
    assert bash(f"grep -boa 'launch code' {holder}").strip() == f"{0x1234 + 4}:launch code"
    assert bash(f"xxd -s 0x1234 -l {len(SECRET)} -p {holder}").strip() == SECRET.hex()
    assert "launch code" in bash(f"strings {holder}")


def test_mprotect_splits_a_vma_file_into_three_and_merging_brings_it_back(
    sandbox: MountedSandbox, space: str
) -> None:
    sandbox.map(space, BASE, "64K")
    sandbox.write_bytes(f"spaces/{space}/mem", BASE + 0x5000, SECRET)
    whole = vma(BASE, BASE + K64)
    ctl = f"spaces/{space}/ctl"
    sandbox.write_ctl(ctl, f"mprotect {BASE + K16:#x} 16K r--")
    parts = [
        vma(BASE, BASE + K16),
        vma(BASE + K16, BASE + 2 * K16),
        vma(BASE + 2 * K16, BASE + K64),
    ]
    assert vmas(sandbox, space) == parts
    with pytest.raises(FileNotFoundError):
        os.stat(sandbox.path / "spaces" / space / "vmas" / whole)
    assert sandbox.read_bytes(f"spaces/{space}/vmas/{parts[1]}", 0x1000, len(SECRET)) == SECRET
    sandbox.write_ctl(ctl, f"mprotect {BASE + K16:#x} 16K rw-")
    assert vmas(sandbox, space) == [whole]
    assert not (sandbox.path / "spaces" / space / "vmas" / parts[0]).exists()


def test_munmap_of_the_middle_leaves_two_files_and_no_name_for_the_hole(
    sandbox: MountedSandbox, space: str
) -> None:
    sandbox.map(space, BASE, "64K")
    sandbox.write_ctl(f"spaces/{space}/ctl", f"munmap {BASE + K16:#x} 16K")
    assert vmas(sandbox, space) == [vma(BASE, BASE + K16), vma(BASE + 2 * K16, BASE + K64)]
    sandbox.write_ctl(f"spaces/{space}/ctl", f"munmap {BASE:#x} 64K")
    assert vmas(sandbox, space) == []


def test_a_read_across_the_end_of_the_vma_stops_there(
    sandbox: MountedSandbox, space: str, bash: Callable[[str], str]
) -> None:
    sandbox.map(space, BASE, "16K")
    sandbox.map(space, BASE + K16, "16K", keyid=1)  # the next VMA is not read
    sandbox.write_bytes(f"spaces/{space}/mem", BASE + K16 - 4, b"tail")
    sandbox.write_bytes(f"spaces/{space}/mem", BASE + K16, b"next")
    first = f"spaces/{space}/vmas/{vma(BASE, BASE + K16)}"
    assert sandbox.read_bytes(first, K16 - 4, 100) == b"tail"
    assert sandbox.read_bytes(first, K16, 100) == b""
    assert bash(f"cat {first} | wc -c").strip() == str(K16)


def test_writes_follow_the_rules_of_mem_and_stop_at_the_vma_end(
    sandbox: MountedSandbox, space: str
) -> None:
    sandbox.map(space, BASE, "16K", keyid=1)
    sandbox.map(space, BASE + K16, "16K")  # writable: mem would let a write run on
    sandbox.map(space, BASE + 2 * K16, "16K", "r--")
    writable = f"spaces/{space}/vmas/{vma(BASE, BASE + K16)}"
    sandbox.write_bytes(writable, 0x10, SECRET)
    assert sandbox.read_bytes(f"spaces/{space}/mem", BASE + 0x10, len(SECRET)) == SECRET
    with pytest.raises(OSError, match="ENOSPC") as past_end:
        sandbox.write_bytes(writable, K16 - 4, b"overflow")
    assert past_end.value.errno == errno.ENOSPC
    assert "reaches past the end of the VMA" in sandbox.dmesg().splitlines()[-1]
    assert sandbox.read_bytes(f"spaces/{space}/mem", BASE + K16 - 4, 8) == bytes(8)
    read_only = f"spaces/{space}/vmas/{vma(BASE + 2 * K16, BASE + 3 * K16)}"
    with pytest.raises(OSError, match="EIO") as refused:
        sandbox.write_bytes(read_only, 0, b"x")
    assert refused.value.errno == errno.EIO
    assert "EIO" in sandbox.dmesg().splitlines()[-1]


def test_a_prot_none_vma_reads_as_eio_like_mem(sandbox: MountedSandbox, space: str) -> None:
    sandbox.map(space, BASE, "4K", "---")
    with pytest.raises(OSError, match="EIO") as refused:
        sandbox.read_bytes(f"spaces/{space}/vmas/{vma(BASE, BASE + 0x1000)}", 0, 16)
    assert refused.value.errno == errno.EIO
