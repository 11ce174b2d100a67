"""The daemon's life (docs/spec.md section 5): mount, signals, stale mounts, cleanup helpers.

Daemons are started with ``daemon_argv`` (the foreground ``mount`` command) as
children of the test, their output in a log that must show no traceback; every
one is stopped and unmounted whatever the test does.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mktme_sandbox import daemon
from mktme_sandbox.daemon import DaemonError


class Daemons:
    """Daemons started by one test; all stopped, unmounted and log-checked at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[tuple[subprocess.Popen[bytes], Path, Path]] = []

    def start(self, mnt: Path, wait: bool = True, **options: object) -> subprocess.Popen[bytes]:
        log = self.tmp_path / f"daemon{len(self.started)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                daemon.daemon_argv(mnt, **options),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append((proc, mnt, log))
        if wait:
            daemon.wait_until_mounted(mnt, proc, timeout=30, log_path=log)
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return next(log for p, _m, log in self.started if p is proc).read_text()

    def close(self) -> None:
        for proc, mnt, log in self.started:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            daemon.unmount(mnt)
            assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    started = Daemons(tmp_path)
    try:
        yield started
    finally:
        started.close()


# -- without a mount ------------------------------------------------------------------


def test_daemon_argv_runs_mount_in_the_foreground_with_options_and_an_absolute_path(
    tmp_path: Path,
) -> None:
    argv, env = daemon.daemon_command(
        "rel",
        phys_mem="64M",
        seed=3,
        algorithms=("aes-xts-128",),
        tme_bypass=True,
        allow_other=False,
        cache_size=None,
    )
    assert argv[:5] == [sys.executable, "-m", "mktme_sandbox.cli", "mount", "--foreground"]
    assert argv[5:] == [
        "--phys-mem",
        "64M",
        "--algorithms",
        "aes-xts-128",
        "--tme-bypass",
        os.path.abspath("rel"),
    ]
    assert env[daemon.SEED_ENV] == "3"


def test_the_seed_goes_in_the_environment_never_in_the_argv(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Anyone can read a process's argv (ps); only its user and root its environment."""
    with pytest.raises(ValueError, match="never goes in an argv"):
        daemon.daemon_argv("mnt", seed=1)
    monkeypatch.setenv(daemon.SEED_ENV, "5")
    argv, env = daemon.daemon_command("mnt", seed=None)
    assert daemon.SEED_ENV not in env  # an inherited seed does not leak into a random machine
    assert not any("seed" in arg for arg in argv)


def test_a_plain_directory_is_neither_mounted_nor_stale_and_needs_no_unmount(
    tmp_path: Path,
) -> None:
    assert not daemon.is_mounted(tmp_path)
    assert not daemon.is_stale(tmp_path)
    assert daemon.mount_type(tmp_path) is None
    assert daemon.unmount(tmp_path) is False
    assert daemon.clean_stale(tmp_path) is False


def test_prepare_mountpoint_creates_a_missing_directory(tmp_path: Path) -> None:
    path = daemon.prepare_mountpoint(tmp_path / "a" / "b")
    assert Path(path).is_dir()
    assert os.path.isabs(path)


def test_prepare_mountpoint_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(DaemonError, match="cannot create|not a directory"):
        daemon.prepare_mountpoint(tmp_path / "file")


# -- with a mount ---------------------------------------------------------------------


@pytest.mark.mount
def test_a_daemon_that_dies_at_start_is_reported_with_its_log_tail(
    daemons: Daemons, tmp_path: Path
) -> None:
    proc = daemons.start(tmp_path / "mnt", wait=False, phys_mem="3M")
    with pytest.raises(DaemonError, match="phys_mem must be a multiple of 2M"):
        daemon.wait_until_mounted(
            tmp_path / "mnt", proc, timeout=30, log_path=tmp_path / "daemon0.log"
        )
    assert proc.wait(10) != 0


@pytest.mark.mount
@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name
)
def test_a_signal_unmounts_cleanly_and_ends_the_daemon(
    daemons: Daemons, tmp_path: Path, sig: signal.Signals
) -> None:
    mnt = tmp_path / "mnt"
    proc = daemons.start(mnt, phys_mem="8M")
    assert daemon.mount_type(mnt) == daemon.FSTYPE
    proc.send_signal(sig)
    assert proc.wait(10) == 0
    assert not daemon.is_mounted(mnt)
    assert "unmounted on a signal" in daemons.log(proc)


@pytest.mark.mount
def test_unmounting_ends_the_daemon(daemons: Daemons, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    proc = daemons.start(mnt, phys_mem="8M")
    assert daemon.unmount(mnt) is True
    assert proc.wait(10) == 0
    assert not daemon.is_mounted(mnt)


@pytest.mark.mount
def test_a_busy_mount_is_unmounted_lazily(daemons: Daemons, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    proc = daemons.start(mnt, phys_mem="8M")
    holder = subprocess.Popen(["sleep", "30"], cwd=mnt)  # keeps the mount busy
    try:
        assert daemon.unmount(mnt, lazy_fallback=True) is True
        assert not daemon.is_mounted(mnt)
    finally:
        holder.kill()
        holder.wait()
    assert proc.wait(10) == 0


@pytest.mark.mount
def test_kill_9_leaves_a_stale_mount_that_clean_stale_removes(
    daemons: Daemons, tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    proc = daemons.start(mnt, phys_mem="8M")
    proc.kill()
    proc.wait()
    assert daemon.is_stale(mnt)
    with pytest.raises(OSError, match="Transport endpoint is not connected") as raised:
        os.stat(mnt)
    assert raised.value.errno == errno.ENOTCONN
    assert daemon.clean_stale(mnt) is True
    assert not daemon.is_mounted(mnt)


@pytest.mark.mount
def test_a_new_daemon_at_a_stale_mountpoint_cleans_it_and_serves(
    daemons: Daemons, tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    first = daemons.start(mnt, phys_mem="8M")
    first.kill()
    first.wait()
    daemons.start(mnt, phys_mem="8M")
    assert (mnt / "README").read_text()
    assert not daemon.is_stale(mnt)


@pytest.mark.mount
def test_prepare_mountpoint_refuses_a_live_sandbox(daemons: Daemons, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    daemons.start(mnt, phys_mem="8M")
    with pytest.raises(DaemonError, match="already serves a sandbox"):
        daemon.prepare_mountpoint(mnt)


@pytest.mark.mount
def test_find_daemons_lists_a_running_daemon_with_its_mountpoint_and_phys_mem(
    daemons: Daemons, tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    proc = daemons.start(mnt, phys_mem="8M")
    found = {d.pid: d for d in daemon.find_daemons()}
    assert proc.pid in found
    info = found[proc.pid]
    assert (info.mountpoint, info.phys_mem) == (str(mnt), 8 << 20)
    assert info.rss > 0
    assert info.uptime >= 0


@pytest.mark.mount
def test_start_daemon_returns_the_pid_and_log_once_the_mount_answers(
    tmp_path: Path, runtime_dir: Path
) -> None:
    mnt = tmp_path / "mnt"
    started = daemon.start_daemon(mnt, phys_mem="8M")
    pid, log = started.pid, started.log_path
    try:
        assert Path(log).parent == runtime_dir
        assert (mnt / "README").read_text()
        assert f"pid {pid}" in Path(log).read_text()
    finally:
        daemon.unmount(mnt)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not Path(log).exists()  # the daemon ended cleanly and removed its own log
    assert list(runtime_dir.iterdir()) == []  # nor is its mountpoint's lock left


@pytest.mark.mount
def test_start_daemon_stops_reaps_and_unmounts_a_daemon_that_does_not_answer_in_time(
    tmp_path: Path, runtime_dir: Path
) -> None:
    mnt = tmp_path / "mnt"
    with pytest.raises(DaemonError, match="did not answer within 0 s") as failed:
        daemon.start_daemon(mnt, timeout=0, phys_mem="8M")
    stopped = re.search(r"daemon (\d+) stopped; its log is kept at (\S+)\)$", str(failed.value))
    assert stopped is not None, str(failed.value)
    with pytest.raises(ChildProcessError):
        os.waitpid(int(stopped.group(1)), os.WNOHANG)  # reaped: not even a zombie is left
    assert not daemon.is_mounted(mnt)
    assert [str(p) for p in runtime_dir.iterdir()] == [stopped.group(2)]


def _detached_daemon_info(mnt: Path) -> daemon.DaemonInfo:
    return next(d for d in daemon.find_daemons() if d.mountpoint == str(mnt))


@pytest.mark.mount
def test_unmounting_a_detached_daemon_that_exits_cleanly_removes_its_log(
    tmp_path: Path, runtime_dir: Path
) -> None:
    mnt = tmp_path / "mnt"
    started = daemon.start_daemon(mnt, phys_mem="8M")
    pid, log = started.pid, started.log_path
    info = _detached_daemon_info(mnt)
    assert (info.pid, info.log_path) == (pid, log)
    assert daemon.unmount(mnt) is True
    try:
        assert daemon.wait_for_exit([info], timeout=10)  # the sequence of `mktme-sandbox umount`
    finally:
        os.waitpid(pid, 0)
    assert not Path(log).exists()
    assert list(runtime_dir.iterdir()) == []


@pytest.mark.mount
def test_the_log_of_a_daemon_that_died_is_kept_and_named(
    tmp_path: Path, runtime_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mnt = tmp_path / "mnt"
    started = daemon.start_daemon(mnt, phys_mem="8M")
    pid, log = started.pid, started.log_path
    info = _detached_daemon_info(mnt)
    os.kill(pid, signal.SIGKILL)
    try:
        assert daemon.wait_for_exit([info], timeout=10)
    finally:
        os.waitpid(pid, 0)
        daemon.unmount(mnt)
    assert Path(log).exists()
    assert f"daemon {pid} did not exit cleanly; its log is kept at {log}" in caplog.text


# -- the logs of detached daemons, without a mount --------------------------------------

CLEAN_END = "2026-01-01 12:00:00 mktme-sandbox[42] INFO /mnt unmounted; exit status 0\n"
SERVING = "2026-01-01 12:00:00 mktme-sandbox[42] INFO serving /mnt as pid 42\n"


TRACEBACK = "Traceback (most recent call last):\n  boom\n"
LOGS = {
    "clean": (SERVING + CLEAN_END, True, ""),
    "killed": (SERVING, True, "did not exit cleanly"),  # no last line
    "traceback": (SERVING + TRACEBACK + CLEAN_END, True, "logged a traceback or an error"),
    "other-pid": (SERVING + CLEAN_END.replace("[42]", "[43]"), True, "did not exit cleanly"),
    "running": (SERVING + CLEAN_END, False, "is still running"),
}


@pytest.mark.parametrize(("text", "ended", "why"), LOGS.values(), ids=list(LOGS))
def test_dispose_log_removes_only_the_log_of_a_clean_exit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, ended: bool, why: str
) -> None:
    removed = not why
    log = tmp_path / "daemon.log"
    log.write_text(text)
    assert daemon.dispose_log(log, 42, ended=ended) is removed
    assert log.exists() is not removed
    assert (f"daemon 42 {why}; its log is kept at {log}" in caplog.text) is not removed


@pytest.mark.mount
def test_a_mountpoint_whose_name_has_a_space_is_recognised_and_unmounted(
    daemons: Daemons, tmp_path: Path
) -> None:
    mnt = tmp_path / "with space"
    daemons.start(mnt, phys_mem="8M")
    assert daemon.mount_type(mnt) == daemon.FSTYPE
    assert daemon.unmount(mnt) is True
    assert not daemon.is_mounted(mnt)


def test_log_trouble_is_any_line_that_is_not_our_own_record() -> None:
    """A daemon log is clean only if every line is the daemon's own INFO/DEBUG/WARNING
    record: libfuse's stderr warnings count as trouble, as pyfuse3's test helpers
    fail a test on any warning of the filesystem process."""
    ours = "2026-11-29 09:46:49,072 mktme-sandbox[14677] INFO serving /tmp/m1 as pid 14677\n"
    assert daemon.LOG_TROUBLE.search(ours) is None
    assert daemon.LOG_TROUBLE.search(ours.replace("INFO", "WARNING")) is None
    assert daemon.LOG_TROUBLE.search(ours.replace("INFO", "ERROR")) is not None
    libfuse = "Ignoring invalid max threads value 4294967295 > max (100000).\n"
    assert daemon.LOG_TROUBLE.search(ours + libfuse) is not None
    assert daemon.LOG_TROUBLE.search(ours + TRACEBACK) is not None


def test_a_clean_daemon_log_has_no_foreign_line(daemons: Daemons, tmp_path: Path) -> None:
    """The daemon's log holds only its own records: no libfuse warning at start-up."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = daemons.start(mnt)
    daemon.unmount(mnt)
    proc.wait(10)
    text = daemons.log(proc)
    assert "serving" in text
    assert daemon.LOG_TROUBLE.search(text) is None, text


@pytest.mark.mount
def test_stopping_a_started_daemon_unmounts_reaps_it_and_removes_its_log_and_lock(
    tmp_path: Path, runtime_dir: Path
) -> None:
    """One stop path: ``Daemon.stop`` is what ``mktme-sandbox umount`` does, plus reaping."""
    mnt = tmp_path / "mnt"
    started = daemon.start_daemon(mnt, phys_mem="8M")
    started.stop()
    assert started.returncode == 0
    assert not daemon.is_mounted(mnt)
    assert list(runtime_dir.iterdir()) == []


@pytest.mark.mount
def test_a_log_the_caller_names_is_appended_to_and_kept(tmp_path: Path, runtime_dir: Path) -> None:
    mnt, log = tmp_path / "mnt", tmp_path / "daemon.log"
    log.write_text("earlier line\n")
    started = daemon.start_daemon(mnt, log_path=log, phys_mem="8M")
    started.stop()
    text = log.read_text()
    assert text.startswith("earlier line\n$ ")
    assert "unmounted; exit status 0" in text
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


@pytest.mark.mount
def test_a_second_daemon_on_a_served_directory_is_refused_in_one_line(
    tmp_path: Path, runtime_dir: Path
) -> None:
    mnt = tmp_path / "mnt"
    started = daemon.start_daemon(mnt, phys_mem="8M")
    try:
        with pytest.raises(DaemonError, match="already serves a sandbox") as refused:
            daemon.start_daemon(mnt, phys_mem="8M")
        assert "\n" not in str(refused.value)
    finally:
        started.stop()
