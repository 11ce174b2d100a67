"""The life of one sandbox daemon: mount, serve, stop, clean up (docs/spec.md section 5).

A daemon is ``mktme-sandbox mount --foreground MNT [options]``: one process,
one ``Machine``, one FUSE mount served by libfuse's single-threaded loop
(no Python thread state made per request; glibc's malloc thresholds raised so
that the buffers of a large read are reused, not mmapped anew). It ends
when MNT is unmounted (``mktme-sandbox umount``, ``fusermount3 -u``) or on
SIGTERM, SIGINT or SIGHUP, whose handlers libfuse installs while it serves:
they end the loop and libfuse unmounts before the process exits. SIGQUIT and
SIGUSR1 end it the same way: Python catches them, and a thread woken by
Python's wakeup pipe sends SIGTERM to the main thread, inside libfuse's loop.

Reusable pieces (the CLI and ``mktme_sandbox.pytest_plugin`` call them):

- ``daemon_command(mountpoint, **options)``: the argv and environment of a
  foreground daemon: the seed, a secret, goes in the environment
  (``MKTME_SEED``), never in the argv that ``ps`` shows to every user;
  ``daemon_argv`` is its argv alone and refuses a seed;
- ``runtime_dir()``: where logs and locks go, private to the user;
- ``lock_mountpoint(path)``: the one lock that lets a single daemon serve a
  directory (``flock`` on a file in ``runtime_dir()``);
- ``fuse_unavailable_reason()``, ``mount_refusal(allow_other)``: why a mount
  cannot work here, as one line;
- ``canonical_path(path)``: the form in which mountinfo names a mount point;
- ``is_mounted(path)``, ``is_stale(path)``, ``mount_type(path)``: what
  /proc/self/mountinfo says about a path (a stale FUSE mount, whose daemon
  died, answers ENOTCONN "Transport endpoint is not connected");
- ``clean_stale(path)``: unmount such a leftover;
- ``unmount(path, lazy_fallback=True)``: ``fusermount3 -u``, then ``-u -z``;
- ``abort_connection(path)``: write ``1`` to the mount's
  ``/sys/fs/fuse/connections/N/abort`` (N from mountinfo, the mount untouched);
- ``stop_sandbox(path)``: what ``mktme-sandbox umount`` does, also to a
  stopped (SIGSTOP) or wedged daemon, without ever blocking on the mount;
- ``wait_until_mounted(path, proc, timeout)``: poll until the mount answers;
- ``start_daemon(mountpoint, log_path=None, **options)``: the one way a daemon
  is started (the CLI's ``mount``, ``mounting.mounted``, the pytest plugin):
  spawn it in its own session, logging to a file, and wait until it answers
  (on failure it is stopped, reaped and unmounted); the ``Daemon`` it returns
  has ``stop()``, which is ``stop_sandbox`` plus SIGTERM/SIGKILL and reaping;
- ``run_foreground(mountpoint, config, allow_other)``: be the daemon;
- ``find_daemons()``: the running daemons, for ``mktme-sandbox list``, each with
  the log ``start_daemon`` made for it;
- ``wait_for_exit(daemons, timeout)``: until those daemons have ended; then the
  log of each that exited cleanly is removed, and where a log is kept (the
  daemon failed, or still runs) a warning says where it is.

Logs: ``start_daemon`` creates the log ``0600`` in ``runtime_dir()`` and
names it in the daemon's environment (``MKTME_SANDBOX_LOG``). A daemon that
ends normally (unmounted, or on a signal) logs ``... unmounted; exit status 0``
as its last line and then disposes of its own log: a log that ends so and
holds only the daemon's own INFO/DEBUG/WARNING records (``LOG_TROUBLE`` finds
anything else: a traceback, an ERROR, a libfuse warning) is removed, any other
is kept, and ``mktme-sandbox umount`` names a kept log on stderr.

Left out: running as a different user than the caller, remounting a live
sandbox elsewhere, restoring a machine's state after a crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from mktme_sandbox.config import MachineConfig

__all__ = [
    "FSTYPE",
    "LOCK_ENV",
    "LOG_ENV",
    "LOG_TROUBLE",
    "SEED_ENV",
    "STOP_SIGNALS",
    "Daemon",
    "DaemonError",
    "DaemonInfo",
    "MountLock",
    "abort_connection",
    "canonical_path",
    "clean_stale",
    "daemon_argv",
    "daemon_command",
    "dispose_log",
    "find_daemons",
    "fuse_connection",
    "fuse_unavailable_reason",
    "is_mounted",
    "is_stale",
    "lock_mountpoint",
    "log_tail",
    "mount_refusal",
    "mount_type",
    "prepare_mountpoint",
    "raise_malloc_thresholds",
    "run_foreground",
    "runtime_dir",
    "start_daemon",
    "stop_sandbox",
    "unmount",
    "wait_for_exit",
    "wait_until_mounted",
]

log = logging.getLogger("mktme_sandbox.daemon")

FSTYPE = "fuse.mktme-sandbox"  # as /proc/self/mountinfo shows our mounts
FUSERMOUNT = "fusermount3"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
_POLL = 0.02
PROBE_TIMEOUT = 1.0  # how long list and umount wait for a mount to answer a stat
LOG_ENV = "MKTME_SANDBOX_LOG"  # the log start_daemon made, in the daemon's environment
SEED_ENV = "MKTME_SEED"  # the seed, in the daemon's environment (never in its argv)
LOCK_ENV = "MKTME_SANDBOX_LOCK_FD"  # the mountpoint's lock, inherited from `mount`
FUSE_DEVICE = "/dev/fuse"
FUSE_CONF = "/etc/fuse.conf"
FUSECTL = "/sys/fs/fuse/connections"  # fusectl: one directory per FUSE connection
# The signals that end a daemon cleanly: libfuse handles the first three, the
# daemon forwards the others to it as SIGTERM.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)
_FORWARDED = (signal.SIGQUIT, signal.SIGUSR1)
# What a healthy daemon never logs: a traceback, or an ERROR line (the fs layer logs a
# handler's unexpected exception as "mktme-sandbox[PID] ERROR internal error in ...",
# by type only, so that no key material reaches the log).
# Trouble is any line that is not one of our own INFO/DEBUG/WARNING records (or
# the "$ command" line the pytest plugin writes first): a traceback, our ERROR and CRITICAL records, and whatever libfuse, mfusepy or
# Python's warnings write to stderr (as pyfuse3's test helpers fail on them).
LOG_TROUBLE = re.compile(
    r"^(?!\$ |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:,\d+)? mktme-sandbox\[\d+\] (?:DEBUG|INFO|WARNING) )"
    r"(?=\S).*$",
    re.MULTILINE,
)
_CLEAN_EXIT = "; exit status 0"  # the end of a daemon's last line when it ends normally


class DaemonError(Exception):
    """Something about mounting or unmounting failed; the message says what."""


class _Pollable(Protocol):
    def poll(self) -> int | None: ...


# -- the daemon's command line --------------------------------------------------------


def daemon_command(
    mountpoint: str | os.PathLike[str], **options: Any
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run a daemon in the foreground at ``mountpoint``.

    ``options`` are the ``mount`` options with underscores: ``phys_mem="64M"``
    or ``phys_mem=64 << 20``, ``seed=1``, ``algorithms=("aes-xts-128",)``,
    ``tme_bypass=True``, ``allow_other=True``. A True flag is passed, False or
    None is left out. The seed goes in the environment as ``MKTME_SEED`` (one
    inherited from ours is dropped when ``seed`` is None): anyone who runs
    ``ps`` reads a process's argv, only its user and root its environment.
    The mount command validates the values, so a bad one makes the daemon exit
    at once with the reason in its log.
    """
    seed = options.pop("seed", None)
    env = {name: value for name, value in os.environ.items() if name != SEED_ENV}
    if seed is not None:
        env[SEED_ENV] = str(seed)
    return daemon_argv(mountpoint, **options), env


def daemon_argv(mountpoint: str | os.PathLike[str], **options: Any) -> list[str]:
    """The argv of ``daemon_command``, for options that hold no secret.

    A seed is refused (``ValueError``): it is a secret, which ``daemon_command``
    passes in the environment.
    """
    if options.get("seed") is not None:
        raise ValueError("the seed never goes in an argv, which ps shows: use daemon_command")
    argv = [sys.executable, "-m", "mktme_sandbox.cli", "mount", "--foreground"]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list | tuple):
            argv += [flag, ",".join(map(str, value))]
        else:
            argv += [flag, str(value)]
    return [*argv, os.path.abspath(mountpoint)]


def _is_daemon_argv(argv: list[str]) -> bool:
    launcher = any(
        a == "mktme_sandbox.cli" or os.path.basename(a) == "mktme-sandbox" for a in argv[:3]
    )
    return launcher and "mount" in argv and "--foreground" in argv


# -- what is mounted where ------------------------------------------------------------


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


class _MountEntry(NamedTuple):
    point: str
    fstype: str
    minor: int  # of st_dev: for FUSE, the connection's number under /sys/fs/fuse/connections


def _mounts() -> Iterator[_MountEntry]:
    """Every mount this process can see, from /proc/self/mountinfo (no mount is touched)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
        for line in info:
            fields = line.split()
            tail = fields.index("-")
            minor = int(fields[2].partition(":")[2])
            yield _MountEntry(_unescape(fields[4]), fields[tail + 1], minor)


def _topmost(path: str | os.PathLike[str]) -> _MountEntry | None:
    target = canonical_path(path)
    found = None
    for entry in _mounts():
        if entry.point == target:
            found = entry
    return found


def canonical_path(path: str | os.PathLike[str]) -> str:
    """Absolute, with symlinks resolved above the last component (which may be stale)."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def mount_type(path: str | os.PathLike[str]) -> str | None:
    """The fstype of the topmost mount at ``path`` (``fuse.mktme-sandbox`` ...), or None."""
    entry = _topmost(path)
    return entry.fstype if entry else None


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """True when something, live or stale, is mounted at ``path``.

    Unlike ``os.path.ismount`` this also sees a FUSE mount whose daemon died.
    """
    return mount_type(path) is not None


def is_stale(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a FUSE mount whose daemon is gone (ENOTCONN).

    A mount that does not answer within ``PROBE_TIMEOUT`` (its daemon stopped
    or wedged) is not stale: its daemon is alive.
    """
    if not is_mounted(path):
        return False
    answer = _probe([os.fspath(path)])[0]
    return isinstance(answer, OSError) and answer.errno in (errno.ENOTCONN, errno.ECONNABORTED)


def _probe(paths: Sequence[str], timeout: float = PROBE_TIMEOUT) -> list[Any]:
    """``os.stat`` of each path, all at once, each in a thread of its own.

    Each answer is the stat result, the ``OSError``, or None when it did not
    come within ``timeout`` seconds: then the thread stays blocked in the
    kernel until the mount answers or is aborted, and it dies with the process.
    So nothing here ever waits on a mount longer than ``timeout``.
    """
    answers: list[Any] = [None] * len(paths)

    def ask(index: int) -> None:
        try:
            answers[index] = os.stat(paths[index])
        except OSError as err:
            answers[index] = err

    threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(len(paths))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return answers


def fuse_connection(path: str | os.PathLike[str]) -> int | None:
    """The FUSE connection number of the mount at ``path`` (the minor of its
    st_dev), read from mountinfo without touching the mount; None if unmounted."""
    entry = _topmost(path)
    return entry.minor if entry else None


def abort_connection(path: str | os.PathLike[str]) -> bool:
    """Abort the FUSE connection of the mount at ``path``: its pending and
    future requests fail at once (ECONNABORTED) and its daemon's next read of
    /dev/fuse fails, so nothing waits on a daemon that does not answer.

    Needs fusectl mounted at /sys/fs/fuse/connections and to be the mount's
    owner or root; False when it could not be done (unmounting then falls back
    to a lazy unmount).
    """
    connection = fuse_connection(path)
    if connection is None:
        return False
    try:
        with open(os.path.join(FUSECTL, str(connection), "abort"), "w") as abort:
            abort.write("1")
    except OSError as err:
        log.info("cannot abort the FUSE connection of %s: %s", path, err.strerror)
        return False
    return True


def _fusermount(path: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FUSERMOUNT, *flags, "--", path], capture_output=True, text=True, check=False
    )


def unmount(path: str | os.PathLike[str], lazy_fallback: bool = True) -> bool:
    """Unmount ``path``: ``fusermount3 -u``, then ``-u -z`` if that fails.

    Returns False when nothing was mounted there, True once unmounted; raises
    ``DaemonError`` with fusermount3's message otherwise. Works on stale
    mounts. The daemon, if alive, sees the unmount and exits by itself.
    """
    target = canonical_path(path)
    if not is_mounted(target):
        return False
    done = _fusermount(target, "-u")
    if done.returncode and lazy_fallback:
        done = _fusermount(target, "-u", "-z")
    if done.returncode:
        raise DaemonError(f"cannot unmount {target}: {done.stderr.strip()}")
    return True


def stop_sandbox(
    path: str | os.PathLike[str],
    timeout: float = STOP_TIMEOUT,
    served: Sequence[DaemonInfo] | None = None,
) -> bool:
    """Unmount ``path`` and wait for its daemon to end; False if nothing was mounted.

    What ``mktme-sandbox umount`` does. It never blocks on the mount: the
    daemon that serves ``path`` (and no other) is found from argv and
    mountinfo; if it is stopped (SIGSTOP) or the mount does not answer a stat
    within ``PROBE_TIMEOUT``, the FUSE connection is aborted first. Then
    ``unmount``, a SIGCONT to a stopped daemon (it sees the unmount and ends
    cleanly), and ``wait_for_exit``, which removes a clean log or names a kept one.
    ``served``: the daemons known to serve ``path`` (default: found from argv).
    """
    target = canonical_path(path)
    if served is None:
        served = [info for info in find_daemons(probe=False) if info.mountpoint == target]
    if not is_mounted(target):
        return False
    stopped = any(info.state == "stopped" for info in served)
    if stopped or _probe([target])[0] is None:
        abort_connection(target)
    unmount(target, lazy_fallback=True)
    for info in served:
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGCONT)
    wait_for_exit(served, timeout)
    return True


def clean_stale(path: str | os.PathLike[str]) -> bool:
    """Unmount a stale FUSE mount at ``path``; True if there was one."""
    if not is_stale(path):
        return False
    log.info("cleaning a stale mount at %s", path)
    return unmount(path, lazy_fallback=True)


def log_tail(log_path: str | os.PathLike[str] | None, lines: int = 20) -> str:
    """The last lines of a daemon log, for error messages."""
    if log_path is None:
        return ""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _answers(path: str) -> bool:
    try:
        return os.path.ismount(path) and bool(Path(path, "README").read_bytes())
    except OSError:
        return False


def wait_until_mounted(
    path: str | os.PathLike[str],
    proc: _Pollable | None = None,
    timeout: float = READY_TIMEOUT,
    log_path: str | os.PathLike[str] | None = None,
) -> None:
    """Poll until the sandbox at ``path`` answers (mounted, README readable).

    ``proc`` is the daemon (anything with ``poll()``, such as ``subprocess.Popen``)
    or None. Raises ``DaemonError`` when the daemon exits first or ``timeout``
    seconds pass, with the tail of ``log_path`` in the message.
    """
    deadline = time.monotonic() + timeout
    while not _answers(os.fspath(path)):
        code = proc.poll() if proc is not None else None
        if code is not None:
            raise DaemonError(
                f"the daemon exited ({code}) before {path} was mounted\n{log_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise DaemonError(f"{path} did not answer within {timeout:g} s\n{log_tail(log_path)}")
        time.sleep(_POLL)


# -- starting and being a daemon ------------------------------------------------------


def fuse_unavailable_reason(device: str | None = None) -> str | None:
    """Why no FUSE mount can work here, in one line; None when one can."""
    device = device or FUSE_DEVICE
    if not os.path.exists(device):
        return f"FUSE is not available: {device} does not exist"
    if not os.access(device, os.R_OK | os.W_OK):
        who = f"uid {os.getuid()}"
        return f"FUSE is not available: {device} is not readable and writable by {who}"
    if shutil.which(FUSERMOUNT) is None:
        return f"FUSE is not available: {FUSERMOUNT} is not on PATH (install fuse3)"
    return None


def _user_allow_other() -> bool:
    try:
        with open(FUSE_CONF, encoding="utf-8", errors="replace") as conf:
            return any(line.split("#")[0].strip() == "user_allow_other" for line in conf)
    except OSError:
        return False


def mount_refusal(allow_other: bool = False) -> str | None:
    """Why ``mount`` cannot work for this user, in one line; None when it can.

    FUSE must be usable, and ``--allow-other`` needs root or
    ``user_allow_other`` in /etc/fuse.conf (fusermount3's rule).
    """
    reason = fuse_unavailable_reason()
    if reason is None and allow_other and os.geteuid() != 0 and not _user_allow_other():
        reason = f"--allow-other needs root or a line user_allow_other in {FUSE_CONF}"
    return reason


def prepare_mountpoint(mountpoint: str | os.PathLike[str]) -> str:
    """Clean a stale mount, refuse a live sandbox, create the directory; absolute path.

    Every refusal is a ``DaemonError`` of one line: a live sandbox there, a
    directory that cannot be created, a file, a directory this user may not
    mount on (not its own and not writable: fusermount3's rule).
    """
    path = canonical_path(mountpoint)
    clean_stale(path)
    if mount_type(path) == FSTYPE:
        raise DaemonError(f"{path} already serves a sandbox (mktme-sandbox umount {path})")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise DaemonError(f"cannot create {path}: {err.strerror}") from None
    if not os.path.isdir(path):
        raise DaemonError(f"{path} is not a directory")
    owner = os.stat(path).st_uid
    if os.geteuid() not in (0, owner) and not os.access(path, os.W_OK):
        raise DaemonError(f"cannot mount on {path}: neither owned nor writable by this user")
    return path


def _is_private_dir(path: str) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    mine = info.st_uid == os.geteuid() and not info.st_mode & 0o077
    return stat.S_ISDIR(info.st_mode) and mine and os.access(path, os.W_OK | os.X_OK)


def runtime_dir() -> str:
    """Where daemon logs and mountpoint locks go: private to this user.

    ``$XDG_RUNTIME_DIR`` when it is a directory of this user that nobody else
    may enter (mode ``0700``), else ``mktme-sandbox-UID`` in the temp
    directory, created ``0700``; one that exists but is not so private (a
    symlink, another owner, a wider mode) is refused with ``DaemonError``.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and _is_private_dir(runtime):
        return runtime
    private = os.path.join(tempfile.gettempdir(), f"mktme-sandbox-{os.geteuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(private, 0o700)
    if not _is_private_dir(private):
        raise DaemonError(f"{private} is not a private directory of uid {os.geteuid()}: remove it")
    return private


@dataclass(frozen=True)
class MountLock:
    """The exclusive ``flock`` one daemon holds on its mountpoint's lock file."""

    fd: int
    path: str

    def release(self) -> None:
        """Remove the lock file (while still holding it), then let go."""
        if _same_file(self.fd, self.path):
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self.fd)


def _same_file(fd: int, path: str) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _lock_path(mountpoint: str) -> str:
    digest = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16]
    return os.path.join(runtime_dir(), f"mktme-sandbox-{digest}.lock")


def _inherited_lock(lock_path: str) -> int | None:
    """The lock ``mount`` took and handed down (``MKTME_SANDBOX_LOCK_FD``), if it is this one."""
    inherited = os.environ.pop(LOCK_ENV, "")
    if inherited.isdigit() and _same_file(int(inherited), lock_path):
        return int(inherited)
    return None


def lock_mountpoint(mountpoint: str | os.PathLike[str]) -> MountLock:
    """Take the lock of ``mountpoint``, or fail with a one-line ``DaemonError``.

    One lock file per mountpoint in ``runtime_dir()``; ``flock(LOCK_EX |
    LOCK_NB)``: whoever holds it mounts or serves there, so two ``mount``s
    racing on one directory cannot both mount. ``mount`` takes it and hands it
    to the daemon it starts, which holds it for its life and removes the file
    at its end (a lock file replaced meanwhile is taken again).
    """
    path = canonical_path(mountpoint)
    lock_path = _lock_path(path)
    inherited = _inherited_lock(lock_path)
    while True:
        fd = (
            inherited
            if inherited is not None
            else os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        )
        inherited = None
        if not _flock_briefly(fd):
            os.close(fd)
            raise DaemonError(
                f"{path} already serves a sandbox or one is being mounted there"
                f" (mktme-sandbox umount {path})"
            ) from None
        if _same_file(fd, lock_path):
            _sweep_locks(os.path.dirname(lock_path), keep=lock_path)
            return MountLock(fd, lock_path)
        os.close(fd)  # its holder removed it meanwhile: take the new one


def _flock_briefly(fd: int, attempts: int = 10, pause: float = 0.02) -> bool:
    """``flock(LOCK_EX)`` without blocking for long: a holder that only sweeps a
    stale lock file lets go within moments; a daemon holds it for its life."""
    for attempt in range(attempts):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if attempt + 1 < attempts:
                time.sleep(pause)
            continue
        return True
    return False


def _sweep_locks(directory: str, keep: str) -> None:
    """Remove the lock files nobody holds: those of daemons killed (SIGKILL)
    before they could remove theirs. Each is locked while it is removed, so a
    taker that opened it meanwhile sees it replaced and takes the new one."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if not (name.startswith("mktme-sandbox-") and name.endswith(".lock")) or path == keep:
            continue
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        with contextlib.suppress(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            MountLock(fd, path).release()
            continue
        os.close(fd)


@dataclass
class Daemon:
    """A daemon this process started (``start_daemon``): pollable, stoppable, reaped.

    ``log_path`` is its log; ``owns_log`` is True when ``start_daemon`` made
    the log (removed after a clean exit), False when the caller named it (kept).
    """

    pid: int
    mountpoint: str
    log_path: str
    owns_log: bool = True
    returncode: int | None = None

    def poll(self) -> int | None:
        """Its exit status once it has ended (reaping it), else None."""
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """What ``mktme-sandbox umount`` does (``stop_sandbox``), then SIGTERM and,
        ``timeout`` seconds later, SIGKILL if it is still running; reaped either way
        and its mount gone (also when it had died leaving a stale mount)."""
        alive = self.poll() is None
        served = [self._info()] if alive else []
        stop_sandbox(self.mountpoint, timeout, served=served)
        self._terminate(timeout)

    def _info(self) -> DaemonInfo:
        import psutil

        try:
            status = psutil.Process(self.pid).status()
        except psutil.NoSuchProcess:
            status = psutil.STATUS_ZOMBIE
        stopped = status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
        return DaemonInfo(
            pid=self.pid,
            mountpoint=self.mountpoint,
            phys_mem=None,
            rss=0,
            uptime=0.0,
            log_path=self.log_path if self.owns_log else None,
            state="stopped" if stopped else "running",
        )

    def _terminate(self, grace: float) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.poll() is None and time.monotonic() < deadline:
                time.sleep(_POLL)
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)


def start_daemon(
    mountpoint: str | os.PathLike[str],
    *,
    log_path: str | os.PathLike[str] | None = None,
    timeout: float = READY_TIMEOUT,
    **options: Any,
) -> Daemon:
    """Start a daemon in its own session and wait until its mount answers.

    The one way a daemon is started: by ``mktme-sandbox mount``, by
    ``mounting.mounted`` and so by the pytest plugin. First ``lock_mountpoint``
    (a second ``mount`` racing on the same directory fails here, with one
    line) and ``prepare_mountpoint``; the daemon inherits the lock. Its output
    goes to ``log_path`` (appended to, created ``0600``), or by default to a
    new log file, mode ``0600``, in ``runtime_dir()``, named in its
    environment as ``MKTME_SANDBOX_LOG`` (removed after a clean exit); the
    seed goes in its environment (``daemon_command``). If the daemon dies or
    does not answer within ``timeout`` seconds it is stopped, reaped and its
    mount (if it made one meanwhile) removed; then ``DaemonError`` is raised
    with the log's tail, and the log is kept.
    """
    lock = lock_mountpoint(mountpoint)
    try:
        path = prepare_mountpoint(mountpoint)
        child = _spawn(path, lock, options, log_path)
    except BaseException:
        lock.release()
        raise
    try:
        wait_until_mounted(path, child, timeout, child.log_path)
    except DaemonError as err:
        child.owns_log = False  # kept: it says why
        child.stop()
        lock.release()
        raise DaemonError(
            f"{err}\n(daemon {child.pid} stopped; its log is kept at {child.log_path})"
        ) from None
    os.close(lock.fd)  # the daemon holds it now
    return child


def _open_log(path: str, log_path: str | os.PathLike[str] | None) -> tuple[int, str, bool]:
    """(fd, path, owned): the caller's log opened for appending, or a new one of ours."""
    if log_path is not None:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        return fd, os.fspath(log_path), False
    fd, made = tempfile.mkstemp(  # mode 0600
        prefix=f"mktme-sandbox-{os.path.basename(path)}-", suffix=".log", dir=runtime_dir()
    )
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)  # others may add
    return fd, made, True


def _spawn(
    path: str, lock: MountLock, options: dict[str, Any], log_path: str | os.PathLike[str] | None
) -> Daemon:
    fd, log_name, owned = _open_log(path, log_path)
    argv, env = daemon_command(path, **options)
    os.write(fd, ("$ " + " ".join(argv) + "\n").encode())
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, fd, 1),
        (os.POSIX_SPAWN_DUP2, fd, 2),
        (os.POSIX_SPAWN_CLOSE, fd),
    ]
    env |= {LOCK_ENV: str(lock.fd), "PYTHONUNBUFFERED": "1"}
    env.pop(LOG_ENV, None)
    if owned:
        env[LOG_ENV] = log_name
    os.set_inheritable(lock.fd, True)
    try:
        pid = os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True)
    finally:
        os.close(fd)
    return Daemon(pid, path, log_name, owns_log=owned)


def _forward_stop_signals() -> None:
    """Make SIGQUIT and SIGUSR1 end the daemon as SIGTERM does.

    libfuse handles only SIGTERM, SIGINT and SIGHUP, and while it serves, the
    main thread is in C, where Python's own handlers do not run. Python's C
    handler does write the signal's number to the wakeup fd, though: a thread
    blocked on it sends SIGTERM to the main thread, whose read of /dev/fuse
    it interrupts, and libfuse ends its loop and unmounts.
    """
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    for sig in _FORWARDED:
        signal.signal(sig, lambda *_: None)
    main = threading.main_thread().ident
    assert main is not None

    def forward() -> None:
        while True:
            if set(os.read(wake_read, 64)) & set(_FORWARDED):
                signal.pthread_kill(main, signal.SIGTERM)

    threading.Thread(target=forward, name="stop-signals", daemon=True).start()


# glibc mallopt(3) parameters and the values the daemon sets: a read of up to a
# few MiB (its numpy buffers, the bytes handed to libfuse) then reuses heap
# memory instead of mmapping and unmapping fresh pages (about 600 minor page
# faults per 1 MiB read otherwise).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's upper limit on 64-bit hosts
_TRIM_THRESHOLD = 64 * 1024 * 1024


def raise_malloc_thresholds() -> bool:
    """Keep buffers of a read in the heap; False where libc has no ``mallopt``."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    return bool(ok)


def run_foreground(
    mountpoint: str | os.PathLike[str], config: MachineConfig, allow_other: bool = False
) -> int:
    """Be the daemon: build the machine, mount, serve until unmounted or signalled.

    Holds the mountpoint's lock (inherited from ``mount``, or taken here) as
    long as it serves. At a normal end (unmounted, or one of ``STOP_SIGNALS``)
    its last record is ``... unmounted; exit status 0``; then a daemon started
    by ``start_daemon`` removes its own log unless something went wrong
    (``dispose_log``).
    """
    from mktme_sandbox.fs import SandboxFS, serve  # FUSE loads libfuse: only in the daemon
    from mktme_sandbox.machine import Machine

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        # Until libfuse serves, a signal just ends the process (no KeyboardInterrupt
        # traceback); libfuse installs its handlers only over SIG_DFL, and a shell's
        # `&` leaves SIGINT ignored.
        signal.signal(sig, signal.SIG_DFL)
    _forward_stop_signals()
    lock = lock_mountpoint(mountpoint)
    try:
        path = prepare_mountpoint(mountpoint)
        os.chdir("/")  # keep no directory busy
        raise_malloc_thresholds()
        machine = Machine(config)
        log.info("serving %s as pid %d (phys_mem %#x)", path, os.getpid(), config.phys_mem)
        ended_by_signal = not serve(SandboxFS(machine), path, allow_other)
    finally:
        lock.release()
    log.info("%s unmounted%s%s", path, " on a signal" if ended_by_signal else "", _CLEAN_EXIT)
    own_log = os.environ.get(LOG_ENV)
    if own_log:
        dispose_log(own_log, os.getpid())
    return 0


# -- running daemons ------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonInfo:
    """One running daemon, as ``mktme-sandbox list`` shows it."""

    pid: int
    mountpoint: str | None  # None while it is starting
    phys_mem: int | None
    rss: int
    uptime: float
    log_path: str | None = None  # the log start_daemon made for it (None: foreground)
    state: str = "running"  # "running", "stopped" (SIGSTOP) or "unresponsive" (no answer)


def _daemon_info(proc: Any, mounts: set[str]) -> DaemonInfo:
    import psutil

    argv, cwd = proc.info["cmdline"], proc.info["cwd"] or "/"
    candidates = (os.path.normpath(os.path.join(cwd, arg)) for arg in argv[1:])
    mountpoint = next((p for p in candidates if p in mounts), None)
    memory = proc.info["memory_info"]
    stopped = proc.info["status"] in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
    return DaemonInfo(
        pid=proc.info["pid"],
        mountpoint=mountpoint,
        phys_mem=None,
        rss=memory.rss if memory else 0,
        uptime=max(0.0, time.time() - proc.info["create_time"]),
        log_path=(proc.info["environ"] or {}).get(LOG_ENV),
        state="stopped" if stopped else "running",
    )


def _probed(daemons: list[DaemonInfo]) -> list[DaemonInfo]:
    """phys_mem from each mount's ``dram``, all asked at once (``_probe``); a
    daemon whose mount does not answer in time is ``unresponsive``. A stopped
    daemon's mount is not asked: it could not answer."""
    asked = [info for info in daemons if info.mountpoint and info.state == "running"]
    answers = _probe([os.path.join(info.mountpoint or "", "dram") for info in asked])
    probed = {}
    for info, answer in zip(asked, answers, strict=True):
        if answer is None:
            probed[info.pid] = dataclasses.replace(info, state="unresponsive")
        elif isinstance(answer, os.stat_result):
            probed[info.pid] = dataclasses.replace(info, phys_mem=answer.st_size)
    return [probed.get(info.pid, info) for info in daemons]


def wait_for_exit(daemons: Sequence[int | DaemonInfo], timeout: float = STOP_TIMEOUT) -> bool:
    """Wait until none of ``daemons`` (pids, or ``DaemonInfo``) runs; True if so in time.

    A zombie counts as ended. Then, for each ``DaemonInfo`` with a log, the log
    goes through ``dispose_log``: removed after a clean exit, else kept, with a
    warning that says where it is.
    """
    import psutil

    def running(pid: int) -> bool:
        try:
            zombie: bool = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            return not zombie
        except psutil.NoSuchProcess:
            return False

    pids = [d.pid if isinstance(d, DaemonInfo) else d for d in daemons]
    deadline = time.monotonic() + timeout
    while any(running(pid) for pid in pids):
        if time.monotonic() > deadline:
            break
        time.sleep(_POLL)
    for info in daemons:
        if isinstance(info, DaemonInfo) and info.log_path is not None:
            dispose_log(info.log_path, info.pid, ended=not running(info.pid))
    return not any(running(pid) for pid in pids)


def _exited_cleanly(text: str, pid: int) -> bool:
    lines = text.rstrip("\n").splitlines()
    last = lines[-1] if lines else ""
    return f"mktme-sandbox[{pid}] " in last and last.endswith(_CLEAN_EXIT)


def dispose_log(log_path: str | os.PathLike[str], pid: int, ended: bool = True) -> bool:
    """Remove the log of daemon ``pid`` if it ended cleanly; True if removed.

    Clean: the daemon has ``ended``, its last line is its own ``... unmounted;
    exit status 0`` and no line matches ``LOG_TROUBLE``. Otherwise the log is
    kept and a warning names it.
    """
    try:
        text = Path(log_path).read_text(errors="replace")
    except FileNotFoundError:
        return False
    except OSError as err:
        log.warning("daemon %d: cannot read its log %s: %s", pid, log_path, err.strerror)
        return False
    if not ended:
        why = "is still running"
    elif not _exited_cleanly(text, pid):
        why = "did not exit cleanly"
    elif LOG_TROUBLE.search(text):
        why = "logged a traceback or an error"
    else:
        os.unlink(log_path)
        return True
    log.warning("daemon %d %s; its log is kept at %s", pid, why, log_path)
    return False


def find_daemons(probe: bool = True) -> list[DaemonInfo]:
    """Every running daemon this user can see, by pid.

    A daemon is recognised by its argv (``mktme_sandbox.cli`` or ``mktme-sandbox``,
    then ``mount --foreground``); its mountpoint is the argument that is a
    ``fuse.mktme-sandbox`` mount; its state ``stopped`` when it is stopped
    (SIGSTOP, a debugger), else ``running``. With ``probe``, phys_mem is the
    size of its ``dram``, asked with a timeout (``_probe``): a mount that does
    not answer makes the state ``unresponsive``. Without, no mount is touched.
    """
    import psutil

    mounts = {entry.point for entry in _mounts() if entry.fstype == FSTYPE}
    found = []
    attrs = ["pid", "cmdline", "cwd", "create_time", "memory_info", "status", "environ"]
    for proc in psutil.process_iter(attrs):
        argv = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and _is_daemon_argv(argv):
            found.append(_daemon_info(proc, mounts))
    found.sort(key=lambda daemon: daemon.pid)
    return _probed(found) if probe else found
