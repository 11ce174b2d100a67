"""Every rejected operation of the error table of docs/spec.md 7, from the shell.

Each case runs one command in bash and checks the errno the shell reports
(its strerror text), the one dmesg line naming the file and the errno, that
nothing was half-applied (maps unchanged), and that the daemon still serves.
"""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
from collections.abc import Callable

import pytest

from mktme_sandbox.errors import errno_name
from mktme_sandbox.mounting import MountedSandbox

pytestmark = pytest.mark.mount

BASE = 0x10000000
READ_ONLY = 0x20000000
KEY = "00112233445566778899aabbccddeeff"
TWEAK = "ffeeddccbbaa99887766554433221100"


@pytest.fixture(scope="module")
def sandbox(module_mount: Callable[..., MountedSandbox]) -> MountedSandbox:
    sandbox = module_mount(phys_mem="16M", seed=2)
    sandbox.program_key(1)
    sandbox.program_key(4)
    sandbox.write_ctl("keys/4", "type=clear")
    sandbox.create_space("err")
    sandbox.write_ctl("spaces/err/ctl", f"mmap {BASE:#x} 16K rw- keyid=1 populate")
    sandbox.write_ctl("spaces/err/ctl", f"mmap {READ_ONLY:#x} 4K r--")
    return sandbox


def user_key(algorithm: str = "aes-xts-128", key: str = KEY, tweak: str = TWEAK) -> str:
    return f"type=user algorithm={algorithm} key={key} tweak={tweak}"


def write(path: str, command: str) -> str:
    return f"echo '{command}' > {path}"


CASES = {
    "malformed key command": (write("keys/2", "type=cpu algorithm"), "keys/2", errno.EINVAL),
    "unknown key field": (
        write("keys/2", "type=cpu algorithm=aes-xts-128 colour=red"),
        "keys/2",
        errno.EINVAL,
    ),
    "bad hex": (write("keys/2", user_key(key="zz" * 16)), "keys/2", errno.EINVAL),
    "key of the wrong length": (write("keys/2", user_key(key="00" * 15)), "keys/2", errno.EINVAL),
    "unknown algorithm": (write("keys/2", user_key("aes-xts-512")), "keys/2", errno.EINVAL),
    "key and tweak equal": (write("keys/2", user_key(tweak=KEY)), "keys/2", errno.EINVAL),
    "unknown space command": (
        write("spaces/err/ctl", "frobnicate 0x30000000 4096"),
        "spaces/err/ctl",
        errno.EINVAL,
    ),
    "unaligned address": (
        write("spaces/err/ctl", "mmap 0x30000001 4096 rw-"),
        "spaces/err/ctl",
        errno.EINVAL,
    ),
    "bad protection": (
        write("spaces/err/ctl", "mmap 0x30000000 4096 rw+"),
        "spaces/err/ctl",
        errno.EINVAL,
    ),
    "keyid never programmed": (
        write("spaces/err/ctl", "mmap 0x30000000 4096 rw- keyid=3"),
        "spaces/err/ctl",
        errno.ENOKEY,
    ),
    "keyid cleared": (
        write("spaces/err/ctl", "mmap 0x30000000 4096 rw- keyid=4"),
        "spaces/err/ctl",
        errno.ENOKEY,
    ),
    "encrypt_mprotect to a keyid never programmed": (
        write("spaces/err/ctl", f"encrypt_mprotect {BASE:#x} 4096 rw- keyid=3"),
        "spaces/err/ctl",
        errno.ENOKEY,
    ),
    "clear a keyid still mapped": (write("keys/1", "type=clear"), "keys/1", errno.EBUSY),
    "reprogram a keyid still mapped": (
        write("keys/1", "type=cpu algorithm=aes-xts-256"),
        "keys/1",
        errno.EBUSY,
    ),
    "overlapping mapping": (
        write("spaces/err/ctl", f"mmap {BASE:#x} 4096 rw-"),
        "spaces/err/ctl",
        errno.EINVAL,
    ),
    "outside the user address space": (
        write("spaces/err/ctl", "mmap 0x900000000000 4096 rw-"),
        "spaces/err/ctl",
        errno.ENOMEM,
    ),
    "physical memory exhausted": (
        write("spaces/err/ctl", "mmap 0x40000000 64M rw- populate"),
        "spaces/err/ctl",
        errno.ENOMEM,
    ),
    "read of an unmapped address": (
        "dd if=spaces/err/mem bs=64 count=1 skip=$((0x30000000)) iflag=skip_bytes status=none",
        "spaces/err/mem",
        errno.EIO,
    ),
    "write to a read-only mapping": (
        f"printf x | dd of=spaces/err/mem bs=1 seek=$(({READ_ONLY})) conv=notrunc status=none",
        "spaces/err/mem",
        errno.EIO,
    ),
    "bad cache command": (write("hw/cache", "clflush zz"), "hw/cache", errno.EINVAL),
    "PA without 0x": (write("hw/cache", "clflush 3000"), "hw/cache", errno.EINVAL),
    "ADDR without 0x": (
        write("spaces/err/ctl", "mmap 30000000 4096 rw-"),
        "spaces/err/ctl",
        errno.EINVAL,
    ),
    "ADDR with an underscore": (
        write("spaces/err/ctl", "mmap 0x3000_0000 4096 rw-"),
        "spaces/err/ctl",
        errno.EINVAL,
    ),
    "LEN in Arabic-Indic digits": (
        write("spaces/err/ctl", "mmap 0x30000000 \u0664\u0660\u0669\u0666 rw-"),
        "spaces/err/ctl",
        errno.EINVAL,
    ),
    "LEN with an underscore": (
        write("spaces/err/ctl", "mmap 0x30000000 4_096 rw-"),
        "spaces/err/ctl",
        errno.EINVAL,
    ),
    "KeyID in fullwidth digits": (
        write("spaces/err/ctl", "mmap 0x30000000 4096 rw- keyid=\uff11"),
        "spaces/err/ctl",
        errno.EINVAL,
    ),
    "bad switch value": (
        write("mm/mitigations/ksm_keyid_check", "2"),
        "mm/mitigations/ksm_keyid_check",
        errno.EINVAL,
    ),
    "bad tlb command": (write("spaces/err/tlb", "flush all"), "spaces/err/tlb", errno.EINVAL),
    "msr read of a size other than 8": (
        "dd if=hw/msr bs=4 count=1 skip=$((0x981)) iflag=skip_bytes status=none",
        "hw/msr",
        errno.EINVAL,
    ),
    "msr that does not exist": (
        "dd if=hw/msr bs=8 count=1 skip=$((0x10)) iflag=skip_bytes status=none",
        "hw/msr",
        errno.EIO,
    ),
    "mbind to a reversed nodelist": (
        write("spaces/err/ctl", f"mbind {BASE:#x} 16K 1-0"),
        "spaces/err/ctl",
        errno.EINVAL,
    ),
    "mbind to a node the machine lacks": (
        write("spaces/err/ctl", f"mbind {BASE:#x} 16K 2"),
        "spaces/err/ctl",
        errno.ENODEV,
    ),
    "migrate to a node the machine lacks": (
        write("spaces/err/ctl", f"migrate {BASE:#x} 16K 2"),
        "spaces/err/ctl",
        errno.ENODEV,
    ),
    "migrate to a negative node": (
        write("spaces/err/ctl", f"migrate {BASE:#x} 16K -1"),
        "spaces/err/ctl",
        errno.EINVAL,
    ),
    "mkdir of a space that exists": ("mkdir spaces/err", None, errno.EEXIST),
    "chmod": ("chmod 0666 spaces/err/mem", "spaces/err/mem", errno.EPERM),
    "chmod of the mount's root": ("chmod 0755 .", "/", errno.EPERM),
    "chown": ("chown 1000 spaces/err/mem", "spaces/err/mem", errno.EPERM),
    "touch (utimens)": ("touch spaces/err/mem", "spaces/err/mem", errno.EPERM),
    "rename": ("mv spaces/err/maps spaces/err/renamed", "spaces/err/maps", errno.EPERM),
    "unlink": ("rm -f spaces/err/maps", "spaces/err/maps", errno.EPERM),
    "symlink": ("ln -s maps spaces/err/link", "spaces/err/link", errno.EPERM),
    "hard link": ("ln spaces/err/maps spaces/err/link", "spaces/err/link", errno.EPERM),
    "mknod (mkfifo)": ("mkfifo spaces/err/fifo", "spaces/err/fifo", errno.EPERM),
}


@pytest.mark.parametrize(("script", "path", "err"), CASES.values(), ids=list(CASES))
def test_a_rejected_operation_gives_its_errno_and_one_dmesg_line(
    sandbox: MountedSandbox,
    sh: Callable[..., subprocess.CompletedProcess[str]],
    script: str,
    path: str | None,
    err: int,
) -> None:
    maps_before = sandbox.read_text("spaces/err/maps")
    lines_before = len(sandbox.dmesg().splitlines())
    done = sh(script, sandbox.path)
    assert done.returncode != 0
    assert os.strerror(err) in done.stderr
    new_lines = sandbox.dmesg().splitlines()[lines_before:]
    if path is not None:  # EEXIST comes from the kernel's own lookup, not from the daemon
        assert len(new_lines) == 1
        assert f"{path}: {errno_name(err)}: " in new_lines[0]
    assert sandbox.read_text("spaces/err/maps") == maps_before
    assert sandbox.check() == []


@pytest.mark.parametrize(
    ("command", "line"),
    [
        ("mbind {BASE:#x} 16K 1-0", "EINVAL: mbind: nodes '1-0': range 1-0 ends below its start"),
        ("mbind {BASE:#x} 16K 2", "ENODEV: mbind: node 2 does not exist (this machine has 1)"),
        ("migrate {BASE:#x} 16K 2", "ENODEV: migrate: node 2 does not exist (this machine has 1)"),
        (
            "migrate {BASE:#x} 16K -1",
            "EINVAL: migrate: usage: migrate ADDR LEN NODE (NODE: one node number, 0, 1, ...)",
        ),
    ],
)
def test_a_refused_node_is_named_with_its_command_in_dmesg(
    sandbox: MountedSandbox, command: str, line: str
) -> None:
    numa_maps = sandbox.read_text("spaces/err/numa_maps")
    with pytest.raises(OSError) as caught:  # noqa: PT011 - the errno is checked below
        sandbox.write_ctl("spaces/err/ctl", command.format(BASE=BASE))
    assert errno_name(caught.value.errno or 0) == line.partition(":")[0]
    assert sandbox.dmesg().splitlines()[-1].endswith(f"spaces/err/ctl: {line}")
    assert sandbox.read_text("spaces/err/numa_maps") == numa_maps


@pytest.mark.parametrize("name", ["\u00b9", "\u0661", "\uff11", "01", "+1", "1_0"])
def test_a_keyid_path_in_anything_but_plain_ascii_digits_does_not_exist(
    sandbox: MountedSandbox, name: str
) -> None:
    """``keys/¹`` gave EIO (``str.isdigit`` accepts superscripts, ``int`` refuses them)."""
    with pytest.raises(FileNotFoundError):
        (sandbox.path / "keys" / name).read_text()
    with pytest.raises(FileNotFoundError):
        (sandbox.path / "keyids" / name / "mem").stat()


def test_a_write_longer_than_a_page_is_refused_whole(sandbox: MountedSandbox) -> None:
    """The kernel splits a long write into requests of at most max_write bytes;
    the first is refused, so neither ``type=clear`` nor the second key that
    follows it in the same write is applied (a sysfs store takes one page)."""
    before = sandbox.read_text("keys/1")
    lines_before = len(sandbox.dmesg().splitlines())
    payload = b"type=clear" + b" " * (1 << 20) + b"\ntype=cpu algorithm=aes-xts-256\n"
    fd = os.open(sandbox.path / "keys/1", os.O_WRONLY)
    try:
        with pytest.raises(OSError, match="Invalid argument") as raised:
            os.write(fd, payload)
    finally:
        os.close(fd)
    assert raised.value.errno == errno.EINVAL
    assert sandbox.read_text("keys/1") == before
    new_lines = sandbox.dmesg().splitlines()[lines_before:]
    assert len(new_lines) == 1
    assert "a command is at most 4096 bytes" in new_lines[0]


def test_a_command_of_exactly_one_page_is_still_a_command(sandbox: MountedSandbox) -> None:
    command = "mmap 0x30000000 4096 rw-"
    sandbox.write_ctl("spaces/err/ctl", command + " " * (4096 - len(command) - 1) + "\n")
    sandbox.write_ctl("spaces/err/ctl", "munmap 0x30000000 4096")


def test_a_write_one_byte_over_a_page_is_refused_even_when_that_byte_is_the_newline(
    sandbox: MountedSandbox,
) -> None:
    """docs/spec.md 7: "a control write longer than 4096 bytes (one page):
    refused whole, whatever it holds". Linux counts the newline too: a sysfs
    store has ``atomic_write_len = PAGE_SIZE`` (fs/sysfs/file.c), and
    kernfs_fop_write_iter() refuses a longer write with E2BIG before the
    store sees it."""
    maps_before = sandbox.read_text("spaces/err/maps")
    lines_before = len(sandbox.dmesg().splitlines())
    command = "mmap 0x30000000 4096 rw-".ljust(4096).encode()
    fd = os.open(sandbox.path / "spaces/err/ctl", os.O_WRONLY)
    try:
        with pytest.raises(OSError, match="Invalid argument") as raised:
            os.write(fd, command + b"\n")
    finally:
        os.close(fd)
    assert raised.value.errno == errno.EINVAL
    assert sandbox.read_text("spaces/err/maps") == maps_before
    (line,) = sandbox.dmesg().splitlines()[lines_before:]
    assert "a command is at most 4096 bytes, not 4097" in line


def test_a_shared_mapping_of_a_memory_file_is_refused_by_the_kernel(
    sandbox: MountedSandbox,
) -> None:
    """fs/fuse/file.c, fuse_file_mmap(): for a FOPEN_DIRECT_IO file "Can't provide
    the coherency needed for MAP_SHARED" -> -ENODEV; a private mapping is a copy."""
    fd = os.open(sandbox.path / "dram", os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="No such device") as raised:
            mmap.mmap(fd, 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        assert raised.value.errno == errno.ENODEV
        with mmap.mmap(fd, 4096, offset=0x3000, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as m:
            assert m[:64] == sandbox.read_bytes("dram", 0x3000, 64)
    finally:
        os.close(fd)


def test_a_misspelled_fuse_handler_fails_at_import() -> None:
    from mktme_sandbox.fs.operations import SandboxFS, _reported

    with pytest.raises(TypeError, match="chmood is not a FUSE operation"):

        class Misspelled(SandboxFS):
            @_reported
            def chmood(self, path: str, mode: int) -> int:
                return 0


def test_a_rejected_write_raises_oserror_with_the_errno_in_python(sandbox: MountedSandbox) -> None:
    fd = os.open(sandbox.path / "spaces/err/ctl", os.O_WRONLY)
    try:
        with pytest.raises(OSError, match="Required key not available") as raised:
            os.write(fd, b"mmap 0x30000000 4096 rw- keyid=3\n")
    finally:
        os.close(fd)
    assert raised.value.errno == errno.ENOKEY


def test_a_reason_in_dmesg_never_shows_the_key_of_a_rejected_command(
    sandbox: MountedSandbox, sh: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    sh(write("keys/2", user_key(tweak=KEY)), sandbox.path)
    assert KEY not in sandbox.dmesg()
    assert KEY.upper() not in sandbox.dmesg()


def test_the_daemon_still_serves_after_every_rejection(
    sandbox: MountedSandbox, sh: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    for script, _path, _err in CASES.values():
        sh(script, sandbox.path)
    assert sandbox.read_text("README")
    assert sandbox.check() == []
    sandbox.write_ctl("spaces/err/ctl", "mmap 0x30000000 4096 rw-")
    sandbox.write_ctl("spaces/err/ctl", "munmap 0x30000000 4096")
