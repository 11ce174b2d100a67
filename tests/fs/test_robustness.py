"""Random bytes and random command lines written to every control file.

Whatever is written, the daemon answers with success or one of the errnos of
docs/spec.md section 4, never with an internal error, keeps serving, and ``mm/check`` stays
"ok". The mitigation switches are only ever written non-"0" data: turning one
off is meant to let the audit find violations. The fuzzed mount is checked in
its fixture's teardown, after the last fuzzing test of the worker that fuzzed
it (a separate test could run on another xdist worker's fresh mount).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mktme_sandbox.machine import Machine
from mktme_sandbox.mounting import MountedSandbox

pytestmark = pytest.mark.mount

CONTROL_FILES = [
    "keys/1",
    "keys/2",
    "keys/3",
    "spaces/fuzz/ctl",
    "spaces/fuzz/tlb",
    "spaces/other/ctl",
    "mm/keyid_free_pools",
    "mm/ksm/run",
    "mm/khugepaged/scan",
    "hw/cache",
    *(f"mm/mitigations/{name}" for name in Machine.MITIGATIONS),
]
SPEC_ERRNOS = {
    errno.EINVAL,
    errno.ENOKEY,
    errno.EBUSY,
    errno.EAGAIN,
    errno.EACCES,
    errno.ENOMEM,
    errno.EIO,
    errno.ENOSPC,
}
FUZZ = settings(
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# Every part of a command is drawn from a short list, mostly of valid values, so
# that commands often succeed and drawing stays cheap (a few thousand examples).
PAGES = [hex(0x10000000 + 4096 * n) for n in range(48)]
ADDRESSES = PAGES + ["0x10000001", "0x0", "0xfff", "0x7ffffffff000", "0x900000000000", "0x", "x"]
LENGTHS = ["4096", "8K", "0x3000", "64K", "2M"] * 3 + ["0", "1", "4097", "1G", "-1", "x"]
PROTS = ["---", "r--", "rw-", "r-x", "rwx", "none", "r", "rw", "rx"] * 2 + ["w", "rw+"]
OPTIONS = ["", "populate", "keyid=1", "keyid=2 populate", "keyid=3", "keyid=0", "keyid=9"]
OPTIONS += ["keyid=", "keyid=x", "populate populate", "colour=red"]
ADVICE = ["mergeable", "unmergeable", "hugepage", "dontneed", "sleep"]
HEXES = [bytes(range(n, n + size)).hex() for n in range(4) for size in (16, 16, 32)]
HEXES += ["", "zz" * 16, "00" * 15, "0" * 31]
ALGORITHMS = ["aes-xts-128", "aes-xts-256", "aes-xts-128", "des"]
OTHER = ["wbinvd", "flush", "1", "0", "2", "", "clflush 0x1000", "clflush 0x1000 keyid=2"]
OTHER += ["clflush 0x2000 keyid=1", "clflush 0xffffffffff", "clflush 0x1000 keyid=x"]

pick = st.sampled_from
space_command = st.one_of(
    st.tuples(
        pick(["mmap", "encrypt_mprotect"]),
        pick(ADDRESSES),
        pick(LENGTHS),
        pick(PROTS),
        pick(OPTIONS),
    ),
    st.tuples(pick(["mprotect"]), pick(ADDRESSES), pick(LENGTHS), pick(PROTS)),
    st.tuples(pick(["madvise"]), pick(ADDRESSES), pick(LENGTHS), pick(ADVICE)),
    st.tuples(pick(["munmap"]), pick(ADDRESSES), pick(LENGTHS)),
).map(" ".join)
key_command = st.one_of(
    st.tuples(pick(["type=cpu"]), pick(ALGORITHMS).map("algorithm={}".format)),
    st.tuples(pick(["type=user", "type=cpu"]), pick(ALGORITHMS), pick(HEXES), pick(HEXES)).map(
        lambda p: (p[0], f"algorithm={p[1]}", f"key={p[2]}", f"tweak={p[3]}")
    ),
    st.tuples(pick(["type=clear", "type=no-encrypt", "type=x", "algorithm=aes-xts-128", ""])),
).map(" ".join)
KEY_FILES = ["keys/1", "keys/2", "keys/3"]
CTL_FILES = ["spaces/fuzz/ctl", "spaces/other/ctl"]
any_line = st.one_of(space_command, key_command, pick(OTHER))
command = st.one_of(
    st.tuples(pick(KEY_FILES), key_command),
    st.tuples(pick(CTL_FILES), space_command),
    st.tuples(pick(CTL_FILES), space_command),
    st.tuples(pick(CONTROL_FILES), pick(OTHER)),
    st.tuples(pick(CONTROL_FILES), any_line),
).map(lambda pair: (pair[0], (pair[1] + "\n").encode()))


@pytest.fixture(scope="module")
def sandbox(module_mount: Callable[..., MountedSandbox]) -> Iterator[MountedSandbox]:
    """The fuzzed mount; after the module's fuzzing (on this xdist worker) it
    must still serve, its audit must be "ok", and it must still map and store."""
    sandbox = module_mount(phys_mem="16M", keyid_bits=2, seed=4)
    sandbox.create_space("fuzz")
    sandbox.create_space("other")
    yield sandbox
    assert_still_serves(sandbox)


def write_one(sandbox: MountedSandbox, rel: str, data: bytes) -> None:
    if rel.startswith("mm/mitigations/") and data.strip() == b"0":
        data = b"1"  # keep every mitigation on
    fd = os.open(sandbox.path / rel, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data)
    except OSError as err:
        allowed = SPEC_ERRNOS
        assert err.errno in allowed, f"{rel} <- {data!r}: {os.strerror(err.errno or 0)}"
    finally:
        os.close(fd)


def assert_still_serves(sandbox: MountedSandbox) -> None:
    assert sandbox.read_text("README")
    assert sandbox.check() == []
    assert "internal error" not in sandbox.dmesg()
    sandbox.create_space("after")
    sandbox.write_ctl("spaces/after/ctl", "mmap 0x10000000 4K rw-")
    sandbox.write_bytes("spaces/after/mem", 0x10000000, b"still works")
    assert sandbox.read_bytes("spaces/after/mem", 0x10000000, 11) == b"still works"


@settings(FUZZ, max_examples=1000)
@given(rel=st.sampled_from(CONTROL_FILES), data=st.binary(min_size=1, max_size=200))
def test_random_bytes_written_to_control_files_leave_the_machine_consistent(
    sandbox: MountedSandbox, rel: str, data: bytes
) -> None:
    write_one(sandbox, rel, data)


@settings(FUZZ, max_examples=2500)
@given(pair=command)
def test_random_command_lines_written_to_control_files_leave_the_machine_consistent(
    sandbox: MountedSandbox, pair: tuple[str, bytes]
) -> None:
    write_one(sandbox, *pair)
