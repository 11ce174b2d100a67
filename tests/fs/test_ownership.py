"""docs/spec.md 8 as unprivileged users see it, and key material never shown.

The daemon runs as root with ``--allow-other``; the tests act as ``nobody``
(65534) and a second unprivileged user (65533) through ``setpriv``. The kernel
enforces the owners and modes because the fs is mounted with
``default_permissions``; the machine checks the owner of keys and spaces too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from mktme_sandbox.mounting import MountedSandbox
from users_helpers import AS_OTHER_USERS, NOBODY, OTHER

BASE = 0x10000000
KEY = "8899aabbccddeeff0011223344556677"
TWEAK = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"

pytestmark = AS_OTHER_USERS


@pytest.fixture(scope="module")
def sandbox(module_mount: Callable[..., MountedSandbox]) -> MountedSandbox:
    sandbox = module_mount(phys_mem="8M", keyid_bits=2, seed=3, allow_other=True)
    sandbox.program_key(1, f"type=user algorithm=aes-xts-128 key={KEY} tweak={TWEAK}")
    sandbox.create_space("root")
    sandbox.write_ctl("spaces/root/ctl", f"mmap {BASE:#x} 16K rw- keyid=1 populate")
    sandbox.write_bytes("spaces/root/mem", BASE, b"root's secret data" * 100)
    sandbox.write_ctl("hw/cache", "wbinvd")
    return sandbox


def allowed(result: tuple[int, str]) -> bool:
    return result[0] == 0


def denied(result: tuple[int, str]) -> bool:
    code, output = result
    return code != 0 and ("Permission denied" in output or "Operation not permitted" in output)


def owner_and_mode(sandbox: MountedSandbox, rel: str) -> tuple[int, int]:
    st = os.stat(sandbox.path / rel)
    return st.st_uid, st.st_mode & 0o7777


def test_anyone_can_read_dram_but_only_the_daemons_user_can_write_it(
    as_user: Callable[[int, str], tuple[int, str]],
) -> None:
    assert allowed(as_user(NOBODY, "head -c 4096 dram | wc -c | grep -qx 4096"))
    assert denied(as_user(NOBODY, "printf x | dd of=dram conv=notrunc status=none"))


def test_nobody_cannot_read_the_keyid_0_view(
    as_user: Callable[[int, str], tuple[int, str]],
) -> None:
    assert denied(as_user(NOBODY, "head -c 64 keyids/0/mem"))


def test_nobody_reads_counters_but_cannot_use_the_control_files_of_mm_and_hw(
    as_user: Callable[[int, str], tuple[int, str]],
) -> None:
    assert allowed(as_user(NOBODY, "cat mm/vmstat mm/check hw/tme > /dev/null"))
    for script in (
        "echo 1 > mm/ksm/run",
        "echo 1 > mm/khugepaged/scan",
        "echo 0 > mm/mitigations/ksm_keyid_check",
        "echo 1 > mm/keyid_free_pools",
        "echo wbinvd > hw/cache",
    ):
        assert denied(as_user(NOBODY, script)), script


def test_a_key_programmed_by_root_is_readable_as_status_but_not_usable_by_nobody(
    as_user: Callable[[int, str], tuple[int, str]], sandbox: MountedSandbox
) -> None:
    assert owner_and_mode(sandbox, "keys/1") == (0, 0o644)
    assert allowed(as_user(NOBODY, "grep -q 'state=programmed' keys/1"))
    assert denied(as_user(NOBODY, "head -c 64 keyids/1/mem"))
    assert denied(as_user(NOBODY, "echo type=clear > keys/1"))
    assert denied(as_user(NOBODY, "echo 'type=cpu algorithm=aes-xts-128' > keys/1"))


def test_a_key_belongs_to_the_user_who_programs_it_until_it_is_cleared(
    as_user: Callable[[int, str], tuple[int, str]], sandbox: MountedSandbox
) -> None:
    assert owner_and_mode(sandbox, "keys/2") == (0, 0o666)
    assert allowed(as_user(NOBODY, "echo 'type=cpu algorithm=aes-xts-128' > keys/2"))
    assert owner_and_mode(sandbox, "keys/2") == (NOBODY, 0o644)
    assert owner_and_mode(sandbox, "keyids/2/mem") == (NOBODY, 0o600)
    assert allowed(as_user(NOBODY, "head -c 64 keyids/2/mem | wc -c | grep -qx 64"))
    assert denied(as_user(OTHER, "head -c 64 keyids/2/mem"))
    assert denied(as_user(OTHER, "echo type=clear > keys/2"))
    assert allowed(as_user(NOBODY, "echo type=clear > keys/2"))
    assert owner_and_mode(sandbox, "keys/2") == (0, 0o666)


def test_a_user_creates_and_uses_its_own_space_and_no_one_else_can(
    as_user: Callable[[int, str], tuple[int, str]], sandbox: MountedSandbox
) -> None:
    own = (
        "set -e; echo 'type=cpu algorithm=aes-xts-256' > keys/3; mkdir spaces/nob\n"
        f"echo 'mmap {BASE:#x} 8K rw- keyid=3 populate' > spaces/nob/ctl\n"
        f"printf hello | dd of=spaces/nob/mem bs=4096 seek=$(({BASE})) oflag=seek_bytes"
        " conv=notrunc status=none\n"
        f'test "$(dd if=spaces/nob/mem bs=5 count=1 skip=$(({BASE})) iflag=skip_bytes'
        ' status=none)" = hello\n'
        "grep -q 'keyid=3' pagetables/nob"
    )
    assert allowed(as_user(NOBODY, own))
    assert owner_and_mode(sandbox, "spaces/nob") == (NOBODY, 0o700)
    assert owner_and_mode(sandbox, "pagetables/nob") == (NOBODY, 0o400)
    assert denied(as_user(OTHER, "ls spaces/nob"))
    assert denied(as_user(OTHER, "cat pagetables/nob"))
    assert denied(as_user(OTHER, f"echo 'munmap {BASE:#x} 8K' > spaces/nob/ctl"))
    assert denied(as_user(OTHER, "rmdir spaces/nob"))
    assert allowed(as_user(NOBODY, "rmdir spaces/nob && echo type=clear > keys/3"))


def test_the_vma_files_of_a_space_belong_to_its_creator_alone(
    as_user: Callable[[int, str], tuple[int, str]], sandbox: MountedSandbox
) -> None:
    root_vma = f"spaces/root/vmas/{BASE:08x}-{BASE + 0x4000:08x}"
    assert owner_and_mode(sandbox, "spaces/root/vmas") == (0, 0o500)
    assert owner_and_mode(sandbox, root_vma) == (0, 0o600)
    assert denied(as_user(NOBODY, "ls spaces/root/vmas"))
    assert denied(as_user(NOBODY, f"head -c 64 {root_vma}"))
    own = (
        f"set -e; mkdir spaces/nobv; echo 'mmap {BASE:#x} 8K rw-' > spaces/nobv/ctl\n"
        f"printf hello | dd of=spaces/nobv/vmas/{BASE:08x}-{BASE + 0x2000:08x} conv=notrunc"
        " status=none\n"
        "grep -qa hello spaces/nobv/vmas/*"
    )
    assert allowed(as_user(NOBODY, own))
    assert denied(as_user(OTHER, f"head -c 5 spaces/nobv/vmas/{BASE:08x}-{BASE + 0x2000:08x}"))
    assert allowed(as_user(NOBODY, "rmdir spaces/nobv"))


def test_a_user_cannot_map_memory_with_a_key_it_does_not_own(
    as_user: Callable[[int, str], tuple[int, str]],
) -> None:
    script = "mkdir spaces/thief && echo 'mmap 0x20000000 4K rw- keyid=1' > spaces/thief/ctl"
    code, output = as_user(NOBODY, script)
    assert code != 0
    assert "Permission denied" in output
    assert allowed(as_user(NOBODY, "rmdir spaces/thief"))


# -- key material ---------------------------------------------------------------------

NEEDLES = [
    bytes.fromhex(KEY),
    bytes.fromhex(TWEAK),
    KEY.encode(),
    KEY.upper().encode(),
    TWEAK.encode(),
    TWEAK.upper().encode(),
]


def _mapped_ranges(maps: str) -> list[tuple[int, int]]:
    ranges = []
    for line in maps.splitlines():
        start, end = line.split()[0].split("-")
        ranges.append((int(start, 16), int(end, 16)))
    return ranges


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return os.pread(f.fileno(), length, offset)


def _contents(sandbox: MountedSandbox, path: Path) -> bytes:
    """What a reader can get from one file: whole text, covered ranges of binary files."""
    rel = path.relative_to(sandbox.path).as_posix()
    if rel.startswith("spaces/") and rel.endswith(("/mem", "/pagemap")):
        ranges = _mapped_ranges(sandbox.read_text(rel.rsplit("/", 1)[0] + "/maps"))
        if rel.endswith("/mem"):
            return b"".join(_read(path, start, end - start) for start, end in ranges)
        return b"".join(_read(path, start // 512, (end - start) // 512) for start, end in ranges)
    if rel == "hw/msr":
        return b"".join(_read(path, addr, 8) for addr in range(0x981, 0x985))
    return path.read_bytes()


def test_key_bytes_appear_in_no_readable_file_of_the_tree(sandbox: MountedSandbox) -> None:
    scanned = 0
    for directory, _dirs, files in os.walk(sandbox.path):
        for name in files:
            path = sandbox.path / os.path.relpath(os.path.join(directory, name), sandbox.path)
            if name in ("ctl", "tlb"):
                continue  # write-only
            try:
                data = _contents(sandbox, path)
            except OSError:
                continue  # e.g. a KeyID that was never programmed
            scanned += 1
            for needle in NEEDLES:
                assert needle not in data, f"key material in {path}"
    assert scanned > 30
    assert "internal error" not in sandbox.dmesg()


HOLDER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.pread(fd, 16, int(sys.argv[2]))  # allowed while the file is ours
print("open", flush=True)
sys.stdin.readline()
try:
    os.pread(fd, 16, int(sys.argv[2]))
    print("read")
except OSError as e:
    print(e.errno)
"""


KEPT_FILES = {  # a file of spaces/kept/ and the offset its holder reads at
    "mem": 0x20000000,
    "vmas/20000000-20001000": 0,
    "maps": 0,
    "smaps": 0,
    "smaps_rollup": 0,
    "status": 0,
    "numa_maps": 0,
    "uffd": 0,
    "cr3": 0,
}


@pytest.mark.parametrize(("leaf", "offset"), KEPT_FILES.items(), ids=list(KEPT_FILES))
def test_an_fd_kept_open_across_a_change_of_owner_reads_nothing_of_the_new_owner(
    as_user: Callable[[int, str], tuple[int, str]], sandbox: MountedSandbox, leaf: str, offset: int
) -> None:
    # maps and the other 0444 files too: their mode lets anyone read, but
    # only the creator could reach them through spaces/kept/ (0700).
    import errno
    import subprocess
    import sys

    assert allowed(
        as_user(NOBODY, "mkdir spaces/kept && echo 'mmap 0x20000000 4K rw-' > spaces/kept/ctl")
    )
    holder = subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-c", HOLDER, str(sandbox.path / "spaces/kept" / leaf), str(offset)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "open"
        os.rmdir(sandbox.path / "spaces/kept")  # root removes it ...
        script = "mkdir spaces/kept && echo 'mmap 0x20000000 4K rw-' > spaces/kept/ctl"
        assert allowed(as_user(OTHER, script))  # ... and another user takes the name
        sandbox.write_bytes("spaces/kept/mem", 0x20000000, b"other's secret!!")
        out, _ = holder.communicate("go\n", timeout=30)
    finally:
        holder.kill()
    assert out.strip() == str(errno.EACCES)
    assert allowed(as_user(OTHER, "rmdir spaces/kept"))


# -- keyids/N/mem: a key owner writes only its own memory --------------------------


def _pa(sandbox: MountedSandbox, space: str, va: int) -> int:
    entry = int.from_bytes(
        sandbox.read_bytes(f"spaces/{space}/pagemap", (va >> 12) * 8, 8), "little"
    )
    assert entry >> 63, f"{va:#x} is not present in {space}"
    return (entry & ((1 << 55) - 1)) << 12


def test_a_key_owner_writes_its_own_pages_through_its_keyid_and_no_others(
    as_user: Callable[[int, str], tuple[int, str]], sandbox: MountedSandbox
) -> None:
    setup = (
        "set -e; echo 'type=cpu algorithm=aes-xts-128' > keys/2; mkdir spaces/raw\n"
        f"echo 'mmap {BASE:#x} 8K rw- keyid=2 populate' > spaces/raw/ctl"
    )
    assert allowed(as_user(NOBODY, setup))
    try:
        own, roots = _pa(sandbox, "raw", BASE), _pa(sandbox, "root", BASE)
        cr3 = int(sandbox.read_text("spaces/raw/cr3"), 16)
        write = (
            "printf 'raw bytes' | dd of=keyids/2/mem bs=9 count=1 seek={} oflag=seek_bytes"
            " conv=notrunc status=none"
        )
        assert allowed(as_user(NOBODY, write.format(own)))
        assert sandbox.read_bytes("spaces/raw/mem", BASE, 9) == b"raw bytes"
        before = sandbox.read_bytes("dram", roots, 4096)
        for pa in (roots, cr3):  # root's page, its own PGD
            assert denied(as_user(NOBODY, write.format(pa))), hex(pa)
        assert sandbox.read_bytes("dram", roots, 4096) == before
        assert "keyids/2/mem: EACCES: pfn" in sandbox.dmesg()
    finally:
        assert allowed(as_user(NOBODY, "rmdir spaces/raw && echo type=clear > keys/2"))
