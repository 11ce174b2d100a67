"""The life of one sandbox daemon: mount, serve, stop, clean up (docs/spec.md section 5).

A daemon is ``mktme-sandbox mount --foreground MNT [options]``: one process,
one ``Machine``, one FUSE mount served by libfuse's single-threaded loop. It ends
when MNT is unmounted (``mktme-sandbox umount``, ``fusermount3 -u``) or on
SIGTERM, SIGINT or SIGHUP, whose handlers libfuse installs while it serves:
they end the loop and libfuse unmounts before the process exits.

Reusable pieces (the CLI and ``mktme_sandbox.pytest_plugin`` call them):

- ``daemon_argv(mountpoint, **options)``: the argv of a foreground daemon;
- ``canonical_path(path)``: the form in which mountinfo names a mount point;
- ``is_mounted(path)``, ``is_stale(path)``, ``mount_type(path)``: what
  /proc/self/mountinfo says about a path (a stale FUSE mount, whose daemon
  died, answers ENOTCONN "Transport endpoint is not connected");
- ``clean_stale(path)``: unmount such a leftover;
- ``unmount(path, lazy_fallback=True)``: ``fusermount3 -u``, then ``-u -z``;
- ``wait_until_mounted(path, proc, timeout)``: poll until the mount answers;
- ``start_detached(mountpoint, **options)``: spawn a daemon in its own session,
  logging to a file, and wait until it answers (on failure it is stopped,
  reaped and unmounted);
- ``run_foreground(mountpoint, config, allow_other)``: be the daemon;
- ``find_daemons()``: the running daemons, for ``mktme-sandbox list``, each with
  the log ``start_detached`` made for it;
- ``wait_for_exit(daemons, timeout)``: until those daemons have ended; then the
  log of each that exited cleanly is removed, and where a log is kept (the
  daemon failed, or still runs) a warning says where it is.

Logs: ``start_detached`` names the log in the daemon's environment
(``MKTME_SANDBOX_LOG``), so whoever later unmounts the sandbox can find it. A
daemon that ends normally logs ``... unmounted; exit status 0`` as its last line;
a log that ends so and holds only the daemon's own INFO/DEBUG/WARNING records
(``LOG_TROUBLE`` finds anything else: a traceback, an ERROR, a libfuse warning)
is removed, any other is kept.

Left out: running as a different user than the caller, remounting a live
sandbox elsewhere, restoring a machine's state after a crash.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mktme_sandbox.config import MachineConfig

__all__ = [
    "FSTYPE",
    "LOG_ENV",
    "LOG_TROUBLE",
    "DaemonError",
    "DaemonInfo",
    "canonical_path",
    "clean_stale",
    "daemon_argv",
    "dispose_log",
    "find_daemons",
    "is_mounted",
    "is_stale",
    "log_tail",
    "mount_type",
    "prepare_mountpoint",
    "run_foreground",
    "start_detached",
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
LOG_ENV = "MKTME_SANDBOX_LOG"  # the log start_detached made, in the daemon's environment
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


def daemon_argv(mountpoint: str | os.PathLike[str], **options: Any) -> list[str]:
    """The argv that runs a daemon in the foreground at ``mountpoint``.

    ``options`` are the ``mount`` options with underscores: ``phys_mem="64M"``
    or ``phys_mem=64 << 20``, ``seed=1``, ``algorithms=("aes-xts-128",)``,
    ``tme_bypass=True``, ``allow_other=True``. A True flag is passed, False or
    None is left out. The mount command validates the values, so a bad one
    makes the daemon exit at once with the reason in its log.
    """
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


def _mounts() -> Iterator[tuple[str, str]]:
    """(mount point, fstype) of every mount this process can see."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
        for line in info:
            fields = line.split()
            tail = fields.index("-")
            yield _unescape(fields[4]), fields[tail + 1]


def canonical_path(path: str | os.PathLike[str]) -> str:
    """Absolute, with symlinks resolved above the last component (which may be stale)."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def mount_type(path: str | os.PathLike[str]) -> str | None:
    """The fstype of the topmost mount at ``path`` (``fuse.mktme-sandbox`` ...), or None."""
    target = canonical_path(path)
    found = None
    for mountpoint, fstype in _mounts():
        if mountpoint == target:
            found = fstype
    return found


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """True when something, live or stale, is mounted at ``path``.

    Unlike ``os.path.ismount`` this also sees a FUSE mount whose daemon died.
    """
    return mount_type(path) is not None


def is_stale(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a FUSE mount whose daemon is gone (ENOTCONN)."""
    if not is_mounted(path):
        return False
    try:
        os.stat(path)
    except OSError as err:
        return err.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


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


def prepare_mountpoint(mountpoint: str | os.PathLike[str]) -> str:
    """Clean a stale mount, refuse a live sandbox, create the directory; absolute path."""
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
    return path


def _log_dir() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return runtime if runtime and os.access(runtime, os.W_OK) else tempfile.gettempdir()


@dataclass
class _Spawned:
    """A detached child as a pollable: its exit status once it has ended."""

    pid: int
    returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def stop(self, grace: float = STOP_TIMEOUT) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; reaped either way."""
        if self.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.poll() is None and time.monotonic() < deadline:
                time.sleep(_POLL)
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)


def start_detached(
    mountpoint: str | os.PathLike[str], timeout: float = READY_TIMEOUT, **options: Any
) -> tuple[int, str]:
    """Start a daemon in its own session and wait until its mount answers.

    Its output goes to a new log file in $XDG_RUNTIME_DIR (or the temp dir),
    named in its environment as ``MKTME_SANDBOX_LOG``. Returns (pid, log path).
    If the daemon dies or does not answer within ``timeout`` seconds it is
    stopped, reaped and its mount (if it made one meanwhile) removed; then
    ``DaemonError`` is raised with the log's tail, and the log is kept.
    """
    path = canonical_path(mountpoint)
    fd, log_path = tempfile.mkstemp(
        prefix=f"mktme-sandbox-{os.path.basename(path)}-", suffix=".log", dir=_log_dir()
    )
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)  # others may add
    argv = daemon_argv(path, **options)
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, fd, 1),
        (os.POSIX_SPAWN_DUP2, fd, 2),
        (os.POSIX_SPAWN_CLOSE, fd),
    ]
    env = {**os.environ, LOG_ENV: log_path}
    try:
        pid = os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True)
    finally:
        os.close(fd)
    child = _Spawned(pid)
    try:
        wait_until_mounted(path, child, timeout, log_path)
    except DaemonError as err:
        child.stop()
        unmount(path, lazy_fallback=True)
        raise DaemonError(f"{err}\n(daemon {pid} stopped; its log is kept at {log_path})") from None
    return pid, log_path


def run_foreground(
    mountpoint: str | os.PathLike[str], config: MachineConfig, allow_other: bool = False
) -> int:
    """Be the daemon: build the machine, mount, serve until unmounted or signalled."""
    from mktme_sandbox.fs import SandboxFS, serve  # FUSE loads libfuse: only in the daemon
    from mktme_sandbox.machine import Machine

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        # Until libfuse serves, a signal just ends the process (no KeyboardInterrupt
        # traceback); libfuse installs its handlers only over SIG_DFL, and a shell's
        # `&` leaves SIGINT ignored.
        signal.signal(sig, signal.SIG_DFL)
    path = prepare_mountpoint(mountpoint)
    os.chdir("/")  # keep no directory busy
    machine = Machine(config)
    log.info("serving %s as pid %d (phys_mem %#x)", path, os.getpid(), config.phys_mem)
    ended_by_signal = not serve(SandboxFS(machine), path, allow_other)
    log.info("%s unmounted%s%s", path, " on a signal" if ended_by_signal else "", _CLEAN_EXIT)
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
    log_path: str | None = None  # the log start_detached made for it (None: foreground)


def _phys_mem(mountpoint: str) -> int | None:
    try:
        return os.stat(os.path.join(mountpoint, "dram")).st_size
    except OSError:
        return None


def _daemon_info(proc: Any, mounts: set[str]) -> DaemonInfo:
    argv, cwd = proc.info["cmdline"], proc.info["cwd"] or "/"
    candidates = (os.path.normpath(os.path.join(cwd, arg)) for arg in argv[1:])
    mountpoint = next((p for p in candidates if p in mounts), None)
    memory = proc.info["memory_info"]
    return DaemonInfo(
        pid=proc.info["pid"],
        mountpoint=mountpoint,
        phys_mem=_phys_mem(mountpoint) if mountpoint else None,
        rss=memory.rss if memory else 0,
        uptime=max(0.0, time.time() - proc.info["create_time"]),
        log_path=(proc.info["environ"] or {}).get(LOG_ENV),
    )


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


def find_daemons() -> list[DaemonInfo]:
    """Every running daemon this user can see, by pid.

    A daemon is recognised by its argv (``mktme_sandbox.cli`` or ``mktme-sandbox``,
    then ``mount --foreground``); its mountpoint is the argument that is a
    ``fuse.mktme-sandbox`` mount; phys_mem is the size of its ``dram``.
    """
    import psutil

    mounts = {mountpoint for mountpoint, fstype in _mounts() if fstype == FSTYPE}
    found = []
    attrs = ["pid", "cmdline", "cwd", "create_time", "memory_info", "status", "environ"]
    for proc in psutil.process_iter(attrs):
        argv = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and _is_daemon_argv(argv):
            found.append(_daemon_info(proc, mounts))
    return sorted(found, key=lambda daemon: daemon.pid)
