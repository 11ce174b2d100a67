"""docs/spec.md 8, the daemon's side: secrets, logs, stopped daemons, races, failures.

The mount command runs as a user runs it (``tests/test_cli.py``'s ``mktme``);
every detached daemon logs and locks in the test's own ``runtime_dir``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from mktme_sandbox import cli as cli_module
from mktme_sandbox import daemon
from mktme_sandbox.cli import cli, main
from mktme_sandbox.mounting import mounted

SCRIPT = Path(sys.executable).with_name("mktme-sandbox")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "mktme_sandbox.cli"]
SEED = "987654321"  # distinctive: found in an argv only if it leaked there
NOBODY = 65534


def mktme(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, timeout=60, check=False
    )


def wait_for(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def environ(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def mounted_pid(done: subprocess.CompletedProcess[str]) -> int:
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def ended(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def mnt(tmp_path: Path, runtime_dir: Path) -> Iterator[Path]:
    """A mountpoint whose daemons are all gone after the test, and its runtime dir empty."""
    path = tmp_path / "mnt"
    yield path
    daemon.stop_sandbox(path)
    for info in daemon.find_daemons(probe=False):
        with contextlib.suppress(psutil.Error):  # it may end (a zombie) meanwhile
            if info.mountpoint == str(path) or str(path) in " ".join(
                psutil.Process(info.pid).cmdline()
            ):
                os.kill(info.pid, signal.SIGKILL)
    for leftover in runtime_dir.iterdir():
        assert "Traceback" not in leftover.read_text(), leftover.read_text()


# -- 1. the seed is never in an argv ------------------------------------------------------


SEED_WAYS = {
    "--seed": ([], ["--seed", SEED], None),
    "--seed-file FILE": ([], ["--seed-file", "{file}"], None),
    "--seed-file -": ([], ["--seed-file", "-"], SEED),
    "MKTME_SEED": ([f"MKTME_SEED={SEED}"], [], None),
}


@pytest.mark.mount
@pytest.mark.parametrize(("env", "args", "stdin"), SEED_WAYS.values(), ids=list(SEED_WAYS))
def test_the_daemons_command_line_never_holds_the_seed_however_it_was_given(
    mnt: Path, tmp_path: Path, env: list[str], args: list[str], stdin: str | None
) -> None:
    seed_file = tmp_path / "seed"
    seed_file.write_text(SEED + "\n")
    argv = [*COMMAND, "mount", str(mnt), "--phys-mem", "8M"]
    argv += [arg.format(file=seed_file) for arg in args]
    extra = dict(item.split("=", 1) for item in env)
    done = subprocess.run(
        argv, input=stdin or "", capture_output=True, text=True, timeout=60,
        env={**os.environ, **extra}, check=False,
    )  # fmt: skip
    pid = mounted_pid(done)
    assert SEED.encode() not in cmdline(pid)
    assert f"{daemon.SEED_ENV}={SEED}".encode() in environ(pid).split(b"\0")


@pytest.mark.mount
def test_a_foreground_daemon_given_seed_on_its_command_line_drops_it_from_its_argv(
    mnt: Path,
) -> None:
    proc = subprocess.Popen(
        [*COMMAND, "mount", "--foreground", "--seed", SEED, "--phys-mem", "8M", str(mnt)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        daemon.wait_until_mounted(mnt, proc, timeout=30)
        assert SEED.encode() not in cmdline(proc.pid)  # the same pid, executed again
        assert f"{daemon.SEED_ENV}={SEED}".encode() in environ(proc.pid).split(b"\0")
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        proc.stderr.close()


@pytest.mark.mount
def test_the_pytest_plugins_daemon_gets_the_seed_in_its_environment_and_a_private_log(
    tmp_path: Path,
) -> None:
    with mounted(tmp_path / "mnt", phys_mem="8M", seed=int(SEED)) as sandbox:
        assert SEED.encode() not in cmdline(sandbox.pid)
        assert f"{daemon.SEED_ENV}={SEED}".encode() in environ(sandbox.pid).split(b"\0")
        assert stat.S_IMODE(sandbox.log_path.stat().st_mode) == 0o600


def test_seed_and_seed_file_together_are_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "seed").write_text("1")
    result = CliRunner().invoke(
        cli, ["mount", str(tmp_path / "m"), "--seed", "1", "--seed-file", str(tmp_path / "seed")]
    )
    assert result.exit_code == 2
    assert "not both" in result.output


def test_a_seed_file_that_holds_no_integer_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "seed").write_text("one")
    result = CliRunner().invoke(
        cli, ["mount", str(tmp_path / "m"), "--seed-file", str(tmp_path / "seed")]
    )
    assert result.exit_code == 2
    assert "expected one integer" in result.output


def test_mount_help_warns_that_a_seed_on_the_command_line_is_public() -> None:
    text = " ".join(CliRunner().invoke(cli, ["mount", "--help"]).output.split())
    assert "every local user sees it (ps)" in text
    assert "MKTME_SEED" in text


# -- 2. private logs, removed however the daemon ends ---------------------------------------


def test_the_runtime_dir_is_xdg_runtime_dir_only_when_it_is_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    public = tmp_path / "public"
    public.mkdir(mode=0o755)
    public.chmod(0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(public))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    private = Path(daemon.runtime_dir())
    assert private == tmp_path / f"mktme-sandbox-{os.geteuid()}"
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    public.chmod(0o700)
    assert daemon.runtime_dir() == str(public)


def test_a_fallback_runtime_dir_that_others_may_enter_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    planted = tmp_path / f"mktme-sandbox-{os.geteuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    with pytest.raises(daemon.DaemonError, match="not a private directory"):
        daemon.runtime_dir()


@pytest.mark.mount
def test_a_detached_daemons_log_is_private(mnt: Path) -> None:
    done = mktme("mount", str(mnt), "--phys-mem", "8M")
    mounted_pid(done)
    log = Path(done.stderr.split("daemon log:")[1].strip())
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


@pytest.mark.mount
@pytest.mark.parametrize("sig", daemon.STOP_SIGNALS, ids=lambda s: s.name)
def test_every_stop_signal_unmounts_and_leaves_no_log_and_no_lock(
    mnt: Path, runtime_dir: Path, sig: signal.Signals
) -> None:
    pid = mounted_pid(mktme("mount", str(mnt), "--phys-mem", "8M"))
    os.kill(pid, sig)
    wait_for(lambda: ended(pid))
    assert not daemon.is_mounted(mnt)
    assert list(runtime_dir.iterdir()) == []


def test_a_lock_left_by_a_killed_daemon_is_swept_by_the_next_lock(
    tmp_path: Path, runtime_dir: Path
) -> None:
    left = runtime_dir / "mktme-sandbox-0123456789abcdef.lock"
    left.write_text("")
    held = daemon.lock_mountpoint(tmp_path / "a")
    try:
        assert not left.exists()
        with pytest.raises(daemon.DaemonError, match="already serves a sandbox"):
            daemon.lock_mountpoint(tmp_path / "a")
        other = daemon.lock_mountpoint(tmp_path / "b")  # a held lock is never swept
        assert Path(held.path).exists()
        other.release()
    finally:
        held.release()
    assert list(runtime_dir.iterdir()) == []


def test_a_lock_held_for_a_moment_by_a_sweeper_does_not_fail_a_mount(
    tmp_path: Path, runtime_dir: Path
) -> None:
    """A sweeper holds a stale lock file only while it removes it: a mount that
    opened that file meanwhile waits a moment and takes the new one (found by
    review: it failed with "already serves a sandbox")."""
    path = daemon._lock_path(daemon.canonical_path(tmp_path / "a"))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)

    def sweep() -> None:
        time.sleep(0.05)
        os.unlink(path)
        os.close(fd)

    sweeper = threading.Thread(target=sweep)
    sweeper.start()
    lock = daemon.lock_mountpoint(tmp_path / "a")
    sweeper.join()
    assert Path(lock.path).exists()
    lock.release()


# -- 3. a stopped daemon blocks neither list nor umount ---------------------------------------


@pytest.mark.mount
def test_list_shows_a_stopped_daemon_at_once_and_umount_ends_it(
    mnt: Path, runtime_dir: Path
) -> None:
    pid = mounted_pid(mktme("mount", str(mnt), "--phys-mem", "8M"))
    os.kill(pid, signal.SIGSTOP)
    reader = subprocess.Popen(["stat", str(mnt / "README")], stdout=subprocess.DEVNULL)
    try:
        start = time.monotonic()
        listed = mktme("list")
        assert time.monotonic() - start < 5
        row = next(line for line in listed.stdout.splitlines() if line.split()[0] == str(pid))
        assert row.split()[-2:] == ["stopped", str(mnt)]
        start = time.monotonic()
        done = mktme("umount", str(mnt))
        assert time.monotonic() - start < 5, done.stderr
        assert done.returncode == 0, done.stderr
        assert "unmounted" in done.stdout, done.stderr
        assert not daemon.is_mounted(mnt)
        wait_for(lambda: ended(pid))
        assert list(runtime_dir.iterdir()) == []
    finally:
        reader.kill()
        reader.wait()


def test_the_fuse_connection_is_the_minor_of_the_mounts_device_from_mountinfo(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    entry = daemon._MountEntry(str(tmp_path / "m"), daemon.FSTYPE, 57)
    monkeypatch.setattr(daemon, "_mounts", lambda: iter([entry]))
    monkeypatch.setattr(daemon, "FUSECTL", str(tmp_path / "connections"))
    (tmp_path / "connections" / "57").mkdir(parents=True)
    assert daemon.fuse_connection(tmp_path / "m") == 57
    assert daemon.abort_connection(tmp_path / "m") is True
    assert (tmp_path / "connections" / "57" / "abort").read_text() == "1"
    assert daemon.abort_connection(tmp_path / "elsewhere") is False


# -- 4. two mounts racing on one directory ----------------------------------------------------


@pytest.mark.mount
def test_of_two_mounts_racing_on_one_directory_exactly_one_wins(mnt: Path) -> None:
    argv = [*COMMAND, "mount", str(mnt), "--phys-mem", "8M"]
    racers = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(racer.wait(60), *racer.communicate()) for racer in racers]
    assert sorted(code for code, _out, _err in results) == [0, 1], results
    _, _, loser = next(result for result in results if result[0] == 1)
    assert loser.count("\n") == 1, loser
    assert "already serves a sandbox" in loser, loser
    assert [e.point for e in daemon._mounts()].count(str(mnt)) == 1


@pytest.mark.mount
def test_umount_stops_the_daemon_of_that_directory_and_no_other(mnt: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pid = mounted_pid(mktme("mount", str(mnt), "--phys-mem", "8M"))
    other_pid = mounted_pid(mktme("mount", str(other), "--phys-mem", "8M"))
    try:
        assert mktme("umount", str(mnt)).returncode == 0
        assert ended(pid)
        assert not ended(other_pid)
        assert (other / "README").read_text()
    finally:
        daemon.stop_sandbox(other)


# -- 5. every failure is one line -------------------------------------------------------------


@pytest.fixture
def run_main(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    """Run the console script's ``main`` in-process: (exit status, stderr), no traceback."""

    def run(*args: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exited:
            main(list(args))
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        code = exited.value.code or 0
        assert isinstance(code, int), code
        return code, err

    return run


def test_without_dev_fuse_mount_fails_in_one_line(
    run_main: Callable[..., tuple[int, str]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    runtime_dir: Path,
) -> None:
    monkeypatch.setattr(daemon, "FUSE_DEVICE", str(tmp_path / "no-fuse"))
    code, err = run_main("mount", str(tmp_path / "m"))
    assert (code, err.count("\n")) == (1, 1)
    assert "no-fuse does not exist" in err


def test_allow_other_without_user_allow_other_fails_in_one_line_for_a_user(
    run_main: Callable[..., tuple[int, str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Simulated: the test runs as root, whom fusermount3 always lets allow others."""
    (tmp_path / "fuse.conf").write_text("# user_allow_other\nmount_max = 1000\n")
    monkeypatch.setattr(daemon, "FUSE_CONF", str(tmp_path / "fuse.conf"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code, err = run_main("mount", "--allow-other", str(tmp_path / "m"))
    assert (code, err.count("\n")) == (1, 1)
    assert "user_allow_other" in err
    (tmp_path / "fuse.conf").write_text("user_allow_other  # for the sandbox\n")
    assert daemon.mount_refusal(allow_other=True) is None


@pytest.mark.mount
def test_a_mountpoint_that_is_a_file_fails_in_one_line(
    run_main: Callable[..., tuple[int, str]], tmp_path: Path, runtime_dir: Path
) -> None:
    (tmp_path / "file").write_text("")
    code, err = run_main("mount", str(tmp_path / "file"))
    assert (code, err.count("\n")) == (1, 1)
    assert "file" in err
    assert list(runtime_dir.iterdir()) == []  # the lock is gone with the attempt


def as_nobody(*args: str, runtime: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *COMMAND, *args],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
    )  # fmt: skip


@pytest.fixture
def nobodys_base() -> Iterator[Path]:
    """A directory nobody may enter but not write, with nobody's runtime dir in it."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("acting as nobody needs root and setpriv")
    base = Path(tempfile.mkdtemp(prefix="mktme-test-"))
    base.chmod(0o755)
    (base / "runtime").mkdir(mode=0o700)
    os.chown(base / "runtime", NOBODY, NOBODY)
    yield base
    shutil.rmtree(base)


def test_a_user_without_access_to_dev_fuse_gets_one_line(nobodys_base: Path) -> None:
    """Real where /dev/fuse is not world-writable (as on this test machine)."""
    done = as_nobody("mount", str(nobodys_base / "mnt"), runtime=nobodys_base / "runtime")
    if os.stat("/dev/fuse").st_mode & 0o006 == 0o006:
        pytest.skip("/dev/fuse is open to every user here")
    assert done.returncode == 1
    assert (
        done.stderr
        == "Error: FUSE is not available: /dev/fuse is not readable and writable by uid 65534\n"
    )
    assert not (nobodys_base / "mnt").exists()


def test_allow_other_as_a_user_without_user_allow_other_gets_one_line(
    nobodys_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real as nobody where /etc/fuse.conf lacks user_allow_other; the /dev/fuse
    check comes first, so where nobody lacks /dev/fuse this is the simulated test above."""
    if daemon._user_allow_other():
        pytest.skip("user_allow_other is set here")
    done = as_nobody(
        "mount", "--allow-other", str(nobodys_base / "mnt"), runtime=nobodys_base / "runtime"
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "/dev/fuse" in done.stderr or "user_allow_other" in done.stderr


def test_a_mountpoint_in_a_directory_the_user_cannot_write_gets_one_line(
    run_main: Callable[..., tuple[int, str]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    runtime_dir: Path,
) -> None:
    """Simulated: as root every directory is writable; mkdir fails as it would for a user."""

    def denied(path: str, mode: int = 0o777, exist_ok: bool = False) -> None:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr("mktme_sandbox.daemon.os.makedirs", denied)
    code, err = run_main("mount", str(tmp_path / "ro" / "mnt"))
    assert (code, err) == (
        1,
        f"Error: cannot create {tmp_path / 'ro' / 'mnt'}: Permission denied\n",
    )
    assert list(runtime_dir.iterdir()) == []


def test_a_directory_neither_owned_nor_writable_is_refused_in_one_line(
    run_main: Callable[..., tuple[int, str]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    runtime_dir: Path,
) -> None:
    """Simulated: uid 1000 and a directory of root's (fusermount3 would refuse it)."""
    (tmp_path / "roots").mkdir()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(daemon, "runtime_dir", lambda: str(runtime_dir))
    monkeypatch.setattr(os, "access", lambda path, mode: mode & os.W_OK == 0)
    monkeypatch.setattr(daemon, "mount_refusal", lambda allow_other=False: None)
    monkeypatch.setattr(cli_module, "mount_refusal", lambda allow_other=False: None)
    code, err = run_main("mount", str(tmp_path / "roots"))
    assert code == 1
    assert err.count("\n") == 1
    assert "neither owned nor writable" in err


ODD_ARGUMENTS = [
    ["--nosuch"],
    ["nosuch"],
    ["mount"],
    ["mount", "/dev/null"],
    ["mount", "x" * 5000],
    ["mount", "/proc/1/nope"],
    ["mount", "m", "--phys-mem", "99999G"],
    ["mount", "m", "--seed-file", "/nonexistent"],
    ["mount", "m", "--seed", "-5"],
    ["umount"],
    ["umount", "x" * 5000],
    ["umount", "/nonexistent/x"],
    ["umount", ""],
    ["list", "extra"],
    ["list", "--json", "--nosuch"],
    ["bench", "nosuch"],
    ["examples", "nosuch"],
    ["examples", "run", "999"],
    ["examples", "run-all", "-k", "nosuch"],
]


@pytest.mark.parametrize("args", ODD_ARGUMENTS, ids=lambda args: " ".join(args)[:30])
def test_any_argument_gets_a_message_and_a_documented_status_never_a_traceback(
    run_main: Callable[..., tuple[int, str]],
    args: list[str],
    tmp_path: Path,
    runtime_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run_main(*args)
    assert code in (0, 1, 2)
    assert code == 0 or err.strip()


def test_an_unexpected_exception_is_one_line_and_status_1(
    run_main: Callable[..., tuple[int, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(probe: bool = True) -> list[daemon.DaemonInfo]:
        raise RuntimeError("psutil broke")

    monkeypatch.setattr(cli_module, "find_daemons", broken)
    assert run_main("list") == (1, "Error: RuntimeError: psutil broke\n")


def test_the_mount_command_module_runs_main(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mktme_sandbox.cli", "umount", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0
    assert "is not mounted" in done.stdout
