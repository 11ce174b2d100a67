"""``mm/snapshot``: save, restore and cold boot through the mount, for root only.

In-process (no mount) for what the kernel's permission check would hide: the
daemon's own non-root user may open the 0600 file, and the machine still
refuses it. Then through a real mount as root, and as ``nobody`` (setpriv).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import mfusepy
import pytest

from mktme_sandbox import Machine
from mktme_sandbox.fs import SandboxFS, operations
from mktme_sandbox.mounting import MountedSandbox
from mktme_sandbox.snapshot import MAGIC

NOBODY = 65534
BASE = 0x10000000


def write(fs: SandboxFS, path: str, data: bytes) -> int:
    fi = SimpleNamespace(flags=os.O_WRONLY, direct_io=0, fh=0)
    fs.open(path, fi)
    try:
        return fs.write(path, data, 0, fi)
    finally:
        fs.release(path, fi)


def refusal(fs: SandboxFS, command: str) -> tuple[int, str]:
    """The errno of writing ``command`` to mm/snapshot, and the dmesg line it left."""
    with pytest.raises(mfusepy.FuseOSError) as refused:
        write(fs, "/mm/snapshot", command.encode())
    return refused.value.errno, fs.machine.dmesg().splitlines()[-1]


@pytest.fixture
def fs_as(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], SandboxFS]:
    """``fs_as(uid)``: a machine whose daemon runs as ``uid``, and its fs, called by ``uid``."""

    def make(uid: int) -> SandboxFS:
        monkeypatch.setattr(operations, "_caller_uid", lambda: uid)
        machine = Machine(phys_mem="8M", keyid_bits=2, seed=4)
        machine.owner_uid = uid
        return SandboxFS(machine)

    return make


def test_the_daemons_own_unprivileged_user_is_refused_with_eacces_and_a_dmesg_line(
    fs_as: Callable[[int], SandboxFS], tmp_path: Path
) -> None:
    err, line = refusal(fs_as(1000), f"save {tmp_path}/m.snap")
    assert err == errno.EACCES
    assert "mm/snapshot: EACCES: snapshot: only root may save or restore" in line
    assert not (tmp_path / "m.snap").exists()


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        ("save relative/path", "PATH must be absolute"),
        ("load /tmp/x", "usage: save PATH"),
        ("restore", "usage: save PATH"),
    ],
)
def test_a_malformed_command_is_einval_with_its_usage(
    fs_as: Callable[[int], SandboxFS], command: str, reason: str
) -> None:
    err, line = refusal(fs_as(0), command)
    assert err == errno.EINVAL
    assert reason in line


def test_restoring_a_corrupted_file_is_einval_with_a_dmesg_line_and_keeps_the_machine(
    fs_as: Callable[[int], SandboxFS], tmp_path: Path
) -> None:
    fs = fs_as(0)
    path = tmp_path / "m.snap"
    write(fs, "/mm/snapshot", f"save {path}".encode())
    path.write_bytes(path.read_bytes()[:-10])
    fs.machine.create_space("kept", uid=0)
    err, line = refusal(fs, f"restore {path}")
    assert err == errno.EINVAL
    assert "mm/snapshot: EINVAL: snapshot: truncated" in line
    assert fs.machine.space_names() == ["kept"]


def test_restoring_a_file_that_is_not_there_is_enoent(
    fs_as: Callable[[int], SandboxFS], tmp_path: Path
) -> None:
    err, line = refusal(fs_as(0), f"restore {tmp_path}/none")
    assert err == errno.ENOENT
    assert "mm/snapshot: ENOENT" in line


# -- through the mount ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox(module_mount: Callable[..., MountedSandbox]) -> MountedSandbox:
    return module_mount(phys_mem="16M", keyid_bits=2, seed=8, allow_other=True)


@pytest.fixture
def bash(
    sandbox: MountedSandbox, sh: Callable[..., subprocess.CompletedProcess[str]]
) -> Callable[..., tuple[int, str]]:
    def run(script: str, user: int | None = None) -> tuple[int, str]:
        done = sh(f"set -euo pipefail\n{script}", sandbox.path, user=user)
        return done.returncode, done.stdout + done.stderr

    return run


def ok(result: tuple[int, str]) -> str:
    code, output = result
    assert code == 0, output
    return output


@pytest.mark.mount
def test_mm_snapshot_is_mode_0600_owned_by_the_daemons_user(sandbox: MountedSandbox) -> None:
    st = os.stat(sandbox.path / "mm/snapshot")
    assert (st.st_uid, st.st_mode & 0o7777) == (os.getuid(), 0o600)


@pytest.mark.mount
def test_root_saves_and_restores_the_machine_through_mm_snapshot(
    bash: Callable[..., tuple[int, str]], tmp_path: Path
) -> None:
    path = tmp_path / "m.snap"
    ok(bash("echo 'type=cpu algorithm=aes-xts-128' > keys/1 && mkdir spaces/kept"))
    ok(bash(f"echo 'mmap {BASE:#x} 8K rw- keyid=1 populate' > spaces/kept/ctl"))
    ok(bash(f"printf secret | dd of=spaces/kept/mem bs=1 seek={BASE} conv=notrunc status=none"))
    ok(bash(f"echo 'save {path}' > mm/snapshot"))
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes().startswith(MAGIC + b"\n")
    ok(bash("rmdir spaces/kept && mkdir spaces/later"))
    ok(bash(f"echo 'restore {path}' > mm/snapshot"))
    assert ok(bash("ls spaces")).split() == ["kept"]
    assert ok(bash(f"dd if=spaces/kept/mem bs=1 skip={BASE} count=6 status=none")) == "secret"
    assert ok(bash("cat mm/check")) == "ok\n"
    ok(bash(f"echo 'coldboot {path}' > mm/snapshot"))
    assert ok(bash("ls spaces")) == ""
    assert "state=free" in ok(bash("cat keys/1"))


@pytest.mark.mount
@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root (setpriv)")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing")
def test_nobody_can_neither_save_nor_restore(
    bash: Callable[..., tuple[int, str]], tmp_path: Path
) -> None:
    code, output = bash(f"echo 'save {tmp_path}/x.snap' > mm/snapshot", user=NOBODY)
    assert code != 0
    assert "Permission denied" in output
    assert not (tmp_path / "x.snap").exists()


def einval(bash: Callable[..., tuple[int, str]], command: str) -> str:
    """Write ``command`` to mm/snapshot, expect EINVAL; the dmesg line it left."""
    code, output = bash(f"echo '{command}' > mm/snapshot")
    assert code != 0
    assert "Invalid argument" in output
    return ok(bash("cat dmesg")).splitlines()[-1]


@pytest.mark.mount
def test_restoring_from_a_fifo_is_einval_at_once_and_waits_for_no_writer(
    bash: Callable[..., tuple[int, str]], tmp_path: Path
) -> None:
    fifo = tmp_path / "swapped-in"
    os.mkfifo(fifo)
    unblock = threading.Timer(20, lambda: os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)))
    unblock.daemon = True
    unblock.start()  # the daemon would wait for a writer forever: give it one, late
    try:
        started = time.monotonic()
        last = einval(bash, f"restore {fifo}")
        assert time.monotonic() - started < 10
    finally:
        unblock.cancel()
    assert f"mm/snapshot: EINVAL: snapshot: {fifo} is not a regular file" in last
    assert ok(bash("cat mm/check")) == "ok\n"


@pytest.mark.mount
@pytest.mark.parametrize("command", ["restore /dev/zero", "coldboot /dev/urandom", "restore /"])
def test_restoring_from_a_device_or_a_directory_is_einval_rather_than_a_read_without_end(
    bash: Callable[..., tuple[int, str]], command: str
) -> None:
    assert "is not a regular file" in einval(bash, command)


@pytest.mark.mount
def test_restoring_a_file_larger_than_any_snapshot_of_the_machine_is_einval_unread(
    bash: Callable[..., tuple[int, str]], tmp_path: Path
) -> None:
    huge = tmp_path / "huge.snap"
    with huge.open("wb") as file:  # sparse: 1 TiB of nothing, after a snapshot's magic
        file.write(MAGIC + b"\n")
        file.truncate(1 << 40)
    last = einval(bash, f"restore {huge}")
    assert f"snapshot: {huge} is larger than this machine's snapshots" in last
    assert ok(bash("cat mm/check")) == "ok\n"
