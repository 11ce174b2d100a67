"""The FUSE entry points in-process, without a mount: resolution and error reporting.

These check what a mount cannot show: that every node of the tree answers
getattr/readdir/read, that a missing path is ENOENT without a dmesg line, that
a ``SandboxError`` becomes its errno plus one dmesg line, and that an
unexpected exception becomes EIO with only the exception's *type* logged.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from types import SimpleNamespace

import mfusepy
import pytest

from mktme_sandbox import Machine
from mktme_sandbox.errors import SandboxError
from mktme_sandbox.fs import SandboxFS, operations
from mktme_sandbox.fs.nodes import Access, BlobFile, TextFile


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Machine:
    monkeypatch.setattr(operations, "_caller_uid", lambda: 0)  # no FUSE context here
    return Machine(phys_mem="8M", keyid_bits=2, seed=6)


@pytest.fixture
def fs(machine: Machine) -> SandboxFS:
    return SandboxFS(machine)


def read(fs: SandboxFS, path: str, size: int = 4096, offset: int = 0) -> bytes:
    fi = SimpleNamespace(flags=os.O_RDONLY, direct_io=0, fh=0)
    fs.open(path, fi)
    try:
        return fs.read(path, size, offset, fi)
    finally:
        fs.release(path, fi)


def write(fs: SandboxFS, path: str, data: bytes) -> int:
    fi = SimpleNamespace(flags=os.O_WRONLY | os.O_TRUNC, direct_io=0, fh=0)
    fs.open(path, fi)
    try:
        return fs.write(path, data, 0, fi)
    finally:
        fs.release(path, fi)


def walk(fs: SandboxFS, path: str = "/") -> Iterator[str]:
    yield path
    if stat.S_ISDIR(fs.getattr(path)["st_mode"]):
        for name in fs.readdir(path, None):
            if name not in (".", ".."):
                yield from walk(fs, f"{path.rstrip('/')}/{name}")


def test_every_node_of_the_tree_answers_getattr_and_its_first_read(fs: SandboxFS) -> None:
    fs.mkdir("/spaces/s", 0o755)
    paths = list(walk(fs))
    assert "/spaces/s/smaps" in paths
    assert "/mm/mitigations/ksm_keyid_check" in paths
    for path in paths:
        if not stat.S_ISREG(fs.getattr(path)["st_mode"]):
            continue
        node = fs.tree.resolve(path)
        assert isinstance(node, TextFile | BlobFile), path
        if node.readable and not path.endswith(("/spaces/s/mem", "/hw/msr")):
            read(fs, path, 64)  # (nothing is mapped at 0 in s; there is no MSR at 0)


def test_a_missing_path_is_enoent_and_leaves_dmesg_alone(fs: SandboxFS) -> None:
    before = fs.machine.dmesg()
    for path in ("/nope", "/keys/0", "/keys/4", "/keys/01", "/keyids/9/mem", "/spaces/x/ctl"):
        with pytest.raises(mfusepy.FuseOSError) as raised:
            fs.getattr(path)
        assert raised.value.errno == errno.ENOENT
    assert fs.machine.dmesg() == before


def test_a_sandbox_error_becomes_its_errno_and_one_dmesg_line_naming_the_file(
    fs: SandboxFS,
) -> None:
    with pytest.raises(mfusepy.FuseOSError) as raised:
        write(fs, "/keys/1", b"type=bogus\n")
    assert raised.value.errno == errno.EINVAL
    assert fs.machine.dmesg().splitlines()[-1].split("] ", 1)[1].startswith("keys/1: EINVAL: ")


def test_an_unexpected_exception_is_eio_with_only_its_type_in_dmesg(
    machine: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> str:
        raise ValueError("text that might carry data")

    monkeypatch.setattr(machine, "vmstat", broken)
    fs = SandboxFS(machine)
    with pytest.raises(mfusepy.FuseOSError) as raised:
        read(fs, "/mm/vmstat")
    assert raised.value.errno == errno.EIO
    last = fs.machine.dmesg().splitlines()[-1]
    assert "mm/vmstat: EIO: internal error (ValueError)" in last
    assert "might carry data" not in fs.machine.dmesg()
    assert read(fs, "/README", 10)  # and it goes on serving


def test_open_sets_direct_io_on_everything_but_the_readme(fs: SandboxFS) -> None:
    for path, direct in (("/README", 0), ("/dmesg", 1), ("/dram", 1), ("/keys/1", 1)):
        fi = SimpleNamespace(flags=0, direct_io=None, fh=0)
        fs.open(path, fi)
        assert fi.direct_io == direct


def test_open_refuses_the_direction_a_file_does_not_have(fs: SandboxFS) -> None:
    fs.mkdir("/spaces/o", 0o755)
    for path, flags in (("/mm/vmstat", 1), ("/spaces/o/ctl", 0), ("/hw/msr", 2)):
        with pytest.raises(mfusepy.FuseOSError) as raised:
            fs.open(path, SimpleNamespace(flags=flags, direct_io=0, fh=0))
        assert raised.value.errno == errno.EACCES


def test_mkdir_and_rmdir_create_and_destroy_spaces_owned_by_the_caller(
    fs: SandboxFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(operations, "_caller_uid", lambda: 1234)
    fs.mkdir("/spaces/mine", 0o755)
    attrs = fs.getattr("/spaces/mine")
    assert (attrs["st_uid"], attrs["st_mode"] & 0o7777) == (1234, 0o700)
    fs.rmdir("/spaces/mine")
    assert "mine" not in fs.readdir("/spaces", None)


def test_pconfig_busy_past_the_retries_is_eagain_through_keys_n(fs: SandboxFS) -> None:
    fs.machine.inject_pconfig_faults(5, 20)  # DEVICE_BUSY, more often than the kernel retries
    with pytest.raises(mfusepy.FuseOSError) as raised:
        write(fs, "/keys/1", b"type=cpu algorithm=aes-xts-128\n")
    assert raised.value.errno == errno.EAGAIN
    assert "keys/1: EAGAIN: " in fs.machine.dmesg().splitlines()[-1]


def test_the_machine_refuses_a_key_command_from_a_writer_who_does_not_own_the_key(
    fs: SandboxFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the kernel's mode check stops other users first; this is the machine's own check
    write(fs, "/keys/2", b"type=cpu algorithm=aes-xts-128\n")
    monkeypatch.setattr(operations, "_caller_uid", lambda: 1000)
    with pytest.raises(mfusepy.FuseOSError) as raised:
        write(fs, "/keys/2", b"type=clear\n")
    assert raised.value.errno == errno.EACCES
    assert "keys/2: EACCES: " in fs.machine.dmesg().splitlines()[-1]


def test_one_open_reads_one_consistent_text_and_a_read_from_0_renders_again(fs: SandboxFS) -> None:
    fi = SimpleNamespace(flags=os.O_RDONLY, direct_io=0, fh=0)
    fs.open("/dmesg", fi)
    head = fs.read("/dmesg", 20, 0, fi)
    with pytest.raises(mfusepy.FuseOSError):
        write(fs, "/keys/1", b"nonsense\n")  # appends a dmesg line meanwhile
    first_pass = head + fs.read("/dmesg", 1 << 20, 20, fi)
    assert b"nonsense" not in first_pass
    assert b"keys/1: EINVAL" not in first_pass
    assert b"keys/1: EINVAL" in fs.read("/dmesg", 1 << 20, 0, fi)
    fs.release("/dmesg", fi)
    assert fs.open_files == {}


def test_with_mktme_off_keys_is_empty_and_keyids_has_only_keyid_0() -> None:
    fs = SandboxFS(Machine(phys_mem="8M", keyid_bits=0))
    assert fs.readdir("/keys", None) == [".", ".."]
    assert fs.readdir("/keyids", None) == [".", "..", "0"]
    assert len(read(fs, "/keyids/0/mem", 64)) == 64


def test_a_write_only_control_file_opened_for_reading_and_writing_is_eacces(fs: SandboxFS) -> None:
    """open(2): O_RDWR asks for both directions, so a file without one of them
    refuses it (docs/spec.md 8: control files are write-only, 0200)."""
    fs.mkdir("/spaces/o", 0o755)
    for path in ("/spaces/o/ctl", "/spaces/o/tlb", "/mm/compact_memory"):
        with pytest.raises(mfusepy.FuseOSError) as raised:
            fs.open(path, SimpleNamespace(flags=os.O_RDWR, direct_io=0, fh=0))
        assert raised.value.errno == errno.EACCES


def test_truncating_a_read_only_file_is_eacces_and_a_writable_one_stays_as_it_is(
    fs: SandboxFS,
) -> None:
    """truncate(2) is a write: "EACCES ... The named file is not writable by
    the user"; ``echo CMD > ctl`` truncates first and must keep working."""
    with pytest.raises(mfusepy.FuseOSError) as raised:
        fs.truncate("/mm/vmstat", 0)
    assert raised.value.errno == errno.EACCES
    assert "mm/vmstat: EACCES: " in fs.machine.dmesg().splitlines()[-1]
    assert fs.truncate("/keys/1", 0) == 0


def open_as(fs: SandboxFS, path: str, flags: int = os.O_RDONLY) -> SimpleNamespace:
    fi = SimpleNamespace(flags=flags, direct_io=0, fh=0)
    fs.open(path, fi)
    return fi


def test_root_keeps_more_files_open_than_a_user_may(
    fs: SandboxFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/spec.md 8: OPEN_FILES_PER_UID binds every user but root and the
    daemon's; one more open is EMFILE for the others."""
    monkeypatch.setattr(operations, "OPEN_FILES_PER_UID", 2)
    for _ in range(3):
        open_as(fs, "/README")  # as root
    monkeypatch.setattr(operations, "_caller_uid", lambda: 1000)
    open_as(fs, "/README")
    open_as(fs, "/README")
    with pytest.raises(mfusepy.FuseOSError) as raised:
        open_as(fs, "/README")
    assert raised.value.errno == errno.EMFILE


def test_text_up_to_the_limit_is_held_and_one_byte_beyond_is_enomem_but_not_for_root(
    fs: SandboxFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/spec.md 8: "an open or read that would render beyond
    TEXT_BYTES_PER_UID is ENOMEM": exactly the limit is not beyond it, and
    root and the daemon's user have no such limit."""
    size = len(fs.tree.resolve("/README").content())  # type: ignore[union-attr]
    monkeypatch.setattr(operations, "TEXT_BYTES_PER_UID", size)
    open_as(fs, "/README")
    open_as(fs, "/README")  # root: twice the limit
    monkeypatch.setattr(operations, "_caller_uid", lambda: 1000)
    fi = open_as(fs, "/README")
    assert fs.holdings[1000].text == size
    fs.release("/README", fi)
    monkeypatch.setattr(operations, "TEXT_BYTES_PER_UID", size - 1)
    with pytest.raises(mfusepy.FuseOSError) as raised:
        open_as(fs, "/README")
    assert raised.value.errno == errno.ENOMEM
    assert 1000 not in fs.holdings


def test_an_fd_of_space_memory_writes_nothing_once_another_user_owns_the_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernel checks modes only at open (``default_permissions``); a write
    through an fd kept open checks the owner again (``_still_permitted``):
    here the daemon's user, whom the machine itself lets write any space."""
    monkeypatch.setattr(os, "getuid", lambda: 4321)
    fs = SandboxFS(Machine(phys_mem="8M", keyid_bits=2, seed=6))
    uid = {"now": 4321}
    monkeypatch.setattr(operations, "_caller_uid", lambda: uid["now"])
    fs.mkdir("/spaces/s", 0o755)
    write(fs, "/spaces/s/ctl", b"mmap 0x10000000 4K rw- populate\n")
    fi = open_as(fs, "/spaces/s/mem", os.O_WRONLY)
    fs.rmdir("/spaces/s")
    uid["now"] = 1001
    fs.mkdir("/spaces/s", 0o755)
    write(fs, "/spaces/s/ctl", b"mmap 0x10000000 4K rw- populate\n")
    uid["now"] = 4321
    with pytest.raises(mfusepy.FuseOSError) as raised:
        fs.write("/spaces/s/mem", b"planted", 0x10000000, fi)
    assert raised.value.errno == errno.EACCES
    assert fs.machine.read_virt("s", 0x10000000, 7) == bytes(7)


def test_a_read_refused_for_its_text_leaves_nothing_charged_to_the_reader(
    fs: SandboxFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/spec.md 8: a read that would render beyond TEXT_BYTES_PER_UID is
    ENOMEM and the open file forgets its text, so the user's share holds none
    of it: a refusal never leaves a charge behind."""
    monkeypatch.setattr(operations, "_caller_uid", lambda: 1000)
    fi = open_as(fs, "/dmesg")
    fs.read("/dmesg", 4096, 0, fi)
    held = fs.holdings[1000].text
    monkeypatch.setattr(operations, "TEXT_BYTES_PER_UID", held)
    fs.machine.reject("x", SandboxError(errno.EINVAL, "one more dmesg line"))
    with pytest.raises(mfusepy.FuseOSError) as raised:
        fs.read("/dmesg", 4096, 0, fi)  # a read from 0 renders the longer text again
    assert raised.value.errno == errno.ENOMEM
    assert fs.holdings[1000].text == 0


def test_a_user_other_than_the_owner_has_the_others_bits_and_root_has_every_bit() -> None:
    """The owner gets the mode's owner bits, anyone else its "other" bits
    (``generic_permission()`` in fs/namei.c; there are no groups here), and
    root passes every check; an enclosed node refuses everyone but owner and root."""
    control, info = Access(1000, 0o600), Access(1000, 0o644)
    assert control.permits(1000, 2)
    assert not control.permits(1001, 2)
    assert not control.permits(1001, 4)
    assert control.permits(0, 6)
    assert info.permits(1001, 4)
    assert not info.permits(1001, 2)
    assert not Access(1000, 0o644, enclosed=True).permits(1001, 4)


def test_the_daemons_user_writes_dram_and_reads_any_space_as_root_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/spec.md 8: "only root and the daemon's user write DRAM", and they
    may see every space; another user may do neither (EACCES)."""
    monkeypatch.setattr(os, "getuid", lambda: 4321)
    machine = Machine(phys_mem="8M", keyid_bits=2, seed=6)
    machine.create_space("s", uid=1001)
    machine.write_dram(0x1000, b"daemon", uid=4321)
    assert machine.read_dram(0x1000, 6) == b"daemon"
    assert machine.maps("s", uid=4321) == ""
    for refused in (lambda: machine.write_dram(0, b"x", uid=1002), lambda: machine.maps("s", 1002)):
        with pytest.raises(SandboxError) as raised:
            refused()
        assert raised.value.errno == errno.EACCES


def test_a_user_reads_no_physical_memory_through_keyid_0(machine: Machine) -> None:
    """docs/spec.md 8: ``keyids/0/mem`` is the daemon's user's (0600), and the
    machine refuses it to anyone else as well (EACCES), as it does KeyID N to
    everyone but its owner."""
    for keyid in (0, 1):
        with pytest.raises(SandboxError) as raised:
            machine.read_phys(keyid, 0, 8, uid=1001)
        assert raised.value.errno == errno.EACCES
