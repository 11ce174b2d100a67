"""Per-user limits (docs/spec.md 8) as unprivileged users meet them on a mount:
one user cannot take every KeyID or every page, and another still can after it.

The daemon runs as root with ``--allow-other``, 7 KeyIDs (a limit of 4 per
user by default) and ``max_pages_per_uid`` 256 (1 MiB); the users are
``nobody`` (65534) and 65533, through ``setpriv``.
"""

from __future__ import annotations

import errno
import subprocess
import sys
from collections.abc import Callable

import pytest

from mktme_sandbox.fs.operations import OPEN_FILES_PER_UID, TEXT_BYTES_PER_UID
from mktme_sandbox.mounting import MountedSandbox
from users_helpers import AS_OTHER_USERS, NOBODY, OTHER

BASE = 0x10000000

pytestmark = AS_OTHER_USERS


@pytest.fixture(scope="module")
def sandbox(module_mount: Callable[..., MountedSandbox]) -> MountedSandbox:
    return module_mount(
        phys_mem="8M", keyid_bits=3, max_pages_per_uid=256, seed=5, allow_other=True
    )


def test_one_user_cannot_program_every_keyid_and_another_still_can(
    as_user: Callable[[int, str], tuple[int, str]], sandbox: MountedSandbox
) -> None:
    take = "echo 'type=cpu algorithm=aes-xts-128' > keys/{}"
    for keyid in (1, 2, 3, 4):
        assert as_user(NOBODY, take.format(keyid))[0] == 0
    code, output = as_user(NOBODY, take.format(5))
    assert code != 0
    assert "Disk quota exceeded" in output
    assert "keys/5: EDQUOT: key: uid 65534 owns 4 KeyIDs" in sandbox.dmesg()
    assert as_user(OTHER, take.format(5))[0] == 0
    for uid, keyids in ((NOBODY, (1, 2, 3, 4)), (OTHER, (5,))):
        for keyid in keyids:
            assert as_user(uid, f"echo type=clear > keys/{keyid}")[0] == 0


def test_one_user_cannot_take_every_page_and_another_still_maps(
    as_user: Callable[[int, str], tuple[int, str]], sandbox: MountedSandbox
) -> None:
    code, output = as_user(
        NOBODY, f"mkdir spaces/hog && echo 'mmap {BASE:#x} 4M rw- populate' > spaces/hog/ctl"
    )
    assert code != 0
    assert "Cannot allocate memory" in output
    assert "max_pages_per_uid" in sandbox.dmesg().splitlines()[-1]
    fill = (
        f"echo 'mmap {BASE:#x} 4M rw-' > spaces/hog/ctl\n"
        f"head -c 4M /dev/zero | dd of=spaces/hog/mem bs=4096 seek=$(({BASE} / 4096))"
        " conv=notrunc status=none"
    )
    code, output = as_user(NOBODY, fill)
    assert code != 0
    assert "Cannot allocate memory" in output
    other = (
        f"set -e; mkdir spaces/other; echo 'mmap {BASE:#x} 512K rw- populate' > spaces/other/ctl\n"
        f"printf still | dd of=spaces/other/mem bs=4096 seek=$(({BASE} / 4096)) conv=notrunc"
        " status=none"
    )
    assert as_user(OTHER, other) == (0, "")
    assert sandbox.read_bytes("spaces/other/mem", BASE, 5) == b"still"
    assert sandbox.check() == []
    assert as_user(NOBODY, "rmdir spaces/hog")[0] == 0
    assert as_user(OTHER, "rmdir spaces/other")[0] == 0


# -- what one user's open files cost the daemon ------------------------------------------

HOARDER = """
import os, sys
fds, error = [], 0
while len(fds) < int(sys.argv[2]):
    try:
        fds.append(os.open(sys.argv[1], os.O_RDONLY))
    except OSError as e:
        error = e.errno
        break
print(len(fds), error, flush=True)
sys.stdin.readline()
os.close(fds.pop())
os.close(os.open(sys.argv[1], os.O_RDONLY))  # room again for one
print("reopened", flush=True)
"""


def hoard(sandbox: MountedSandbox, uid: int, path: str, most: int) -> subprocess.Popen[str]:
    """A process of ``uid`` that opens ``path`` until refused (or ``most`` times) and
    keeps what it got, printing how many and the errno, until told to go on."""
    return subprocess.Popen(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
         sys.executable, "-c", HOARDER, str(sandbox.path / path), str(most)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def opened_until_refused(hoarder: subprocess.Popen[str]) -> tuple[int, int]:
    assert hoarder.stdout is not None
    count, error = hoarder.stdout.readline().split()
    return int(count), int(error)


def test_one_user_cannot_keep_more_than_its_share_of_files_open_and_others_still_open(
    as_user: Callable[[int, str], tuple[int, str]], sandbox: MountedSandbox
) -> None:
    hoarder = hoard(sandbox, NOBODY, "hw/tme", OPEN_FILES_PER_UID + 10)
    try:
        assert opened_until_refused(hoarder) == (OPEN_FILES_PER_UID, errno.EMFILE)
        assert f"hw/tme: EMFILE: uid {NOBODY} has {OPEN_FILES_PER_UID} files" in sandbox.dmesg()
        assert as_user(OTHER, "cat hw/tme > /dev/null") == (0, "")
        assert (sandbox.path / "hw/tme").read_text()  # root: no limit
        out, _ = hoarder.communicate("go\n", timeout=30)
    finally:
        hoarder.kill()
    assert out.strip() == "reopened"


def test_one_user_cannot_hold_more_rendered_text_than_its_share(
    as_user: Callable[[int, str], tuple[int, str]], sandbox: MountedSandbox
) -> None:
    # A full dmesg of long lines (printk cuts them at 1 KiB): 4096 rejected keyid=WORD.
    word = "x" * 4000
    flood = f"for i in $(seq 4096); do echo 'mmap {BASE:#x} 4K rw- keyid={word}'; done"
    assert as_user(NOBODY, f"mkdir spaces/flood && {flood} > spaces/flood/ctl")[0] != 0
    rendered = len((sandbox.path / "dmesg").read_bytes())
    assert rendered > 4096 * 1000
    hoarder = hoard(sandbox, NOBODY, "dmesg", 100)
    try:
        assert opened_until_refused(hoarder) == (TEXT_BYTES_PER_UID // rendered, errno.ENOMEM)
        assert f"dmesg: ENOMEM: uid {NOBODY}'s open files would hold" in sandbox.dmesg()
        assert as_user(OTHER, "head -c 1 dmesg") == (0, "[")
        out, _ = hoarder.communicate("go\n", timeout=30)
    finally:
        hoarder.kill()
    assert out.strip() == "reopened"
    assert as_user(NOBODY, "rmdir spaces/flood") == (0, "")
