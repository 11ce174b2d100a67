"""Per-user limits (docs/spec.md 8) as unprivileged users meet them on a mount:
one user cannot take every KeyID or every page, and another still can after it.

The daemon runs as root with ``--allow-other``, 7 KeyIDs (a limit of 4 per
user by default) and ``max_pages_per_uid`` 256 (1 MiB); the users are
``nobody`` (65534) and 65533, through ``setpriv``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

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
